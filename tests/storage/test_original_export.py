"""The original pipeline's ensemble folder and the SPD app's mapping, written from spd_math values."""

from __future__ import annotations

import json
import sqlite3
import zipfile

import numpy as np
import pytest
import torch
import yaml

from spd_assets.errors import ExportError
from spd_assets.storage import original_export as original
from spd_assets.storage.history_format import read_history_zip
from spd_math import MergeConfig, MergeHistory, compute_distances, normalize_ensemble


def _history(labels: list[str], rows: list[list[int]], config: MergeConfig | None = None) -> MergeHistory:
    c = len(labels)
    group_idxs = torch.tensor(rows)
    k = torch.tensor([len(set(row)) for row in rows])
    assert k.tolist() == [c - 1 - i for i in range(len(rows))]
    return MergeHistory(labels=labels, group_idxs=group_idxs, k_groups=k, selected_pairs=torch.zeros(len(rows), 2, dtype=torch.long),
                        config=config or MergeConfig(iters=2), mdl_losses=torch.tensor([2.0, 1.0][: len(rows)]))


# Two members that lack one label each: a:0 (first) and b:1 (second).
FIRST = _history(["a:1", "b:0", "b:1"], [[0, 0, 1], [0, 0, 0]])
SECOND = _history(["a:0", "a:1", "b:0"], [[0, 1, 0], [0, 0, 0]])


def test_the_merge_array_follows_the_originals_rule_for_missing_labels():
    merges, labels = original.original_merge_array([FIRST, SECOND])
    assert labels == ["a:0", "a:1", "b:0", "b:1"]
    assert merges.dtype == np.int16 and merges.shape == (2, 2, 4)
    # a missing label's id is the member's label count plus its place among the missing: 3 for both here
    assert merges[0].tolist() == [[3, 0, 0, 1], [3, 0, 0, 0]]
    assert merges[1].tolist() == [[0, 1, 0, 3], [0, 0, 0, 3]]
    # the partitions are spd_math's, up to ids
    ours = normalize_ensemble([FIRST, SECOND]).merges.numpy()
    for member in range(2):
        for iteration in range(2):
            assert _same_partition(merges[member, iteration], ours[member, iteration])


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    return np.array_equal(a[:, None] == a[None, :], b[:, None] == b[None, :])


def test_distances_take_the_originals_layouts():
    ours = torch.tensor([[[0, 2, 1], [2, 0, 3], [1, 3, 0]]])
    hamming = original.original_distances(ours, "perm_invariant_hamming")
    assert hamming.dtype == np.float64
    assert np.isnan(hamming[0][np.triu_indices(3)]).all() and hamming[0][np.tril_indices(3, -1)].tolist() == [2, 1, 3]
    matching = original.original_distances(ours, "matching_dist")
    assert matching.dtype == np.float32
    assert np.isnan(matching[0][np.tril_indices(3)]).all() and matching[0][np.triu_indices(3, 1)].tolist() == [2, 1, 3]
    vectorised = original.original_distances(ours, "matching_dist_vec")
    assert vectorised.dtype == np.float32 and vectorised[0].tolist() == (2 * ours[0]).tolist()
    with pytest.raises(ExportError, match="no original counterpart"):
        original.original_distances(ours, "jaccard")


def _export(**overrides) -> original.EnsembleExport:
    ensemble = normalize_ensemble([FIRST, SECOND])
    values = dict(
        experiment="tiny", ensemble_id=original.ensemble_id_for("tiny", "abc"), members=["member_000", "member_001"],
        histories=[FIRST, SECOND], distances={m: compute_distances(ensemble, m) for m in ("perm_invariant_hamming", "matching_dist")},
        merge_config=MergeConfig(iters=2), model_path="wandb:goodfire/spd/runs/abcd1234", batch_size=16, dataset_seeds=[5, 6])
    values.update(overrides)
    return original.EnsembleExport(**values)


def test_the_folder_holds_what_the_original_pipeline_writes(tmp_path):
    export = _export()
    folder = original.write_original_ensemble(export, tmp_path / "spd_out")
    assert export.ensemble_id.startswith("e-") and len(export.ensemble_id) == 10
    assert folder.ensemble_dir == tmp_path / "spd_out" / "clustering" / "ensembles" / export.ensemble_id
    names = sorted(p.relative_to(folder.ensemble_dir).as_posix() for p in folder.ensemble_dir.rglob("*"))
    assert names == ["clustering_run_config.json", "distances_matching_dist.npz", "distances_perm_invariant_hamming.npz",
                     "ensemble_merge_array.npz", "ensemble_meta.json", "pipeline_config.yaml", "plots",
                     "plots/distances_matching_dist.png", "plots/distances_perm_invariant_hamming.png"]

    pipeline = yaml.safe_load((folder.ensemble_dir / "pipeline_config.yaml").read_text())
    assert pipeline["n_runs"] == 2 and pipeline["distances_methods"] == ["perm_invariant_hamming", "matching_dist"]
    base = json.loads(open(pipeline["clustering_run_config_path"]).read())
    assert base["model_path"] == "wandb:goodfire/spd/runs/abcd1234" and base["ensemble_id"] is None
    assert list(base) == ["model_path", "batch_size", "dataset_seed", "ensemble_id", "merge_config", "logging_intervals",
                          "wandb_project", "wandb_entity", "dataset_streaming"]

    meta = json.loads((folder.ensemble_dir / "ensemble_meta.json").read_text())
    assert meta["component_labels"] == ["a:0", "a:1", "b:0", "b:1"] and meta["n_ensemble"] == 2
    assert meta["n_iters_range"] == [2, 2] and meta["config"] == MergeConfig(iters=2).to_dict()
    assert [m["origin_path"] for m in meta["history_metadatas"]] == [str(d / "history.zip") for d in folder.run_dirs]
    for entry, run_dir in zip(meta["history_metadatas"], folder.run_dirs):  # the original's meta: the file's metadata
        with zipfile.ZipFile(run_dir / "history.zip") as archive:
            assert entry == {**json.loads(archive.read("metadata.json")), "origin_path": str(run_dir / "history.zip")}
    ours = normalize_ensemble([FIRST, SECOND]).metadata  # one metadata: spd_math's, with the files the original read
    paths = [{"origin_path": str(d / "history.zip")} for d in folder.run_dirs]
    assert meta == json.loads(json.dumps({**ours, "history_metadatas": [
        {**entry, **path} for entry, path in zip(ours["history_metadatas"], paths)]}))
    with np.load(folder.ensemble_dir / "ensemble_merge_array.npz") as stored:
        assert list(stored) == ["merge_array"]
        assert np.array_equal(stored["merge_array"], original.original_merge_array([FIRST, SECOND])[0])
    with np.load(folder.ensemble_dir / "distances_perm_invariant_hamming.npz") as stored:
        assert list(stored) == ["distances"] and stored["distances"].shape == (2, 2, 2)

    for idx, run_dir in enumerate(folder.run_dirs):
        config = json.loads((run_dir / "clustering_run_config.json").read_text())
        assert config["ensemble_id"] == export.ensemble_id and config["dataset_seed"] == [5, 6][idx]
        history = read_history_zip(run_dir / "history.zip")
        assert history.labels == [FIRST, SECOND][idx].labels
        with zipfile.ZipFile(run_dir / "history.zip") as archive:
            assert "selected_pairs.npy" in archive.namelist()  # the original's reader requires it

    rows = sqlite3.connect(folder.registry).execute("SELECT pipeline_run_id, idx, clustering_run_id FROM ensemble_runs").fetchall()
    assert rows == [(export.ensemble_id, idx, d.name) for idx, d in enumerate(folder.run_dirs)]


def test_exporting_again_replaces_the_ensembles_rows_and_keeps_others(tmp_path):
    original.register_ensemble(tmp_path / "clustering" / "ensemble_registry.db", "e-00000000", ["c-11111111"])
    first = original.write_original_ensemble(_export(), tmp_path)
    again = original.write_original_ensemble(_export(), tmp_path)
    assert first == again
    rows = sqlite3.connect(again.registry).execute("SELECT pipeline_run_id, idx FROM ensemble_runs ORDER BY 1, 2").fetchall()
    assert rows == [("e-00000000", 0), (_export().ensemble_id, 0), (_export().ensemble_id, 1)]


def test_members_merged_with_different_configs_are_refused(tmp_path):
    other = _history(SECOND.labels, SECOND.group_idxs.tolist(), MergeConfig(iters=2, alpha=0.5))
    with pytest.raises(ExportError, match="2 different merge configs"):
        original.write_original_ensemble(_export(histories=[FIRST, other]), tmp_path)


def test_member_mapping_is_get_cluster_mappings():
    merges, labels = original.original_merge_array([FIRST, SECOND])
    assert original.member_clusters(merges, labels, 0, 0) == {"a:0": None, "a:1": 0, "b:0": 0, "b:1": None}
    assert original.member_clusters(merges, labels, 1, 1) == {"a:0": 0, "a:1": 0, "b:0": 0, "b:1": None}
    with pytest.raises(ExportError, match="iteration 2 is out of range"):
        original.member_clusters(merges, labels, 0, 2)
    with pytest.raises(ExportError, match="run index 2 is out of range"):
        original.member_clusters(merges, labels, 2, 0)


def test_the_app_mapping_file():
    mapping = original.consensus_mapping_file(
        experiment="tiny", config_hash="abc", spd_run="goodfire/spd/abcd1234", iteration=1, rule="consensus.k = 2",
        threshold=0.5, n_members=2, labels=["a:0", "a:1", "b:0"], cluster_of=np.array([0, 0, -1]))
    assert list(mapping) == ["ensemble_id", "notes", "spd_run", "n_iterations", "run_idx", "clusters"]
    assert mapping["clusters"] == {"a:0": 0, "a:1": 0, "b:0": None} and mapping["run_idx"] == -1
    assert "consensus clusters" in mapping["notes"] and mapping["ensemble_id"] == original.ensemble_id_for("tiny", "abc")
    with pytest.raises(ExportError, match="not a wandb run"):
        original.cluster_mapping_file(ensemble_id="e", notes="", spd_run="./local", n_iterations=0, run_idx=0, clusters={})


@pytest.mark.parametrize("reference, expected", [
    ("wandb:goodfire/spd/runs/0d2lld8j", "goodfire/spd/0d2lld8j"),
    ("goodfire/spd/0d2lld8j", "goodfire/spd/0d2lld8j"),
    ("https://wandb.ai/goodfire/spd/runs/s-0d2lld8j?x=1", "goodfire/spd/s-0d2lld8j"),
    ("/runs/local/model_100.pth", None),
    (None, None),
])
def test_wandb_run_references(reference, expected):
    assert original.spd_run_of(reference) == expected
