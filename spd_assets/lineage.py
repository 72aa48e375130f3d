"""Data versions and lineage rows, written by each step as it materializes.

A data version is a fingerprint of the value's content, so the version a step consumed is
known exactly: it is the fingerprint of the input it loaded. Each materialization writes one
row to `materializations` and one row per consumed input to `lineage_edges`, each in a Parquet
file of its own, so history is kept and concurrent steps never touch the same file.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import singledispatch

import numpy as np
import polars as pl
import torch

from spd_assets.database import TABLE_SCHEMAS
from spd_assets.storage import EnsembleDistances, MemberEnsemble, write_table
from spd_math import MergeHistory, ProcessedActivations

FINGERPRINT_LENGTH = 16


def _digest(parts: Iterable[bytes | str]) -> str:
    digest = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        digest.update(len(data).to_bytes(8, "little"))  # length-prefixed: no two part lists hash alike
        digest.update(data)
    return digest.hexdigest()[:FINGERPRINT_LENGTH]


def _tensor_bytes(tensor: torch.Tensor | None) -> bytes:
    if tensor is None:
        return b"none"
    array = tensor.detach().cpu().contiguous().numpy()
    return f"{array.dtype}{array.shape}".encode() + array.tobytes()


@singledispatch
def fingerprint(value) -> str:
    raise TypeError(f"no fingerprint for {type(value).__name__}")


@fingerprint.register
def _(value: ProcessedActivations) -> str:
    return _digest([json.dumps(value.labels), json.dumps(value.dead_labels), _tensor_bytes(value.activations)])


@fingerprint.register
def _(value: MergeHistory) -> str:
    return _digest([json.dumps(value.labels), _tensor_bytes(value.group_idxs), _tensor_bytes(value.selected_pairs),
                    _tensor_bytes(value.pair_costs), _tensor_bytes(value.mdl_losses)])


@fingerprint.register
def _(value: MemberEnsemble) -> str:
    return _digest([json.dumps([value.members, value.missing, value.ensemble.labels]), _tensor_bytes(value.ensemble.merges)])


@fingerprint.register
def _(value: EnsembleDistances) -> str:
    return _digest([json.dumps(value.members), *(part for method in sorted(value.by_method)
                                                   for part in (method, _tensor_bytes(value.by_method[method])))])


@fingerprint.register
def _(value: dict) -> str:
    """A raw batch: module name -> tensor, in order."""
    return _digest([part for name, tensor in value.items() for part in (name, _tensor_bytes(torch.as_tensor(tensor)))])


@dataclass(frozen=True)
class Consumed:
    """One input of a materialization: which asset partition, at which data version."""

    asset: str
    partition: str | None
    data_version: str


def _jsonable(value):
    if isinstance(value, (np.generic,)):
        return value.item()
    return getattr(value, "value", value)  # Dagster MetadataValue -> its plain value


def record_materialization(
    *,
    experiment: str,
    asset: str,
    partition: str | None,
    run_id: str,
    step_key: str,
    code_version: str,
    data_version: str,
    config_hash: str,
    storage_path: str,
    metadata: dict,
    consumed: list[Consumed],
) -> None:
    materialized_at = datetime.now(timezone.utc)
    part = f"{asset}.{partition or 'all'}.{run_id}.{time.time_ns()}"
    row = {
        "experiment": experiment, "asset": asset, "partition": partition, "run_id": run_id, "step_key": step_key,
        "materialized_at": materialized_at, "code_version": code_version, "data_version": data_version,
        "config_hash": config_hash, "storage_path": storage_path,
        "metadata_json": json.dumps({key: _jsonable(value) for key, value in metadata.items()}, default=str),
    }
    write_table(pl.DataFrame([row], schema=TABLE_SCHEMAS["materializations"]), "materializations", experiment, part)
    edges = [
        {"experiment": experiment, "asset": asset, "partition": partition, "run_id": run_id, "data_version": data_version,
         "upstream_asset": item.asset, "upstream_partition": item.partition, "upstream_data_version": item.data_version}
        for item in consumed
    ]
    write_table(pl.DataFrame(edges, schema=TABLE_SCHEMAS["lineage_edges"]), "lineage_edges", experiment, part)
