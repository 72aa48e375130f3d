"""Maximum-weight matchings between the groups of two partitions, kept optimal as the partitions change.

`perm_invariant_hamming(a, b) = n − W(a, b)` (docs/math.md §9), where W is the largest
`Σ C[p, σ(p)]` over one-to-one matchings σ of a's groups with b's groups and
`C[p, q] = #{x : a_x = p, b_x = q}`. W is a maximum-weight matching of the bipartite graph
whose edges are the nonempty cells (empty cells weigh 0 and add nothing). Its linear
programming dual gives every group a price `y ≥ 0` with `y_p + y_q ≥ C[p, q]` on every cell.
A matching and prices are both optimal exactly when

(i) every matched cell is tight, `y_p + y_q = C[p, q]`, and
(ii) every group with a positive price is matched;

then `W = Σ matched C = Σ y` (weak duality makes each the other's certificate).

Along a sequence of partition pairs (one per iteration of two merge histories) the matching
and the prices are kept and repaired rather than solved afresh. A group is identified by its
smallest item, so a group that did not change as a set of items keeps its identity, its
cells, its price and its partner. Per step:

1. every group that changed (on either side) is removed; its partner becomes unmatched;
2. every new group is added with the smallest price that keeps the inequality on its cells,
   `max(0, max_q C[p, q] − y_q)`: a's new groups first, against b's unchanged groups, then
   b's new groups against all of a's;
3. every group left violating (ii) (unmatched, positive price: the new groups and the freed
   partners) is repaired by one Hungarian search: Dijkstra over the reduced costs
   `y_p + y_q − C[p, q] ≥ 0` from that group along alternating paths, stopping at the first
   of (a) an unmatched group of the other side, at distance d, or (b) a group of the root's
   side whose price would fall to zero, at distance `d + y`. Every settled group's price
   moves by the distance left (down on the root's side, up on the other), which keeps all
   inequalities and keeps matched cells tight; then the path to the stop is flipped. A
   search repairs its root and breaks nothing.

After the repairs (i) and (ii) hold, so the matching is optimal on any input; nothing
assumes the partitions come from merges. A merge history changes one group per member per
step (two removed, one added), so a step costs a few searches, and they stop early because
the other prices stay valid; the first step (every group new) is an ordinary Hungarian solve.
All quantities are integers, so the arithmetic is exact.
"""

from __future__ import annotations

import numpy as np

from spd_math._engine.kernels import compiled, max_threads, parallel_range, thread_id

# Larger than every distance a search can reach (distances are at most n).
UNREACHED = np.iinfo(np.int64).max // 4

# Bound on (member pairs solved at once) x (items): a pair's state is about 50 bytes per item
# (both sides' prices, partners and matched weights), so chunks of pairs keep it near 400 MB.
MAX_PAIR_ITEMS = 1 << 23


@compiled()
def _push(keys, values, size, key, value):  # pragma: no cover - compiled
    """Insert into the binary min-heap `keys[:size]` (payloads in `values`); returns the new size."""
    i = size
    while i > 0:
        parent = (i - 1) >> 1
        if keys[parent] <= key:
            break
        keys[i] = keys[parent]
        values[i] = values[parent]
        i = parent
    keys[i] = key
    values[i] = value
    return size + 1


@compiled()
def _pop(keys, values, size):  # pragma: no cover - compiled
    """Remove the heap's top (read `keys[0]`, `values[0]` first); returns the new size."""
    size -= 1
    key = keys[size]
    value = values[size]
    i = 0
    while True:
        child = 2 * i + 1
        if child >= size:
            break
        if child + 1 < size and keys[child + 1] < keys[child]:
            child += 1
        if keys[child] >= key:
            break
        keys[i] = keys[child]
        values[i] = values[child]
        i = child
    keys[i] = key
    values[i] = value
    return size


@compiled()
def _cells(group, next_item, other_rep, counts, cells):  # pragma: no cover - compiled
    """The other side's groups meeting `group`: `cells[:m]`, with the cell sizes in `counts` (the caller clears them)."""
    m = 0
    x = group
    while x >= 0:
        q = other_rep[x]
        if counts[q] == 0:
            cells[m] = q
            m += 1
        counts[q] += 1
        x = next_item[x]
    return m


@compiled()
def _member_step(previous, current, first_step, rep, next_item, changed, old_rep, scratch):  # pragma: no cover
    """Advance one member from labels `previous` to `current`; returns the number m of changed items.

    `changed[:m]` lists (ascending) the items whose group changed as a set of items, with
    their previous group's representative in `old_rep[:m]` (-1 on the first step, when every
    item is new). `rep` (representative = smallest item of the item's group) and the item
    lists `next_item` (each group's items ascending, from its representative) are updated.
    `scratch` is `[4, n_ids]` int64 filled with -1, and left so.
    """
    n = current.size
    new_of_old, old_of_new, head, tail = scratch[0], scratch[1], scratch[2], scratch[3]
    m = 0
    if first_step:
        for x in range(n):
            changed[x] = x
            old_rep[x] = -1
        m = n
    else:
        # An old group survives exactly when all its items went to one new group that took no others.
        for x in range(n):
            new_of_old[previous[x]] = current[x]
            old_of_new[current[x]] = previous[x]
        for x in range(n):
            if new_of_old[previous[x]] != current[x]:
                head[previous[x]] = 0  # the old group split
            if old_of_new[current[x]] != previous[x]:
                tail[current[x]] = 0  # the new group gathers several old ones
        for x in range(n):
            if head[previous[x]] == 0 or tail[current[x]] == 0:
                changed[m] = x
                old_rep[m] = rep[x]
                m += 1
        for x in range(n):
            new_of_old[previous[x]] = -1
            old_of_new[current[x]] = -1
            head[previous[x]] = -1
            tail[current[x]] = -1
    for i in range(m):
        x = changed[i]
        if head[current[x]] < 0:
            head[current[x]] = x  # items ascending: the first is the smallest
    for i in range(m - 1, -1, -1):
        x = changed[i]
        g = current[x]
        rep[x] = head[g]
        next_item[x] = tail[g]
        tail[g] = x
    for i in range(m):
        g = current[changed[i]]
        head[g] = -1
        tail[g] = -1
    return m


@compiled()
def _search(root, side, y, mate, weight, rep, next_item, member0, member1, dist, pred, pred_weight, settled,
            reached, counts, cells, heap_keys, heap_values):  # pragma: no cover - compiled
    """One Hungarian search from the unmatched group `root` of `side` (see the module docstring).

    `y`, `mate`, `weight` are the pair's `[2, n]` prices, partners (-1: none) and matched
    cell sizes; `member0`, `member1` are the members on sides 0 and 1. Returns the change of the matched total.
    """
    n = rep.shape[1]
    other = 1 - side
    own_member, other_member = (member0, member1) if side == 0 else (member1, member0)
    dist_own, dist_other = dist[0], dist[1]
    n_own = 0  # settled groups of the root's side, listed in reached[0]
    n_other = 0  # groups of the other side ever reached, listed in reached[1]
    size = 0
    stop = -1
    stop_own = False
    delta = 0
    group = root
    d = 0
    while True:
        # Settle `group` (root's side) at distance d: its price may fall to zero at d + y, and its cells relax.
        dist_own[group] = d
        reached[0, n_own] = group
        n_own += 1
        price = y[side, group]
        size = _push(heap_keys, heap_values, size, d + price, n + group)
        m = _cells(group, next_item[own_member], rep[other_member], counts, cells)
        for c in range(m):
            q = cells[c]
            w = counts[q]
            counts[q] = 0
            if settled[q]:
                continue
            nd = d + price + y[other, q] - w
            if nd < dist_other[q]:
                if dist_other[q] == UNREACHED:
                    reached[1, n_other] = q
                    n_other += 1
                dist_other[q] = nd
                pred[q] = group
                pred_weight[q] = w
                size = _push(heap_keys, heap_values, size, nd, q)
        # Next: the nearest unsettled stop or group of the other side.
        found = False
        while size > 0:
            d = heap_keys[0]
            code = heap_values[0]
            size = _pop(heap_keys, heap_values, size)
            if code >= n:
                stop, stop_own, delta = code - n, True, d
                found = True
                break
            q = code
            if settled[q] or d > dist_other[q]:
                continue  # a stale entry
            settled[q] = 1
            partner = mate[other, q]
            if partner < 0:
                stop, stop_own, delta = q, False, d
                found = True
                break
            group = partner
            break
        if found:
            break
    # Prices: settled groups move by the distance left.
    for i in range(n_own):
        g = reached[0, i]
        y[side, g] -= delta - dist_own[g]
    for i in range(n_other):
        q = reached[1, i]
        if settled[q]:
            y[other, q] += delta - dist_other[q]
        settled[q] = 0
        dist_other[q] = UNREACHED
    # Flip the alternating path from the root to the stop.
    gain = 0
    if stop_own:
        if stop == root:
            return 0
        q = mate[side, stop]  # the stop's price is now 0: it gives up its partner, which the path then takes
        gain -= weight[side, stop]
        mate[side, stop] = -1
        weight[side, stop] = 0
        mate[other, q] = -1
        weight[other, q] = 0
    else:
        q = stop
    while True:
        g = pred[q]
        previous = mate[side, g]
        gain += pred_weight[q] - weight[side, g]
        mate[side, g] = q
        mate[other, q] = g
        weight[side, g] = pred_weight[q]
        weight[other, q] = pred_weight[q]
        if g == root:
            break
        q = previous
    return gain


@compiled()
def _pair_step(y, mate, weight, alive, rep, next_item, member0, member1, n_changed, changed, old_rep, violations,
               dist, pred, pred_weight, settled, reached, counts, cells, heap_keys, heap_values):  # pragma: no cover
    """Bring one member pair's matching up to the members' current partitions; returns the change of its total."""
    n = rep.shape[1]
    members = (member0, member1)
    gain = 0
    n_violations = 0
    # 1. Changed groups leave; their partners become unmatched.
    for side in range(2):
        member = members[side]
        for i in range(n_changed[member]):
            g = old_rep[member, i]
            if g < 0 or alive[side, g] == 0:
                continue
            alive[side, g] = 0
            partner = mate[side, g]
            if partner >= 0:
                gain -= weight[side, g]
                mate[1 - side, partner] = -1
                weight[1 - side, partner] = 0
                violations[n_violations] = (1 - side) * n + partner
                n_violations += 1
            mate[side, g] = -1
            weight[side, g] = 0
            y[side, g] = 0
    # 2. New groups join with the least price that keeps every inequality on their cells.
    for side in range(2):
        member = members[side]
        other = 1 - side
        for i in range(n_changed[member]):
            g = rep[member, changed[member, i]]
            if alive[side, g]:
                continue
            m = _cells(g, next_item[member], rep[members[other]], counts, cells)
            price = 0
            for c in range(m):
                q = cells[c]
                if alive[other, q] and counts[q] - y[other, q] > price:
                    price = counts[q] - y[other, q]
                counts[q] = 0
            alive[side, g] = 1
            y[side, g] = price
            mate[side, g] = -1
            weight[side, g] = 0
            violations[n_violations] = side * n + g
            n_violations += 1
    # 3. Repair every unmatched group with a positive price.
    for i in range(n_violations):
        side = violations[i] // n
        g = violations[i] % n
        if alive[side, g] and mate[side, g] < 0 and y[side, g] > 0:
            gain += _search(g, side, y, mate, weight, rep, next_item, member0, member1, dist, pred, pred_weight, settled,
                            reached, counts, cells, heap_keys, heap_values)
    return gain


@compiled(parallel=True)
def _matched_totals(merges, n_ids, first, second, n_threads):  # pragma: no cover - compiled
    """`[n_iters, n_pairs]` maximum matched weight of members `first[p]` and `second[p]` of `merges`."""
    n_members, n_iters, n = merges.shape
    n_pairs = first.size
    out = np.zeros((n_iters, n_pairs), np.int64)
    # Per member: representatives, item lists, and this step's changed items.
    rep = np.zeros((n_members, n), np.int64)
    next_item = np.full((n_members, n), -1, np.int64)
    n_changed = np.zeros(n_members, np.int64)
    changed = np.zeros((n_members, n), np.int64)
    old_rep = np.zeros((n_members, n), np.int64)
    member_scratch = np.full((n_members, 4, n_ids), -1, np.int64)
    # Per pair: prices, partners, matched cell sizes and presence of every group (by representative).
    y = np.zeros((n_pairs, 2, n), np.int64)
    mate = np.full((n_pairs, 2, n), -1, np.int64)
    weight = np.zeros((n_pairs, 2, n), np.int64)
    alive = np.zeros((n_pairs, 2, n), np.uint8)
    totals = np.zeros(n_pairs, np.int64)
    # Per thread: search scratch, left clean by every search.
    dist = np.full((n_threads, 2, n), UNREACHED, np.int64)
    pred = np.zeros((n_threads, n), np.int64)
    pred_weight = np.zeros((n_threads, n), np.int64)
    settled = np.zeros((n_threads, n), np.uint8)
    reached = np.zeros((n_threads, 2, n), np.int64)
    counts = np.zeros((n_threads, n), np.int64)
    cells = np.zeros((n_threads, n), np.int64)
    heap_keys = np.zeros((n_threads, 2 * n + 2), np.int64)
    heap_values = np.zeros((n_threads, 2 * n + 2), np.int64)
    violations = np.zeros((n_threads, 4 * n), np.int64)
    for t in range(n_iters):
        for member in parallel_range(n_members):
            previous = merges[member, max(t - 1, 0)]
            n_changed[member] = _member_step(previous, merges[member, t], t == 0, rep[member], next_item[member],
                                             changed[member], old_rep[member], member_scratch[member])
        for p in parallel_range(n_pairs):
            if n_changed[first[p]] or n_changed[second[p]]:
                k = thread_id()
                totals[p] += _pair_step(y[p], mate[p], weight[p], alive[p], rep, next_item, first[p], second[p],
                                        n_changed, changed, old_rep, violations[k], dist[k], pred[k], pred_weight[k],
                                        settled[k], reached[k], counts[k], cells[k], heap_keys[k], heap_values[k])
            out[t, p] = totals[p]
    return out


@compiled()
def _merge_step(side, u, v, rep, next_item, changed, old_rep):  # pragma: no cover - compiled
    """Side `side` merges the groups of items u and v: their ascending item lists become one, every item of both
    is listed in `changed[side]` (ascending, with its previous representative in `old_rep[side]`) and takes the
    smaller representative. Returns how many items changed."""
    a = rep[side, u]
    b = rep[side, v]
    new_rep = min(a, b)
    m = 0
    previous = -1
    while a >= 0 or b >= 0:
        if b < 0 or (a >= 0 and a < b):
            x = a
            a = next_item[side, a]
        else:
            x = b
            b = next_item[side, b]
        changed[side, m] = x
        old_rep[side, m] = rep[side, x]
        rep[side, x] = new_rep
        if previous >= 0:
            next_item[side, previous] = x
        previous = x
        m += 1
    next_item[side, previous] = -1
    return m


@compiled()
def _pair_replay(items_a, items_b, n, out):  # pragma: no cover - compiled
    """`out[t]`: W of two members' partitions after merge t of each, from every item alone (W = n: each item's
    group matched with itself, prices 1 on side 0 and 0 on side 1, which is optimal)."""
    y = np.zeros((2, n), np.int64)
    mate = np.zeros((2, n), np.int64)
    weight = np.ones((2, n), np.int64)
    alive = np.ones((2, n), np.uint8)
    rep = np.zeros((2, n), np.int64)
    next_item = np.full((2, n), -1, np.int64)
    for x in range(n):
        y[0, x] = 1
        mate[0, x] = x
        mate[1, x] = x
        rep[0, x] = x
        rep[1, x] = x
    n_changed = np.zeros(2, np.int64)
    changed = np.zeros((2, n), np.int64)
    old_rep = np.zeros((2, n), np.int64)
    dist = np.full((2, n), UNREACHED, np.int64)
    pred = np.zeros(n, np.int64)
    pred_weight = np.zeros(n, np.int64)
    settled = np.zeros(n, np.uint8)
    reached = np.zeros((2, n), np.int64)
    counts = np.zeros(n, np.int64)
    cells = np.zeros(n, np.int64)
    heap_keys = np.zeros(2 * n + 2, np.int64)
    heap_values = np.zeros(2 * n + 2, np.int64)
    violations = np.zeros(4 * n, np.int64)
    total = n
    for t in range(items_a.shape[0]):
        n_changed[0] = _merge_step(0, items_a[t, 0], items_a[t, 1], rep, next_item, changed, old_rep)
        n_changed[1] = _merge_step(1, items_b[t, 0], items_b[t, 1], rep, next_item, changed, old_rep)
        total += _pair_step(y, mate, weight, alive, rep, next_item, 0, 1, n_changed, changed, old_rep, violations,
                            dist, pred, pred_weight, settled, reached, counts, cells, heap_keys, heap_values)
        out[t] = total


@compiled(parallel=True)
def _pairs_replay(items, n, first, second, out):  # pragma: no cover - compiled
    for p in parallel_range(first.size):
        _pair_replay(items[first[p]], items[second[p]], n, out[:, p])


def matched_totals_of_merges(items: np.ndarray, n: int, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """`[n_iters, n_pairs]`: `W` of members `first[p]` and `second[p]` after every merge, replayed from their merges.

    `items[m, t]` are two items, one in each of the groups member m merges at t (every item starts alone).
    The same values as `matched_totals` on the partitions the merges make, at the cost of what the merges
    change: per step, the two merged groups' items and the searches they start.

    Examples
    --------
    >>> import numpy as np
    >>> items = np.array([[[0, 1], [1, 2]], [[1, 2], [0, 3]]])  # {0,1} then {0,1,2}; {1,2} then {0,3} too
    >>> matched_totals_of_merges(items, 4, np.array([0]), np.array([1])).tolist()
    [[3], [3]]
    """
    first = np.asarray(first, dtype=np.int64)
    second = np.asarray(second, dtype=np.int64)
    out = np.zeros((items.shape[1], first.size), dtype=np.int64)
    if first.size and items.shape[1]:
        # Each pair replays on its own (its state, ~200 bytes per item, lives while its thread replays it).
        _pairs_replay(np.ascontiguousarray(items, dtype=np.int64), int(n), first, second, out)
    return out


def matched_totals(merges: np.ndarray, n_ids: int, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """`[n_iters, n_pairs]`: `W` (the maximum matched weight) of members `first[p]` and `second[p]` at every iteration.

    Parameters
    ----------
    merges : numpy.ndarray
        `[n_ens, n_iters, n]` int64 group ids in `[0, n_ids)`.
    n_ids : int
        Bound on the ids.
    first, second : numpy.ndarray
        int64 member indices of the pairs.

    Returns
    -------
    numpy.ndarray
        `[n_iters, n_pairs]` int64; the perm-invariant Hamming distance is `n` minus it.

    Examples
    --------
    >>> import numpy as np
    >>> from spd_math.assignment import matched_totals
    >>> merges = np.array([[[0, 0, 1, 2], [0, 0, 0, 2]], [[0, 1, 1, 2], [0, 1, 1, 1]]])
    >>> matched_totals(merges, 3, np.array([0]), np.array([1])).tolist()
    [[3], [2]]
    """
    first = np.asarray(first, dtype=np.int64)
    second = np.asarray(second, dtype=np.int64)
    totals = np.zeros((merges.shape[1], first.size), dtype=np.int64)
    chunk = max(max_threads(), MAX_PAIR_ITEMS // max(merges.shape[2], 1))
    for start in range(0, first.size, chunk):
        stop = start + chunk
        # Each chunk follows only its own members (every member's steps are redone per chunk: cheap next to the pairs).
        members, local = np.unique(np.concatenate([first[start:stop], second[start:stop]]), return_inverse=True)
        chunk_merges = merges if members.size == merges.shape[0] else merges[members]
        chunk_merges = np.ascontiguousarray(chunk_merges, dtype=np.int64)
        n_pairs = min(stop, first.size) - start
        totals[:, start:stop] = _matched_totals(
            chunk_merges, max(int(n_ids), 1), local[:n_pairs], local[n_pairs:], max_threads()
        )
    return totals


__all__ = ["matched_totals", "matched_totals_of_merges"]
