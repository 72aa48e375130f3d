"""The range sampler's candidate pool: pairs whose merge cost was at most a level, and the candidates in it.

The scalable merge state (`state.GroupState`) keeps every ordered pair `(i, j)` whose cost was
at most `level` when last evaluated, with the two parts its cost is made of (the α-term and
`q_ij`), so that each iteration's cost of a pooled pair is one fused operation,
`alpha_term − L·q`, the same float the full cost matrix holds (docs/math.md §4).

The sampler draws uniformly among the candidates (cost `<= cutoff`) in row-major slot order, so
only two things are asked of the pool: how many candidates there are, and the n-th of them in
that order. On heterogeneous data the window can hold a large share of all k² pairs, so neither
answer sorts: candidates are counted per row in one pass, and the n-th is found in its row. On
the CPU the per-merge upkeep (forgetting the merged groups' pairs, renumbering the
moved slot, dropping pairs that rose above the level, appending the merged group's pairs) is one
compiled pass over buffers grown in place; other devices use the equivalent torch operations.

A pool may also leave out the pairs whose *ceiling* (`ceilings.py`: an upper bound of the cost that
reads no coactivation) is at most its `floor`: while the cutoff stays at or above the floor, those
pairs are candidates whatever their cost, and the merge state counts them from the sorted group
counts instead. Each entry keeps its ceiling, so that pairs counted that way are not counted twice.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from spd_math._engine import backend, kernels

# Growth of the pool's buffers when pairs are appended (in place: no copy of the whole pool per merge).
GROWTH = 1.5


@kernels.compiled()
def _forget_and_move(i, j, terms, q, ceiling, size, stale_end, keep, drop, source, target):  # pragma: no cover
    """In place: of the entries before `stale_end`, drop those touching `keep` or `drop` and rename slot `source` to
    `target` (later entries are kept as they are); the new size."""
    kept = 0
    for t in range(size):
        a, b = i[t], j[t]
        if t < stale_end:
            if a == keep or a == drop or b == keep or b == drop:
                continue
            if a == source:
                a = target
            if b == source:
                b = target
        i[kept], j[kept], terms[kept], q[kept], ceiling[kept] = a, b, terms[t], q[t], ceiling[t]
        kept += 1
    return kept


@kernels.compiled()
def _keep_at_most(i, j, terms, q, ceiling, costs, level, stale_end, keep, drop, source, target, cutoff,
                  k):  # pragma: no cover - compiled
    """In place, in one pass: a merge's deferred upkeep of the entries before `stale_end` (as `_forget_and_move`),
    then only the entries whose cost is `<= level` kept (costs compacted alike). Returns the new size, the lowest
    kept cost (+inf when none) and, per row of `k` (none when `k` is 0), the kept entries with cost `<= cutoff`
    whose ceiling is above it (as `_row_counts_above_ceiling`)."""
    counts = np.zeros(k, np.int64)
    kept = 0
    lowest = np.inf
    for t in range(costs.size):
        a, b = i[t], j[t]
        if t < stale_end:
            if a == keep or a == drop or b == keep or b == drop:
                continue
            if a == source:
                a = target
            if b == source:
                b = target
        cost = costs[t]
        if cost <= level:
            above = ceiling[t]
            i[kept], j[kept], terms[kept], q[kept], costs[kept], ceiling[kept] = a, b, terms[t], q[t], cost, above
            if cost < lowest:
                lowest = cost
            if k and cost <= cutoff and above > cutoff:
                counts[a] += 1
            kept += 1
    return kept, lowest, counts


@kernels.compiled()
def _row_counts(i, costs, cutoff, k):  # pragma: no cover - compiled
    counts = np.zeros(k, np.int64)
    for t in range(costs.size):
        if costs[t] <= cutoff:
            counts[i[t]] += 1
    return counts


@kernels.compiled()
def _row_counts_above_ceiling(i, costs, ceiling, cutoff, k):  # pragma: no cover - compiled
    """Per row, the entries with cost `<= cutoff` whose ceiling is above it."""
    counts = np.zeros(k, np.int64)
    for t in range(costs.size):
        if costs[t] <= cutoff and ceiling[t] > cutoff:
            counts[i[t]] += 1
    return counts


@kernels.compiled()
def _row_entries(i, j, costs, cutoff, row, count):  # pragma: no cover - compiled
    """Columns and costs of the `count` candidates of one row, in pool order (one pass, ending at the last)."""
    columns = np.empty(count, np.int64)
    values = np.empty(count, np.float64)
    n = 0
    for t in range(costs.size):
        if n == count:
            break
        if i[t] == row and costs[t] <= cutoff:
            columns[n] = j[t]
            values[n] = costs[t]
            n += 1
    return columns, values


class CandidatePool:
    """Ordered pairs (i, j) whose cost was at most `level` when evaluated, with their α-terms, q and ceilings.

    `level` is the cost at or below which every pair was collected, with L = `built_at`, except
    pairs whose ceiling is at most `floor`: a finite floor is only set where some pair lies under it.
    """

    def __init__(self, i: torch.Tensor, j: torch.Tensor, alpha_term: torch.Tensor, q: torch.Tensor,
                 ceiling: torch.Tensor, level: float, built_at: float, floor: float = -math.inf) -> None:
        self.level, self.built_at, self.floor = level, built_at, floor
        self.compiled = backend.numpy_fast_path(i)
        self._i, self._j, self._terms, self._q, self._ceiling = i, j, alpha_term, q, ceiling
        self.size = int(i.numel())
        # A merge's upkeep not yet done (compiled pools): (keep, drop, source, target, entries it applies to). The
        # next `keep_at_most` does it in its own pass; anything else reading the entries does it first.
        self._pending: tuple[int, int, int, int, int] | None = None
        self.lowest: float | None = None  # the lowest cost `keep_at_most` kept (compiled pools)
        # Where `costs` writes, kept from merge to merge: a fresh tensor of the pool's size each merge costs page
        # faults on every page of it (large allocations come straight from the kernel).
        self._costs_buffer = torch.empty(0, dtype=alpha_term.dtype, device=alpha_term.device)

    @property
    def complete(self) -> bool:
        """Whether the pool holds every pair with cost `<= level` (no pair left out under a floor)."""
        return self.floor == -math.inf

    def _settle(self) -> None:
        """Do a merge's pending upkeep now (a pass over the pool)."""
        if self._pending is not None:
            keep, drop, source, target, stale_end = self._pending
            self._pending = None
            self.size = int(_forget_and_move(*self._buffers(), self.size, stale_end, keep, drop, source, target))

    @property
    def i(self) -> torch.Tensor:
        self._settle()
        return self._i[: self.size]

    @property
    def j(self) -> torch.Tensor:
        self._settle()
        return self._j[: self.size]

    @property
    def alpha_term(self) -> torch.Tensor:
        self._settle()
        return self._terms[: self.size]

    @property
    def q(self) -> torch.Tensor:
        self._settle()
        return self._q[: self.size]

    @property
    def ceiling(self) -> torch.Tensor:
        self._settle()
        return self._ceiling[: self.size]

    def _buffers(self) -> tuple[np.ndarray, ...]:
        return self._i.numpy(), self._j.numpy(), self._terms.numpy(), self._q.numpy(), self._ceiling.numpy()

    def costs(self, log_k_minus_1: float) -> torch.Tensor:
        """Scaled costs of the pooled pairs at L = `log_k_minus_1`, in the pool's costs buffer (valid until the next
        call). Only for `keep_at_most`, which does a pending upkeep in its pass: entries it drops have costs here
        too."""
        if self._costs_buffer.numel() < self.size:
            self._costs_buffer = torch.empty(max(self.size, int(self._costs_buffer.numel() * GROWTH)),
                                             dtype=self._terms.dtype, device=self._terms.device)
        return torch.add(self._terms[: self.size], self._q[: self.size], alpha=-log_k_minus_1,
                         out=self._costs_buffer[: self.size])

    def keep_at_most(self, costs: torch.Tensor, level: float) -> torch.Tensor:
        """Drop the pairs whose cost (`costs`, from `costs()`) is above `level`; returns the kept costs."""
        if self.compiled:
            return self._compiled_keep_at_most(costs, level, -math.inf, 0)[0]
        keep = costs <= level
        if bool(keep.all()):
            return costs
        self._select(keep)
        return torch.masked_select(costs, keep)

    def keep_at_most_counting(self, costs: torch.Tensor, level: float, cutoff: float,
                              k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`keep_at_most(costs, level)` and `counts_above_ceiling(kept, cutoff, k)` at once (one pass over the pool
        where compiled); returns the kept costs and the counts."""
        if self.compiled:
            return self._compiled_keep_at_most(costs, level, cutoff, k)
        kept = self.keep_at_most(costs, level)
        return kept, self.counts_above_ceiling(kept, cutoff, k)

    def _compiled_keep_at_most(self, costs: torch.Tensor, level: float, cutoff: float,
                               k: int) -> tuple[torch.Tensor, torch.Tensor]:
        keep, drop, source, target, stale_end = self._pending or (-1, -1, -1, -1, 0)
        self._pending = None
        size, lowest, counts = _keep_at_most(*self._buffers(), costs.numpy(), level, stale_end, keep, drop, source,
                                             target, cutoff, k)
        self.size, self.lowest = int(size), float(lowest)
        return costs[: self.size], torch.from_numpy(counts)

    def forget_and_move(self, keep: int, drop: int, source: int, target: int) -> None:
        """Forget the pairs of the merged groups `keep` and `drop`, then rename slot `source` to `target`."""
        if self.compiled:  # done in the next `keep_at_most`'s pass (or before anything else reads the entries)
            self._settle()
            self._pending = (keep, drop, source, target, self.size)
            return
        i, j = self.i, self.j
        touched = (i == keep) | (j == keep) | (i == drop) | (j == drop)
        self._select(~touched)
        if source != target:
            self._i = torch.where(self._i == source, target, self._i)
            self._j = torch.where(self._j == source, target, self._j)

    def _select(self, keep: torch.Tensor) -> None:
        index = torch.nonzero(keep).squeeze(1)  # (boolean-mask indexing is far slower on the CPU)
        self._i, self._j = self.i.index_select(0, index), self.j.index_select(0, index)
        self._terms, self._q = self.alpha_term.index_select(0, index), self.q.index_select(0, index)
        self._ceiling = self.ceiling.index_select(0, index)
        self.size = int(index.numel())

    def append(self, i: torch.Tensor, j: torch.Tensor, alpha_term: torch.Tensor, q: torch.Tensor,
               ceiling: torch.Tensor) -> None:
        added = int(i.numel())
        if not self.compiled:
            self._i, self._j = torch.cat([self.i, i]), torch.cat([self.j, j])
            self._terms, self._q = torch.cat([self.alpha_term, alpha_term]), torch.cat([self.q, q])
            self._ceiling = torch.cat([self.ceiling, ceiling])
            self.size += added
            return
        end = self.size + added
        if end > self._i.numel():
            capacity = max(end, int(self._i.numel() * GROWTH), 1024)
            self._i, self._j, self._terms, self._q, self._ceiling = (
                _grown(buffer, self.size, capacity)
                for buffer in (self._i, self._j, self._terms, self._q, self._ceiling))
        for buffer, values in ((self._i, i), (self._j, j), (self._terms, alpha_term), (self._q, q),
                               (self._ceiling, ceiling)):
            buffer[self.size : end] = values
        self.size = end

    def candidates(self, costs: torch.Tensor, cutoff: float, k: int):
        """The pooled pairs with cost `<= cutoff` (`costs` from `costs()`), enumerable in row-major slot order."""
        if self.compiled:
            return RowSelectedCandidates(self.i.numpy(), self.j.numpy(), costs.numpy(), cutoff, k)
        index = torch.nonzero(costs <= cutoff).squeeze(1)
        keys = self.i.index_select(0, index) * k + self.j.index_select(0, index)
        return SortedCandidates(keys, costs.index_select(0, index), k)

    def counts_above_ceiling(self, costs: torch.Tensor, cutoff: float, k: int) -> torch.Tensor:
        """Per row (int64 `[k]`), the pooled pairs with cost `<= cutoff` whose ceiling is above `cutoff`."""
        if self.compiled:
            return torch.from_numpy(_row_counts_above_ceiling(self.i.numpy(), costs.numpy(), self.ceiling.numpy(),
                                                               cutoff, k))
        chosen = (costs <= cutoff) & (self.ceiling > cutoff)
        return torch.bincount(self.i[chosen], minlength=k)


def _grown(buffer: torch.Tensor, used: int, capacity: int) -> torch.Tensor:
    bigger = torch.empty(capacity, dtype=buffer.dtype, device=buffer.device)
    bigger[:used] = buffer[:used]
    return bigger


class RowSelectedCandidates:
    """Candidates of a pool counted per row in one pass; the n-th (row-major) found within its row.

    Equal to sorting the candidates by `i·k + j` and indexing, without the sort: the pool holds
    each pair at most once, so a row's candidates sorted by column are its part of that order.
    """

    def __init__(self, i: np.ndarray, j: np.ndarray, costs: np.ndarray, cutoff: float, k: int) -> None:
        self.i, self.j, self.costs, self.cutoff = i, j, costs, cutoff
        self.cumulative = np.cumsum(_row_counts(i, costs, cutoff, k))
        self.count = int(self.cumulative[-1]) if self.cumulative.size else 0

    def nth(self, index: int) -> tuple[int, int, float]:
        row = int(np.searchsorted(self.cumulative, index, side="right"))
        before = int(self.cumulative[row - 1]) if row else 0
        count = int(self.cumulative[row]) - before
        columns, values = _row_entries(self.i, self.j, self.costs, self.cutoff, row, count)
        order = np.argsort(columns, kind="stable")
        at = int(order[index - before])
        return row, int(columns[at]), float(values[at])


class SortedCandidates:
    """Candidates as flat row-major slot keys `i·k + j`, ascending, with their scaled costs."""

    def __init__(self, keys: torch.Tensor, costs: torch.Tensor, k: int) -> None:
        order = torch.argsort(keys)
        self.keys, self.costs, self.k = keys[order], costs[order], k
        self.count = int(keys.numel())

    def nth(self, index: int) -> tuple[int, int, float]:
        i, j = divmod(int(self.keys[index]), self.k)
        return i, j, float(self.costs[index])


class RowCountedCandidates:
    """Candidates counted row by row (rows ascending = row-major order) without storing them.

    `state.offdiagonal_cost_rows(rows)` gives the exact scaled costs of some rows (+inf on the diagonal).
    """

    def __init__(self, state, rows: torch.Tensor, counts: torch.Tensor, cutoff: float) -> None:
        self.state, self.rows, self.cutoff = state, rows, cutoff
        self.cumulative = torch.cumsum(counts, 0).cpu().numpy()
        self.count = int(self.cumulative[-1]) if self.cumulative.size else 0

    def nth(self, index: int) -> tuple[int, int, float]:
        position = int(np.searchsorted(self.cumulative, index, side="right"))
        before = int(self.cumulative[position - 1]) if position else 0
        row = self.rows[position : position + 1]
        costs = self.state.offdiagonal_cost_rows(row)[0]
        columns = torch.nonzero(costs <= self.cutoff).squeeze(1)
        j = int(columns[index - before])
        return int(row[0]), j, float(costs[j])
