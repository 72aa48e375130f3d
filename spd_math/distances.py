"""Distances between the partitions of ensemble members (docs/math.md §9), exact and incremental.

For two labellings a, b of the same n items, both distances are sums over *blocks*: sets of
items closed under "same group in a" and "same group in b".

- `matching_dist = Σ_p C(n_p,2) + Σ_q C(m_q,2) − 2·Σ_cells C(C_pq,2)`: the margins give
  the pairs that are together in a or in b, the cells (blocks of items sharing both
  groups) the pairs together in both.
- `perm_invariant_hamming = n − max Σ C[p,σ(p)]`: the best matching never pairs groups
  from different connected components of the bipartite graph "a-group — b-group, an edge
  per nonempty cell", so it is a sum over those components (the blocks). A component
  with one a-group or one b-group contributes its largest cell; the others go to an
  assignment solver, many small components per call.

A merge history changes little from one iteration to the next, and so do the blocks: a
block without an item whose group changed (as a set of items) is exactly an old block,
with the same value. Each member pair therefore keeps its blocks, and per iteration only
the old blocks touching a changed item are recomputed. This is exact on every input: an
arbitrary relabelling just marks every item changed and recomputes everything.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_array, csr_array
from scipy.sparse.csgraph import (
    connected_components,
    min_weight_full_bipartite_matching,
)

from spd_math.ensemble import NormalizedEnsemble
from spd_math.errors import DistanceError
from spd_math.registry import Registry
from spd_math.validation import integer_labels

# Bound on (member pairs tracked at once) x (items): the per-pair state is two int64 arrays
# of this size, so pairs are processed in chunks that keep it near 32 MB.
MAX_TRACKED_ITEMS = 1 << 21

# Target number of groups per call of the assignment solver (see _component_blocks).
MATCHING_BATCH_NODES = 2048
# A batch is solved densely when its dense table has at most this many entries per nonzero cell.
DENSE_ENTRIES_PER_CELL = 16

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
        merges = _validated_labels(ensemble_or_merges_array.merges, "ensemble.merges", ndim=3)
    else:
        merges = _validated_labels(ensemble_or_merges_array, "ensemble_or_merges_array", ndim=3)
    return _distance_matrices(merges, method)


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
    per_pair = DISTANCE_METHODS.lookup(method, DistanceError, "method")(merges, n_ids, first, second)
    matrices = np.zeros((n_iters, n_ens, n_ens), dtype=np.int64)
    matrices[:, first, second] = per_pair
    matrices[:, second, first] = per_pair
    return torch.from_numpy(matrices)


def _perm_invariant_hamming(merges: np.ndarray, n_ids: int, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """`[n_iters, n_pairs]`: n minus the best group matching of members first[p] and second[p]."""
    return merges.shape[2] - _pair_block_totals(merges, n_ids, first, second, _component_blocks)


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


def _component_blocks(pair: np.ndarray, a: np.ndarray, b: np.ndarray, n_ids: int) -> tuple[np.ndarray, np.ndarray]:
    """Blocks = connected components of the cell graph, valued by their max-weight group matching."""
    cell_key, item_cell, weight = _cells(pair, a, b, n_ids)
    # Nodes: the batch's a-groups (keys are sorted, so a-groups come in runs), then its b-groups.
    a_group_key = cell_key // n_ids
    starts_a_group = np.ones(cell_key.size, dtype=bool)
    starts_a_group[1:] = a_group_key[1:] != a_group_key[:-1]
    a_node = np.cumsum(starts_a_group) - 1
    n_a = int(a_node[-1]) + 1
    b_group_key = cell_key // (n_ids * n_ids) * n_ids + cell_key % n_ids
    b_keys, b_node = np.unique(b_group_key, return_inverse=True)
    b_node += n_a
    n_nodes = n_a + b_keys.size
    graph = coo_array((np.ones(cell_key.size, dtype=np.int8), (a_node, b_node)), shape=(n_nodes, n_nodes)).tocsr()
    n_components, node_component = connected_components(graph, directed=True, connection="weak")
    cell_component = node_component[a_node]
    value = np.zeros(n_components, dtype=np.int64)
    np.maximum.at(value, cell_component, weight)  # right for components with one a- or one b-group
    a_groups = np.bincount(node_component[:n_a], minlength=n_components)
    b_groups = np.bincount(node_component[n_a:], minlength=n_components)
    needs_matching = (a_groups >= 2) & (b_groups >= 2)
    if needs_matching.any():
        value[needs_matching] = 0
        # Solve components in batches of about MATCHING_BATCH_NODES groups: the sparse solver's
        # cost grows faster than linearly with its input, even when that is many small components.
        nodes = a_groups[needs_matching] + b_groups[needs_matching]
        batch_of_component = np.zeros(n_components, dtype=np.int64)
        batch_of_component[needs_matching] = (np.cumsum(nodes) - nodes) // MATCHING_BATCH_NODES
        cells = np.flatnonzero(needs_matching[cell_component])
        cells = cells[np.argsort(batch_of_component[cell_component[cells]], kind="stable")]
        cell_batch = batch_of_component[cell_component[cells]]
        bounds = np.flatnonzero(np.diff(cell_batch, prepend=-1, append=-1))
        for start, stop in zip(bounds[:-1], bounds[1:]):
            batch = cells[start:stop]
            matched = batch[_max_weight_matching(a_node[batch], b_node[batch], weight[batch])]
            np.add.at(value, cell_component[matched], weight[matched])
    return cell_component[item_cell], value


def _max_weight_matching(a_node: np.ndarray, b_node: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Indices of the edges `(a_node[i], b_node[i])` (weights > 0) of one maximum-weight matching.

    Not every group needs a partner, so each a-group gets a private dummy column and each
    b-group a private dummy row; a dummy row meets a dummy column wherever their groups
    share an edge, which lets both dummies pair up when their groups pair with each other.
    Every full matching then costs `big·(n_a + n_b) − Σ matched weights`, so the LAPJVsp
    minimum-weight full matching is a maximum-weight matching.
    """
    a_ids, a_row = np.unique(a_node, return_inverse=True)
    b_ids, b_col = np.unique(b_node, return_inverse=True)
    n_a, n_b = a_ids.size, b_ids.size
    if n_a * n_b <= DENSE_ENTRIES_PER_CELL * weight.size:
        table = np.full((n_a, n_b), -1, dtype=np.int64)  # edge index; -1 where there is none (weight 0)
        table[a_row, b_col] = np.arange(weight.size)
        dense_weight = np.where(table >= 0, weight[table], 0)
        matched_rows, matched_cols = linear_sum_assignment(dense_weight, maximize=True)
        edges = table[matched_rows, matched_cols]
        return edges[edges >= 0]
    big = float(weight.max() + 1)  # keeps every cost positive (LAPJVsp takes no zero weights)
    a_range, b_range = np.arange(n_a), np.arange(n_b)
    rows = np.concatenate([a_row, a_range, n_a + b_col, n_a + b_range])
    cols = np.concatenate([b_col, n_b + a_range, n_b + a_row, b_range])
    costs = np.concatenate([big - weight, np.full(n_a + weight.size + n_b, big)])
    size = n_a + n_b
    matched_rows, matched_cols = min_weight_full_bipartite_matching(csr_array((costs, (rows, cols)), shape=(size, size)))
    real = (matched_rows < n_a) & (matched_cols < n_b)
    # Edges are distinct (row, col) pairs: find the matched ones by their key.
    edge_key = a_row * n_b + b_col
    by_key = np.argsort(edge_key)
    return by_key[np.searchsorted(edge_key[by_key], matched_rows[real] * n_b + matched_cols[real])]


# method name -> `(merges, n_ids, first, second) -> [n_iters, n_pairs]` distances of member pairs
# (first[p], second[p]) on compacted ids. A tuple of the names, as configs use it; a new method is
# one function and one line here.
DISTANCE_METHODS: Registry[Callable[[np.ndarray, int, np.ndarray, np.ndarray], np.ndarray]] = Registry(
    "method",
    {
        "perm_invariant_hamming": _perm_invariant_hamming,
        "matching_dist": _matching_dist,
    },
)
