"""Adjusted Rand index against a pair-counting definition, its invariances and known values; canonical labels."""

from __future__ import annotations

from fractions import Fraction
from itertools import combinations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spd_math.partitions import adjusted_rand_index, canonical_labels


def pair_counting_ari(a: list[int], b: list[int]) -> float:
    """ARI from its definition: classify every unordered pair of items, then (index - expected) / (max - expected)."""
    n_pairs = together_a = together_b = together_both = 0
    for x, y in combinations(range(len(a)), 2):
        n_pairs += 1
        same_a, same_b = a[x] == a[y], b[x] == b[y]
        together_a += same_a
        together_b += same_b
        together_both += same_a and same_b
    if n_pairs == 0:
        return 1.0
    expected = together_a * together_b / n_pairs
    maximum = (together_a + together_b) / 2
    if maximum == expected:
        return 1.0
    return (together_both - expected) / (maximum - expected)


def labellings(max_items: int = 40, max_groups: int = 8):
    """Two labellings of the same items, ids drawn from a few arbitrary (negative, large) integers."""
    ids = st.sampled_from([-7, 0, 1, 2, 3, 5, 11, 2**40, -(2**50)][:max_groups])
    return st.integers(0, max_items).flatmap(
        lambda n: st.tuples(st.lists(ids, min_size=n, max_size=n), st.lists(ids, min_size=n, max_size=n))
    )


@settings(max_examples=300, deadline=None)
@given(labellings())
def test_equals_pair_counting_definition(pair):
    a, b = pair
    assert adjusted_rand_index(np.array(a), np.array(b)) == pytest.approx(pair_counting_ari(a, b), rel=1e-12, abs=1e-12)


@settings(max_examples=100, deadline=None)
@given(labellings(), st.randoms(use_true_random=False))
def test_invariant_under_item_permutation_relabelling_and_swap(pair, random):
    a, b = (np.array(v, dtype=np.int64) for v in pair)
    order = np.array(random.sample(range(a.size), a.size), dtype=np.int64)
    relabel = {old: new for old, new in zip(np.unique(b), random.sample(range(1000), np.unique(b).size))}
    b_relabelled = np.array([relabel[v] for v in b], dtype=np.int64)
    reference = adjusted_rand_index(a, b)
    assert adjusted_rand_index(a[order], b[order]) == pytest.approx(reference, abs=1e-12)
    assert adjusted_rand_index(a, b_relabelled) == pytest.approx(reference, abs=1e-12)
    assert adjusted_rand_index(b, a) == pytest.approx(reference, abs=1e-12)


@settings(max_examples=100, deadline=None)
@given(labellings(), st.randoms(use_true_random=False))
def test_one_on_identical_partitions_up_to_relabelling(pair, random):
    a = np.array(pair[0], dtype=np.int64)
    ids = np.unique(a)
    relabel = dict(zip(ids, random.sample(range(-500, 500), ids.size)))
    assert adjusted_rand_index(a, np.array([relabel[v] for v in a], dtype=np.int64)) == 1.0


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ([0, 0, 1, 1], [0, 0, 1, 1], 1.0),
        ([0, 0, 1, 1], [1, 1, 0, 0], 1.0),
        ([0, 0, 1, 2], [0, 0, 1, 1], 4 / 7),
        ([0, 0, 1, 1], [0, 0, 1, 2], 4 / 7),
        ([0, 0, 0, 0], [0, 1, 2, 3], 0.0),
        ([0, 0, 1, 1], [0, 1, 0, 1], -0.5),
        ([0, 0, 1, 1, 2, 2], [0, 0, 1, 2, 2, 2], 4 / 9),
    ],
)
def test_known_values(a, b, expected):
    assert adjusted_rand_index(a, b) == pytest.approx(expected, rel=1e-15)


@pytest.mark.parametrize("labels", [[], [3], [0, 1, 2, 3], [4, 4, 4]])
def test_degenerate_identical_partitions_are_one(labels):
    assert adjusted_rand_index(np.array(labels, dtype=np.int64), np.array(labels, dtype=np.int64)) == 1.0


def test_all_singletons_against_one_group_is_zero():
    assert adjusted_rand_index(np.arange(6), np.zeros(6, dtype=np.int64)) == 0.0


def test_accepts_torch_tensors_and_mixed_integer_dtypes():
    a = torch.tensor([0, 0, 1, 2], dtype=torch.int32)
    b = np.array([9, 9, 3, 3], dtype=np.uint8)
    assert adjusted_rand_index(a, b) == pytest.approx(4 / 7)


def test_exact_on_large_inputs():
    """Pair counts past 2**63 stay exact (an int64 product of pair counts would overflow)."""
    quarter = 50_000
    n = 4 * quarter
    halves, quarters = np.arange(n) % 2, np.arange(n) % 4
    # Quarters nest in halves: pairs together in both = pairs together in quarters.
    together_quarters = 4 * (quarter * (quarter - 1) // 2)
    together_halves = 2 * (2 * quarter * (2 * quarter - 1) // 2)
    all_pairs = n * (n - 1) // 2
    expected = Fraction(together_quarters) - Fraction(together_halves * together_quarters, all_pairs)
    expected /= Fraction(together_halves + together_quarters, 2) - Fraction(together_halves * together_quarters, all_pairs)
    assert together_halves * together_quarters > 2**63
    assert adjusted_rand_index(halves, quarters) == float(expected)


@pytest.mark.parametrize(
    ("a", "b", "message"),
    [
        (np.zeros((2, 2), dtype=np.int64), np.zeros(4, dtype=np.int64), "labels_a: expected a 1-D"),
        (np.zeros(3, dtype=np.int64), np.zeros(4, dtype=np.int64), "labels_b: expected 3 group ids"),
        (np.zeros(3), np.zeros(3, dtype=np.int64), "labels_a: expected integer group ids"),
    ],
)
def test_rejects_bad_input(a, b, message):
    with pytest.raises(ValueError, match=message):
        adjusted_rand_index(a, b)


def test_canonical_labels_number_groups_by_first_occurrence():
    np.testing.assert_array_equal(canonical_labels([5, 5, -2, 9, -2, 5, 2**40]), [0, 0, 1, 2, 1, 0, 3])
    np.testing.assert_array_equal(canonical_labels(torch.tensor([3, 1, 3])), [0, 1, 0])
    assert canonical_labels(np.array([], dtype=np.int64)).shape == (0,)


@settings(max_examples=100, deadline=None)
@given(labellings())
def test_canonical_labels_keep_the_partition(pair):
    a = np.array(pair[0], dtype=np.int64)
    canonical = canonical_labels(a)
    assert canonical.dtype == np.int64
    np.testing.assert_array_equal(canonical[:, None] == canonical[None, :], a[:, None] == a[None, :])
    # First occurrences read 0, 1, 2, ... in order.
    _, first = np.unique(canonical, return_index=True)
    np.testing.assert_array_equal(canonical[np.sort(first)], np.arange(first.size))
    np.testing.assert_array_equal(canonical_labels(canonical), canonical)
