"""Re-registering an experiment name: a changed config or member set is refused, `--replace` removes the old
results (files and Dagster's record) so they never mix with current ones, and an interrupted removal is finished."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from dagster import AssetKey

from spd_assets.config import load_config
from spd_assets.sources.synthetic import SyntheticParams, build_model, generate_batch
from spd_assets.storage.experiments import Replacement, begin_replacement, pending_replacements
from tests.cli.test_results_queries import cli, query
from tests.pipeline_helpers import SMALL_SYNTHETIC, instance_at, make_home, store_at


def write(path, values: dict):
    path.write_text(yaml.safe_dump(values))
    return path


@pytest.fixture(scope="module")
def swept(tmp_path_factory) -> dict:
    """An experiment run once; the tests below change it in order."""
    root = tmp_path_factory.mktemp("swept")
    home = make_home(root / "home")
    config = write(root / "swept.yaml", {"name": "swept", "source": SMALL_SYNTHETIC, "merge_config": {"iters": 20}})
    cli(home, "run", "--config", str(config))
    return {"home": home, "config": config}


def test_a_changed_config_is_refused_then_replaced_with_nothing_old_left(swept):
    home, first = swept["home"], swept["config"]
    store = store_at(home)
    files_before = sorted(store.value_files("swept")) + sorted(store.table_files("swept"))
    registered_before = (store.experiments_dir / "swept.yaml").read_text()

    changed = ["--config", str(first), "--set", "merge_config.alpha=0.5", "--set", "source.n_members=2"]
    refused = cli(home, "run", *changed, check=False)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "experiment 'swept' has results of another config" in refused.stderr
    assert "merge_config.alpha: 1.0 -> 0.5" in refused.stderr and "source.n_members: 3 -> 2" in refused.stderr
    assert "--replace" in refused.stderr
    assert sorted(store.value_files("swept")) + sorted(store.table_files("swept")) == files_before
    assert (store.experiments_dir / "swept.yaml").read_text() == registered_before

    replaced = cli(home, "run", *changed, "--replace")
    assert "removed all results of experiment 'swept'; registered the new config" in replaced.stdout
    new_hash = load_config(first, ["merge_config.alpha=0.5", "source.n_members=2"]).config_hash
    assert query(home, "SELECT alpha FROM experiment_settings WHERE experiment = 'swept'")["alpha"].to_list() == [0.5]
    members = query(home, "SELECT DISTINCT member FROM merge_events WHERE experiment = 'swept' ORDER BY member")
    assert members["member"].to_list() == ["member_000", "member_001"]
    hashes = query(home, "SELECT DISTINCT config_hash FROM materializations WHERE experiment = 'swept' "
                         "AND config_hash IS NOT NULL")
    assert hashes["config_hash"].to_list() == [new_hash], "no materialization of the old config is left"
    with instance_at(home) as instance:
        history = instance.fetch_materializations(AssetKey(["swept", "merge_history"]), limit=100).records
        assert {r.partition_key for r in history} == {"member_000", "member_001"} and len(history) == 2
        assert all(r.asset_materialization.metadata["config_hash"].value == new_hash for r in history)
    assert "no problems found" in cli(home, "doctor").stdout


def test_an_interrupted_replacement_is_finished_by_doctor(swept):
    home = swept["home"]
    store = store_at(home)
    new_config = (store.experiments_dir / "swept.yaml").read_text().replace("alpha: 0.5", "alpha: 0.25")
    # What a `run --replace` killed right after it began leaves: the journal, and some files already gone.
    begin_replacement(store, Replacement("swept", new_config))
    next(iter(store.table_files("swept"))).unlink()

    report = cli(home, "doctor")
    assert "the removal of all results of experiment 'swept' was cut short: finished it" in report.stdout
    assert pending_replacements(store) == []
    assert store.value_files("swept") == {} and store.table_files("swept") == {}
    assert "alpha: 0.25" in (store.experiments_dir / "swept.yaml").read_text()
    with instance_at(home) as instance:
        assert instance.get_latest_materialization_event(AssetKey(["swept", "merge_history"])) is None


@pytest.mark.slow  # --replace: also the changed-config test above
def test_members_that_left_a_files_experiment_are_removed_with_replace(tmp_path):
    home = make_home(tmp_path / "home")
    params = SyntheticParams(n_layers=1, modules=("mlp.up",), components_per_module=(10, 12), n_planted_groups=3,
                             group_size=(2, 3), seq_len=16)
    model = build_model(params)
    directory = tmp_path / "batches"
    directory.mkdir()
    for index in range(3):
        batch = generate_batch(model, seed=index, batch_size=4)
        np.savez(directory / f"b{index}.npz", **{name: tensor.numpy() for name, tensor in batch.items()})
    config = write(tmp_path / "files.yaml", {"name": "from_files", "source": {"kind": "files", "directory": str(directory)},
                                             "merge_config": {"iters": 10}})
    cli(home, "run", "--config", str(config))
    (directory / "b1.npz").unlink()

    refused = cli(home, "run", "--config", str(config), check=False)
    assert refused.returncode == 2
    assert "results of members that are no longer in it: b1" in refused.stderr and "--replace" in refused.stderr
    cli(home, "run", "--config", str(config), "--replace")
    for table in ("merge_events", "component_stats", "membership_spans"):
        members = query(home, f"SELECT DISTINCT member FROM {table} WHERE experiment = 'from_files' ORDER BY member")
        assert members["member"].to_list() == ["b0", "b2"], table
    lineage = query(home, "SELECT DISTINCT partition FROM materializations WHERE experiment = 'from_files' "
                          "AND partition IS NOT NULL ORDER BY partition")
    assert lineage["partition"].to_list() == ["b0", "b2"]
