"""Item pairs together in two partitions, kept as two merge sequences replay (`matching_dist`, docs/math.md §9).

`matching_dist(a, b) = Σ_p C(n_p, 2) + Σ_q C(m_q, 2) − 2·Σ_cells C(C_pq, 2)`. When a merges groups
G and H, the first sum grows by |G|·|H| and the cells `(G, q)` and `(H, q)` of every group q of b
become one, which adds `Σ_q C_Gq·C_Hq` pairs to the last sum. Counted over the items of the smaller
of G and H (each looks up its cell with the larger), then those items move to the larger group:
an item moves only when its group at least doubles, so a whole replay touches each item O(log n)
times per side. The nonempty cells (never more than n) live in an open-addressing hash table.
"""

from __future__ import annotations

import numpy as np

from spd_math._engine.kernels import compiled, parallel_range

EMPTY = -1
# Fibonacci hashing: the key times 2**64 / golden ratio, top bits.
_GOLDEN = np.uint64(11400714819323198485)


@compiled()
def _slot(key, shift):  # pragma: no cover - compiled
    return np.int64((np.uint64(key) * _GOLDEN) >> np.uint64(shift))


@compiled()
def _find(keys, key, shift, mask):  # pragma: no cover - compiled
    """The slot holding `key`, or the empty slot where it would go."""
    i = _slot(key, shift)
    while keys[i] != EMPTY and keys[i] != key:
        i = (i + 1) & mask
    return i


@compiled()
def _remove(keys, values, i, shift, mask):  # pragma: no cover - compiled
    """Empty slot i, moving later entries of its probe run back so that every key stays findable."""
    j = i
    keys[j] = EMPTY
    k = j
    while True:
        k = (k + 1) & mask
        if keys[k] == EMPTY:
            return
        home = _slot(keys[k], shift)
        # The entry at k may move to j unless its home lies cyclically in (j, k].
        if (j < k and (home <= j or home > k)) or (j > k and home <= j and home > k):
            keys[j] = keys[k]
            values[j] = values[k]
            keys[k] = EMPTY
            j = k


@compiled()
def _add(keys, values, key, delta, shift, mask):  # pragma: no cover - compiled
    i = _find(keys, key, shift, mask)
    if keys[i] == EMPTY:
        keys[i] = key
        values[i] = delta
    else:
        values[i] += delta
        if values[i] == 0:
            _remove(keys, values, i, shift, mask)


@compiled()
def _merge_side(side, u, v, group, next_item, size, keys, values, n, shift, mask):  # pragma: no cover - compiled
    """Side `side` merges the groups of items u and v; returns the pairs this adds to Σ_cells C(C_pq, 2)."""
    own, other = group[side], group[1 - side]
    a, b = own[u], own[v]
    small, large = (a, b) if size[side, a] <= size[side, b] else (b, a)
    added = 0
    x = small
    while x >= 0:
        q = other[x]
        key = large * n + q if side == 0 else q * n + large
        slot = _find(keys, key, shift, mask)
        if keys[slot] != EMPTY:
            added += values[slot]
        x = next_item[side, x]
    x = small
    last = small
    while x >= 0:
        q = other[x]
        if side == 0:
            _add(keys, values, small * n + q, -1, shift, mask)
            _add(keys, values, large * n + q, 1, shift, mask)
        else:
            _add(keys, values, q * n + small, -1, shift, mask)
            _add(keys, values, q * n + large, 1, shift, mask)
        own[x] = large
        last = x
        x = next_item[side, x]
    # The small group's list goes right after the large group's first item.
    next_item[side, last] = next_item[side, large]
    next_item[side, large] = small
    size[side, large] += size[side, small]
    size[side, small] = 0
    return added


@compiled()
def _pair_replay(items_a, items_b, n, out):  # pragma: no cover - compiled
    """`out[t]`: Σ_cells C(C_pq, 2) of two members' partitions after merge t of each."""
    group = np.empty((2, n), np.int64)
    next_item = np.full((2, n), -1, np.int64)
    size = np.ones((2, n), np.int64)
    for x in range(n):
        group[0, x] = x
        group[1, x] = x
    bits = 1
    while (1 << bits) < 2 * n + 2:
        bits += 1
    capacity = 1 << bits
    shift = 64 - bits
    mask = capacity - 1
    keys = np.full(capacity, EMPTY, np.int64)
    values = np.zeros(capacity, np.int64)
    for x in range(n):  # every item alone on both sides: the cells (x, x)
        _add(keys, values, x * n + x, 1, shift, mask)
    together = 0
    for t in range(items_a.shape[0]):
        together += _merge_side(0, items_a[t, 0], items_a[t, 1], group, next_item, size, keys, values, n, shift, mask)
        together += _merge_side(1, items_b[t, 0], items_b[t, 1], group, next_item, size, keys, values, n, shift, mask)
        out[t] = together


@compiled(parallel=True)
def _pairs_replay(items, n, first, second, out):  # pragma: no cover - compiled
    for p in parallel_range(first.size):
        _pair_replay(items[first[p]], items[second[p]], n, out[:, p])


@compiled()
def _member_together(items, n, out):  # pragma: no cover - compiled
    """`out[t]`: Σ_p C(n_p, 2) of one member after merge t (each merge adds |G|·|H|)."""
    parent = np.arange(n)
    size = np.ones(n, np.int64)
    together = 0
    for t in range(items.shape[0]):
        a, b = items[t, 0], items[t, 1]
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        while parent[b] != b:
            parent[b] = parent[parent[b]]
            b = parent[b]
        together += size[a] * size[b]
        if size[a] < size[b]:
            a, b = b, a
        parent[b] = a
        size[a] += size[b]
        out[t] = together


def pairs_together(items: np.ndarray, n: int) -> np.ndarray:
    """`[n_ens, n_iters]`: item pairs sharing a group in each member after each merge.

    `items[m, t]` are two items, one in each group member m merges at t (every item starts alone).
    """
    out = np.zeros(items.shape[:2], dtype=np.int64)
    for m in range(items.shape[0]):
        _member_together(np.ascontiguousarray(items[m]), int(n), out[m])
    return out


def pairs_together_in_both(items: np.ndarray, n: int, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """`[n_iters, n_pairs]`: item pairs sharing a group in both member `first[p]` and member `second[p]`.

    Examples
    --------
    >>> import numpy as np
    >>> items = np.array([[[0, 1], [1, 2]], [[0, 1], [2, 3]]])  # member 0: {0,1}, then {0,1,2}; member 1: {0,1}, {2,3}
    >>> pairs_together_in_both(items, 4, np.array([0]), np.array([1])).tolist()
    [[1], [1]]
    """
    first = np.asarray(first, dtype=np.int64)
    second = np.asarray(second, dtype=np.int64)
    out = np.zeros((items.shape[1], first.size), dtype=np.int64)
    if first.size and items.shape[1]:
        # Each pair replays on its own (its state, ~100 bytes per item, lives while its thread replays it).
        _pairs_replay(np.ascontiguousarray(items, dtype=np.int64), int(n), first, second, out)
    return out
