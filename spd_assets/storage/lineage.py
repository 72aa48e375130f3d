"""Data versions of values, and the lineage tables built from what Dagster recorded.

A data version is a fingerprint of a value's content, so the version a step consumed is known
exactly: it is the fingerprint of the input it loaded. Each materialization names, in its
metadata, what it consumed (asset, partition, data version and the run that produced it);
the `materializations` and `lineage_edges` tables are rebuilt from Dagster's event log, which
stays the one source of truth (see `spd_assets.defs.lineage`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

import numpy as np
import polars as pl
import torch

from spd_assets.storage.schemas import TABLE_SCHEMAS

FINGERPRINT_LENGTH = 16
# The lineage tables, in the order `lineage_tables` returns them.
LINEAGE_TABLES = ("materializations", "lineage_edges")


def _parts(value) -> Iterator[bytes]:
    """Length-prefixable byte parts that identify `value`'s content (type names included)."""
    if isinstance(value, torch.Tensor) and value.layout == torch.sparse_csr:
        yield f"sparse_csr{tuple(value.shape)}".encode()
        for part in (value.crow_indices(), value.col_indices(), value.values()):
            yield from _parts(part)
        return
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().contiguous().numpy()
    if isinstance(value, np.ndarray):
        yield f"{value.dtype}{value.shape}".encode()
        yield np.ascontiguousarray(value).tobytes()
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        yield type(value).__name__.encode()
        for field in dataclasses.fields(value):
            yield field.name.encode()
            yield from _parts(getattr(value, field.name))
    elif isinstance(value, Mapping):
        yield b"mapping"
        for key, item in value.items():
            yield str(key).encode()
            yield from _parts(item)
    elif isinstance(value, (list, tuple)) and any(isinstance(item, (torch.Tensor, np.ndarray)) for item in value):
        yield b"sequence"
        for item in value:
            yield from _parts(item)
    else:
        yield json.dumps(value, sort_keys=True, default=repr).encode()


def fingerprint(value) -> str:
    """A short hash of `value`'s content: tensors, arrays, dataclasses, mappings and JSON-able values.

    Examples
    --------
    >>> fingerprint({"a": np.zeros(3)}) == fingerprint({"a": np.zeros(3)})
    True
    >>> fingerprint({"a": np.zeros(3)}) == fingerprint({"a": np.ones(3)})
    False
    """
    digest = hashlib.sha256()
    for part in _parts(value):
        digest.update(len(part).to_bytes(8, "little"))  # length-prefixed: no two part lists hash alike
        digest.update(part)
    return digest.hexdigest()[:FINGERPRINT_LENGTH]


@dataclass(frozen=True)
class Consumed:
    """One input of a materialization: which asset partition, at which data version, made by which run."""

    asset: str
    partition: str | None
    data_version: str
    run_id: str | None = None

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, values: Mapping) -> Consumed:
        return cls(**{field.name: values.get(field.name) for field in dataclasses.fields(cls)})


@dataclass(frozen=True)
class MaterializationRecord:
    """What Dagster recorded of one materialization of an experiment's value asset."""

    experiment: str
    asset: str
    partition: str | None
    run_id: str
    step_key: str | None
    materialized_at: datetime
    code_version: str | None
    data_version: str | None
    config_hash: str | None
    storage_path: str | None
    metadata: Mapping[str, object]
    consumed: Sequence[Consumed]


def lineage_tables(records: Iterable[MaterializationRecord]) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The `materializations` and `lineage_edges` rows of `records`."""
    materializations, edges = [], []
    for record in records:
        materializations.append({
            "experiment": record.experiment, "asset": record.asset, "partition": record.partition,
            "run_id": record.run_id, "step_key": record.step_key, "materialized_at": record.materialized_at,
            "code_version": record.code_version, "data_version": record.data_version,
            "config_hash": record.config_hash, "storage_path": record.storage_path,
            "metadata_json": json.dumps(dict(record.metadata), default=str, sort_keys=True),
        })
        edges.extend({
            "experiment": record.experiment, "asset": record.asset, "partition": record.partition,
            "run_id": record.run_id, "step_key": record.step_key, "data_version": record.data_version,
            "upstream_asset": item.asset, "upstream_partition": item.partition,
            "upstream_data_version": item.data_version, "upstream_run_id": item.run_id,
        } for item in record.consumed)
    return (_frame("materializations", materializations), _frame("lineage_edges", edges))


def _frame(table: str, rows: list[dict]) -> pl.DataFrame:
    schema = TABLE_SCHEMAS[table]
    return schema.conform(pl.DataFrame(rows, schema=schema.dtypes)) if rows else schema.empty()
