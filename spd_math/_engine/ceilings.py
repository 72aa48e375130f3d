"""Cost ceilings: a pair's merge cost as if its groups never fired together, an upper bound of its cost.

In boolean mode `q_ij ≥ 0`, α ≥ 0 and L = log2(k−1) ≥ 0, and every float operation of a cost
(docs/math.md §4, in the order `state.GroupState.cost_rows` evaluates it) is monotone in `q_ij`:
the cost computed with `q_ij = 0`, the pair's *ceiling*, bounds the real cost from above, bit for
bit. A ceiling reads no coactivation, only the counts `s` and sizes `r` of the two groups:

    fl(fl(α·s_i) + fl(α·s_j))                        both groups unmerged (r = 1)
    fl(fl(fl(s_i·r_j) + fl(s_j·r_i)) · α)            otherwise

and for a fixed group it is monotone in the other group's `s` among the unmerged groups.

So the pairs whose ceiling is at most a cutoff, which are candidates of the range sampler
whatever their coactivation, can be counted row by row from the sorted counts of the unmerged
groups in O(k log k), without reading any of the k² coactivations. On heterogeneous activations,
once the strongly coactivating groups are merged, the range sampler's window holds nearly every
pair (98% at 4,000 components of the synthetic source's data), and almost all of them are
counted this way; only pairs with a ceiling above the cutoff need their exact cost.
"""

from __future__ import annotations

import numpy as np
import torch

from spd_math._engine import kernels


def pair_ceilings(s_i, r_i, s_j, r_j, alpha: float):
    """Ceilings of the pairs `(i, j)`, elementwise (NumPy arrays or torch tensors of float64, broadcastable)."""
    unmerged = (r_i == 1) & (r_j == 1)
    initial = s_i * alpha + s_j * alpha
    merged = (s_i * r_j + s_j * r_i) * alpha
    if isinstance(unmerged, np.ndarray):
        return np.where(unmerged, initial, merged)
    return torch.where(unmerged, initial, merged)


class CeilingIndex:
    """The live groups' counts sorted once, answering questions about ceilings at any cutoff.

    Parameters
    ----------
    s, r : numpy.ndarray
        Float64 counts (the diagonal of Q) and sizes of the k live groups, by slot.
    alpha : float
        The α of the merge (>= 0).

    Examples
    --------
    >>> import numpy as np
    >>> index = CeilingIndex(np.array([1.0, 2.0, 5.0, 3.0]), np.array([1.0, 1.0, 1.0, 2.0]), alpha=1.0)
    >>> # ceilings: 3, 6 and 7 among the unmerged groups; 5, 7 and 13 with the merged group 3
    >>> index.counts(6.0).tolist()
    [3, 1, 1, 1]
    >>> index.unmerged.tolist(), index.sorted_unmerged.tolist(), index.unmerged_prefixes(6.0).tolist()
    ([0, 1, 2], [0, 1, 2], [3, 2, 1])
    """

    def __init__(self, s: np.ndarray, r: np.ndarray, alpha: float) -> None:
        self.s, self.r, self.alpha = s, r, alpha
        self.unmerged = np.flatnonzero(r == 1)
        self.merged = np.flatnonzero(r != 1)
        s_unmerged = s[self.unmerged]
        order = np.argsort(s_unmerged, kind="stable")
        self.sorted_unmerged = self.unmerged[order]  # unmerged slots by ascending count
        self._order = order
        self._sorted_s = s_unmerged[order]
        self._sorted_a = self._sorted_s * alpha  # fl(α·s) is monotone in s: still sorted
        self._a = s_unmerged * alpha

    def unmerged_prefixes(self, cutoff) -> np.ndarray:
        """Per unmerged group (in `unmerged` order), how many of `sorted_unmerged` pair with it at a ceiling
        `<= cutoff` (itself included where its own pair would): its other unmerged partners lie beyond.
        `cutoff`: one for all, or one per unmerged group."""
        a = self._a
        cutoffs = np.broadcast_to(np.asarray(cutoff, dtype=np.float64), a.shape)
        if self.alpha == 0:
            return np.where(cutoffs >= 0, a.size, 0).astype(np.int64)
        return _prefix_lengths(self._sorted_a, cutoffs - a, lambda rows, values: a[rows] + values <= cutoffs[rows])

    def counts(self, cutoff: float) -> np.ndarray:
        """Per slot, the number of other groups it pairs with at a ceiling `<= cutoff` (int64 `[k]`)."""
        s, r, alpha, cutoff = self.s, self.r, self.alpha, float(cutoff)
        k = s.size
        counts = np.zeros(k, dtype=np.int64)
        if k < 2:
            return counts
        if alpha == 0:  # every ceiling is 0
            return counts + (k - 1) if cutoff >= 0 else counts
        unmerged, merged = self.unmerged, self.merged
        if unmerged.size:
            # Unmerged rows, unmerged columns: fl(a_i + a_j) <= cutoff, a prefix of the sorted columns.
            counts[unmerged] = self.unmerged_prefixes(cutoff) - (self._a + self._a <= cutoff)
        if merged.size:
            s_merged, r_merged = s[merged], r[merged]
            if unmerged.size:
                # A merged group j against the unmerged groups: fl(fl(s_x·r_j) + s_j)·α, monotone in s_x. The
                # same float as from j's side, fl(s_j + fl(s_x·r_j))·α: addition is commutative.
                sorted_s = self._sorted_s
                guesses = (cutoff / alpha - s_merged) / r_merged
                lengths = _prefix_lengths(sorted_s, guesses,
                                          lambda rows, x: (x * r_merged[rows] + s_merged[rows]) * alpha <= cutoff)
                counts[merged] += lengths
                # Each unmerged x counts the merged j whose prefix reaches past x's place in the sorted order.
                place = np.empty(unmerged.size, dtype=np.int64)
                place[self._order] = np.searchsorted(sorted_s, sorted_s, side="right")
                counts[unmerged] += merged.size - np.searchsorted(np.sort(lengths), place, side="left")
            counts[merged] += _merged_counts(s_merged, r_merged, alpha, cutoff)
        return counts


@kernels.compiled()
def _merged_counts(s, r, alpha, cutoff):  # pragma: no cover - compiled
    """Per merged group, the other merged groups it pairs with at a ceiling `<= cutoff`.

    The merged groups by size, each size's counts sorted: for a row i and the groups j of one size, the
    ceiling fl(fl(fl(s_i·r_j) + fl(s_j·r_i))·α) is monotone in s_j, so the pairs under the cutoff are a prefix,
    found by bisection on the exact float predicate (rounded as `pair_ceilings` computes it: no FMA). Merged groups
    come in few sizes, so a row costs a few bisections, not a pass over every merged group."""
    m = s.size
    counts = np.zeros(m, np.int64)
    by_count = np.argsort(s, kind="mergesort")
    order = by_count[np.argsort(r[by_count], kind="mergesort")]  # by size, then count
    sorted_s = s[order]
    sorted_r = r[order]
    starts = [0]
    for position in range(1, m):
        if sorted_r[position] != sorted_r[position - 1]:
            starts.append(position)
    starts.append(m)
    for i in range(m):
        s_i, r_i = s[i], r[i]
        total = 0
        for c in range(len(starts) - 1):
            first, stop = starts[c], starts[c + 1]
            r_j = sorted_r[first]
            if (s_i * r_j + sorted_s[first] * r_i) * alpha > cutoff:
                continue
            if (s_i * r_j + sorted_s[stop - 1] * r_i) * alpha <= cutoff:
                total += stop - first
                continue
            low, high = first + 1, stop - 1  # the predicate holds at first, fails at stop - 1
            while low < high:
                middle = (low + high) // 2
                if (s_i * r_j + sorted_s[middle] * r_i) * alpha <= cutoff:
                    low = middle + 1
                else:
                    high = middle
            total += low - first
        if (s_i * r_i + s_i * r_i) * alpha <= cutoff:
            total -= 1  # the pair of i with itself is no candidate
        counts[i] = total
    return counts


def ceiling_counts(s: np.ndarray, r: np.ndarray, alpha: float, cutoff: float) -> np.ndarray:
    """Per group i, the number of groups j != i whose pair `(i, j)` has a ceiling `<= cutoff` (int64 `[k]`).

    Examples
    --------
    >>> import numpy as np
    >>> ceiling_counts(np.array([1.0, 2.0, 5.0]), np.ones(3), alpha=1.0, cutoff=6.0).tolist()
    [2, 1, 1]
    """
    return CeilingIndex(s, r, alpha).counts(cutoff)


def _prefix_lengths(sorted_values: np.ndarray, guesses: np.ndarray, holds) -> np.ndarray:
    """Per row, how many leading `sorted_values` satisfy `holds(rows, values)`, a predicate true on a prefix.

    `guesses` are the rows' thresholds in real arithmetic; rounding can move the true boundary by an
    ulp, so the boundary is corrected by whole runs of equal values until the predicate agrees.
    """
    n = sorted_values.size
    with np.errstate(invalid="ignore"):
        lengths = np.searchsorted(sorted_values, np.nan_to_num(guesses, nan=-np.inf), side="right")
    while True:
        rows = np.flatnonzero(lengths > 0)
        too_far = rows[~holds(rows, sorted_values[lengths[rows] - 1])]
        lengths[too_far] = np.searchsorted(sorted_values, sorted_values[lengths[too_far] - 1], side="left")
        rows = np.flatnonzero(lengths < n)
        too_short = rows[holds(rows, sorted_values[lengths[rows]])]
        lengths[too_short] = np.searchsorted(sorted_values, sorted_values[lengths[too_short]], side="right")
        if not too_far.size and not too_short.size:
            return lengths
