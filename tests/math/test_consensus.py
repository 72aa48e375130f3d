"""Consensus and single-partition clusters against plain implementations of their definitions."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spd_math.consensus import consensus_clusters, partition_clusters


def textbook_consensus(partitions: np.ndarray, threshold: float) -> tuple[list[frozenset], dict[frozenset, float]]:
    n_members, c = partitions.shape
    co = np.array([[np.mean(partitions[:, x] == partitions[:, y]) for y in range(c)] for x in range(c)])
    parent = list(range(c))

    def find(x: int) -> int:
        while parent[x] != x:
            x = parent[x]
        return x

    for x, y in itertools.combinations(range(c), 2):
        if co[x, y] >= threshold:
            parent[find(x)] = find(y)
    groups: dict[int, set] = {}
    for x in range(c):
        groups.setdefault(find(x), set()).add(x)
    clusters = [frozenset(g) for g in groups.values() if len(g) > 1]
    stability = {g: float(np.mean([co[x, y] for x, y in itertools.combinations(sorted(g), 2)])) for g in clusters}
    return clusters, stability


@settings(max_examples=150, deadline=None)
@given(
    n_members=st.integers(1, 6),
    c=st.integers(1, 14),
    n_groups=st.integers(1, 6),
    threshold=st.sampled_from([0.5, 0.34, 0.75, 1.0]),
    seed=st.integers(0, 2**32 - 1),
)
def test_consensus_equals_the_definition(n_members, c, n_groups, threshold, seed):
    partitions = np.random.default_rng(seed).integers(0, n_groups, size=(n_members, c))
    result = consensus_clusters(partitions, threshold)
    expected, stability = textbook_consensus(partitions, threshold)
    found = [frozenset(np.flatnonzero(result.cluster_of == i)) for i in range(result.stability.size)]
    assert sorted(map(sorted, found)) == sorted(map(sorted, expected))
    for cluster_id, members in enumerate(found):
        assert result.stability[cluster_id] == pytest.approx(stability[members])
    # Ids count up in order of each cluster's first item.
    firsts = [min(members) for members in found]
    assert firsts == sorted(firsts)


def test_half_means_at_least_half():
    # Items 0 and 1 together in 2 of 4 members: exactly half is enough.
    partitions = np.array([[0, 0, 1], [0, 0, 1], [0, 1, 2], [0, 1, 2]])
    assert consensus_clusters(partitions).cluster_of.tolist() == [0, 0, -1]
    assert consensus_clusters(partitions, threshold=0.75).cluster_of.tolist() == [-1, -1, -1]


def test_partition_clusters_number_shared_groups_and_null_singletons():
    clusters = partition_clusters(np.array([7, 7, 3, 9, 9, 1]))
    assert clusters.cluster_of.tolist() == [0, 0, -1, 1, 1, -1]
    assert clusters.stability.tolist() == [1.0, 1.0]


def test_bad_consensus_arguments():
    with pytest.raises(ValueError, match="partitions"):
        consensus_clusters(np.zeros((0, 3), dtype=int))
    with pytest.raises(ValueError, match="threshold"):
        consensus_clusters(np.zeros((2, 3), dtype=int), threshold=0)
