"""The real asset graph, materialized through Dagster into a temporary DAGSTER_HOME."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import duckdb
import numpy as np
import pytest
import torch
from dagster import AssetCheckKey, AssetKey, DagsterInstance

from spd_assets.sources import source_for
from spd_assets.storage.database import connect_read_only
from spd_assets.storage.values import load_activations, load_consensus, load_distances, load_ensemble, load_history
from spd_math import (
    compute_distances,
    drop_dead,
    merge_iteration,
    normalize_ensemble,
    process_activations,
)
from spd_math.consensus import consensus_clusters
from tests.pipeline_helpers import (
    asset_path,
    definitions_for,
    make_home,
    materialize_experiment,
    small_config,
    store_at,
)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """One full materialization of a 3-member experiment, shared by the tests of this module."""
    home = make_home(tmp_path_factory.mktemp("dagster_home"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DAGSTER_HOME", str(home))
        config = small_config()
        members = source_for(config.source).member_keys()
        defs = definitions_for(config)
        with DagsterInstance.get() as instance:
            member_results, ensemble_result = materialize_experiment(defs, instance, config, members)
            yield {"home": home, "config": config, "members": members, "defs": defs, "instance": instance,
                   "member_results": member_results, "ensemble_result": ensemble_result}


def test_every_asset_materializes_with_metadata(pipeline):
    assert all(result.success for result in pipeline["member_results"].values())
    assert pipeline["ensemble_result"].success
    instance, name = pipeline["instance"], pipeline["config"].name
    for asset in ("component_activations", "merge_history"):
        assert instance.get_materialized_partitions(AssetKey([name, asset])) == set(pipeline["members"])
    history_event = instance.get_latest_materialization_event(AssetKey([name, "merge_history"]))
    metadata = history_event.asset_materialization.metadata
    for key in ("final_k", "mdl_start", "mdl_end", "iterations", "seconds", "device", "seed"):
        assert key in metadata
    assert metadata["final_k"].value == 3
    distances_metadata = instance.get_latest_materialization_event(AssetKey([name, "distance_matrices"])).asset_materialization.metadata
    assert {"perm_invariant_hamming_mean_first", "matching_dist_mean_last"} <= set(distances_metadata)


PLOTS = {"merge_history": ["mdl_curve"], "normalized_ensemble": ["member_overlap_heatmap"],
         "distance_matrices": ["distances_plot"], "consensus_clusters": ["co_association", "distances_at_iteration"]}


@pytest.mark.parametrize("asset", list(PLOTS))
def test_plots_are_png_images_in_markdown_metadata(pipeline, asset):
    metadata = pipeline["instance"].get_latest_materialization_event(
        AssetKey([pipeline["config"].name, asset])).asset_materialization.metadata
    for name in PLOTS[asset]:
        found = re.fullmatch(r"!\[[^\]]+\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", metadata[name].value)
        assert found, f"{asset}.{name} is not an embedded PNG"
        png = base64.b64decode(found.group(1))
        assert png.startswith(b"\x89PNG") and 5_000 < len(png) < 100_000


def test_lineage_rows_name_plots_instead_of_carrying_them(pipeline):
    connection = connect_read_only(store_at(pipeline["home"]))
    try:
        rows = connection.execute(
            "SELECT metadata_json FROM materializations WHERE experiment = ? AND asset = 'merge_history'",
            [pipeline["config"].name],
        ).fetchall()
    finally:
        connection.close()
    assert len(rows) == len(pipeline["members"])
    for (metadata_json,) in rows:
        metadata = json.loads(metadata_json)
        assert "data:image" not in metadata_json and len(metadata_json) < 5_000
        assert metadata["mdl_curve"] == "(plot: see the asset in the Dagster UI)" and metadata["final_k"] == 3


def test_consensus_and_explorer_are_materialized(pipeline):
    config, home, instance = pipeline["config"], pipeline["home"], pipeline["instance"]
    consensus = load_consensus(asset_path(config.name, "consensus_clusters", None, home))
    ensemble = load_ensemble(asset_path(config.name, "normalized_ensemble", None, home))
    assert consensus.labels == ensemble.ensemble.labels and consensus.members == pipeline["members"]
    expected = consensus_clusters(ensemble.ensemble.merges[:, consensus.iteration, :].numpy(), threshold=0.5)
    assert np.array_equal(consensus.cluster_of, expected.cluster_of)
    with connect_read_only(store_at(home)) as connection:
        rows = connection.execute("SELECT count(*), count(cluster), max(iteration) FROM consensus_components "
                                  "WHERE experiment = ?", [config.name]).fetchone()
    assert rows == (len(consensus.labels), int((consensus.cluster_of >= 0).sum()), consensus.iteration)
    event = instance.get_latest_materialization_event(AssetKey([config.name, "cluster_explorer"]))
    page = Path(event.asset_materialization.metadata["path"].value)
    assert event.asset_materialization.metadata["open"].value == page.as_uri()
    html = page.read_text()
    assert html.startswith("<!DOCTYPE html>") and '"experiment":"small"' in html


def test_stored_results_equal_direct_spd_math(pipeline):
    config, members, home = pipeline["config"], pipeline["members"], pipeline["home"]
    source = source_for(config.source)
    histories = []
    for member in members:
        seed = config.member_seed(member)
        processed = drop_dead(
            process_activations(source.load_batch(member, seed), seq_mode=config.seq_mode),
            config.merge_config.filter_dead_threshold,
        )
        stored_activations = load_activations(asset_path(config.name, "component_activations", member, home))
        assert stored_activations.labels == processed.labels
        assert stored_activations.dead_labels == processed.dead_labels
        # The synthetic source streams its batches into compact form: the entries above the activation threshold
        # (all the merge reads), with the dense batch's values.
        threshold = config.merge_config.activation_threshold
        active = processed.active_mask(threshold).toarray()
        assert np.array_equal(stored_activations.active_mask(threshold).toarray(), active)
        assert np.array_equal(stored_activations.to_scipy_csr().toarray()[active], processed.activations.numpy()[active])

        direct = merge_iteration(processed, config.merge_config, seed=seed)
        stored = load_history(asset_path(config.name, "merge_history", member, home))
        assert stored.labels == direct.labels
        assert torch.equal(stored.group_idxs, direct.group_idxs)
        assert torch.equal(stored.selected_pairs, direct.selected_pairs)
        assert torch.equal(stored.mdl_losses, direct.mdl_losses)
        histories.append(direct)

    ensemble = normalize_ensemble(histories)
    stored_ensemble = load_ensemble(asset_path(config.name, "normalized_ensemble", None, home))
    assert stored_ensemble.members == members and stored_ensemble.missing == []
    assert torch.equal(stored_ensemble.ensemble.merges, ensemble.merges)
    stored_distances = load_distances(asset_path(config.name, "distance_matrices", None, home))
    for method in config.distance_methods:
        assert torch.equal(stored_distances.by_method[method], compute_distances(ensemble, method))


def test_duckdb_answers_with_the_expected_rows(pipeline):
    config, members = pipeline["config"], pipeline["members"]
    connection = connect_read_only(store_at(pipeline["home"]))
    try:
        iterations = dict(
            connection.execute(
                "SELECT member, count(*) FROM merge_events WHERE experiment = ? GROUP BY member", [config.name]
            ).fetchall()
        )
        histories = {m: load_history(asset_path(config.name, "merge_history", m, pipeline["home"])) for m in members}
        assert iterations == {m: h.n_iters for m, h in histories.items()}

        # Memberships at an iteration, expanded from spans, agree with the stored partitions.
        member, iteration = members[0], 5
        rows = connection.execute(
            "SELECT label, group_label FROM memberships_at(?) WHERE experiment = ? AND member = ?",
            [iteration, config.name, member],
        ).fetchall()
        history = histories[member]
        partition = history.group_idxs[iteration].numpy()
        by_label = dict(rows)
        assert set(by_label) == set(history.labels)
        for x, label in enumerate(history.labels):
            same_group = {history.labels[y] for y in np.flatnonzero(partition == partition[x])}
            assert by_label[label] == min(same_group, key=history.labels.index)

        n_iters = min(h.n_iters for h in histories.values())
        n_pairs = len(members) * (len(members) - 1)
        distance_rows = connection.execute(
            "SELECT method, count(*) FROM distances WHERE experiment = ? GROUP BY method", [config.name]
        ).fetchall()
        assert dict(distance_rows) == {method: n_iters * n_pairs for method in config.distance_methods}
        stats = connection.execute(
            "SELECT count(*), count(DISTINCT member) FROM component_stats WHERE experiment = ?", [config.name]
        ).fetchone()
        assert stats[1] == len(members) and stats[0] >= sum(h.c_components for h in histories.values())
    finally:
        connection.close()


def test_checks_pass_including_planted_truth(pipeline):
    instance, name = pipeline["instance"], pipeline["config"].name
    expected = {
        ("merge_history", "partition_sizes"),
        ("merge_history", "planted_truth_recovered"),
        ("normalized_ensemble", "every_component_assigned"),
        ("normalized_ensemble", "all_members_present"),
        ("distance_matrices", "symmetric_with_zero_diagonal"),
    }
    for asset, check in expected:
        records = instance.event_log_storage.get_asset_check_execution_history(
            AssetCheckKey(AssetKey([name, asset]), check), limit=10
        )
        assert records, f"no evaluation of {asset}.{check}"
        for record in records:
            evaluation = record.event.dagster_event.event_specific_data
            assert evaluation.passed, f"{asset}.{check} failed: {evaluation.metadata}"


def test_rematerializing_a_partition_replaces_its_rows(pipeline):
    config, members, instance = pipeline["config"], pipeline["members"], pipeline["instance"]
    query = "SELECT count(*) FROM merge_events WHERE experiment = ? AND member = ?"
    with connect_read_only(store_at(pipeline["home"])) as connection:
        before = connection.execute(query, [config.name, members[1]]).fetchone()[0]
        total_before = connection.execute("SELECT count(*) FROM component_stats").fetchone()[0]
    job = pipeline["defs"].resolve_job_def(f"{config.name}__members")
    assert job.execute_in_process(instance=instance, partition_key=members[1]).success
    with connect_read_only(store_at(pipeline["home"])) as connection:
        assert connection.execute(query, [config.name, members[1]]).fetchone()[0] == before
        assert connection.execute("SELECT count(*) FROM component_stats").fetchone()[0] == total_before
    assert len(instance.fetch_materializations(AssetKey([config.name, "merge_history"]), limit=100).records) == len(members) + 1


def test_database_is_only_views_over_parquet(pipeline):
    connection = duckdb.connect(str(pipeline["home"] / "spd_cluster.duckdb"), read_only=True)
    try:
        kinds = dict(connection.execute("SELECT table_name, table_type FROM information_schema.tables").fetchall())
    finally:
        connection.close()
    assert kinds.pop("spd_cluster_meta") == "BASE TABLE"
    assert set(kinds.values()) == {"VIEW"}
