"""Result tables from real value objects, conformed to their one schema; lineage rows from records."""

from __future__ import annotations

from datetime import datetime, timezone

import numpy as np
import polars as pl
import pytest
import torch

from spd_assets.config import ExperimentConfig
from spd_assets.storage import tables
from spd_assets.storage.lineage import Consumed, MaterializationRecord, fingerprint, lineage_tables
from spd_assets.storage.schemas import TABLE_SCHEMAS, TableSchema
from spd_math import MergeConfig, ProcessedActivations, merge_iteration, normalize_ensemble


@pytest.fixture(scope="module")
def histories():
    generator = torch.Generator().manual_seed(3)
    result = []
    for member in range(2):  # the second member lacks component mod:0
        n_components = 12 - member
        values = (torch.rand(400, n_components, generator=generator) < 0.2).float()
        labels = [f"mod:{i}" for i in range(member, 12)]
        result.append(merge_iteration(ProcessedActivations(activations=values, labels=labels), MergeConfig(iters=None), seed=member))
    return result


def _matches_schema(frame: pl.DataFrame, table: str) -> None:
    assert frame.schema == pl.Schema(TABLE_SCHEMAS[table].dtypes)


def test_every_builder_gives_exactly_its_schema(histories):
    history = histories[0]
    processed = ProcessedActivations(activations=torch.rand(30, 4), labels=["a.b:0", "a.b:1", "c:0", "c:1"])
    _matches_schema(tables.component_stats("e", "m", processed, dead_labels=["c:1"], activation_threshold=0.5), "component_stats")
    _matches_schema(tables.merge_events("e", "m", history), "merge_events")
    _matches_schema(tables.membership_spans("e", "m", history), "membership_spans")
    ensemble = normalize_ensemble(histories)
    members = tables.ensemble_members("e", ensemble, ["m0", "m1"], ["m0", "m1", "m2"], {"m0": histories[0], "m1": histories[1]})
    _matches_schema(members, "ensemble_members")
    assert members.filter(pl.col("member") == "m2")["status"].to_list() == ["missing"]
    _matches_schema(tables.distances_long("e", "matching_dist", torch.zeros(2, 2, 2, dtype=torch.int64), ["m0", "m1"]), "distances")
    _matches_schema(tables.experiment_row(ExperimentConfig(), datetime.now(timezone.utc)), "experiments")


def test_membership_spans_reproduce_every_partition(histories):
    history = histories[0]
    spans = tables.membership_spans("e", "m", history)
    labels = history.labels
    for iteration in range(history.n_iters):
        at = spans.filter((pl.col("first_iteration") <= iteration) & (pl.col("last_iteration") >= iteration))
        group_of = dict(zip(at["label"], at["group_label"]))
        assert set(group_of) == set(labels)
        partition = history.group_idxs[iteration].numpy()
        for x, label in enumerate(labels):
            together = [labels[y] for y in np.flatnonzero(partition == partition[x])]
            assert group_of[label] == together[0]  # the group's smallest member (labels are in member order)


def test_conform_names_missing_and_extra_columns():
    schema = TableSchema("t", "test", {"a": ("INTEGER", ""), "b": ("VARCHAR", "")})
    assert schema.conform(pl.DataFrame({"b": ["x"], "a": [1]})).columns == ["a", "b"]
    with pytest.raises(ValueError, match=r"missing \['b'\], extra \['c'\]"):
        schema.conform(pl.DataFrame({"a": [1], "c": [2]}))
    with pytest.raises(ValueError, match="unknown SQL types"):
        TableSchema("t", "test", {"a": ("INT4", "")})


def test_fingerprints_follow_content_not_identity():
    first = ProcessedActivations(activations=torch.ones(3, 2), labels=["a", "b"])
    same = ProcessedActivations(activations=torch.ones(3, 2), labels=["a", "b"])
    relabelled = ProcessedActivations(activations=torch.ones(3, 2), labels=["a", "c"])
    retyped = ProcessedActivations(activations=torch.ones(3, 2, dtype=torch.float64), labels=["a", "b"])
    assert fingerprint(first) == fingerprint(same)
    assert len({fingerprint(first), fingerprint(relabelled), fingerprint(retyped)}) == 3


def test_lineage_rows_from_records():
    when = datetime(2026, 1, 1, tzinfo=timezone.utc)
    records = [
        MaterializationRecord("e", "merge_history", "m0", "run-a", "e__merge_history", when, "1", "v1", "cfg", "/x/m0.zip",
                              {"iterations": 5}, [Consumed("component_activations", "m0", "v0", "run-0")]),
        MaterializationRecord("e", "normalized_ensemble", None, "run-b", "e__normalized_ensemble", when, "1", "v2", "cfg", None,
                              {}, [Consumed("merge_history", "m0", "v1", "run-a"), Consumed("merge_history", "m1", "v9", None)]),
    ]
    materializations, edges = lineage_tables(records)
    _matches_schema(materializations, "materializations")
    _matches_schema(edges, "lineage_edges")
    assert materializations["run_id"].to_list() == ["run-a", "run-b"]
    assert edges.filter(pl.col("asset") == "normalized_ensemble")["upstream_run_id"].to_list() == ["run-a", None]
    empty_materializations, empty_edges = lineage_tables([])
    assert empty_materializations.height == 0 and empty_edges.columns == list(TABLE_SCHEMAS["lineage_edges"].columns)
