"""`spd-cluster export original` and `spd-cluster export spd-app` on an experiment materialized through Dagster."""

from __future__ import annotations

import json
import sqlite3

import numpy as np
import pytest

from spd_assets.cli.main import main as spd_cluster
from spd_assets.notebook import cluster_analysis_pipeline
from spd_assets.storage.original_export import ensemble_id_for, original_merge_array
from tests.pipeline_helpers import SMALL_SYNTHETIC, materialize_original_folder


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    results = cluster_analysis_pipeline({"name": "small", "source": SMALL_SYNTHETIC, "merge_config": {"iters": 30}},
                                        home=home)
    return home, results


def test_export_original_writes_the_folder_and_registry(experiment, tmp_path, monkeypatch, capsys):
    home, results = experiment
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    assert spd_cluster(["export", "original", "--experiment", "small", "--out", str(tmp_path)]) == 0
    ensemble_id = ensemble_id_for("small", results.config.config_hash)
    ensemble_dir = tmp_path / "clustering" / "ensembles" / ensemble_id
    printed = capsys.readouterr()
    assert str(ensemble_dir) in printed.out
    # No SPD run to name: written all the same, with a warning that the original's scripts refuse its model_path.
    warning, = [line for line in printed.err.splitlines() if "warning" in line]
    assert "model_path will be '(spd-cluster synthetic source: no SPD run)', not a wandb run" in warning
    assert "its synthetic source generates activations without an SPD model" in warning
    assert "the original's scripts will refuse this folder" in warning
    assert "\"model_path must start with 'wandb:'\", so get_cluster_mapping fails too" in warning
    assert "pass --spd-run wandb:<entity>/<project>/<run>" in warning and "None" not in warning
    with np.load(ensemble_dir / "ensemble_merge_array.npz") as stored:
        merges = stored["merge_array"]
    histories = [results.histories[m] for m in results.ensemble.members]
    assert np.array_equal(merges, original_merge_array(histories)[0]) and merges.shape[:2] == (3, 30)
    rows = sqlite3.connect(tmp_path / "clustering" / "ensemble_registry.db").execute(
        "SELECT idx, clustering_run_id FROM ensemble_runs WHERE pipeline_run_id = ?", (ensemble_id,)).fetchall()
    assert [idx for idx, _ in rows] == [0, 1, 2]
    for _, run in rows:
        config = json.loads((tmp_path / "clustering" / "runs" / run / "clustering_run_config.json").read_text())
        assert config["ensemble_id"] == ensemble_id and config["batch_size"] == 8
        assert config["model_path"] == "(spd-cluster synthetic source: no SPD run)"
    for method in results.config.distance_methods:
        with np.load(ensemble_dir / f"distances_{method}.npz") as stored:
            assert stored["distances"].shape == (30, 3, 3)
        assert (ensemble_dir / "plots" / f"distances_{method}.png").read_bytes()[:4] == b"\x89PNG"

    named = tmp_path / "named"  # --spd-run names the run (any form the original accepts): no warning
    assert spd_cluster(["export", "original", "--experiment", "small", "--out", str(named),
                        "--spd-run", "wandb:goodfire/spd/abcd1234"]) == 0
    assert "warning" not in capsys.readouterr().err
    base = json.loads((named / "clustering" / "ensembles" / ensemble_id / "clustering_run_config.json").read_text())
    assert base["model_path"] == "wandb:goodfire/spd/runs/abcd1234"


def test_export_spd_app_member_and_consensus(experiment, tmp_path, monkeypatch, capsys):
    home, results = experiment
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    member_file = tmp_path / "member.json"
    assert spd_cluster(["export", "spd-app", "--experiment", "small", "--out", str(member_file), "--member", "member_002",
                        "--iteration", "12", "--spd-run", "wandb:goodfire/spd/runs/abcd1234"]) == 0
    mapping = json.loads(member_file.read_text())
    assert list(mapping) == ["ensemble_id", "notes", "spd_run", "n_iterations", "run_idx", "clusters"]
    assert mapping["spd_run"] == "goodfire/spd/abcd1234" and mapping["run_idx"] == 2 and mapping["n_iterations"] == 12
    history = results.histories["member_002"]
    groups = history.group_idxs[12].tolist()
    for label, group in zip(history.labels, groups):  # together in the mapping exactly when together in the history
        together = [other for other, g in zip(history.labels, groups) if g == group]
        assert (mapping["clusters"][label] is None) == (len(together) == 1)
        assert all(mapping["clusters"][other] == mapping["clusters"][label] for other in together)

    consensus_file = tmp_path / "consensus.json"
    assert spd_cluster(["export", "spd-app", "--experiment", "small", "--out", str(consensus_file),
                        "--spd-run", "goodfire/spd/abcd1234"]) == 0
    consensus = json.loads(consensus_file.read_text())
    assert consensus["n_iterations"] == results.consensus.iteration and consensus["run_idx"] == -1
    clustered = [label for label, cluster in zip(results.consensus.labels, results.consensus.cluster_of) if cluster >= 0]
    assert sorted(label for label, cluster in consensus["clusters"].items() if cluster is not None) == sorted(clustered)
    assert "consensus clusters of experiment 'small'" in consensus["notes"]


# Without a run: what is missing, why the app needs it and what to pass, naming the source (never "None").
NO_RUN = ("experiment 'small' names no wandb SPD run: its synthetic source generates activations without an SPD model. "
          "The SPD app loads a mapping only for the run it has loaded (the mapping's spd_run), so pass that run: "
          "--spd-run ENTITY/PROJECT/RUN (e.g. goodfire/spd/0d2lld8j)")


@pytest.mark.parametrize("arguments, message", [
    (["--member", "member_000", "--iteration", "1"], NO_RUN),
    ([], NO_RUN),
    (["--member", "member_000", "--spd-run", "a/b/abcd1234"], "--member needs --iteration"),
    (["--iteration", "3", "--spd-run", "a/b/abcd1234"], "--iteration goes with --member"),
    (["--member", "member_009", "--iteration", "1", "--spd-run", "a/b/abcd1234"], "'member_009' is not a member"),
    (["--member", "member_000", "--iteration", "30", "--spd-run", "a/b/abcd1234"], "iteration 30 is out of range"),
    (["--spd-run", "not-a-run"], "--spd-run: expected ENTITY/PROJECT/RUN"),
])
def test_export_spd_app_refuses_with_the_reason(experiment, tmp_path, monkeypatch, capsys, arguments, message):
    home, _ = experiment
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    assert spd_cluster(["export", "spd-app", "--experiment", "small", "--out", str(tmp_path / "m.json"), *arguments]) == 1
    error = capsys.readouterr().err
    assert message in error and "None" not in error
    assert not (tmp_path / "m.json").exists()


def test_export_of_an_unknown_experiment(experiment, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DAGSTER_HOME", str(experiment[0]))
    assert spd_cluster(["export", "original", "--experiment", "nothing", "--out", str(tmp_path)]) == 1
    assert "no experiment 'nothing' in " in capsys.readouterr().err


def test_the_original_folder_is_an_asset_written_when_asked_for(experiment):
    home, results = experiment
    ensemble_id = ensemble_id_for("small", results.config.config_hash)
    folder = home / "spd_cluster" / "small" / "exports" / "original" / "clustering"
    assert not folder.exists()  # not a cost every run pays
    result = materialize_original_folder(home, "small")
    assert result.success
    announced = result.asset_materializations_for_node("small__original_ensemble_folder")[0].metadata["dense_bytes"]
    histories = [results.histories[m] for m in results.ensemble.members]
    union = {label for history in histories for label in history.labels}
    # int16 ids: every partition of every run history, and of every member on the union of labels.
    assert announced.value == sum(30 * h.c_components * 2 for h in histories) + 3 * 30 * len(union) * 2
    assert (folder / "ensembles" / ensemble_id / "ensemble_merge_array.npz").is_file()
    assert len(list((folder / "runs").glob("c-*/history.zip"))) == 3
    assert not (home / "spd_cluster" / "small" / "exports" / "spd_app_cluster_mapping.json").exists()  # no wandb run named
