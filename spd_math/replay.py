"""Partitions replayed from a merge sequence (docs/math.md §6-§7): what a history stores is its merges.

A merge history is `c` components and, per iteration, the pair of groups it merged, `(low, high)`
in the numbering of §6 before the merge (groups ordered by their smallest component; the merged
group takes `low`, `high` disappears and the ids above it move down by one). That is O(c + iters)
numbers; every partition follows from it exactly:

- `representatives(merge_pairs, c)`: the smallest component of each merged group, `[iters, 2]`
  (lower first). A group's number is the rank of its smallest component among the groups' smallest
  components, so ids turn into components with an order-statistics tree, O(log c) per merge.
- `partition_at(reps, c, iteration)`: the group ids after one merge, O(c + iteration): the higher
  group's smallest component points at the lower one's, so in component order every root is found
  in one pass.
- `iter_partitions` / `dense_partitions`: every partition in turn, each from the last in O(c).
- `merge_pairs_of_partitions(rows)`: the inverse, for partitions given densely (the original's
  files): the merges, or the first row that is not its predecessor with one pair merged.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from spd_math._engine.kernels import compiled

# Returned by the checking kernels when every row passed.
ALL_VALID = -1


@compiled()
def _fenwick_build(size):  # pragma: no cover - compiled
    """A Fenwick tree of `size` ones (every component the smallest of its own group)."""
    tree = np.zeros(size + 1, np.int64)
    for i in range(1, size + 1):
        tree[i] += 1
        parent = i + (i & -i)
        if parent <= size:
            tree[parent] += tree[i]
    return tree


@compiled()
def _fenwick_select(tree, size, top_bit, rank):  # pragma: no cover - compiled
    """The position of the `rank`-th (0-based) one in the tree."""
    position = 0
    remaining = rank + 1
    step = top_bit
    while step > 0:
        following = position + step
        if following <= size and tree[following] < remaining:
            position = following
            remaining -= tree[following]
        step >>= 1
    return position  # 0-based: the one sits at tree index position + 1


@compiled()
def _representatives(merge_pairs, c, out):  # pragma: no cover - compiled
    """Fill `out[t] = (smallest component of group low, of group high)`; returns the first invalid row, or -1."""
    tree = _fenwick_build(c)
    top_bit = 1
    while top_bit * 2 <= c:
        top_bit *= 2
    k = c
    for t in range(merge_pairs.shape[0]):
        low = merge_pairs[t, 0]
        high = merge_pairs[t, 1]
        if not (0 <= low < high < k):
            return t
        out[t, 0] = _fenwick_select(tree, c, top_bit, low)
        item = _fenwick_select(tree, c, top_bit, high)
        out[t, 1] = item
        i = item + 1
        while i <= c:
            tree[i] -= 1
            i += i & -i
        k -= 1
    return ALL_VALID


def representatives(merge_pairs: np.ndarray, c: int) -> tuple[np.ndarray, int]:
    """`[iters, 2]` smallest components of the two groups each merge joined (lower group first), and the first
    row of `merge_pairs` that is not `low < high < k` (groups before the merge), or -1.

    Examples
    --------
    >>> import numpy as np
    >>> reps, invalid = representatives(np.array([[1, 2], [0, 1]]), 4)
    >>> reps.tolist(), invalid
    ([[1, 2], [0, 1]], -1)
    >>> representatives(np.array([[0, 3], [0, 3]]), 4)[1]
    1
    """
    merge_pairs = np.ascontiguousarray(merge_pairs, dtype=np.int64).reshape(-1, 2)
    out = np.zeros(merge_pairs.shape, dtype=np.int64)
    invalid = _representatives(merge_pairs, int(c), out)
    return out, int(invalid)


@compiled()
def _partition_from_reps(reps, c, stop, out):  # pragma: no cover - compiled
    """`out[x]`: group id of component x after the first `stop` merges of `reps`."""
    root = np.arange(c)
    for t in range(stop):
        root[reps[t, 1]] = reps[t, 0]  # the higher group's smallest component points at the lower one's
    # root[x] <= x, so in increasing x every pointer leads to an already resolved component.
    rank = 0
    for x in range(c):
        if root[x] == x:
            out[x] = rank
            rank += 1
        else:
            root[x] = root[root[x]]
            out[x] = out[root[x]]


def partition_at(reps: np.ndarray, c: int, iteration: int) -> np.ndarray:
    """`[c]` int64 group ids after merge `iteration` (0-based) of the merges whose representatives are `reps`.

    Examples
    --------
    >>> import numpy as np
    >>> partition_at(np.array([[1, 2], [0, 1]]), 4, 0).tolist(), partition_at(np.array([[1, 2], [0, 1]]), 4, 1).tolist()
    ([0, 1, 1, 2], [0, 0, 0, 1])
    """
    out = np.empty(int(c), dtype=np.int64)
    _partition_from_reps(np.ascontiguousarray(reps, dtype=np.int64), int(c), int(iteration) + 1, out)
    return out


@compiled()
def _merge_into(row, low, high):  # pragma: no cover - compiled
    for x in range(row.size):
        group = row[x]
        if group == high:
            row[x] = low
        elif group > high:
            row[x] = group - 1


@compiled()
def _fill_partitions(merge_pairs, first, start, out):  # pragma: no cover - compiled
    """`out[i]`: the partition after merge `start + i`, from `first`, the partition after merge `start - 1`."""
    row = first.copy()
    for i in range(out.shape[0]):
        _merge_into(row, merge_pairs[start + i, 0], merge_pairs[start + i, 1])
        out[i] = row


def dense_partitions(merge_pairs: np.ndarray, reps: np.ndarray, c: int, start: int = 0, stop: int | None = None,
                     dtype=np.int64) -> np.ndarray:
    """`[stop - start, c]` group ids after merges `start .. stop - 1`, in `dtype` (values below c).

    Examples
    --------
    >>> import numpy as np
    >>> pairs = np.array([[1, 2], [0, 1]])
    >>> dense_partitions(pairs, representatives(pairs, 4)[0], 4).tolist()
    [[0, 1, 1, 2], [0, 0, 0, 1]]
    """
    stop = merge_pairs.shape[0] if stop is None else stop
    first = np.arange(c, dtype=np.int64) if start == 0 else partition_at(reps, c, start - 1)
    out = np.empty((max(stop - start, 0), c), dtype=np.int64)
    _fill_partitions(np.ascontiguousarray(merge_pairs, dtype=np.int64), first, start, out)
    return out if dtype == np.int64 else out.astype(dtype)


# Partitions made at once by `iter_partitions`: bounds its memory to about this many ids.
ITER_BLOCK_IDS = 1 << 22


def iter_partitions(merge_pairs: np.ndarray, reps: np.ndarray, c: int, start: int = 0,
                    stop: int | None = None) -> Iterator[np.ndarray]:
    """Each partition after merges `start .. stop - 1` in turn (a fresh `[c]` int64 array each), made in blocks
    of a few MB."""
    stop = merge_pairs.shape[0] if stop is None else stop
    block = max(1, ITER_BLOCK_IDS // max(c, 1))
    for begin in range(start, stop, block):
        yield from dense_partitions(merge_pairs, reps, c, begin, min(begin + block, stop))


@compiled()
def _pairs_of_partitions(rows, previous, out):  # pragma: no cover - compiled
    """`out[t] = (low, high)` merged between row t - 1 (row -1: `previous`, which ends as the last row) and row
    t; returns the first row that is not its predecessor with one pair merged (in the numbering of §6), or -1."""
    c = rows.shape[1]
    for t in range(rows.shape[0]):
        row = rows[t]
        # The first component whose id changed is the smallest of the vanishing group (groups are ordered by
        # their smallest component, and every group at or above it moves).
        x = 0
        while x < c and row[x] == previous[x]:
            x += 1
        if x == c:
            return t
        high = previous[x]
        low = row[x]
        if not 0 <= low < high:
            return t
        for y in range(c):
            group = previous[y]
            expected = low if group == high else (group - 1 if group > high else group)
            if row[y] != expected:
                return t
            previous[y] = expected
        out[t, 0] = low
        out[t, 1] = high
    return ALL_VALID


def merge_pairs_of_partitions(rows: np.ndarray, previous: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """The merges `[iters, 2]` (low, high) that give the partitions `rows` `[iters, c]` from every component
    alone, and the first row that is not its predecessor with one pair merged (-1 when every row is).

    `previous`, when given, is the partition before `rows[0]` (int64, updated in place to the last row), so
    that long histories can be read block by block.

    Examples
    --------
    >>> import numpy as np
    >>> merge_pairs_of_partitions(np.array([[0, 1, 1, 2], [0, 0, 0, 1]]))[0].tolist()
    [[1, 2], [0, 1]]
    >>> merge_pairs_of_partitions(np.array([[0, 0, 2]]))[1]
    0
    """
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    if previous is None:
        previous = np.arange(rows.shape[1], dtype=np.int64)
    out = np.zeros((rows.shape[0], 2), dtype=np.int64)
    invalid = _pairs_of_partitions(rows, previous, out) if rows.size else ALL_VALID
    return out, int(invalid)


@compiled()
def _spans(reps, c, n_iters, out_item, out_rep, out_first, out_last):  # pragma: no cover - compiled
    """Fill the spans (see `representative_spans`); returns how many there are."""
    current = np.arange(c)
    start = np.zeros(c, np.int64)
    next_item = np.full(c, -1, np.int64)
    tail = np.arange(c)
    m = 0
    for t in range(n_iters):
        low, high = reps[t, 0], reps[t, 1]
        x = high
        while x >= 0:  # every component of the higher group now has the lower group's smallest as representative
            if t > 0:  # before merge 0 is no iteration: nothing to close
                out_item[m] = x
                out_rep[m] = current[x]
                out_first[m] = start[x]
                out_last[m] = t - 1
                m += 1
            current[x] = low
            start[x] = t
            x = next_item[x]
        next_item[tail[low]] = high
        tail[low] = tail[high]
    for x in range(c):
        out_item[m] = x
        out_rep[m] = current[x]
        out_first[m] = start[x]
        out_last[m] = n_iters - 1
        m += 1
    return m


def representative_spans(reps: np.ndarray, c: int, n_iters: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Each component's group representative (its smallest component) over the merges, as spans: component
    `item[i]` has representative `rep[i]` after every merge from `first[i]` to `last[i]`. Ordered by component,
    then merge; a component has a new span only when its group joins one with a smaller component.

    Examples
    --------
    >>> import numpy as np
    >>> item, rep, first, last = representative_spans(np.array([[1, 2], [0, 1]]), 4, 2)
    >>> np.stack([item, rep, first, last], axis=1).tolist()
    [[0, 0, 0, 1], [1, 1, 0, 0], [1, 0, 1, 1], [2, 1, 0, 0], [2, 0, 1, 1], [3, 3, 0, 1]]
    """
    if n_iters == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty, empty
    reps = np.ascontiguousarray(reps[:n_iters], dtype=np.int64)
    # A merge closes one span per component of its higher group: counted first, to allocate once.
    moved = _moved_count(reps, c)
    size = moved + c
    item, rep, first, last = (np.empty(size, dtype=np.int64) for _ in range(4))
    m = _spans(reps, c, n_iters, item, rep, first, last)
    order = np.lexsort((first[:m], item[:m]))
    return item[:m][order], rep[:m][order], first[:m][order], last[:m][order]


@compiled()
def _moved_count(reps, c):  # pragma: no cover - compiled
    """Σ over merges of the size of the higher group (the spans merges close)."""
    size = np.ones(c, np.int64)
    moved = 0
    for t in range(reps.shape[0]):
        moved += size[reps[t, 1]]
        size[reps[t, 0]] += size[reps[t, 1]]
    return moved
