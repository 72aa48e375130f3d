"""Histories and ensembles kept as merges: partitions replayed exactly, distances replayed equal the textbook."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spd_math import (
    DISTANCE_METHODS,
    HistoryError,
    MergeConfig,
    MergeHistory,
    ProcessedActivations,
    compute_distances,
    merge_iteration,
    normalize_ensemble,
    replay,
)
from tests.math.test_distances import textbook_matrix


def merged_by_rule(pairs: list[tuple[int, int]], c: int) -> np.ndarray:
    """docs/math.md §6 applied literally: the higher group joins the lower, ids above it move down by one."""
    row = np.arange(c)
    rows = []
    for low, high in pairs:
        row = row.copy()
        row[row == high] = low
        row[row > high] -= 1
        rows.append(row)
    return np.array(rows, dtype=np.int64).reshape(len(pairs), c)


@st.composite
def merge_sequences(draw, max_components: int = 30) -> tuple[int, list[tuple[int, int]]]:
    c = draw(st.integers(2, max_components))
    n_merges = draw(st.integers(0, c - 1))
    pairs = []
    for k in range(c, c - n_merges, -1):
        a, b = draw(st.lists(st.integers(0, k - 1), min_size=2, max_size=2, unique=True))
        pairs.append((a, b))  # as sampled: either order
    return c, pairs


@settings(max_examples=200, deadline=None)
@given(sequence=merge_sequences())
def test_partitions_replayed_from_merges_are_the_rule(sequence) -> None:
    c, sampled = sequence
    expected = merged_by_rule([(min(p), max(p)) for p in sampled], c)
    history = MergeHistory(labels=[f"m:{x}" for x in range(c)], selected_pairs=np.array(sampled, dtype=np.int64).reshape(-1, 2))
    assert history.is_merge_sequence and history.n_iters == len(sampled)
    assert history.k_groups.tolist() == list(range(c - 1, c - 1 - len(sampled), -1))
    np.testing.assert_array_equal(history.group_idxs.numpy(), expected)
    for t in range(len(sampled)):
        np.testing.assert_array_equal(history.partition_at(t), expected[t])
    np.testing.assert_array_equal(np.array(list(history.partitions_between())).reshape(-1, c), expected)
    previous = np.arange(c)
    for t in range(len(sampled)):  # what each merge changed: the components whose group is another set now
        changed = [x for x in range(c)
                   if set(np.flatnonzero(expected[t] == expected[t][x])) != set(np.flatnonzero(previous == previous[x]))]
        assert history.merged_components(t).tolist() == changed
        previous = expected[t]
    # Dense partitions give back the same merges, and a history built from them holds only those.
    rebuilt = MergeHistory(labels=history.labels, group_idxs=expected)
    assert rebuilt.is_merge_sequence and torch.equal(rebuilt.merge_pairs, history.merge_pairs)


def test_partitions_of_another_numbering_are_kept_as_given() -> None:
    given_ids = np.array([[0, 0, 2], [0, 0, 0]])  # not numbered by smallest member: no merge sequence
    history = MergeHistory(labels=["a:0", "a:1", "b:0"], group_idxs=given_ids)
    assert not history.is_merge_sequence and history.merge_pairs is None
    assert history.group_idxs.tolist() == given_ids.tolist() and history.k_groups.tolist() == [2, 1]
    assert history.partition_at(-1).tolist() == [0, 0, 0]
    with pytest.raises(HistoryError, match="no merges to replay"):
        history.merge_representatives()


@pytest.mark.parametrize(
    ("pairs", "message"),
    [([[0, 0]], r"merge_pairs\[0\]: expected two different group ids in 0\.\.2"),
     ([[0, 1], [0, 2]], r"merge_pairs\[1\]: expected two different group ids in 0\.\.1"),
     ([[0, 1, 2]], r"selected_pairs: expected shape \[n_iters, 2\]")],
)
def test_merges_that_are_not_two_groups_are_named(pairs, message) -> None:
    with pytest.raises(HistoryError, match=message):
        MergeHistory(labels=["a", "b", "c"], selected_pairs=pairs)


def test_a_merge_keeps_no_partitions_and_pickles_without_derived_arrays() -> None:
    values = np.random.default_rng(0).random((300, 40), dtype=np.float32) > 0.8
    history = merge_iteration(ProcessedActivations(values, [f"m:{x}" for x in range(40)]), MergeConfig(), seed=3)
    assert history.is_merge_sequence and history.n_iters == 37  # merged to 3 groups
    assert "group_idxs" not in history._cache  # nothing of size iters x c until asked for
    dense = history.group_idxs
    assert dense.shape == (37, 40) and "group_idxs" in history._cache
    restored = pickle.loads(pickle.dumps(history))
    assert restored._cache == {} and torch.equal(restored.group_idxs, dense)
    assert len(pickle.dumps(history)) < dense.numel() * dense.element_size()


def ensemble_of_merge_runs(rng: np.random.Generator, n_members: int, universe: int) -> list[MergeHistory]:
    """Members with different labels (some missing), each merged along a random sequence."""
    histories = []
    for _ in range(n_members):
        labels = sorted(rng.choice(universe, size=int(rng.integers(universe // 2, universe + 1)), replace=False),
                        key=lambda x: (x % 3, x))  # an order of its own, not the union's sorted one
        c = len(labels)
        pairs = [tuple(rng.choice(k, size=2, replace=False)) for k in range(c, 3, -1)]
        histories.append(MergeHistory(labels=[f"layer.{x % 3}:{x}" for x in labels], selected_pairs=np.array(pairs)))
    return histories


@pytest.mark.parametrize("seed", range(4))
def test_replayed_distances_equal_the_textbook_and_the_array_path(seed: int) -> None:
    rng = np.random.default_rng(seed)
    ensemble = normalize_ensemble(ensemble_of_merge_runs(rng, n_members=int(rng.integers(2, 5)), universe=24))
    assert ensemble.is_compact
    merges = ensemble.merges.numpy()
    for method in DISTANCE_METHODS:
        replayed = compute_distances(ensemble, method)
        np.testing.assert_array_equal(replayed.numpy(), compute_distances(merges, method).numpy(), err_msg=method)
        for t in range(0, ensemble.n_iters, 3):
            np.testing.assert_array_equal(replayed[t].numpy(), textbook_matrix(merges[:, t], method), err_msg=method)
            np.testing.assert_array_equal(ensemble.partitions_at(t), merges[:, t])


def test_replay_kernels_agree_with_the_array_path_on_real_merges() -> None:
    """Merges of planted co-firing groups (large groups form, unlike uniform random merges)."""
    rng = np.random.default_rng(5)
    n, c = 2000, 120
    groups = rng.integers(0, 12, size=c)
    latent = rng.random((n, 12)) < 0.05
    histories = []
    for member in range(3):
        values = (latent[:, groups] & (rng.random((n, c)) < 0.9)) | (rng.random((n, c)) < 0.005)
        labels = [f"m:{x}" for x in range(c)]
        keep = np.sort(rng.choice(c, size=c - member * 5, replace=False))
        histories.append(merge_iteration(ProcessedActivations(values[:, keep], [labels[x] for x in keep]),
                                         MergeConfig(), seed=member))
    ensemble = normalize_ensemble(histories)
    for method in DISTANCE_METHODS:
        np.testing.assert_array_equal(compute_distances(ensemble, method).numpy(),
                                      compute_distances(ensemble.merges.numpy(), method).numpy(), err_msg=method)


def test_replay_module_matches_itself_at_scale_in_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    c = 500
    rng = np.random.default_rng(1)
    pairs = np.array([sorted(rng.choice(k, size=2, replace=False)) for k in range(c, 3, -1)])
    reps, invalid = replay.representatives(pairs, c)
    assert invalid == replay.ALL_VALID
    monkeypatch.setattr(replay, "ITER_BLOCK_IDS", 3 * c + 7)  # blocks of 3 partitions
    blocks = np.array(list(replay.iter_partitions(pairs, reps, c)))
    np.testing.assert_array_equal(blocks, merged_by_rule([tuple(p) for p in pairs], c))
