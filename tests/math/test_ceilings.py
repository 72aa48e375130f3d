"""Cost ceilings: exact upper bounds of the engine's costs, and their counts at a cutoff equal to counting every pair."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spd_math._engine import state
from spd_math._engine.ceilings import CeilingIndex, pair_ceilings


def brute_ceilings(s: np.ndarray, r: np.ndarray, alpha: float) -> np.ndarray:
    return pair_ceilings(s[:, None], r[:, None], s[None, :], r[None, :], alpha)


@st.composite
def groups(draw):
    k = draw(st.integers(1, 40))
    s = np.array(draw(st.lists(st.integers(1, 60), min_size=k, max_size=k)), dtype=np.float64)  # repeated counts: ties
    r = np.array(draw(st.lists(st.sampled_from([1, 1, 1, 2, 3, 7]), min_size=k, max_size=k)), dtype=np.float64)
    alpha = draw(st.sampled_from([0.0, 0.3, 1.0, 1.7, 5.0]))
    return s, r, alpha


@settings(max_examples=300, deadline=None)
@given(groups(), st.data())
def test_counts_equal_counting_every_pair(problem, data):
    s, r, alpha = problem
    ceilings = brute_ceilings(s, r, alpha)
    np.fill_diagonal(ceilings, np.inf)
    # Cutoffs exactly at ceilings (ties), between them, and around them by a rounding step.
    finite = np.unique(ceilings[np.isfinite(ceilings)])
    at = data.draw(st.sampled_from(finite.tolist())) if finite.size else 0.0
    for cutoff in (at, np.nextafter(at, -np.inf), np.nextafter(at, np.inf), at / 2, -1.0, 1e9):
        expected = (ceilings <= cutoff).sum(axis=1)
        np.testing.assert_array_equal(CeilingIndex(s, r, alpha).counts(cutoff), expected)


@settings(max_examples=200, deadline=None)
@given(groups(), st.floats(-10, 800))
def test_unmerged_prefixes_split_each_row_at_the_cutoff(problem, cutoff):
    s, r, alpha = problem
    index = CeilingIndex(s, r, alpha)
    ceilings = brute_ceilings(s, r, alpha)
    for row, prefix in zip(index.unmerged, index.unmerged_prefixes(cutoff)):
        row_ceilings = ceilings[row, index.sorted_unmerged]
        assert (row_ceilings[:prefix] <= cutoff).all() and (row_ceilings[prefix:] > cutoff).all()


def test_ceilings_bound_the_engines_costs_bit_for_bit():
    """Mid-run, every cost the scalable state evaluates is at most its pair's ceiling, and equal where q = 0."""
    rng = np.random.default_rng(3)
    rates = np.minimum(0.5, 0.3 * np.arange(1, 61) ** -1.1)[rng.permutation(60)]
    values = torch.from_numpy((rng.random((400, 60)) < rates).astype(np.float32))
    merge_state = state.GroupState(values, [f"m:{x}" for x in range(60)], 0.5, 1.3, torch.device("cpu"))
    for _ in range(25):
        merge_state.merge(*sorted(rng.choice(merge_state.k, 2, replace=False).tolist()))
    k = merge_state.k
    slots = torch.arange(k)
    costs, q, _ = merge_state.cost_rows(slots)
    ceilings = merge_state._pair_ceilings(slots[:, None], slots).numpy()
    offdiagonal = ~np.eye(k, dtype=bool)
    assert (costs.numpy() <= ceilings)[offdiagonal].all()
    unrelated = offdiagonal & (q.numpy() == 0)
    assert unrelated.sum() > 50
    np.testing.assert_array_equal(costs.numpy()[unrelated], ceilings[unrelated])
    assert (merge_state.sizes_host[:k] > 1).sum() > 5  # merged groups: the second formula is exercised
