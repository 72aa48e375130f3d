"""The results store's paths and writes, and each value type's file format, directly."""

from __future__ import annotations

import os

import numpy as np
import polars as pl
import pytest
import torch

from spd_assets.errors import StorageError
from spd_assets.storage.store import ResultsStore
from spd_assets.storage.values import (
    VALUE_FORMATS,
    ConsensusClusters,
    EnsembleDistances,
    ExplorerPage,
    MemberEnsemble,
    load_activations,
    load_consensus,
    load_distances,
    load_ensemble,
    load_page,
    save_activations,
    save_consensus,
    save_distances,
    save_ensemble,
    save_page,
    value_format,
)
from spd_math import MergeHistory, NormalizedEnsemble, ProcessedActivations


def test_store_paths_are_under_its_root_and_the_database_beside_it(tmp_path):
    store = ResultsStore(tmp_path / "spd_cluster")
    assert store.database_path == tmp_path / "spd_cluster.duckdb"
    assert store.value_path("exp", "merge_history", "member_001", ".zip") == tmp_path / "spd_cluster/exp/merge_history/member_001.zip"
    assert store.value_path("exp", "normalized_ensemble", None, ".npz") == tmp_path / "spd_cluster/exp/normalized_ensemble.npz"
    assert store.table_file("distances", "exp") == tmp_path / "spd_cluster/tables/distances/exp__all.parquet"
    assert store.table_file("merge_events", "exp", "m1").name == "exp__m1.parquet"


def test_write_table_replaces_atomically_and_leaves_no_temporary_files(tmp_path):
    store = ResultsStore(tmp_path / "root")
    first = store.write_table(pl.DataFrame({"a": [1, 2]}), "t", "exp", "p")
    second = store.write_table(pl.DataFrame({"a": [3]}), "t", "exp", "p")
    assert first == second
    assert pl.read_parquet(second)["a"].to_list() == [3]
    assert os.listdir(second.parent) == [second.name]


def test_a_failed_table_write_keeps_the_previous_file(tmp_path):
    store = ResultsStore(tmp_path / "root")
    path = store.write_table(pl.DataFrame({"a": [1]}), "t", "exp")

    class Broken:
        def write_parquet(self, target):
            open(target, "wb").write(b"half")
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        store.write_table(Broken(), "t", "exp")
    assert pl.read_parquet(path)["a"].to_list() == [1]
    assert os.listdir(path.parent) == [path.name]


def test_activations_round_trip_sparse_and_exact(tmp_path):
    values = torch.zeros(50, 7)
    values[::3, 2] = 0.5
    values[5, 6] = 1e-6
    processed = ProcessedActivations(activations=values, labels=[f"m:{i}" for i in range(7)], dead_labels=["m:99"])
    path = tmp_path / "a.npz"
    save_activations(path, processed)
    loaded = load_activations(path)
    assert torch.equal(loaded.activations, values)
    assert loaded.labels == processed.labels and loaded.dead_labels == ["m:99"]


def test_ensemble_and_distances_round_trip(tmp_path):
    merges = torch.tensor([[[0, 0, 1], [0, 0, 0]], [[0, 1, 1], [0, 0, 0]]])
    ensemble = MemberEnsemble(NormalizedEnsemble(merges=merges, labels=["a", "b", "c"], present=torch.ones(2, 3, dtype=torch.bool)),
                              members=["m0", "m1"], missing=["m2"])
    save_ensemble(tmp_path / "e.npz", ensemble)
    loaded = load_ensemble(tmp_path / "e.npz")
    assert torch.equal(loaded.ensemble.merges, merges) and loaded.members == ["m0", "m1"] and loaded.missing == ["m2"]

    distances = EnsembleDistances({"matching_dist": torch.tensor([[[0, 2], [2, 0]]])}, members=["m0", "m1"])
    save_distances(tmp_path / "d.npz", distances)
    loaded_distances = load_distances(tmp_path / "d.npz")
    assert torch.equal(loaded_distances.by_method["matching_dist"], distances.by_method["matching_dist"])


def test_value_formats_by_class_and_by_name_and_unknown_types_named():
    assert value_format(MergeHistory).suffix == ".npz" and value_format(MergeHistory).previous_suffixes == (".zip",)
    assert value_format("MemberEnsemble") is VALUE_FORMATS[MemberEnsemble]
    with pytest.raises(StorageError, match="no storage format for values of type 'dict'.*MergeHistory"):
        value_format(dict)


def test_missing_and_corrupt_value_files_name_the_file(tmp_path):
    with pytest.raises(StorageError, match="does not exist"):
        load_ensemble(tmp_path / "absent.npz")
    (tmp_path / "bad.npz").write_bytes(b"not an npz")
    with pytest.raises(StorageError, match="bad.npz is unreadable"):
        load_distances(tmp_path / "bad.npz")


def test_value_paths_use_each_types_suffix(tmp_path):
    store = ResultsStore(tmp_path)
    suffixes = {cls.__name__: value_format(cls).suffix for cls in VALUE_FORMATS}
    assert suffixes == {"ProcessedActivations": ".npz", "MergeHistory": ".npz", "MemberEnsemble": ".npz", "EnsembleDistances": ".npz",
                        "ConsensusClusters": ".npz", "ExplorerPage": ".html",
                        "TokenBatch": ".npz"}
    assert np.all([store.value_path("e", "x", None, s).suffix == s for s in suffixes.values()])


def test_consensus_and_explorer_page_round_trip(tmp_path):
    consensus = ConsensusClusters(
        iteration=7, rule="median over members of each member's MDL-loss minimum", threshold=0.5,
        members=["member_000", "member_001"], member_iterations=[6, 7], labels=["a:0", "a:1", "b:0"],
        cluster_of=np.array([0, 0, -1]), stability=np.array([0.75]), component_stability=np.array([0.75, 0.75, np.nan]))
    save_consensus(tmp_path / "c.npz", consensus)
    loaded = load_consensus(tmp_path / "c.npz")
    assert (loaded.iteration, loaded.rule, loaded.threshold, loaded.members, loaded.member_iterations, loaded.labels) == (
        consensus.iteration, consensus.rule, consensus.threshold, consensus.members, consensus.member_iterations,
        consensus.labels)
    np.testing.assert_array_equal(loaded.cluster_of, consensus.cluster_of)
    np.testing.assert_array_equal(loaded.component_stability, consensus.component_stability)
    assert repr(loaded) == "ConsensusClusters(iteration=7, 1 clusters of 2 of 3 components, threshold=0.5, members=2)"
    page = ExplorerPage("<!DOCTYPE html><title>é</title>")
    save_page(tmp_path / "p.html", page)
    assert load_page(tmp_path / "p.html") == page and isinstance(load_page(tmp_path / "p.html"), ExplorerPage)
    with pytest.raises(StorageError, match="missing.html"):
        load_page(tmp_path / "missing.html")
