"""An experiment's results as the original research pipeline writes them, and as the SPD app loads them.

The original pipeline (`spd-clustering`) keeps everything under its output folder `SPD_OUT_DIR`:

    clustering/
      ensemble_registry.db                  SQLite: ensemble_runs(pipeline_run_id, idx, clustering_run_id)
      runs/<clustering_run_id>/
        clustering_run_config.json          the run's config (dataset_seed already offset by its index)
        history.zip                         its merge history (`storage.history_format`)
      ensembles/<pipeline_run_id>/
        pipeline_config.yaml                the pipeline config
        clustering_run_config.json          the base run config the pipeline config points at
        ensemble_meta.json                  what `MergeHistoryEnsemble.normalized()` returns besides the array
        ensemble_merge_array.npz            `merge_array`: int16 [n_runs, n_iterations, n_components]
        distances_<method>.npz              `distances`: [n_iterations, n_runs, n_runs], NaN where not computed
        plots/distances_<method>.png        the distances of every member pair against iteration

`write_original_ensemble` writes that tree for one ensemble, so that the original's scripts
(`get_cluster_mapping`, `calc_distances`) and readers (`MergeHistory.read`) work on it unchanged.
The ensemble array follows the original's own rule, not spd_math's: a label a member lacks gets
the group id `n_member_labels + k`, the k-th missing label (in sorted order; the original takes
them in the iteration order of a Python set, which depends on string hashing, so only those
ids may differ from a run of the original, never the partitions). The distances carry the
original's layout: `perm_invariant_hamming` float64 filled below the diagonal,
`matching_dist` float32 filled above it, NaN elsewhere; `matching_dist_vec` float32, full,
counting each pair twice.

`cluster_mapping_file` makes the JSON the SPD app loads (`ClusterMappingFile`) from one member
at one iteration (as `get_cluster_mapping` does) or from the consensus clusters.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import sqlite3
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from spd_assets.errors import ExportError
from spd_assets.storage.atomic import atomic_path
from spd_assets.storage.figures import png_bytes
from spd_assets.storage.history_format import PARTITION_BLOCK_IDS, dense_bytes, write_history_zip
from spd_math import MergeConfig, MergeHistory
from spd_math.ensemble import ensemble_metadata

CLUSTERING = "clustering"
REGISTRY_DB = "ensemble_registry.db"
RUN_CONFIG = "clustering_run_config.json"
HISTORY = "history.zip"
PIPELINE_CONFIG = "pipeline_config.yaml"
ENSEMBLE_META = "ensemble_meta.json"
ENSEMBLE_ARRAY = "ensemble_merge_array.npz"

# The original's clustering run config: defaults of the keys it has that spd-cluster does not use.
LOGGING_INTERVALS = {"stat": 1, "tensor": 100, "plot": 100, "artifact": 100}
WANDB_ENTITY = "goodfire"

# The original's wandb run references (spd.utils.wandb_utils.parse_wandb_run_path).
_RUN_ID = r"(?:[a-z0-9]-)?[a-z0-9]{8}"
_WANDB_FORMS = (
    re.compile(rf"^([^/\s]+)/([^/\s]+)/({_RUN_ID})$"),
    re.compile(rf"^([^/\s]+)/([^/\s]+)/runs/({_RUN_ID})$"),
    re.compile(rf"^https://wandb\.ai/([^/]+)/([^/]+)/runs/({_RUN_ID})(?:/[^?]*)?(?:\?.*)?$"),
)
# The original's distance layouts: which triangle holds the values, and the dtype.
_DISTANCE_LAYOUT = {
    "perm_invariant_hamming": ("lower", np.float64),
    "matching_dist": ("upper", np.float32),
    "matching_dist_vec": ("full", np.float32),
}


def spd_run_of(model_path: str | None) -> str | None:
    """`entity/project/run_id` of a wandb run reference in any form the original accepts, else None.

    Examples
    --------
    >>> spd_run_of("wandb:goodfire/spd/runs/0d2lld8j")
    'goodfire/spd/0d2lld8j'
    >>> spd_run_of("./runs/local") is None
    True
    """
    if model_path is None:
        return None
    text = model_path.strip().removeprefix("wandb:")
    for form in _WANDB_FORMS:
        match = form.match(text)
        if match:
            return "/".join(match.groups())
    return None


# Why a source names no wandb SPD run, by source kind (when it names no model at all).
_NO_SPD_MODEL = {
    "synthetic": "its synthetic source generates activations without an SPD model",
    "files": "its files source reads activations from files that name no SPD model",
    "torch": "its torch source runs a torch model, not an SPD run on wandb",
    "histories": f"its histories' run configs ({RUN_CONFIG} beside each history) name no model_path",
    "spd": "its spd source's experiment_key could not be resolved to a model_path (that needs the spd package)",
}


def no_spd_run_reason(kind: str, model_path: str | None) -> str:
    """Why an experiment whose source is of `kind`, with model `model_path` (None: none), names no wandb SPD run.

    Examples
    --------
    >>> no_spd_run_reason("spd", "/runs/local/model_100.pth")
    "its spd source's model '/runs/local/model_100.pth' is not a wandb run"
    """
    if model_path is not None:
        return f"its {kind} source's model {model_path!r} is not a wandb run"
    return _NO_SPD_MODEL.get(kind, f"its {kind} source names no SPD model")


def ensemble_id_for(experiment: str, config_hash: str) -> str:
    """The pipeline run id of an experiment's export: `e-` and 8 hex digits, as the original's, but stable, so that
    exporting the same results again replaces the same folder."""
    return "e-" + hashlib.sha256(f"{experiment}:{config_hash}".encode()).hexdigest()[:8]


def run_id_for(ensemble_id: str, member: str) -> str:
    """A member's clustering run id: `c-` and 8 hex digits, stable for the ensemble and member."""
    return "c-" + hashlib.sha256(f"{ensemble_id}:{member}".encode()).hexdigest()[:8]


def _union_labels(histories: Sequence[MergeHistory]) -> list[str]:
    if not histories:
        raise ExportError("an ensemble export needs at least one member history, got none")
    return sorted({label for history in histories for label in history.labels})


def _merge_array_dtype(n_labels: int) -> type[np.integer]:
    return np.int16 if n_labels <= np.iinfo(np.int16).max else np.int32


class _MemberPlacement:
    """Where one member's components sit among the union's labels, and the ids its missing labels get."""

    def __init__(self, history: MergeHistory, labels: Sequence[str], position: Mapping[str, int]) -> None:
        self.history = history
        self.columns = np.fromiter((position[label] for label in history.labels), dtype=np.int64,
                                   count=len(history.labels))
        self.missing = np.setdiff1d(np.arange(len(labels)), self.columns)  # sorted, so in label order
        self.width = len(labels)

    def rows(self, start: int, stop: int, dtype) -> np.ndarray:
        """`[stop - start, labels]` ids after iterations start .. stop - 1, in the original's numbering."""
        out = np.empty((stop - start, self.width), dtype=dtype)
        out[:, self.columns] = self.history.dense_group_idxs(start, stop).astype(dtype)
        out[:, self.missing] = (len(self.history.labels) + np.arange(self.missing.size)).astype(dtype)
        return out


def _placements(histories: Sequence[MergeHistory]) -> tuple[list[_MemberPlacement], list[str]]:
    labels = _union_labels(histories)
    position = {label: x for x, label in enumerate(labels)}
    return [_MemberPlacement(history, labels, position) for history in histories], labels


def original_merge_array(histories: Sequence[MergeHistory]) -> tuple[np.ndarray, list[str]]:
    """The original's `MergeHistoryEnsemble.normalized()` array and labels of `histories`, as one array (members x
    iterations x labels: `write_original_ensemble` streams it instead).

    Labels are the sorted union; iterations those every member completed; a member's missing
    labels get ids `n_member_labels + k` (k-th missing label in sorted order). int16 like the
    original, int32 when ids do not fit.
    """
    placements, labels = _placements(histories)
    n_iters = min(history.n_iters for history in histories)
    dtype = _merge_array_dtype(len(labels))
    return np.stack([placement.rows(0, n_iters, dtype) for placement in placements]), labels


def original_member_row(histories: Sequence[MergeHistory], run_idx: int, iteration: int) -> tuple[np.ndarray, list[str]]:
    """One member's row of `original_merge_array` (its ids after `iteration`) and the labels, without the rest."""
    placements, labels = _placements(histories)
    n_iters = min(history.n_iters for history in histories)
    if not 0 <= run_idx < len(placements):
        raise ExportError(f"run index {run_idx} is out of range; the ensemble has runs 0..{len(placements) - 1}")
    if not 0 <= iteration < n_iters:
        raise ExportError(f"iteration {iteration} is out of range; the ensemble has iterations 0..{n_iters - 1}")
    return placements[run_idx].rows(iteration, iteration + 1, _merge_array_dtype(len(labels)))[0], labels


def original_folder_bytes(histories: Sequence[MergeHistory]) -> dict[str, int]:
    """What the original's folder of `histories` holds, uncompressed, in bytes: every history's partitions (`runs`)
    and the ensemble array (`ensemble`, written compressed)."""
    labels = _union_labels(histories)
    n_iters = min(history.n_iters for history in histories)
    return {"runs": sum(dense_bytes(history) for history in histories),
            "ensemble": len(histories) * n_iters * len(labels) * np.dtype(_merge_array_dtype(len(labels))).itemsize}


def _write_merge_array(path: Path, histories: Sequence[MergeHistory]) -> None:
    """`ensemble_merge_array.npz` as `np.savez_compressed(merge_array=original_merge_array(...))` writes it, streamed
    a block of iterations of one member at a time."""
    placements, labels = _placements(histories)
    n_iters = min(history.n_iters for history in histories)
    dtype = _merge_array_dtype(len(labels))
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
              "shape": (len(placements), n_iters, len(labels))}
    block = max(1, PARTITION_BLOCK_IDS // max(len(labels), 1))
    with atomic_path(path) as temporary, zipfile.ZipFile(temporary, "w", zipfile.ZIP_DEFLATED, allowZip64=True) as archive:
        with archive.open("merge_array.npy", "w", force_zip64=True) as entry:
            np.lib.format.write_array_header_1_0(entry, header)
            for placement in placements:
                for start in range(0, n_iters, block):
                    entry.write(placement.rows(start, min(start + block, n_iters), dtype).tobytes())


def original_distances(distances: torch.Tensor | np.ndarray, method: str) -> np.ndarray:
    """spd_math's symmetric `[n_iters, n, n]` distances in the layout the original's `compute_distances` gives.

    `matching_dist_vec` is the original's vectorised matching distance, which counts each pair of
    components twice: twice spd_math's `matching_dist`.
    """
    if method not in _DISTANCE_LAYOUT:
        raise ExportError(f"distance method {method!r} has no original counterpart; expected one of {list(_DISTANCE_LAYOUT)}")
    triangle, dtype = _DISTANCE_LAYOUT[method]
    values = np.asarray(distances.numpy() if isinstance(distances, torch.Tensor) else distances).astype(dtype)
    n = values.shape[-1]
    if triangle == "full":
        return values * dtype(2)
    keep = np.tril(np.ones((n, n), dtype=bool), -1) if triangle == "lower" else np.triu(np.ones((n, n), dtype=bool), 1)
    return np.where(keep, values, np.nan).astype(dtype)


@dataclass(frozen=True)
class EnsembleExport:
    """What one ensemble export is made of: members in ensemble order with their histories and dataset seeds, the
    distances by method (spd_math's symmetric matrices), and the run config values the original records."""

    experiment: str
    ensemble_id: str
    members: list[str]
    histories: list[MergeHistory]
    distances: Mapping[str, torch.Tensor]
    merge_config: MergeConfig
    model_path: str
    batch_size: int | None
    dataset_seeds: list[int]
    notes: dict[str, Any] = field(default_factory=dict)
    run_ids: list[str] | None = None  # each member's clustering run id; default `run_id_for` the ensemble and member


@dataclass(frozen=True)
class OriginalFolder:
    """Where an export was written: the output root (the original's `SPD_OUT_DIR`), the ensemble folder, each
    member's run folder (ensemble order) and the registry."""

    root: Path
    ensemble_dir: Path
    run_dirs: list[Path]
    registry: Path


def write_original_ensemble(export: EnsembleExport, out: str | os.PathLike[str]) -> OriginalFolder:
    """Write `export` under `out` as the original pipeline lays out an ensemble (see the module docstring).

    Earlier exports of the same ensemble are replaced (same ids); other ensembles and runs under
    `out`, and their registry rows, are left as they are.
    """
    run_ids = export.run_ids if export.run_ids is not None else [run_id_for(export.ensemble_id, member)
                                                                 for member in export.members]
    if not len(export.histories) == len(export.dataset_seeds) == len(run_ids) == len(export.members):
        raise ExportError(f"{len(export.members)} members, {len(export.histories)} histories, "
                          f"{len(export.dataset_seeds)} dataset seeds and {len(run_ids)} run ids: expected one of "
                          "each per member")
    if len(set(run_ids)) != len(run_ids):
        raise ExportError(f"run ids {run_ids}: expected a different run id for each member")
    configs = {json.dumps(history.config.to_dict() if history.config else None, sort_keys=True)
               for history in export.histories}
    if len(configs) > 1:
        raise ExportError(f"the members' histories were merged with {len(configs)} different merge configs; the "
                          "original's ensemble (MergeHistoryEnsemble) requires one")
    root = Path(out).resolve()
    clustering = root / CLUSTERING
    ensemble_dir = clustering / "ensembles" / export.ensemble_id
    (ensemble_dir / "plots").mkdir(parents=True, exist_ok=True)
    merge_config = export.histories[0].config or export.merge_config

    run_dirs = []
    history_paths = []
    for idx, (run_id, history, seed) in enumerate(zip(run_ids, export.histories, export.dataset_seeds)):
        run_dir = clustering / "runs" / run_id
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_text(run_dir / RUN_CONFIG, json.dumps(
            _run_config(export, merge_config, seed, export.ensemble_id), indent=2, ensure_ascii=False))
        write_history_zip(history, run_dir / HISTORY)
        run_dirs.append(run_dir)
        history_paths.append(run_dir / HISTORY)

    base_config = ensemble_dir / RUN_CONFIG
    _write_text(base_config, json.dumps(_run_config(export, merge_config, export.dataset_seeds[0], None),
                                        indent=2, ensure_ascii=False))
    _write_text(ensemble_dir / PIPELINE_CONFIG, yaml.dump(_pipeline_config(export, base_config)))

    meta = ensemble_metadata(export.histories, _union_labels(export.histories), origin_paths=history_paths)
    if meta["config"] is None:  # histories that record no merge config: the experiment's
        meta["config"] = merge_config.to_dict()
    _write_text(ensemble_dir / ENSEMBLE_META, json.dumps(meta, indent=2))
    _write_merge_array(ensemble_dir / ENSEMBLE_ARRAY, export.histories)
    for method, distances in export.distances.items():
        values = original_distances(distances, method)
        _write_npz(ensemble_dir / f"distances_{method}.npz", distances=values)
        with atomic_path(ensemble_dir / "plots" / f"distances_{method}.png") as temporary:
            Path(temporary).write_bytes(distances_plot(values, method))

    registry = clustering / REGISTRY_DB
    register_ensemble(registry, export.ensemble_id, run_ids)
    return OriginalFolder(root, ensemble_dir, run_dirs, registry)


def _run_config(export: EnsembleExport, merge_config: MergeConfig, dataset_seed: int,
                ensemble_id: str | None) -> dict[str, Any]:
    """The original's `ClusteringRunConfig`, keys in its field order."""
    return {
        "model_path": export.model_path,
        "batch_size": export.batch_size,
        "dataset_seed": dataset_seed,
        "ensemble_id": ensemble_id,
        "merge_config": merge_config.to_dict(),
        "logging_intervals": dict(LOGGING_INTERVALS),
        "wandb_project": None,
        "wandb_entity": WANDB_ENTITY,
        "dataset_streaming": False,
    }


def _pipeline_config(export: EnsembleExport, base_config: Path) -> dict[str, Any]:
    """The original's `ClusteringPipelineConfig`. Its `clustering_run_config_path` is absolute: the original joins
    it to its repository root, which leaves an absolute path as it is."""
    return {
        "clustering_run_config_path": str(base_config),
        "n_runs": len(export.members),
        "distances_methods": list(export.distances),
        "slurm_job_name_prefix": None,
        "slurm_partition": None,
        "wandb_project": None,
        "wandb_entity": WANDB_ENTITY,
        "create_git_snapshot": False,
    }


def register_ensemble(registry: Path, ensemble_id: str, run_ids: Sequence[str]) -> None:
    """The ensemble's rows in the original's registry (its schema; rows of other ensembles are kept)."""
    registry.parent.mkdir(parents=True, exist_ok=True)
    connection = sqlite3.connect(registry)
    try:
        with connection:
            connection.execute("""
                CREATE TABLE IF NOT EXISTS ensemble_runs (
                    pipeline_run_id TEXT NOT NULL,
                    idx INTEGER NOT NULL,
                    clustering_run_id TEXT NOT NULL,
                    PRIMARY KEY (pipeline_run_id, idx)
                )
            """)
            connection.execute("CREATE INDEX IF NOT EXISTS idx_pipeline_run_id ON ensemble_runs (pipeline_run_id)")
            connection.execute("DELETE FROM ensemble_runs WHERE pipeline_run_id = ?", (ensemble_id,))
            connection.executemany(
                "INSERT INTO ensemble_runs (pipeline_run_id, idx, clustering_run_id) VALUES (?, ?, ?)",
                [(ensemble_id, idx, run_id) for idx, run_id in enumerate(run_ids)])
    finally:
        connection.close()


def distances_plot(distances: np.ndarray, method: str) -> bytes:
    """PNG of every member pair's distance against iteration (the original's points plot, symlog y axis)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    n_iters, n_ens, _ = distances.shape
    flat = distances.reshape(n_iters, -1)
    figure, axes = plt.subplots(1, 1, figsize=(8, 5))
    iterations = np.repeat(np.arange(n_iters), flat.shape[1])
    axes.plot(iterations, flat.reshape(-1), marker="o", linestyle="", color="blue",
              alpha=min(1.0, 10 / (n_ens * n_ens)), markersize=5, markeredgewidth=0, label=f"{method} distances")
    axes.set_yscale("symlog", linthresh=1.0)
    axes.set_xlabel("Iteration #")
    axes.set_ylabel("distance")
    axes.set_title(f"Distance Distribution ({method})")
    axes.legend()
    png = png_bytes(figure)
    plt.close(figure)
    return png


def member_clusters(merges: np.ndarray, labels: Sequence[str], run_idx: int, iteration: int) -> dict[str, int | None]:
    """Label -> group id of one member after `iteration` in the original's ensemble array, None for a group of one
    (the original's `get_cluster_mapping`)."""
    n_runs, n_iters, _ = merges.shape
    if not 0 <= run_idx < n_runs:
        raise ExportError(f"run index {run_idx} is out of range; the ensemble has runs 0..{n_runs - 1}")
    if not 0 <= iteration < n_iters:
        raise ExportError(f"iteration {iteration} is out of range; the ensemble has iterations 0..{n_iters - 1}")
    return row_clusters(merges[run_idx, iteration], labels)


def row_clusters(assignments: np.ndarray, labels: Sequence[str]) -> dict[str, int | None]:
    """Label -> group id of one row of the original's ensemble array (`original_member_row`), None for a group of
    one (the original's `get_cluster_mapping`)."""
    ids, counts = np.unique(assignments, return_counts=True)
    singletons = set(ids[counts == 1].tolist())
    return {label: None if int(group) in singletons else int(group) for label, group in zip(labels, assignments)}


def consensus_clusters_mapping(labels: Sequence[str], cluster_of: np.ndarray) -> dict[str, int | None]:
    """Label -> consensus cluster, None for a component in no cluster of two or more."""
    sizes = np.bincount(cluster_of[cluster_of >= 0], minlength=int(cluster_of.max(initial=-1)) + 1)
    return {label: int(cluster) if cluster >= 0 and sizes[cluster] > 1 else None
            for label, cluster in zip(labels, cluster_of)}


def cluster_mapping_file(*, ensemble_id: str, notes: str, spd_run: str, n_iterations: int, run_idx: int,
                         clusters: Mapping[str, int | None]) -> dict[str, Any]:
    """The SPD app's `ClusterMappingFile`, keys in the order `get_cluster_mapping` writes them."""
    if spd_run_of(spd_run) != spd_run:
        raise ExportError(f"spd_run {spd_run!r} is not a wandb run as the SPD app names it; expected "
                          "'<entity>/<project>/<run_id>' (e.g. goodfire/spd/0d2lld8j)")
    return {"ensemble_id": ensemble_id, "notes": notes, "spd_run": spd_run, "n_iterations": int(n_iterations),
            "run_idx": int(run_idx), "clusters": dict(clusters)}


def write_json(path: str | os.PathLike[str], values: Any) -> Path:
    """`values` as indented JSON at `path` (atomically), as the original writes its mapping files."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_text(path, json.dumps(values, indent=2))
    return path


def _write_text(path: Path, text: str) -> None:
    with atomic_path(path) as temporary:
        Path(temporary).write_text(text)


def _write_npz(path: Path, **arrays: np.ndarray) -> None:
    # Through a buffer: np.savez_compressed on a path appends ".npz" to names lacking it (atomic temporaries do).
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    with atomic_path(path) as temporary:
        Path(temporary).write_bytes(buffer.getvalue())


def consensus_mapping_file(*, experiment: str, config_hash: str, spd_run: str, iteration: int, rule: str,
                           threshold: float, n_members: int, labels: Sequence[str], cluster_of: np.ndarray,
                           notes: str | None = None, ensemble_id: str | None = None) -> dict[str, Any]:
    """The SPD app's mapping of an experiment's consensus clusters. No single run made them, so `run_idx` is -1 and
    the notes say how they were taken (unless `notes` is given); `ensemble_id` is the id its ensemble is exported
    under (default: `ensemble_id_for` the experiment and config)."""
    if notes is None:
        notes = (f"spd-cluster consensus clusters of experiment {experiment!r}: components together in at least "
                 f"{threshold:g} of {n_members} members after iteration {iteration} ({rule})")
    return cluster_mapping_file(ensemble_id=ensemble_id or ensemble_id_for(experiment, config_hash), notes=notes,
                                spd_run=spd_run, n_iterations=iteration, run_idx=-1,
                                clusters=consensus_clusters_mapping(labels, cluster_of))
