"""Where results live under DAGSTER_HOME, and how arrays and tables are written there (atomically).

    $DAGSTER_HOME/
      spd_cluster.duckdb                       views over the tables (see `database`)
      spd_cluster/
        experiments/<experiment>.yaml          registered experiment configs
        <experiment>/component_activations/<member>.npz
        <experiment>/merge_history/<member>.zip          (the original research format)
        <experiment>/normalized_ensemble.npz
        <experiment>/distance_matrices.npz
        tables/<table>/<experiment>__<part>.parquet      one file per experiment and partition
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch

from spd_assets.atomic import atomic_path
from spd_math import NormalizedEnsemble, ProcessedActivations

PROJECT_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = "spd_cluster"
DATABASE_FILE = "spd_cluster.duckdb"
# Partition part of a table file name for assets that are not partitioned.
WHOLE_EXPERIMENT = "all"


class StorageError(RuntimeError):
    """A stored result is missing or unreadable; the message names the file."""


def dagster_home() -> Path:
    """`$DAGSTER_HOME`, else the project's `dagster_home/` (where `dagster.yaml` is committed)."""
    configured = os.environ.get("DAGSTER_HOME")
    if configured:
        return Path(configured).resolve()
    bundled = PROJECT_ROOT / "dagster_home"
    return bundled if (bundled / "dagster.yaml").exists() else Path.cwd() / "dagster_home"


def results_root(home: Path | None = None) -> Path:
    return (home or dagster_home()) / RESULTS_DIR


def database_path(home: Path | None = None) -> Path:
    return (home or dagster_home()) / DATABASE_FILE


def experiments_dir(home: Path | None = None) -> Path:
    return results_root(home) / "experiments"


def tables_dir(home: Path | None = None) -> Path:
    return results_root(home) / "tables"


def table_file(table: str, experiment: str, part: str = WHOLE_EXPERIMENT, home: Path | None = None) -> Path:
    return tables_dir(home) / table / f"{experiment}__{part}.parquet"


def write_table(frame: pl.DataFrame, table: str, experiment: str, part: str = WHOLE_EXPERIMENT, home: Path | None = None) -> Path:
    """Write (or replace) one experiment partition's rows of a table; readers never see half a file."""
    path = table_file(table, experiment, part, home)
    with atomic_path(path) as temporary:
        frame.write_parquet(temporary)
    return path


# --- arrays ---------------------------------------------------------------------------------------


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    with atomic_path(path) as temporary, open(temporary, "wb") as handle:
        np.savez(handle, **arrays)


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except FileNotFoundError:
        raise StorageError(f"{path} does not exist (was the upstream asset materialized?)") from None
    except (OSError, ValueError) as error:
        raise StorageError(f"{path} is unreadable: {error}") from None


def save_activations(path: Path, activations: ProcessedActivations) -> None:
    """Sparse (CSR) float32: causal importances are mostly exactly zero."""
    dense = activations.activations.detach().cpu().numpy()
    rows, columns = np.nonzero(dense)
    indptr = np.zeros(dense.shape[0] + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=dense.shape[0]), out=indptr[1:])
    _save_npz(
        path,
        shape=np.array(dense.shape, dtype=np.int64),
        indptr=indptr,
        indices=columns.astype(np.int32),
        values=dense[rows, columns].astype(np.float32),
        labels=np.array(activations.labels, dtype=str),
        dead_labels=np.array(activations.dead_labels, dtype=str),
    )


def load_activations(path: Path) -> ProcessedActivations:
    data = _load_npz(path)
    n, c = (int(v) for v in data["shape"])
    dense = np.zeros((n, c), dtype=np.float32)
    rows = np.repeat(np.arange(n), np.diff(data["indptr"]))
    dense[rows, data["indices"]] = data["values"]
    return ProcessedActivations(
        activations=torch.from_numpy(dense),
        labels=data["labels"].tolist(),
        dead_labels=data["dead_labels"].tolist(),
    )


@dataclass(frozen=True)
class MemberEnsemble:
    """A normalized ensemble with the partition key of each member (in ensemble order) and those missing."""

    ensemble: NormalizedEnsemble
    members: list[str]
    missing: list[str]


@dataclass(frozen=True)
class EnsembleDistances:
    """`[n_iters, n_ens, n_ens]` distances per method, members in ensemble order."""

    by_method: dict[str, torch.Tensor]
    members: list[str]


def save_ensemble(path: Path, value: MemberEnsemble) -> None:
    _save_npz(
        path,
        merges=value.ensemble.merges.numpy(),
        labels=np.array(value.ensemble.labels, dtype=str),
        present=value.ensemble.present.numpy(),
        members=np.array(value.members, dtype=str),
        missing=np.array(value.missing, dtype=str),
    )


def load_ensemble(path: Path) -> MemberEnsemble:
    data = _load_npz(path)
    ensemble = NormalizedEnsemble(
        merges=torch.from_numpy(data["merges"]),
        labels=data["labels"].tolist(),
        present=torch.from_numpy(data["present"]),
    )
    return MemberEnsemble(ensemble=ensemble, members=data["members"].tolist(), missing=data["missing"].tolist())


def save_distances(path: Path, value: EnsembleDistances) -> None:
    arrays = {f"method__{method}": distances.numpy() for method, distances in value.by_method.items()}
    _save_npz(path, members=np.array(value.members, dtype=str), **arrays)


def load_distances(path: Path) -> EnsembleDistances:
    data = _load_npz(path)
    by_method = {key.removeprefix("method__"): torch.from_numpy(v) for key, v in data.items() if key.startswith("method__")}
    return EnsembleDistances(by_method=by_method, members=data["members"].tolist())
