"""A results store of the previous layout (histories in the original zip, the ensemble as one dense array, data
versions as that layout fingerprinted them): read as it is everywhere, `doctor` says so and finds nothing to
repair, and the next run writes the current layout in its place."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

from spd_assets.cli.main import main as spd_cluster
from spd_assets.config import parse_config
from spd_assets.defs import assets
from spd_assets.results import ClusteringResults
from spd_assets.storage import previous_layout, values
from spd_assets.storage.experiments import register_experiment
from spd_assets.storage.history_format import write_history_zip
from spd_assets.storage.values import MemberEnsemble, ValueFormat, load_ensemble, load_history
from spd_math import MergeHistory
from tests.pipeline_helpers import (
    SMALL_SYNTHETIC,
    definitions_for,
    instance_at,
    make_home,
    materialize_experiment,
    store_at,
)

CONFIG = {"name": "older", "source": SMALL_SYNTHETIC, "merge_config": {"iters": 25}}
MEMBERS = ["member_000", "member_001", "member_002"]


def save_dense_ensemble(path, value: MemberEnsemble) -> None:
    """The previous layout's `normalized_ensemble.npz`: the whole `[members, iterations, components]` array."""
    ensemble = value.ensemble
    np.savez(path, merges=ensemble.merges.numpy(), labels=np.array(ensemble.labels, dtype=str),
             present=ensemble.present.numpy(), members=np.array(value.members, dtype=str),
             missing=np.array(value.missing, dtype=str))


@pytest.fixture()
def older_home(tmp_path, monkeypatch):
    """An experiment materialized the way the previous layout stored and fingerprinted it."""
    home = make_home(tmp_path / "home")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    config = parse_config(CONFIG)
    with monkeypatch.context() as older:
        older.setitem(values.VALUE_FORMATS, MergeHistory, ValueFormat(
            ".zip", lambda path, history: write_history_zip(history, path), load_history))
        older.setitem(values.VALUE_FORMATS, MemberEnsemble, ValueFormat(".npz", save_dense_ensemble, load_ensemble))
        older.setattr(assets, "fingerprint", previous_layout.previous_fingerprint)
        register_experiment(store_at(home), config)
        with instance_at(home) as instance:
            member_runs, ensemble_run = materialize_experiment(definitions_for(config), instance, config, MEMBERS)
    assert all(run.success for run in member_runs.values()) and ensemble_run.success
    return home, config


def test_a_store_of_the_previous_layout_is_read_as_it_is(older_home, capsys):
    home, config = older_home
    folder = store_at(home).experiment_dir("older")
    assert sorted(p.name for p in (folder / "merge_history").iterdir()) == [f"{m}.zip" for m in MEMBERS]
    assert previous_layout.is_previous_layout(folder / "normalized_ensemble.npz")
    results = ClusteringResults.load("older", home=home)
    assert not results.ensemble.ensemble.is_compact and all(h.is_merge_sequence for h in results.histories.values())
    assert results.partition("member_001", 10).tolist() == results.histories["member_001"].group_idxs[10].tolist()
    np.testing.assert_array_equal(results.ensemble.ensemble.partitions_at(12),
                                  results.ensemble.ensemble.merges[:, 12].numpy())

    assert spd_cluster(["doctor", "--dry-run"]) == 0
    report = capsys.readouterr().out
    assert "note" in report and "older: 4 result file(s)" in report and "are in the previous layout" in report
    assert "doctor: no problems found (1 note(s) above)" in report
    assert spd_cluster(["clusters", "--experiment", "older", "--consensus", "--iteration", "20"]) == 0
    assert '"iteration": 20' in capsys.readouterr().out


def test_the_next_run_writes_the_current_layout_in_place_of_the_previous(older_home, tmp_path, capsys):
    home, config = older_home
    before = ClusteringResults.load("older", home=home)
    path = tmp_path / "older.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    assert spd_cluster(["run", "--config", str(path)]) == 0
    folder = store_at(home).experiment_dir("older")
    assert sorted(p.name for p in (folder / "merge_history").iterdir()) == [f"{m}.npz" for m in MEMBERS]
    assert not previous_layout.is_previous_layout(folder / "normalized_ensemble.npz")
    after = ClusteringResults.load("older", home=home)
    assert after.ensemble.ensemble.is_compact
    for member in MEMBERS:
        assert torch.equal(after.histories[member].merge_pairs, before.histories[member].merge_pairs)
    assert torch.equal(after.ensemble.ensemble.merges, before.ensemble.ensemble.merges)
    for method, distances in before.distances.items():
        assert torch.equal(after.distances[method], distances)
    capsys.readouterr()
    assert spd_cluster(["doctor", "--dry-run"]) == 0
    assert "previous layout" not in capsys.readouterr().out
