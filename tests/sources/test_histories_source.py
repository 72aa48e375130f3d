"""The `histories` source: past runs' history files as ensemble members, through the real asset graph."""

from __future__ import annotations

import io
import json
import shutil
import sqlite3
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from spd_assets.cli.main import main as spd_cluster
from spd_assets.config import parse_config
from spd_assets.errors import HistoryFileError
from spd_assets.notebook import cluster_analysis_pipeline
from spd_assets.results import ClusteringResults
from spd_assets.service.runs import first_failure_message
from spd_assets.sources import HistoriesSource, HistoriesSourceConfig, source_for
from spd_assets.storage import original_export
from spd_assets.storage.history_format import write_history_zip
from spd_assets.storage.original_histories import (
    CURRENT,
    SEPTEMBER_2025,
    read_original_history,
)
from spd_math import MergeConfig, merge_iteration, process_activations
from tests.pipeline_helpers import (
    definitions_for,
    instance_at,
    make_home,
    materialize_experiment,
    materialize_original_folder,
    store_at,
)

MERGE = MergeConfig(iters=10, merge_pair_sampling_kwargs={"threshold": 0.0})
MODULES = {"layers.0.mlp_in": 6, "layers.0.mlp_out": 8}


def merged(seed: int, modules: dict[str, int] = MODULES):
    generator = torch.Generator().manual_seed(seed)
    batch = {name: (torch.rand(64, c, generator=generator) > 0.7).float() * torch.rand(64, c, generator=generator)
             for name, c in modules.items()}
    processed = process_activations(batch, filter_dead_threshold=0.001, seq_mode=None)
    return merge_iteration(processed, MERGE, seed=seed)


def write_september(history, path: Path, *, pop_component_prob: float = 0.0) -> Path:
    """A history in the September 2025 layout: row i before merge i (row 0: every component alone), metadata `config`
    holding the run keys too, no labels in it."""
    c, n = history.c_components, history.n_iters
    before = np.vstack([np.arange(c)[None], history.group_idxs[: n - 1].numpy()]).astype(np.int64)
    config = {**history.config.to_dict(), "pop_component_prob": pop_component_prob, "model_path": "wandb:goodfire/spd/runs/abcd1234",
              "task_name": "resid_mlp", "n_batches": 4, "batch_size": 64}
    arrays = {"merge.group_idxs": before, "merge.k_groups": c - np.arange(n), "selected_pairs": history.selected_pairs.numpy().astype(np.int16)}
    with zipfile.ZipFile(path, "w") as archive:
        for name, values in arrays.items():
            buffer = io.BytesIO()
            np.save(buffer, values)
            archive.writestr(f"{name}.npy", buffer.getvalue())
        archive.writestr("labels.txt", "\n".join(history.labels))
        archive.writestr("metadata.json", json.dumps({"config": config, "wandb_url": "https://wandb.ai/x/y/runs/abcd1234",
                                                      "c_components": c, "n_iters_current": n}))
    return path


def same_partitions(first, second) -> bool:
    return first.labels == second.labels and torch.equal(first.group_idxs, second.group_idxs) and \
        torch.equal(first.k_groups, second.k_groups)


def test_both_formats_read_to_the_same_partitions(tmp_path):
    history = merged(0)
    write_history_zip(history, tmp_path / "current.zip")
    write_september(history, tmp_path / "september.zip")
    current, september = read_original_history(tmp_path / "current.zip"), read_original_history(tmp_path / "september.zip")
    assert (current.format, september.format) == (CURRENT, SEPTEMBER_2025)
    assert same_partitions(current.history, history) and same_partitions(september.history, history)
    assert torch.equal(september.history.selected_pairs, history.selected_pairs)
    assert september.history.config == MERGE and september.history.mdl_losses is None
    assert september.extras["wandb_url"].endswith("abcd1234") and september.extras["run_config"]["n_batches"] == 4


def test_september_histories_that_do_not_hold_together_are_refused(tmp_path):
    history = merged(1)
    with pytest.raises(ValueError, match="pop_component_prob 0.1"):
        read_original_history(write_september(history, tmp_path / "popped.zip", pop_component_prob=0.1))
    path = write_september(history, tmp_path / "shuffled.zip")
    with zipfile.ZipFile(path) as archive:
        entries = {name: archive.read(name) for name in archive.namelist()}
    rows = np.load(io.BytesIO(entries["merge.group_idxs.npy"]))
    rows[[3, 4]] = rows[[4, 3]]
    buffer = io.BytesIO()
    np.save(buffer, rows)
    entries["merge.group_idxs.npy"] = buffer.getvalue()
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    with pytest.raises(ValueError, match="row 3 of group_idxs is not row 2 with pair"):
        read_original_history(path)


def run_folder(root: Path, name: str, history) -> Path:
    (root / name).mkdir(parents=True)
    write_history_zip(history, root / name / "history.zip")
    return root / name


def test_discovery_and_empty_folders(tmp_path):
    source = HistoriesSource(HistoriesSourceConfig(directory=tmp_path / "runs"))
    with pytest.raises(HistoryFileError, match="does not exist"):
        source.check()
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "notes.txt").write_text("no histories here")
    with pytest.raises(HistoryFileError, match="holds no merge histories; expected an original ensemble folder"):
        HistoriesSource(HistoriesSourceConfig(directory=tmp_path / "runs")).check()
    run_folder(tmp_path / "runs", "c-bbbbbbbb", merged(0))
    (tmp_path / "runs" / "sept").mkdir()
    write_september(merged(1), tmp_path / "runs" / "sept" / "merge_history.zip")
    write_history_zip(merged(2), tmp_path / "runs" / "loose.zip")
    assert HistoriesSource(HistoriesSourceConfig(directory=tmp_path / "runs")).member_keys() == ["c-bbbbbbbb", "loose", "sept"]


def test_an_original_ensemble_folder_gives_its_registered_runs_in_order(tmp_path):
    histories = [merged(seed) for seed in range(3)]
    export = original_export.EnsembleExport(
        experiment="past", ensemble_id="e-12345678", members=["m0", "m1", "m2"], histories=histories, distances={},
        merge_config=MERGE, model_path="wandb:goodfire/spd/runs/abcd1234", batch_size=64, dataset_seeds=[0, 1, 2])
    folder = original_export.write_original_ensemble(export, tmp_path / "spd_out")
    original_export.register_ensemble(folder.registry, "e-other000", ["c-00000000"])
    source = HistoriesSource(HistoriesSourceConfig(directory=folder.ensemble_dir))
    assert source.member_keys() == [d.name for d in folder.run_dirs]
    assert same_partitions(source.load_history(folder.run_dirs[2].name).history, histories[2])
    with pytest.raises(HistoryFileError, match="holds 2 ensembles"):
        HistoriesSource(HistoriesSourceConfig(directory=folder.registry.parent)).check()
    by_id = HistoriesSource(HistoriesSourceConfig(directory=folder.registry.parent, ensemble_id="e-12345678"))
    assert by_id.member_keys() == source.member_keys()

    # The original's ids, for an export of these runs: the ensemble's only for all its runs, in its order.
    runs = source.member_keys()
    assert source.original_ids(runs) == ("e-12345678", {run: run for run in runs})
    first_two = HistoriesSource(HistoriesSourceConfig(directory=folder.ensemble_dir, n_members=2))
    assert first_two.original_ids(first_two.member_keys()) == (None, {run: run for run in runs[:2]})
    assert source.original_ids(runs[::-1])[0] is None
    # A folder of run folders: runs beside their run configs keep their ids; a loose zip is no run of the original.
    write_history_zip(histories[0], folder.run_dirs[0].parent / "loose.zip")
    in_folder = HistoriesSource(HistoriesSourceConfig(directory=folder.run_dirs[0].parent))
    assert in_folder.original_ids(in_folder.member_keys()) == (None, {run: run for run in runs})


def test_past_runs_become_an_experiment_and_bad_files_fail_alone(tmp_path):
    """Five members: a current-format run folder, a September 2025 file, a truncated zip, a zip in neither format
    and a history of another model; the first two make the ensemble, the others fail with the file named."""
    runs = tmp_path / "runs"
    good = [merged(seed) for seed in range(2)]
    run_folder(runs, "a_current", good[0])
    (runs / "b_september").mkdir()
    write_september(good[1], runs / "b_september" / "merge_history.zip")
    truncated = run_folder(runs, "c_truncated", merged(3)) / "history.zip"
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    with zipfile.ZipFile(runs / "d_neither.zip", "w") as archive:
        archive.writestr("metadata.json", json.dumps({"groups": [1, 2]}))
    run_folder(runs, "e_other_model", merged(4, {"h.0.attn.q_proj": 5, "h.0.attn.k_proj": 5}))
    run_folder(runs, "f_current", merged(5))

    config = parse_config({"name": "past", "source": {"kind": "histories", "directory": str(runs)},
                           "consensus": {"k": 8}})
    source = source_for(config.source)
    members = source.member_keys()
    assert members == ["a_current", "b_september", "c_truncated", "d_neither", "e_other_model", "f_current"]
    home = make_home(tmp_path / "home")
    from spd_assets.service.registration import register

    with instance_at(home) as instance:
        register(store_at(home), instance, config, members, replace=False)
        member_results, ensemble_result = materialize_experiment(definitions_for(config), instance, config, members)
        failures = {m: first_failure_message(r) for m, r in member_results.items() if not r.success}
    assert ensemble_result.success
    assert sorted(failures) == ["c_truncated", "d_neither", "e_other_model"]
    assert "c_truncated" in failures["c_truncated"] and "not a readable zip archive" in failures["c_truncated"]
    assert "d_neither.zip: a zip in neither history format" in failures["d_neither"]
    assert "history of another component set" in failures["e_other_model"]
    assert "h.0.attn.k_proj" in failures["e_other_model"] and "layers.0.mlp_in" in failures["e_other_model"]

    results = ClusteringResults.load("past", home=home)
    assert results.ensemble.members == ["a_current", "b_september", "f_current"]
    assert results.ensemble.missing == ["c_truncated", "d_neither", "e_other_model"]
    assert same_partitions(results.histories["b_september"], good[1])
    assert "k" in results.consensus.rule and len(results.consensus.members) == 3
    assert results.tables["merge_events"].height == 3 * 10 and results.tables["component_stats"].height == 0
    assert results.explorer_path.exists()
    shutil.rmtree(runs)  # the stored histories are the experiment's own copies
    assert same_partitions(ClusteringResults.load("past", home=home).histories["a_current"], good[0])


def test_an_imported_original_ensemble_gets_the_apps_mapping_and_its_original_folder_again(tmp_path, monkeypatch):
    """The registry's runs name a wandb SPD run: the consensus step writes the SPD app's mapping for it, and the
    `original_ensemble_folder` asset writes the ensemble again, with the same histories under the same ids."""
    histories = [merged(seed) for seed in range(3)]
    export = original_export.EnsembleExport(
        experiment="before", ensemble_id="e-12345678", members=["m0", "m1", "m2"], histories=histories, distances={},
        merge_config=MERGE, model_path="wandb:goodfire/spd/runs/abcd1234", batch_size=64, dataset_seeds=[0, 1, 2])
    folder = original_export.write_original_ensemble(export, tmp_path / "spd_out")
    home = tmp_path / "home"
    results = cluster_analysis_pipeline({"name": "imported", "consensus": {"k": 8},
                                         "source": {"kind": "histories", "directory": str(folder.ensemble_dir)}}, home=home)
    exports = store_at(home).exports_dir("imported")
    mapping = json.loads((exports / "spd_app_cluster_mapping.json").read_text())
    assert mapping["spd_run"] == "goodfire/spd/abcd1234" and mapping["n_iterations"] == results.consensus.iteration
    clustered = {label for label, cluster in zip(results.consensus.labels, results.consensus.cluster_of) if cluster >= 0}
    assert {label for label, cluster in mapping["clusters"].items() if cluster is not None} == clustered

    assert mapping["ensemble_id"] == "e-12345678"  # the ensemble the app's mapping is of keeps its id

    assert materialize_original_folder(home, "imported").success  # written when asked for
    again = exports / "original" / "clustering"
    meta = json.loads((again / "ensembles" / "e-12345678" / "ensemble_meta.json").read_text())
    assert meta["n_ensemble"] == 3 and meta["component_labels"] == sorted({x for h in histories for x in h.labels})
    run_configs = [json.loads(p.read_text()) for p in sorted((again / "runs").glob("*/clustering_run_config.json"))]
    assert {c["model_path"] for c in run_configs} == {"wandb:goodfire/spd/runs/abcd1234"}
    # Exported again, the original's runs keep the ensemble id and run ids they came with.
    assert sorted(p.name for p in (again / "runs").iterdir()) == sorted(d.name for d in folder.run_dirs)
    assert {c["ensemble_id"] for c in run_configs} == {"e-12345678"}
    assert not (again / "ensembles" / original_export.ensemble_id_for("imported", results.config.config_hash)).exists()
    rows = sqlite3.connect(again / "ensemble_registry.db").execute(
        "SELECT pipeline_run_id, idx, clustering_run_id FROM ensemble_runs ORDER BY idx").fetchall()
    assert rows == [("e-12345678", idx, d.name) for idx, d in enumerate(folder.run_dirs)]

    monkeypatch.setenv("DAGSTER_HOME", str(home))  # the command line's exports too
    assert spd_cluster(["export", "original", "--experiment", "imported", "--out", str(tmp_path / "cli")]) == 0
    assert (tmp_path / "cli" / "clustering" / "ensembles" / "e-12345678" / "ensemble_merge_array.npz").is_file()
    assert sorted(p.name for p in (tmp_path / "cli" / "clustering" / "runs").iterdir()) == sorted(
        d.name for d in folder.run_dirs)
    assert spd_cluster(["export", "spd-app", "--experiment", "imported", "--out", str(tmp_path / "m.json"),
                        "--member", folder.run_dirs[1].name, "--iteration", "3"]) == 0
    member_mapping = json.loads((tmp_path / "m.json").read_text())
    assert member_mapping["ensemble_id"] == "e-12345678" and member_mapping["run_idx"] == 1
