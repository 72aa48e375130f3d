"""The warm-started group matching (spd_math.assignment) against a fresh assignment solve at every step.

`matched_totals` keeps its matching and prices from one partition pair to the next; every
step's total must equal scipy's `linear_sum_assignment` on that step's contingency table,
whatever the steps are (merges, splits, moves, relabellings, unrelated partitions).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from spd_math import MergeConfig, ProcessedActivations, assignment, compute_distances, merge_iteration
from spd_math.assignment import matched_totals


def reference_total(a: np.ndarray, b: np.ndarray) -> int:
    """The largest Σ C[p, σ(p)] over one-to-one group matchings, solved from scratch on the dense table."""
    _, a_group = np.unique(a, return_inverse=True)
    _, b_group = np.unique(b, return_inverse=True)
    table = np.zeros((a_group.max() + 1, b_group.max() + 1), dtype=np.int64)
    np.add.at(table, (a_group, b_group), 1)
    rows, cols = linear_sum_assignment(table, maximize=True)
    return int(table[rows, cols].sum())


def all_pairs(n_members: int) -> tuple[np.ndarray, np.ndarray]:
    first, second = np.triu_indices(n_members, 1)
    return first.astype(np.int64), second.astype(np.int64)


def assert_every_step_optimal(merges: np.ndarray, n_ids: int, first: np.ndarray, second: np.ndarray) -> None:
    totals = matched_totals(merges, n_ids, first, second)
    assert totals.shape == (merges.shape[1], first.size) and totals.dtype == np.int64
    for t in range(merges.shape[1]):
        expected = [reference_total(merges[i, t], merges[j, t]) for i, j in zip(first, second)]
        np.testing.assert_array_equal(totals[t], expected, err_msg=f"step {t}")


def next_partition(rng: np.random.Generator, row: np.ndarray, n_ids: int) -> np.ndarray:
    """One arbitrary change of a labelling with ids in [0, n_ids), n_ids ≥ 2n (so a free id always exists)."""
    n = row.size
    row = row.copy()
    groups = np.unique(row)
    free = np.setdiff1d(np.arange(n_ids), groups)
    kind = rng.choice(["merge", "merge_many", "split", "move", "swap", "relabel", "fresh", "repeat"])
    if kind == "merge" and groups.size >= 2:
        keep, gone = rng.choice(groups, size=2, replace=False)
        row[row == gone] = keep
    elif kind == "merge_many" and groups.size >= 3:
        chosen = rng.choice(groups, size=rng.integers(3, groups.size + 1), replace=False)
        row[np.isin(row, chosen)] = rng.choice(free)  # into a new id
    elif kind == "split":
        moved = (row == rng.choice(groups)) & (rng.random(n) < 0.5)
        row[moved] = rng.choice(free)
    elif kind == "move":
        row[rng.integers(n)] = rng.choice(np.concatenate([groups, free[:1]]))
    elif kind == "swap":  # two items trade groups: the same group sizes, different sets
        x, y = rng.integers(n, size=2)
        row[x], row[y] = row[y], row[x]
    elif kind == "relabel":  # the same partition under other ids
        row = rng.permutation(n_ids)[np.unique(row, return_inverse=True)[1]]
    elif kind == "fresh":  # an unrelated partition
        row = rng.permutation(n_ids)[rng.integers(0, rng.integers(1, n + 1), size=n)]
    return row


def random_sequences(rng: np.random.Generator, n_members: int, n_steps: int, n: int) -> tuple[np.ndarray, int]:
    n_ids = 2 * n + 1
    merges = np.empty((n_members, n_steps, n), dtype=np.int64)
    for member in range(n_members):
        row = rng.permutation(n_ids)[rng.integers(0, rng.integers(1, n + 1), size=n)]
        for t in range(n_steps):
            merges[member, t] = row
            row = next_partition(rng, row, n_ids)
    return merges, n_ids


@pytest.mark.parametrize("seed", range(20))
def test_arbitrary_partition_sequences(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 40))
    merges, n_ids = random_sequences(rng, n_members=3, n_steps=15, n=n)
    first, second = all_pairs(3)
    # Both orders of a pair, and a member with itself.
    first, second = np.concatenate([first, second, [1]]), np.concatenate([second, first, [1]])
    assert_every_step_optimal(merges, n_ids, first, second)


@pytest.mark.parametrize("seed", range(2))
def test_long_sequences_of_small_changes(seed: int) -> None:
    """Many groups and small moves: repairs run long alternating paths through a deep matching."""
    rng = np.random.default_rng(100 + seed)
    n, n_ids = 150, 301
    merges = np.empty((2, 60, n), dtype=np.int64)
    for member in range(2):
        row = rng.integers(0, 40, size=n)
        for t in range(60):
            merges[member, t] = row
            row = row.copy()
            for _ in range(rng.integers(1, 4)):
                row[rng.integers(n)] = rng.integers(0, 45)
    assert_every_step_optimal(merges, n_ids, *all_pairs(2))


def merge_runs(seed: int, n_members: int, n_samples: int, n_components: int) -> np.ndarray:
    """`[n_members, c - 1, c]` full-length merge histories of spd_math's engine on one random batch."""
    generator = np.random.default_rng(seed)
    shared = generator.random((n_samples, 4)) < 0.3  # latent features several components follow
    follows = generator.integers(0, 4, size=n_components)
    active = shared[:, follows] & (generator.random((n_samples, n_components)) < 0.8)
    active |= generator.random((n_samples, n_components)) < 0.1
    values = np.where(active, generator.random((n_samples, n_components)) * 0.9 + 0.1, 0.0).astype(np.float32)
    activations = ProcessedActivations(activations=values, labels=[f"m:{i}" for i in range(n_components)])
    config = MergeConfig(iters=None, merge_pair_sampling_kwargs={"threshold": 0.3})
    return np.stack([merge_iteration(activations, config, seed=seed * 100 + m).group_idxs.numpy() for m in range(n_members)])


@pytest.mark.parametrize("seed", range(2))
def test_merge_histories_every_iteration(seed: int) -> None:
    merges = merge_runs(seed, n_members=4, n_samples=300, n_components=40)
    assert merges.shape[0] == 4 and merges.shape[2] == 40 and merges.shape[1] >= 30  # runs to a few groups
    assert_every_step_optimal(merges, merges.max() + 1, *all_pairs(4))
    # And through the public entry point: n minus the totals, one symmetric matrix per iteration.
    distances = compute_distances(merges, "perm_invariant_hamming").numpy()
    for t in range(merges.shape[1]):
        for i, j in itertools.combinations(range(4), 2):
            assert distances[t, i, j] == distances[t, j, i] == 40 - reference_total(merges[i, t], merges[j, t])


def test_edge_cases() -> None:
    n = 7
    one_group = np.zeros(n, dtype=np.int64)
    alone = np.arange(n)
    halves = np.array([0, 0, 0, 3, 3, 3, 3])
    # Every step of member 0 against member 1: one group vs every item alone, identical partitions, ...
    member0 = np.stack([one_group, alone, halves, one_group, alone, alone])
    member1 = np.stack([alone, alone, halves, one_group, one_group, halves[::-1]])
    merges = np.stack([member0, member1])
    totals = matched_totals(merges, n, np.array([0]), np.array([1]))[:, 0]
    assert totals.tolist() == [1, n, n, n, 1, 2]
    # One item; one step; a single pair.
    assert matched_totals(np.zeros((2, 1, 1), dtype=np.int64), 1, np.array([0]), np.array([1])).tolist() == [[1]]
    # No pairs at all; no items at all.
    assert matched_totals(merges, n, np.array([], np.int64), np.array([], np.int64)).shape == (6, 0)
    assert matched_totals(np.zeros((2, 3, 0), dtype=np.int64), 1, np.array([0]), np.array([1])).tolist() == [[0]] * 3


def test_two_members_and_unchanged_steps() -> None:
    """Steps where neither member changes keep the previous total."""
    rng = np.random.default_rng(5)
    merges, n_ids = random_sequences(rng, n_members=2, n_steps=10, n=25)
    merges = np.repeat(merges, 3, axis=1)  # every partition three times in a row
    assert_every_step_optimal(merges, n_ids, *all_pairs(2))


def test_pairs_in_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pairs solved a few at a time (a bound on the state's memory) give the same totals."""
    rng = np.random.default_rng(21)
    merges, n_ids = random_sequences(rng, n_members=4, n_steps=6, n=30)
    first, second = all_pairs(4)
    whole = matched_totals(merges, n_ids, first, second)
    monkeypatch.setattr(assignment, "MAX_PAIR_ITEMS", 1)  # as few pairs per chunk as there are threads
    np.testing.assert_array_equal(matched_totals(merges, n_ids, first, second), whole)
    assert_every_step_optimal(merges, n_ids, first, second)
