"""The steps without Dagster; the definitions as Dagster sees them (tables as assets, bad experiments skipped);
and the IO managers through `dagster.materialize` into a test instance."""

from __future__ import annotations

import logging

import polars as pl
import pytest
import torch
from dagster import AssetKey, instance_for_test, materialize

from spd_assets.defs import steps
from spd_assets.defs.assets import STORAGE_KEY, TABLE_IO_MANAGER_KEY, VALUE_IO_MANAGER_KEY, experiment_assets
from spd_assets.defs.definitions import build_definitions
from spd_assets.defs.io_managers import TableIOManager, ValueIOManager
from spd_assets.defs.jobs import ensemble_job_name, members_job_name
from spd_assets.defs.resources import ActivationSourceResource, StorageResource, source_resource_key
from spd_assets.sources import source_for
from spd_assets.storage.schemas import TABLE_SCHEMAS
from spd_assets.storage.store import ResultsStore
from tests.pipeline_helpers import make_home, small_config


@pytest.fixture(scope="module")
def config():
    return small_config("steps")


def test_steps_run_without_dagster(config):
    source = source_for(config.source)
    members = source.member_keys()
    activations = steps.component_activations(source, config, members[0])
    assert activations.value.n_components == activations.tables["component_stats"].filter(~pl.col("dead")).height
    assert activations.consumed[0].asset == "source:synthetic" and activations.consumed[0].partition == members[0]
    history = steps.merge_history(activations.value, config, members[0], torch.device("cpu"))
    assert history.tables["merge_events"].height == history.value.n_iters
    assert history.metadata["final_k"] == 3
    ensemble = steps.normalized_ensemble({members[0]: history.value}, members, config)
    assert ensemble.value.members == [members[0]] and ensemble.value.missing == members[1:]
    assert ensemble.metadata["missing_members"] == members[1:]
    distances = steps.distance_matrices(ensemble.value, config)
    assert set(distances.value.by_method) == set(config.distance_methods)
    with pytest.raises(steps.NoMembersError, match="no merge_history partition of steps is materialized"):
        steps.normalized_ensemble({}, members, config)


def test_every_result_table_is_an_asset_with_its_schema_downstream_of_its_producer(config):
    graph = build_definitions([config]).resolve_asset_graph()
    producers = {"component_stats": "component_activations", "merge_events": "merge_history",
                 "membership_spans": "merge_history", "ensemble_members": "normalized_ensemble",
                 "distances": "distance_matrices", "materializations": "cluster_explorer",
                 "lineage_edges": "cluster_explorer", "consensus_components": "consensus_clusters", "experiments": None}
    assert set(producers) == set(TABLE_SCHEMAS)
    for table, producer in producers.items():
        node = graph.get(AssetKey([config.name, table]))
        schema = node.metadata["dagster/column_schema"]
        assert [(c.name, c.type) for c in schema.columns] == [(n, t) for n, (t, _) in TABLE_SCHEMAS[table].columns.items()]
        if producer is not None:
            assert AssetKey([config.name, producer]) in node.parent_keys


def test_the_lineage_tables_come_after_every_step_through_the_last_steps(config):
    """They read every asset's materializations from the event log: each other step must run before them, which
    their parents (the graph's last steps) ensure without an edge from every asset."""
    graph = build_definitions([config]).resolve_asset_graph()
    lineage = AssetKey([config.name, "lineage_edges"])
    assert {key.path[-1] for key in graph.get(lineage).parent_keys} == {"cluster_explorer", "original_ensemble_folder",
                                                                         "experiments"}
    ancestors, frontier = set(), set(graph.get(lineage).parent_keys)
    while frontier:
        key = frontier.pop()
        ancestors.add(key)
        frontier |= set(graph.get(key).parent_keys) - ancestors
    lineage_step = set(graph.get(lineage).execution_set_asset_keys)
    for key in graph.get_all_asset_keys():
        if key.path[0] == config.name and key not in lineage_step:
            assert set(graph.get(key).execution_set_asset_keys) & ancestors, f"{key.path[-1]} may run after the lineage"


def test_a_backfill_can_run_every_ensemble_asset_with_its_parents(config):
    """Dagster's asset backfill puts an asset in the same run as a parent only when it visits the parent's step
    first. It visits steps by the highest level of their assets (at equal levels by name, so not reliably): each
    step must rank above the steps of its parents, or it waits for the backfill's next tick (30 s)."""
    graph = build_definitions([config]).resolve_asset_graph()
    level = {key: index for index, keys in enumerate(graph.toposorted_asset_keys_by_level) for key in keys}

    def step_level(key):
        return max(level[k] for k in graph.get(key).execution_set_asset_keys)

    checked = 0
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        if node.is_partitioned:
            continue
        for parent in node.parent_keys:
            if key in graph.get(parent).execution_set_asset_keys or graph.get(parent).is_partitioned:
                continue
            assert step_level(key) > step_level(parent), (key, parent)
            checked += 1
    assert checked >= 5


def test_jobs_split_members_from_the_ensemble(config):
    defs = build_definitions([config])
    member_keys = defs.resolve_job_def(members_job_name(config.name)).asset_layer.executable_asset_keys
    ensemble_keys = defs.resolve_job_def(ensemble_job_name(config.name)).asset_layer.executable_asset_keys
    assert {key.path[-1] for key in member_keys} == {"component_activations", "component_stats", "merge_history",
                                                     "merge_events", "membership_spans"}
    assert not member_keys & ensemble_keys
    assert {key.path[-1] for key in ensemble_keys} >= {"normalized_ensemble", "distance_matrices", "lineage_edges"}


def test_a_bad_registered_experiment_is_skipped_and_logged(tmp_path, monkeypatch, caplog):
    home = make_home(tmp_path / "home")
    experiments = ResultsStore(home / "spd_cluster").experiments_dir
    experiments.mkdir(parents=True)
    (experiments / "broken.yaml").write_text("name: broken\nmerge_config: {alpha: -1}\n")
    (experiments / "gone.yaml").write_text(f"name: gone\nsource: {{kind: files, directory: {tmp_path / 'missing'}}}\n")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    with caplog.at_level(logging.ERROR, logger="spd_cluster"):
        defs = build_definitions()
    groups = {key.path[0] for key in defs.resolve_asset_graph().get_all_asset_keys()}
    assert groups == {"default"}
    assert "skipped registered experiment broken.yaml" in caplog.text and "alpha" in caplog.text
    assert "skipped experiment 'gone'" in caplog.text and "does not exist" in caplog.text


def test_io_managers_store_values_and_tables_under_the_instance(config, tmp_path):
    members = source_for(config.source).member_keys()
    member = members[0]
    activations_def = experiment_assets(config, members).assets[0]
    storage = StorageResource()  # the root follows the test instance
    resources = {
        VALUE_IO_MANAGER_KEY: ValueIOManager(storage=storage),
        TABLE_IO_MANAGER_KEY: TableIOManager(storage=storage),
        source_resource_key(config.name): ActivationSourceResource.for_experiment(config),
        STORAGE_KEY: storage,  # where the step's progress file goes
    }
    (tmp_path / "instance").mkdir()
    with instance_for_test(temp_dir=str(tmp_path / "instance")) as instance:
        result = materialize([activations_def], partition_key=member, instance=instance, resources=resources)
        assert result.success
        store = ResultsStore(tmp_path / "instance" / "spd_cluster")
        assert store.value_path(config.name, "component_activations", member, ".npz").exists()
        stats = pl.read_parquet(store.table_file("component_stats", config.name, member))
        event = instance.get_latest_materialization_event(AssetKey([config.name, "component_stats"]))
        assert event.asset_materialization.metadata["dagster/row_count"].value == stats.height > 0
