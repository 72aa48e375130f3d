"""Which iteration the consensus is taken at, and the stability of each component, against their definitions."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spd_assets.analysis.consensus import (
    ConsensusError,
    boundary_warning,
    choose_iteration,
    co_association,
    component_stability,
    ensemble_consensus,
    lower_median,
)
from spd_assets.config import ConsensusConfig
from spd_math import adjusted_rand_index
from spd_math.consensus import consensus_clusters
from tests.analysis.small_ensemble import small_ensemble


@pytest.fixture(scope="module")
def small():
    return small_ensemble()


def test_lower_median():
    assert lower_median([5, 1, 3]) == 3
    assert lower_median([4, 1, 3, 2]) == 2
    assert lower_median([7]) == 7


def test_default_rule_is_the_median_of_the_members_mdl_minima(small):
    config, _, histories, ensemble, _, consensus = small
    minima = [int(np.argmin(histories[m].mdl_losses.numpy())) for m in ensemble.members]
    assert consensus.member_iterations == minima
    assert consensus.iteration == sorted(minima)[(len(minima) - 1) // 2]
    assert "MDL" in consensus.rule and consensus.threshold == 0.5


def test_k_rule_and_fixed_iteration(small):
    _, _, histories, ensemble, _, _ = small
    ordered = [histories[m] for m in ensemble.members]
    iteration, rule, choices = choose_iteration(ConsensusConfig(k=10), ordered, ensemble.members, ensemble.ensemble.n_iters)
    assert choices == [h.c_components - 11 for h in ordered] and "k=10" in rule
    assert iteration == lower_median(choices)
    assert choose_iteration(ConsensusConfig(iteration=4), ordered, ensemble.members, ensemble.ensemble.n_iters)[:2] == (
        4, "configured iteration 4")


def test_an_iteration_outside_the_ensemble_is_a_clear_error(small):
    _, _, histories, ensemble, _, _ = small
    ordered = [histories[m] for m in ensemble.members]
    with pytest.raises(ConsensusError, match=r"iterations 0\.\.\d+; set consensus.iteration or consensus.k"):
        choose_iteration(ConsensusConfig(iteration=10_000), ordered, ensemble.members, ensemble.ensemble.n_iters)
    with pytest.raises(ConsensusError, match="k=100000"):
        choose_iteration(ConsensusConfig(k=100_000), ordered, ensemble.members, ensemble.ensemble.n_iters)


def test_consensus_at_the_planted_k_recovers_the_planted_truth(small):
    _, source, histories, ensemble, _, _ = small
    truth = source.planted_partition(ensemble.ensemble.labels)
    planted_k = np.unique(truth).size
    consensus = ensemble_consensus(ensemble, [histories[m] for m in ensemble.members], ConsensusConfig(k=planted_k))
    found = np.where(consensus.cluster_of >= 0, consensus.cluster_of, consensus.n_clusters + np.arange(truth.size))
    assert adjusted_rand_index(found, truth) > 0.95


def textbook_component_stability(partitions: np.ndarray, cluster_of: np.ndarray) -> np.ndarray:
    expected = np.full(cluster_of.size, np.nan)
    for x in np.flatnonzero(cluster_of >= 0):
        others = [y for y in np.flatnonzero(cluster_of == cluster_of[x]) if y != x]
        expected[x] = np.mean([np.mean(partitions[:, x] == partitions[:, y]) for y in others])
    return expected


@settings(max_examples=100, deadline=None)
@given(n_members=st.integers(1, 6), c=st.integers(1, 12), n_groups=st.integers(1, 5),
       threshold=st.sampled_from([0.5, 0.34, 1.0]), seed=st.integers(0, 2**32 - 1))
def test_component_stability_equals_the_definition(n_members, c, n_groups, threshold, seed):
    partitions = np.random.default_rng(seed).integers(0, n_groups, size=(n_members, c))
    clusters = consensus_clusters(partitions, threshold)
    stability = component_stability(partitions, clusters.cluster_of)
    np.testing.assert_allclose(stability, textbook_component_stability(partitions, clusters.cluster_of))
    # A cluster's stability is the mean of its components'.
    for cluster, value in enumerate(clusters.stability):
        assert stability[clusters.cluster_of == cluster].mean() == pytest.approx(value)


def test_co_association_matrix():
    partitions = np.array([[0, 0, 1], [0, 1, 1]])
    expected = np.array([[1, 0.5, 0], [0.5, 1, 0.5], [0, 0.5, 1]])
    np.testing.assert_allclose(co_association(partitions, np.arange(3)), expected)
    np.testing.assert_allclose(co_association(partitions, np.array([2, 0])), expected[np.ix_([2, 0], [2, 0])])
    for x, y in itertools.product(range(3), repeat=2):
        assert co_association(partitions, np.array([x, y]))[0, 1] == expected[x, y]


def test_a_minimum_where_the_merges_stopped_is_flagged_with_what_to_change(small):
    config, source, histories, ensemble, _, _ = small
    members = list(ensemble.members)
    full = [histories[m] for m in members]
    assert boundary_warning(ConsensusConfig(), full, members) is None  # merged to the end: real minima
    # The same merges cut short while the loss still falls: each one's "minimum" is where it stopped.
    cut = [truncated(history, int(np.argmin(history.mdl_losses.numpy())) // 2) for history in full]
    warning = boundary_warning(ConsensusConfig(), cut, members)
    assert warning is not None and f"{len(members)} of {len(members)} members" in warning
    assert "merge_config.iters" in warning and "consensus.k" in warning
    assert boundary_warning(ConsensusConfig(k=40), cut, members) is None  # another rule chose the iteration
    # One member of several at its boundary moves the median nowhere near it: no warning.
    mixed = [cut[0], *full[1:]]
    assert boundary_warning(ConsensusConfig(), mixed, members) is None


def truncated(history, n_iters):
    """The first `n_iters` merges of `history`, as a merge stopped there by `iters` would have recorded them."""
    return dataclasses.replace(
        history, selected_pairs=history.selected_pairs[:n_iters], group_idxs=history.group_idxs[:n_iters],
        k_groups=history.k_groups[:n_iters], pair_costs=history.pair_costs[:n_iters],
        mdl_losses=history.mdl_losses[:n_iters])
