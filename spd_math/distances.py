"""Distances between the partitions of ensemble members (docs/math.md §9), exact and incremental.

- `matching_dist = Σ_p C(n_p,2) + Σ_q C(m_q,2) − 2·Σ_cells C(C_pq,2)`: the margins give
  the pairs that are together in a or in b, the cells (blocks of items sharing both
  groups) the pairs together in both.
- `perm_invariant_hamming = n − max Σ C[p,σ(p)]`: a maximum-weight matching of the two
  labellings' groups, kept optimal from one iteration to the next (`spd_math.assignment`).

A merge history changes little from one iteration to the next. An ensemble kept as merges (what
`normalize_ensemble` makes) is replayed: each member pair follows both members' merges, and each
merge updates what it changes (`spd_math.contingency`, `spd_math.assignment`), so no partition is
ever materialized. Partitions given as arrays are compared row by row: for `matching_dist` each
member pair keeps its cells, and per iteration only the cells touching a changed item (an item
whose group changed as a set of items) are recomputed. Every path is exact on every input: an
arbitrary relabelling just marks every item changed and recomputes everything.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from spd_math import assignment, contingency
from spd_math.errors import DistanceError
from spd_math.normalized import NormalizedEnsemble
from spd_math.registry import Registry
from spd_math.validation import integer_labels

# Bound on (member pairs tracked at once) x (items): the per-pair state is two int64 arrays
# of this size, so pairs are processed in chunks that keep it near 32 MB.
MAX_TRACKED_ITEMS = 1 << 21

# (block of every item, value of every block) for the items of a batch of member pairs.
BlocksFn = Callable[[np.ndarray, np.ndarray, np.ndarray, int], tuple[np.ndarray, np.ndarray]]


def perm_invariant_hamming_matrix(labels_2d) -> torch.Tensor:
    """Perm-invariant Hamming distance between every two labellings (docs/math.md §9).

    Parameters
    ----------
    labels_2d : array-like of int
        `[n_ens, n]` group ids, one labelling of the same n items per row.

    Returns
    -------
    torch.Tensor
        `[n_ens, n_ens]` int64, symmetric, zero diagonal.

    Raises
    ------
    DistanceError
        Not a 2-D integer array with at least one row.

    Examples
    --------
    >>> from spd_math import perm_invariant_hamming_matrix
    >>> perm_invariant_hamming_matrix([[0, 0, 1, 1], [5, 5, 5, 9], [1, 1, 0, 0]]).tolist()
    [[0, 1, 0], [1, 0, 1], [0, 1, 0]]
    """
    labels = _validated_labels(labels_2d, "labels_2d", ndim=2)
    return _distance_matrices(labels[:, None, :], "perm_invariant_hamming")[0]


def matching_dist_matrix(labels_2d) -> torch.Tensor:
    """Matching distance (item pairs whose "same group" differs) between every two labellings (docs/math.md §9).

    Parameters
    ----------
    labels_2d : array-like of int
        `[n_ens, n]` group ids.

    Returns
    -------
    torch.Tensor
        `[n_ens, n_ens]` int64, symmetric, zero diagonal.

    Raises
    ------
    DistanceError
        Not a 2-D integer array with at least one row.

    Examples
    --------
    >>> from spd_math import matching_dist_matrix
    >>> matching_dist_matrix([[0, 0, 1, 1], [5, 5, 5, 9]]).tolist()
    [[0, 3], [3, 0]]
    """
    labels = _validated_labels(labels_2d, "labels_2d", ndim=2)
    return _distance_matrices(labels[:, None, :], "matching_dist")[0]


def compute_distances(ensemble_or_merges_array, method: str) -> torch.Tensor:
    """One full symmetric distance matrix per iteration of an ensemble (docs/math.md §9).

    Parameters
    ----------
    ensemble_or_merges_array : NormalizedEnsemble or array-like of int
        A normalized ensemble, or its `merges` array `[n_ens, n_iters, c]` of group ids.
    method : str
        A name in `DISTANCE_METHODS` ("perm_invariant_hamming" or "matching_dist").

    Returns
    -------
    torch.Tensor
        `[n_iters, n_ens, n_ens]` int64.

    Raises
    ------
    DistanceError
        An unknown method, or merges that are not a 3-D integer array with at least one member.

    Examples
    --------
    >>> from spd_math import compute_distances
    >>> merges = [[[0, 1, 2], [0, 0, 1]], [[0, 1, 2], [0, 1, 1]]]
    >>> compute_distances(merges, "perm_invariant_hamming")[:, 0, 1].tolist()
    [0, 1]
    """
    DISTANCE_METHODS.lookup(method, DistanceError, "method")
    if isinstance(ensemble_or_merges_array, NormalizedEnsemble):
        ensemble = ensemble_or_merges_array
        if ensemble.is_compact:  # replayed from the members' merges, without their partitions
            return _replayed_matrices(ensemble, method)
        merges = _validated_labels(ensemble.merges, "ensemble.merges", ndim=3)
    else:
        merges = _validated_labels(ensemble_or_merges_array, "ensemble_or_merges_array", ndim=3)
    return _distance_matrices(merges, method)


def _replayed_matrices(ensemble: NormalizedEnsemble, method: str) -> torch.Tensor:
    """`[n_iters, n_ens, n_ens]` distances of an ensemble kept as merges: every member pair replays both members'
    merges, updating only what each merge changes."""
    if ensemble.n_members == 0:
        raise DistanceError("ensemble: expected at least one ensemble member, got none")
    items = ensemble.replay_items()
    first, second = np.triu_indices(ensemble.n_members, 1)
    per_pair = DISTANCE_METHODS.lookup(method).on_merges(items, len(ensemble.labels), first, second)
    return _symmetric(per_pair, ensemble.n_iters, ensemble.n_members, first, second)


def _symmetric(per_pair: np.ndarray, n_iters: int, n_ens: int, first: np.ndarray, second: np.ndarray) -> torch.Tensor:
    matrices = np.zeros((n_iters, n_ens, n_ens), dtype=np.int64)
    matrices[:, first, second] = per_pair
    matrices[:, second, first] = per_pair
    return torch.from_numpy(matrices)


def _validated_labels(value, name: str, ndim: int) -> np.ndarray:
    """Group ids as an int64 array of `ndim` dimensions with at least one member, or a DistanceError."""
    layout = "[n_ens, n]" if ndim == 2 else "[n_ens, n_iters, c]"
    array = integer_labels(value, name, DistanceError, ndim=ndim, layout=layout)
    if array.shape[0] == 0:
        raise DistanceError(f"{name}: expected at least one ensemble member, got shape {array.shape}")
    return array


def _distance_matrices(merges: np.ndarray, method: str) -> torch.Tensor:
    n_ens, n_iters, n = merges.shape
    merges, n_ids = _compact_ids(merges)
    first, second = np.triu_indices(n_ens, 1)
    per_pair = DISTANCE_METHODS.lookup(method, DistanceError, "method").on_partitions(merges, n_ids, first, second)
    return _symmetric(per_pair, n_iters, n_ens, first, second)


def _perm_invariant_hamming(merges: np.ndarray, n_ids: int, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """`[n_iters, n_pairs]`: n minus the best group matching of members first[p] and second[p]."""
    return merges.shape[2] - assignment.matched_totals(merges, n_ids, first, second)


def _perm_invariant_hamming_of_merges(items: np.ndarray, n: int, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    return n - assignment.matched_totals_of_merges(items, n, first, second)


def _matching_dist_of_merges(items: np.ndarray, n: int, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    together = contingency.pairs_together(items, n)  # [n_ens, n_iters]
    together_in_both = contingency.pairs_together_in_both(items, n, first, second)
    return together[first].T + together[second].T - 2 * together_in_both


def _matching_dist(merges: np.ndarray, n_ids: int, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """`[n_iters, n_pairs]`: item pairs together in exactly one of members first[p] and second[p]."""
    together = _pairs_together(merges, n_ids)  # [n_ens, n_iters]
    together_in_both = _pair_block_totals(merges, n_ids, first, second, _cell_blocks)
    return together[first].T + together[second].T - 2 * together_in_both


def _compact_ids(merges: np.ndarray) -> tuple[np.ndarray, int]:
    """Ids in `[0, n_ids)` with `n_ids ≤ 2n`, so per-group tables stay as small as the input.

    Ids already there (merge histories number groups by their smallest member) are kept;
    otherwise every (member, iteration) row is renumbered by rank, which keeps its partition.
    """
    n = merges.shape[2]
    if merges.size == 0 or (merges.min() >= 0 and merges.max() < 2 * n):
        return merges, int(merges.max()) + 1 if merges.size else 1
    ranks = np.empty_like(merges)
    for member, rows in enumerate(merges):  # one member at a time bounds the temporaries
        order = np.argsort(rows, axis=-1)
        ordered = np.take_along_axis(rows, order, axis=-1)
        starts_group = np.ones(ordered.shape, dtype=bool)
        starts_group[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
        np.put_along_axis(ranks[member], order, np.cumsum(starts_group, axis=-1) - 1, axis=-1)
    return ranks, n


def _pairs_together(merges: np.ndarray, n_ids: int) -> np.ndarray:
    """`[n_ens, n_iters]`: Σ_p C(n_p, 2), the item pairs sharing a group, per member and iteration."""
    n_ens, n_iters, _ = merges.shape
    member_offsets = (np.arange(n_ens) * n_ids)[:, None]
    together = np.empty((n_ens, n_iters), dtype=np.int64)
    for t in range(n_iters):
        sizes = np.bincount((merges[:, t] + member_offsets).ravel(), minlength=n_ens * n_ids).reshape(n_ens, n_ids)
        together[:, t] = (sizes * (sizes - 1) // 2).sum(axis=1)
    return together


def _pair_block_totals(
    merges: np.ndarray, n_ids: int, first: np.ndarray, second: np.ndarray, blocks_fn: BlocksFn
) -> np.ndarray:
    """`[n_iters, n_pairs]`: for member pair (first[i], second[i]), the sum of its block values."""
    n = merges.shape[2]
    totals = np.zeros((merges.shape[1], first.size), dtype=np.int64)
    chunk = max(1, MAX_TRACKED_ITEMS // max(n, 1))
    for start in range(0, first.size, chunk):
        stop = start + chunk
        totals[:, start:stop] = _track_pairs(merges, n_ids, first[start:stop], second[start:stop], blocks_fn)
    return totals


def _track_pairs(
    merges: np.ndarray, n_ids: int, first: np.ndarray, second: np.ndarray, blocks_fn: BlocksFn
) -> np.ndarray:
    """Block totals of a few member pairs over all iterations, recomputing only changed blocks.

    State, over flat positions `pair * n + item`: `block_rep` is the position of one item of
    the item's block (its representative), `block_value` a block's value at its representative
    and 0 elsewhere.
    """
    _, n_iters, n = merges.shape
    n_pairs = first.size
    members = np.union1d(first, second)
    pairs_of_member = [np.flatnonzero((first == m) | (second == m)) for m in members]
    block_rep = np.arange(n_pairs * n)
    block_value = np.zeros(n_pairs * n, dtype=np.int64)
    in_dirty_block = np.zeros(n_pairs * n, dtype=bool)
    running = np.zeros(n_pairs, dtype=np.int64)
    totals = np.empty((n_iters, n_pairs), dtype=np.int64)
    previous = None
    for t in range(n_iters):
        current = merges[members, t]
        changed = np.ones(current.shape, dtype=bool) if previous is None else _changed_items(previous, current, n_ids)
        previous = current
        seeds = np.concatenate(
            [(pairs[:, None] * n + np.flatnonzero(row)[None, :]).ravel() for pairs, row in zip(pairs_of_member, changed)]
        )
        if seeds.size:
            # Every item of an old block that holds a changed item is recomputed.
            in_dirty_block[block_rep[seeds]] = True
            dirty = np.flatnonzero(in_dirty_block[block_rep])
            in_dirty_block[block_rep[seeds]] = False
            pair, item = np.divmod(dirty, n)
            np.subtract.at(running, pair, block_value[dirty])
            block, value = blocks_fn(pair, merges[first[pair], t, item], merges[second[pair], t, item], n_ids)
            rep = np.empty(value.size, dtype=np.int64)
            rep[block] = dirty  # any item of the block will do
            block_rep[dirty] = rep[block]
            block_value[dirty] = 0
            block_value[rep] = value
            np.add.at(running, rep // n, value)
        totals[t] = running
    return totals


def _changed_items(previous: np.ndarray, current: np.ndarray, n_ids: int) -> np.ndarray:
    """`[rows, n]` bool: whether an item's group, as a set of items, differs between the two rows.

    An old group G survives as new group H exactly when every item of G is now in H and
    every item of H was in G: record, per group, where one of its items went (or came
    from), then compare every item against that.
    """
    offsets = (np.arange(current.shape[0]) * n_ids)[:, None]
    old, new = previous + offsets, current + offsets
    table_size = current.shape[0] * n_ids
    new_of_old = np.empty(table_size, dtype=np.int64)
    new_of_old[old] = new
    old_of_new = np.empty(table_size, dtype=np.int64)
    old_of_new[new] = old
    old_split = np.zeros(table_size, dtype=bool)
    old_split[old[new_of_old[old] != new]] = True
    new_joined = np.zeros(table_size, dtype=bool)
    new_joined[new[old_of_new[new] != old]] = True
    return old_split[old] | new_joined[new]


def _cells(pair: np.ndarray, a: np.ndarray, b: np.ndarray, n_ids: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Nonempty contingency cells of the batch: sorted keys `(pair·n_ids + a)·n_ids + b`, cell of each item, counts."""
    return np.unique((pair * n_ids + a) * n_ids + b, return_inverse=True, return_counts=True)


def _cell_blocks(pair: np.ndarray, a: np.ndarray, b: np.ndarray, n_ids: int) -> tuple[np.ndarray, np.ndarray]:
    """Blocks = cells, valued C(C_pq, 2): the item pairs together in both labellings."""
    _, item_cell, counts = _cells(pair, a, b, n_ids)
    return item_cell, counts * (counts - 1) // 2


@dataclass(frozen=True)
class DistanceMethod:
    """One distance, computed two ways with the same values: `on_partitions(merges, n_ids, first, second)` over
    `[n_ens, n_iters, n]` group ids (compacted), and `on_merges(items, n, first, second)` replaying merges
    (`NormalizedEnsemble.replay_items`); each gives `[n_iters, n_pairs]` for member pairs (first[p], second[p])."""

    on_partitions: Callable[[np.ndarray, int, np.ndarray, np.ndarray], np.ndarray]
    on_merges: Callable[[np.ndarray, int, np.ndarray, np.ndarray], np.ndarray]


# method name -> its `DistanceMethod`. A tuple of the names, as configs use it; a new method is two functions and
# one line here.
DISTANCE_METHODS: Registry[DistanceMethod] = Registry(
    "method",
    {
        "perm_invariant_hamming": DistanceMethod(_perm_invariant_hamming, _perm_invariant_hamming_of_merges),
        "matching_dist": DistanceMethod(_matching_dist, _matching_dist_of_merges),
    },
)
