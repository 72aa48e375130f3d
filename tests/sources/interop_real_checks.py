"""Run inside an environment with the real `spd` package: the original's own code on our files, and our reader on
files the original's code writes. `test_interop_real.py` asserts on the JSON printed.

    python interop_real_checks.py make-histories OUT_DIR ACTIVATIONS.npz      (HEAD or September 2025 spd)
    python interop_real_checks.py check-export SPD_OUT_DIR ENSEMBLE_ID MAPPING.json CONSENSUS.json

`make-histories` merges each member's activations with the spd on the path (HEAD writes
`OUT_DIR/<member>/history.zip`, September 2025 `OUT_DIR/<member>/merge_history.zip`) and records,
with that version's own `GroupMerge.merge_groups`, the partition after every merge.
`check-export` reads an exported folder with the original's `MergeHistory.read`,
`MergeHistoryEnsemble.normalized()`, `compute_distances`, `get_cluster_mapping`,
`ClusterMappingFile` and finally its `calc_distances` script (through the registry).
spd is imported only when this runs (test collection imports every module of the folder).
"""

from __future__ import annotations

import json
import random
import signal
import sys
from pathlib import Path

import numpy as np
import torch


def make_histories(out: Path, activations_file: Path) -> dict:
    from spd.clustering.merge import merge_iteration
    from spd.clustering.merge_config import MergeConfig

    september = "pop_component_prob" in MergeConfig.model_fields
    config = MergeConfig(activation_threshold=0.1, alpha=1.0, iters=15, merge_pair_sampling_method="range",
                         merge_pair_sampling_kwargs={"threshold": 0.05}, filter_dead_threshold=0.001)
    found = {"september": september, "members": {}}
    with np.load(activations_file) as stored:
        arrays = {name: stored[name] for name in stored.files}
    members = sorted({name.split("/")[0] for name in arrays})
    for member in members:
        labels = [str(label) for label in arrays[f"{member}/labels"]]
        activations = torch.from_numpy(arrays[f"{member}/activations"])
        random.seed(7)
        torch.manual_seed(7)
        if september:
            history = merge_iteration(activations=activations, merge_config=config, component_labels=labels)
        else:
            history = merge_iteration(merge_config=config, activations=activations, component_labels=labels)
        folder = out / member
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / ("merge_history.zip" if september else "history.zip")
        history.save(path)
        n = history.n_iters_current
        rows = history.merges.group_idxs[:n]
        if september:  # its rows are before each merge: merge each row's pair with this version's own code
            from spd.clustering.math.merge_matrix import GroupMerge

            after = [GroupMerge(group_idxs=rows[i].clone(), k_groups=int(history.merges.k_groups[i]))
                     .merge_groups(*[int(x) for x in history.selected_pairs[i]]).group_idxs for i in range(n)]
            rows = torch.stack(after)
        np.save(folder / "after_each_merge.npy", rows.numpy().astype(np.int64))
        found["members"][member] = {"n_iters": n, "path": str(path)}
    return found


def check_export(root: Path, ensemble_id: str, mapping_file: Path, consensus_file: Path) -> dict:
    import os

    os.environ["SPD_OUT_DIR"] = str(root)
    ClusterMappingFile = _app_cluster_mapping_file()
    from spd.clustering.ensemble_registry import get_clustering_runs
    from spd.clustering.math.merge_distances import compute_distances
    from spd.clustering.merge_history import MergeHistory, MergeHistoryEnsemble
    from spd.clustering.scripts import calc_distances, get_cluster_mapping

    from spd_assets.storage.history_format import read_history_zip

    ensemble_dir = root / "clustering" / "ensembles" / ensemble_id
    runs = get_clustering_runs(ensemble_id)
    theirs = [MergeHistory.read(root / "clustering" / "runs" / run / "history.zip") for _, run in runs]
    ours = [read_history_zip(root / "clustering" / "runs" / run / "history.zip") for _, run in runs]
    histories_equal = all(
        h.labels == o.labels and h.n_iters_current == o.n_iters
        and np.array_equal(h.merges.group_idxs.numpy(), o.group_idxs.numpy())
        and np.array_equal(h.merges.k_groups.numpy(), o.k_groups.numpy())
        and np.array_equal(h.selected_pairs, o.selected_pairs.numpy())
        and h.merge_config.model_dump(mode="json") == o.config.to_dict()
        for h, o in zip(theirs, ours))

    merge_array, meta = MergeHistoryEnsemble(data=theirs).normalized()
    with np.load(ensemble_dir / "ensemble_merge_array.npz") as stored:
        exported = stored["merge_array"]
    exported_meta = json.loads((ensemble_dir / "ensemble_meta.json").read_text())
    pipeline = __import__("yaml").safe_load((ensemble_dir / "pipeline_config.yaml").read_text())
    distances = {}
    for method in pipeline["distances_methods"]:
        with np.load(ensemble_dir / f"distances_{method}.npz") as stored:
            mine = stored["distances"]
        theirs_distances = compute_distances(merge_array, method)
        distances[method] = {"equal": bool(np.array_equal(mine, theirs_distances, equal_nan=True)),
                             "dtype": [str(mine.dtype), str(theirs_distances.dtype)],
                             "nan_where_theirs": bool(np.array_equal(np.isnan(mine), np.isnan(theirs_distances)))}

    mapping = json.loads(mapping_file.read_text())
    output = mapping_file.with_name("theirs_" + mapping_file.name)
    get_cluster_mapping.main(str(ensemble_dir), n_iterations=mapping["n_iterations"], run_idx=mapping["run_idx"],
                             output=str(output))
    their_mapping = json.loads(output.read_text())

    validated = {}
    for name, path in (("member", mapping_file), ("consensus", consensus_file)):
        try:
            ClusterMappingFile.model_validate(json.loads(path.read_text()))
            validated[name] = "valid"
        except Exception as error:  # the finding is the app's own message
            validated[name] = str(error)

    # The original's own distance script, through the registry, over our folder (it overwrites our files).
    for method in pipeline["distances_methods"]:
        calc_distances.main(pipeline_run_id=ensemble_id, distances_method=method)
    with np.load(ensemble_dir / "ensemble_merge_array.npz") as stored:
        script_array = stored["merge_array"]
    script_distances = {}
    for method in pipeline["distances_methods"]:
        with np.load(ensemble_dir / f"distances_{method}.npz") as stored:
            script_distances[method] = stored["distances"]

    return {
        "runs": [run for _, run in runs],
        "histories_equal": histories_equal,
        "array": _array_findings(exported, merge_array, theirs, meta["component_labels"]),
        "script_array_same_partitions": _array_findings(script_array, exported, theirs, meta["component_labels"]),
        "meta_equal": exported_meta == json.loads(json.dumps(meta)),
        "meta_keys": sorted(exported_meta),
        "distances": distances,
        "script_distances_equal": {m: bool(np.array_equal(compute_distances(merge_array, m), v, equal_nan=True))
                                   for m, v in script_distances.items()},
        "mapping_equal": their_mapping == mapping,
        "mapping_differences": {k: [mapping.get(k), their_mapping.get(k)] for k in their_mapping
                                if their_mapping.get(k) != mapping.get(k) and k != "clusters"},
        "validated": validated,
    }


def _app_cluster_mapping_file():
    """The SPD app's `ClusterMappingFile`, from its own module (`spd/app/backend/routers/clusters.py`), loaded by file:
    importing it as `spd.app.backend.routers.clusters` would first import every other router, which need more of the
    app's web stack than the mapping does."""
    import importlib.util

    import spd

    path = Path(spd.__file__).parent / "app" / "backend" / "routers" / "clusters.py"
    spec = importlib.util.spec_from_file_location("spd_app_clusters", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ClusterMappingFile


def _array_findings(exported: np.ndarray, theirs: np.ndarray, histories, labels: list[str]) -> dict:
    """Exact where the member has the label; where it lacks it, the same ids as a set (the original orders those by
    a Python set's iteration order)."""
    exact_present, same_missing = True, True
    for m, history in enumerate(histories):
        present = np.isin(np.array(labels), np.array(history.labels))
        exact_present &= bool(np.array_equal(exported[m][:, present], theirs[m][:, present]))
        same_missing &= bool(np.array_equal(np.sort(exported[m][:, ~present], axis=1), np.sort(theirs[m][:, ~present], axis=1)))
    return {"shape_equal": exported.shape == theirs.shape, "dtype": [str(exported.dtype), str(theirs.dtype)],
            "exact_where_present": exact_present, "same_ids_where_missing": same_missing,
            "identical": bool(np.array_equal(exported, theirs)),
            "missing_labels": int(sum((~np.isin(np.array(labels), np.array(h.labels))).sum() for h in histories))}


if __name__ == "__main__":
    # The original's compute_distances ends its multiprocessing.Pool with terminate(), which takes the task queue's
    # lock and ends with SIGTERM any worker still waiting on it. A SIGTERM ignored by whatever started this process
    # (a test runner's worker can leave it so) is inherited by those workers, and terminate() then waits forever.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    command, *arguments = sys.argv[1:]
    if command == "make-histories":
        result = make_histories(Path(arguments[0]), Path(arguments[1]))
    else:
        result = check_export(Path(arguments[0]), arguments[1], Path(arguments[2]), Path(arguments[3]))
    print(json.dumps(result))
