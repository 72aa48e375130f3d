"""The state of a merge run by slot, with merge costs computed per row block when needed (docs/math.md §3-§6).

Three states offer the merge loop and the samplers what `cost_view.MergeState` describes:
`GroupState` (scalable: counts in `store.CoactivationStore`, bounds, and the range sampler's
`pool.CandidatePool`), `DenseGroupState` (full float64 matrices, for small problems) and
`SwitchingState` (the scalable state until the dense one is cheaper and fits; `group_state`
picks). Their shared pieces (sizes, masks, the merged group's row, the MDL loss) live in
`_SlotState`.

Memory grows with what the math needs: exact group coactivation counts in the narrowest
integer type that holds them, a few vectors per group, and (boolean mode) the packed masks.
No cost matrix and no α-term matrix are stored.

Costs, bit for bit. The cost of a pair is evaluated exactly as the original dense engine
did, in float64 and in the same order of operations, so that every comparison (the range
sampler's window, its ties) comes out the same:

    A_ij = ((q·(−2α) + s_i·α) + s_j·α)                           both groups unmerged (r = 1)
    A_ij = ((s_i·r_j + s_j·r_i) − q_ij·(r_i + r_j))·α             otherwise
    cost_ij = fma(q_ij, −log2(k−1), A_ij)                         (torch.add with alpha: one rounding)

(the original kept A as a matrix, built by the first formula and rewritten by the second for
the merged group's row and column; the second is symmetric in i and j bit for bit). The
scaled cost handed to the samplers is `n · cost − S·log2((k−1)/k)`, as before.

Bounds instead of rescans. Between merges a pair's cost changes only through L = log2(k−1)
(the merged group's row is recomputed exactly). L falls as k falls, so with `q_ij ≥ 0`
(boolean mode) every unchanged cost can only rise, and it rises by at most (L_then − L)·q_ij.
Each row therefore keeps a lower bound of its minimum and an upper bound of its maximum that
stay valid as L drifts and entries are removed; the global extremes are found by scanning
only rows whose bound could hold them. The range sampler's candidates come from a *pool* of
pairs whose cost was at most a level when last evaluated: while the window's cutoff stays
at or below that level, the pool holds every candidate; otherwise it is rebuilt from the
rows whose lower bound is at most the new level (when, and to which level, `pool_policy.PoolPolicy`
decides). Continuous mode allows negative coactivations; there the bounds include the drift of
negative entries and a safety margin.

Ceilings instead of a pool of everything. On heterogeneous activations (rates spread over an
order of magnitude, a few dense components), once the strongly coactivating groups are merged
the window holds nearly every pair. In boolean mode a pair's cost is at most its *ceiling*, its
cost without coactivation (`ceilings.py`), which reads only the two groups' counts and sizes:
the pairs with a ceiling under the cutoff are counted per row from the sorted counts, and the
pool then keeps only pairs with a ceiling above a *floor* just under the cutoff. The n-th
candidate is found in its row, evaluated exactly.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from spd_math._engine import backend, coactivation, kernels
from spd_math._engine.bitsets import overlap_counts
from spd_math._engine.ceilings import CeilingIndex, pair_ceilings
from spd_math._engine.cost_view import DenseCostView
from spd_math._engine.pool import CandidatePool, RowCountedCandidates
from spd_math._engine.pool_policy import PoolPolicy
from spd_math._engine.store import CoactivationStore, narrow_store
from spd_math.costs import log_factors

FLOAT = torch.float64
# Rows of the cost matrix evaluated at once: about this many entries per block (32 MB of float64).
BLOCK_ENTRIES = 1 << 22
# Stale rows scanned per round while looking for the global min or max: at most this many costs,
# torch's grain size, so that per-iteration work never pays for waking threads (which costs
# milliseconds on a loaded machine).
LAZY_BATCH_ENTRIES = 1 << 13
# Relative safety margin on bounds that drift (rounding of a few float64 operations is ~1e-16).
BOUND_MARGIN = 1e-10
# Rows of a pool rebuild are read through their ceiling windows (gathers) rather than whole (one contiguous
# read each) where the windows hold at most this share of the rows' entries.
WINDOW_READ_SHARE = 0.1


def _offdiagonal_extremes(values: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor):
    """Row-wise (min, max) of `values` leaving out the entries (rows[b], columns[b]); `values` is unchanged.

    The left-out entry is replaced by another entry of its row (which changes neither extreme)
    for one pass of aminmax, then restored. Rows of one entry give (+inf, -inf).
    """
    if values.shape[1] < 2:
        empty = torch.full((values.shape[0],), float("inf"), dtype=values.dtype, device=values.device)
        return empty, -empty
    if backend.numpy_fast_path(values):  # torch's row reductions of small blocks are far slower on the CPU
        array, r, c = values.numpy(), rows.numpy(), columns.numpy()
        saved = array[r, c].copy()
        array[r, c] = array[r, np.where(c == 0, 1, c - 1)]
        low, high = array.min(axis=1), array.max(axis=1)
        array[r, c] = saved
        return torch.from_numpy(low), torch.from_numpy(high)
    saved = values[rows, columns].clone()
    neighbour = torch.where(columns == 0, 1, columns - 1)
    values[rows, columns] = values[rows, neighbour]
    low, high = torch.aminmax(values, dim=1)
    values[rows, columns] = saved
    return low, high


class _SlotState:
    """What both states keep and do alike: groups by slot (sizes, diagonal counts, masks or column sums),
    the shared cost term, the MDL loss, and the merged group's coactivation row."""

    n: int
    k: int
    alpha: float
    boolean: bool
    masks: torch.Tensor | None
    column_sums: torch.Tensor | None
    sizes: torch.Tensor
    diag_host: np.ndarray
    sizes_host: np.ndarray

    @property
    def log_k_minus_1(self) -> float:
        return log_factors(self.k)[1]

    def cost_offset(self) -> float:
        """The term shared by all pairs, `S · log2((k-1)/k)`, in units of n."""
        log_ratio, _ = log_factors(self.k)
        return float(self.diag_host[: self.k].sum()) * log_ratio

    def mdl_loss(self) -> float:
        k = self.k
        return float((self.diag_host[:k] * (math.log2(k) + self.alpha * self.sizes_host[:k])).sum())

    def _exact_row(self, slot: int) -> torch.Tensor:
        """Row `slot` of the coactivations over the live slots, in exact arithmetic (a new tensor or a view)."""
        raise NotImplementedError

    def _overlap(self, keep: int, drop: int, k: int) -> torch.Tensor:
        """For every live group l, the samples where keep, drop and l are all active (`[k]`)."""
        raise NotImplementedError

    def _merge_groups(self, keep: int, drop: int) -> tuple[torch.Tensor, float]:
        """Fold group `drop` into `keep` (masks or column sums, sizes, host mirrors); returns the merged group's
        coactivation row over the live slots (its own entry: its new diagonal, docs/math.md §6) and that diagonal."""
        k = self.k
        if self.boolean:
            overlap = self._overlap(keep, drop, k)
            new_row = self._exact_row(keep) + self._exact_row(drop) - overlap
            new_diag = self.diag_host[keep] + self.diag_host[drop] - float(overlap[keep])
            self.masks[:, keep] |= self.masks[:, drop]
        else:
            new_row = self._exact_row(keep) + self._exact_row(drop)
            self.column_sums[keep] += self.column_sums[drop]
            new_diag = float(self.column_sums[keep])
        new_row[keep] = new_diag
        self.sizes[keep] += self.sizes[drop]
        self.sizes_host[keep] += self.sizes_host[drop]
        self.diag_host[keep] = new_diag
        return new_row, new_diag

    def _move_group(self, source: int, target: int, vectors: tuple) -> None:
        """Copy slot `source`'s per-group values (the shared ones and `vectors`) into slot `target`."""
        for vector in (self.sizes, self.column_sums, self.diag_host, self.sizes_host, *vectors):
            if vector is not None:
                vector[target] = vector[source]
        if self.masks is not None:
            self.masks[:, target] = self.masks[:, source]


class GroupState(_SlotState):
    """Sizes, coactivations, masks (boolean) or column sums (continuous) of the live groups, by slot,
    and the cost view the samplers read (see the module docstring)."""

    def __init__(self, values: torch.Tensor, labels: list[str], threshold: float | None, alpha: float,
                 device: torch.device) -> None:
        n, c = values.shape
        self.n, self.k, self.alpha, self.device = n, c, alpha, device
        self.boolean = threshold is not None
        if self.boolean:
            masks, diag, structure, dense_counts = coactivation.boolean_setup(values, threshold, labels, device)
            self.masks = masks
            self.column_sums = None
            self.store = narrow_store(structure, dense_counts, diag, n, device)
            del dense_counts
            # CPU: the samples -> components structure answers a merge's overlaps by sample (see _overlap).
            self.structure = structure
            self.component_slot = np.arange(c) if structure is not None else None
        else:
            coact, self.column_sums = coactivation.continuous_setup(values, labels, device)
            self.masks = None
            self.structure = self.component_slot = None
            diag = coact.diagonal().cpu().numpy().copy()
            self.store = CoactivationStore(coact, None)
        # Host mirrors of the diagonal and sizes for the MDL loss and the cost offset, without device syncs.
        self.diag_host = diag.astype(np.float64)
        self.sizes_host = np.ones(c, dtype=np.float64)
        self.diag = torch.from_numpy(self.diag_host.copy()).to(device)
        self.sizes = torch.ones(c, dtype=FLOAT, device=device)
        self.top_log = math.log2(c - 1) if c > 1 else 0.0
        # Per-row bounds (see module docstring), valid at the L they were recorded with.
        self.row_min = torch.empty(c, dtype=FLOAT, device=device)
        self.row_min_at = torch.empty(c, dtype=FLOAT, device=device)
        self.row_max = torch.empty(c, dtype=FLOAT, device=device)
        self.row_max_at = torch.empty(c, dtype=FLOAT, device=device)
        self.row_q_max = torch.empty(c, dtype=FLOAT, device=device)
        self.row_q_min = torch.empty(c, dtype=FLOAT, device=device)
        self.exact = torch.zeros(c, dtype=torch.bool, device=device)  # bounds exact at the current L
        self.exact_host = np.zeros(c, dtype=bool)
        self.lowest_q = 0.0  # min(0, every coactivation seen): the drift of costs that can fall
        self._bounds_stale = False  # merges were made without costs (see `merge`)
        self.pool: CandidatePool | None = None
        self.pool_policy = PoolPolicy()  # when the pool is rebuilt, and what a new one covers
        self.full_passes = 0  # cost passes over (nearly) every row since the last merge
        self.last_full_passes = 0  # ... and in the iteration before it
        self._pool_costs_cache: torch.Tensor | None = None
        self._max_cache: float | None = None
        self._ceilings_cache: CeilingIndex | None = None
        if c >= 2 and self.boolean:
            self._initial_bounds()
        elif c >= 2:
            self._scan(torch.arange(c, device=device))
            self.lowest_q = min(0.0, float(self.row_q_min[:c].min()))

    def _initial_bounds(self) -> None:
        """Row bounds from the counts alone, before any cost is evaluated (boolean mode, all groups unmerged).

        With every r = 1, `cost_ij ≈ α(s_i + s_j) − (2α + L)·q_ij` and `0 ≤ q_ij ≤ min(q_max_i, s_j)`:
        the row's minimum is at least `α·s_i − (α + L)·q_max_i` (the worst case is q_ij = s_j or
        q_ij = q_max_i ≤ s_j) and its maximum at most `α·(s_i + max_j s_j)`.
        """
        c, alpha, L = self.k, self.alpha, self.log_k_minus_1
        matrix = self.store.matrix
        matrix.diagonal().zero_()  # never read (costs take the diagonal from `diag`): off-diagonal maxima below
        q_max = torch.cat([matrix[first : first + 4096].amax(dim=1) for first in range(0, c, 4096)]).to(FLOAT)
        wide = torch.from_numpy(self.store.wide_of_slot[:c] >= 0).to(self.device)
        q_max = torch.where(wide, self.diag, q_max)  # wide rows: their 16-bit entries may be clipped; s_i bounds them
        self.row_q_max[:c] = q_max
        self.row_q_min[:c] = 0.0
        if self.device.type == "cpu":
            # Nearly exact row extremes in one compiled pass: the lazy searches then scan few rows.
            lows, highs = kernels.pair_score_extremes(matrix.numpy(), self.diag_host, alpha, 2 * alpha + L)
            lows_t, highs_t = torch.from_numpy(lows), torch.from_numpy(highs)
            s_top = float(self.diag.max())
            loose_min = alpha * self.diag - (alpha + L) * q_max
            self.row_min[:c] = torch.where(wide, loose_min, lows_t)
            self.row_max[:c] = torch.where(wide, alpha * (self.diag + s_top), highs_t)
        else:
            s_top = float(self.diag.max())
            self.row_min[:c] = alpha * self.diag - (alpha + L) * q_max
            self.row_max[:c] = alpha * (self.diag + s_top)
        self.row_min[:c] -= self._margin(self.row_min[:c], q_max)
        self.row_max[:c] += self._margin(self.row_max[:c], q_max)
        self.row_min_at[:c] = L
        self.row_max_at[:c] = L

    # --- costs -------------------------------------------------------------------------------

    def cost_rows(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`(scaled costs, q, α-terms)`, each `[len(slots), k]` float64, bit-identical to the original engine."""
        k = self.k
        q = self.store.rows(slots, k)
        rows = torch.arange(slots.numel(), device=self.device)
        s_rows, r_rows = self.diag[slots], self.sizes[slots]
        q[rows, slots] = s_rows
        unmerged_rows = self.sizes_host[slots.cpu().numpy()] == 1
        merged_cols = np.flatnonzero(self.sizes_host[:k] != 1)
        if unmerged_rows.all():
            terms = self._initial_terms(q, s_rows, self.diag[:k])
            if merged_cols.size:
                cols = torch.from_numpy(merged_cols).to(self.device)
                terms[:, cols] = self._merged_terms(q[:, cols], s_rows, r_rows, self.diag[cols], self.sizes[cols])
        else:
            terms = self._merged_terms(q, s_rows, r_rows, self.diag[:k], self.sizes[:k])
            if unmerged_rows.any() and merged_cols.size < k:
                initial = self._initial_terms(q, s_rows, self.diag[:k])
                unmerged = torch.from_numpy(unmerged_rows).to(self.device)[:, None] & (self.sizes[:k] == 1)[None, :]
                terms = torch.where(unmerged, initial, terms)
        costs = torch.add(terms, q, alpha=-self.log_k_minus_1)
        return costs, q, terms

    def _initial_terms(self, q: torch.Tensor, s_rows: torch.Tensor, s_cols: torch.Tensor) -> torch.Tensor:
        """α-terms of pairs of unmerged groups, as the original engine built its matrix: `(q·(−2α) + s_i·α) + s_j·α`."""
        alpha = self.alpha
        terms = q * (-2 * alpha)
        terms += (s_rows * alpha)[:, None]
        terms += (s_cols * alpha)[None, :]
        return terms

    def _merged_terms(self, q, s_rows, r_rows, s_cols, r_cols) -> torch.Tensor:
        """α-terms once a group of the pair was merged: `((s_i·r_j + s_j·r_i) − q·(r_i + r_j))·α`."""
        terms = s_rows[:, None] * r_cols[None, :]
        terms += s_cols[None, :] * r_rows[:, None]
        terms -= q * (r_rows[:, None] + r_cols[None, :])
        terms *= self.alpha
        return terms

    def offdiagonal_cost_rows(self, slots: torch.Tensor) -> torch.Tensor:
        costs, _, _ = self.cost_rows(slots)
        costs[torch.arange(slots.numel(), device=self.device), slots] = float("inf")
        return costs

    def row_blocks(self) -> list[tuple[int, int]]:
        """`(first, stop)` slot ranges of about `BLOCK_ENTRIES` costs each, covering all rows in order."""
        step = max(1, BLOCK_ENTRIES // self.k)
        return [(first, min(self.k, first + step)) for first in range(0, self.k, step)]

    def block_costs(self, first: int, stop: int) -> torch.Tensor:
        """Scaled costs of rows first..stop-1 with +inf on the diagonal."""
        self.full_passes += 1
        return self.offdiagonal_cost_rows(torch.arange(first, stop, device=self.device))

    def full_costs(self, order: np.ndarray) -> torch.Tensor:
        """The scaled `[k, k]` cost matrix with rows and columns in the given slot order (small k only)."""
        order_t = torch.from_numpy(order).to(self.device)
        step = max(1, BLOCK_ENTRIES // self.k)
        rows = [self.cost_rows(order_t[first : first + step])[0] for first in range(0, self.k, step)]
        return torch.cat(rows).index_select(1, order_t)

    # --- row bounds --------------------------------------------------------------------------

    def _scan(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Exact costs of some rows (in blocks); records their exact bounds. Returns the last block only
        when `slots` fits one block (callers that need values pass at most one block)."""
        k = self.k
        step = max(1, BLOCK_ENTRIES // k)
        result = None
        L = self.log_k_minus_1
        for first in range(0, slots.numel(), step):
            block = slots[first : first + step]
            costs, q, terms = self.cost_rows(block)
            rows = torch.arange(block.numel(), device=self.device)
            self.row_min[block], self.row_max[block] = _offdiagonal_extremes(costs, rows, block)
            self.row_q_min[block], self.row_q_max[block] = _offdiagonal_extremes(q, rows, block)
            self.row_min_at[block] = L
            self.row_max_at[block] = L
            self.exact[block] = True
            self.exact_host[block.cpu().numpy()] = True
            result = (costs, q, terms)
        return result

    def _margin(self, values: torch.Tensor, q_extreme: torch.Tensor) -> torch.Tensor:
        return BOUND_MARGIN * (values.abs() + self.top_log * q_extreme.abs() + 1.0)

    def _min_bounds(self) -> torch.Tensor:
        """Lower bounds of every live row's minimum cost at the current L (exact rows: their minimum)."""
        k = self.k
        falling = self.row_q_min[:k].clamp(max=0.0)
        drift = (self.row_min_at[:k] - self.log_k_minus_1) * falling
        bound = self.row_min[:k] + drift - torch.where(falling < 0, self._margin(self.row_min[:k], falling), 0.0)
        return torch.where(self.exact[:k], self.row_min[:k], bound)

    def _max_bounds(self) -> torch.Tensor:
        """Upper bounds of every live row's maximum cost at the current L (exact rows: their maximum)."""
        k = self.k
        rising = self.row_q_max[:k].clamp(min=0.0)
        drift = (self.row_max_at[:k] - self.log_k_minus_1) * rising
        bound = self.row_max[:k] + drift + self._margin(self.row_max[:k], rising)
        return torch.where(self.exact[:k], self.row_max[:k], bound)

    def _extreme(self, lowest: bool) -> float:
        """The exact global off-diagonal min (or max), scanning only rows whose bound could hold it.

        Rows are scanned in rounds, most promising first; rounds grow while the answer is not found.
        """
        batch = max(1, LAZY_BATCH_ENTRIES // self.k)
        while True:
            bounds = self._min_bounds() if lowest else self._max_bounds()
            best = int(torch.argmin(bounds) if lowest else torch.argmax(bounds))
            if self.exact_host[best]:
                return float(bounds[best])
            stale = torch.where(self.exact[: self.k], float("inf") if lowest else float("-inf"), bounds)
            count = min(batch, int((~self.exact[: self.k]).sum()))
            rows = torch.topk(stale, count, largest=not lowest).indices
            self._scan(rows)
            batch = min(2 * batch, max(1, BLOCK_ENTRIES // self.k))

    # --- what the samplers read --------------------------------------------------------------

    def offdiagonal_min(self) -> float:
        # A pool that counts pairs by their ceilings cannot say the minimum: its pass waits for the cutoff
        # (`candidates_at_most` counts the candidates in it).
        costs = self._pool_costs() if self.pool is not None and self.pool.complete else None
        if costs is not None and costs.numel():
            lowest = self.pool.lowest if self.pool.lowest is not None else float(costs.min())
            if lowest <= self._pool_level():
                return lowest
        # No pool holds the minimum: the best row's exact minimum bounds it from above, and a pool up
        # to a little above that bound holds it (and, usually, this iteration's candidates too) unless
        # pairs under that level are counted by their ceilings; then the lazy row search finds it.
        if not self.pool_policy.builds_for_minimum(self.pool is not None):
            return self._extreme(lowest=True)
        bounds = self._min_bounds()
        best = torch.argmin(bounds).reshape(1)
        self._scan(best)
        upper = float(self.row_min[best])
        highest = self.offdiagonal_max()
        level = self.pool_policy.minimum_level(upper, highest)
        if self._counts_ceilings(level) and self._ceiling_counts(level).any():
            return self._extreme(lowest=True)
        self._rebuild_pool(level, upper)
        costs = self._pool_costs()
        if costs is None or costs.numel() == 0:
            return self._extreme(lowest=True)
        return float(costs.min())

    def offdiagonal_max(self) -> float:
        if self._max_cache is None:
            self._max_cache = self._extreme(lowest=False)
        return self._max_cache

    def candidates_at_most(self, cutoff: float, slack: float):
        """Every off-diagonal pair with scaled cost `<= cutoff`, enumerable in row-major slot order.

        Pairs whose ceiling is at most the cutoff are counted from the group counts alone
        (`ceilings.ceiling_counts`); the pool holds the others that can be candidates.
        """
        if self.pool is None or not self.pool_policy.answers(cutoff, self._pool_level(), self.pool.floor):
            if self.pool_policy.counts_rows_instead():
                self.pool, self._pool_costs_cache = None, None
                return self._counted_candidates(cutoff)
            floor, level = self._pool_bounds(cutoff, max(slack, 0.0))
            self._rebuild_pool(level, cutoff, floor)
            self.pool_policy.built(overflowed=self.pool is None)
        if self.pool is None:
            return self._counted_candidates(cutoff)
        if self.pool.complete or not self._counts_ceilings(cutoff):
            return self.pool.candidates(self._pool_costs(), cutoff, self.k)
        if self._pool_costs_cache is None:  # the pool's upkeep and its count in one pass
            costs = self.pool.costs(self.log_k_minus_1)
            self._pool_costs_cache, counts = self.pool.keep_at_most_counting(costs, self._pool_level(), cutoff, self.k)
        else:
            counts = self.pool.counts_above_ceiling(self._pool_costs_cache, cutoff, self.k)
        counts = counts.cpu() + torch.from_numpy(self._ceiling_counts(cutoff))
        return RowCountedCandidates(self, torch.arange(self.k, device=self.device), counts, cutoff)

    def _pool_bounds(self, cutoff: float, slack: float) -> tuple[float, float]:
        """`(floor, level)` of a new pool for `cutoff` (`PoolPolicy.bounds`), counting pairs by their ceilings."""
        if not self.boolean:
            return self.pool_policy.bounds(cutoff, slack, self.k, None)
        index = self._ceilings()

        def under(value: float) -> int:  # pairs (ordered) with a ceiling <= value; every ceiling is >= 0
            return int(index.counts(value).sum()) if value >= 0 else 0

        return self.pool_policy.bounds(cutoff, slack, self.k, under)

    # --- ceilings ------------------------------------------------------------------------------

    def _counts_ceilings(self, cutoff: float) -> bool:
        """Whether some pair may have a ceiling `<= cutoff` (ceilings bound costs in boolean mode only, and are >= 0)."""
        return self.boolean and cutoff >= 0

    def _ceiling_counts(self, cutoff: float) -> np.ndarray:
        """Per slot, the pairs whose ceiling is `<= cutoff` (candidates whatever their coactivation)."""
        return self._ceilings().counts(cutoff)

    def _ceilings(self) -> CeilingIndex:
        if self._ceilings_cache is None:
            k = self.k
            self._ceilings_cache = CeilingIndex(self.diag_host[:k], self.sizes_host[:k], self.alpha)
        return self._ceilings_cache

    def _pair_ceilings(self, rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        """Ceilings of the pairs (rows[b], columns[b]) (broadcastable, e.g. `[r, 1]` rows against `[c]` columns)."""
        def take(vector, index):  # index_select: indexing with a tensor is ~100x slower on the CPU here
            return vector.index_select(0, index.reshape(-1)).reshape(index.shape)

        return pair_ceilings(take(self.diag, rows), take(self.sizes, rows), take(self.diag, columns),
                             take(self.sizes, columns), self.alpha)

    def _counted_candidates(self, cutoff: float) -> RowCountedCandidates:
        self.full_passes += 1
        rows = torch.nonzero(self._min_bounds() <= cutoff).squeeze(1)
        step = max(1, BLOCK_ENTRIES // self.k)
        counts = []
        for first in range(0, rows.numel(), step):
            block = rows[first : first + step]
            counts.append((self.offdiagonal_cost_rows(block) <= cutoff).sum(dim=1))
        counts_t = torch.cat(counts) if counts else torch.zeros(0, dtype=torch.int64, device=self.device)
        return RowCountedCandidates(self, rows, counts_t, cutoff)

    # --- the candidate pool ------------------------------------------------------------------

    def _pool_level(self) -> float:
        """The cost at or below which every pair is in the pool, at the current L."""
        pool = self.pool
        if self.lowest_q >= 0:
            return pool.level
        drift = (pool.built_at - self.log_k_minus_1) * self.lowest_q
        return pool.level + drift - BOUND_MARGIN * (abs(pool.level) + self.top_log * abs(self.lowest_q) + 1.0)

    def _pool_costs(self) -> torch.Tensor | None:
        if self.pool is None:
            return None
        if self._pool_costs_cache is None:
            # Entries above the level cannot become candidates while this pool stands: drop them.
            costs = self.pool.costs(self.log_k_minus_1)
            self._pool_costs_cache = self.pool.keep_at_most(costs, self._pool_level())
        return self._pool_costs_cache

    def _rebuild_pool(self, level: float, cutoff: float, floor: float = -math.inf) -> None:
        """Collect every pair with cost `<= level` and a ceiling above `floor`: rows whose lower bound says they
        may hold one are read; for unmerged rows a bound on the cost through q alone first discards most entries."""
        self.pool = None
        self._pool_costs_cache = None
        rows = torch.nonzero(self._min_bounds() <= level).squeeze(1)
        rows_host = rows.cpu().numpy()
        L = self.log_k_minus_1
        filterable = self.boolean and 2 * self.alpha + L > 0
        plain = np.zeros(rows_host.size, dtype=bool)
        if filterable:
            plain = (self.sizes_host[rows_host] == 1) & (self.store.wide_of_slot[rows_host] < 0)
        parts: list[tuple[torch.Tensor, ...]] = []
        step = max(1, BLOCK_ENTRIES // self.k)
        windows = self._ceiling_windows(level, floor) if plain.any() else None
        exact_rows = torch.from_numpy(rows_host[~plain]).to(self.device)
        for first in range(0, exact_rows.numel(), step):
            block = exact_rows[first : first + step]
            costs, q, terms = self._scan(block)
            costs[torch.arange(block.numel(), device=self.device), block] = float("inf")
            chosen = costs <= level
            if floor > -math.inf:
                chosen &= self._pair_ceilings(block[:, None], torch.arange(self.k, device=self.device)) > floor
            local, j = torch.nonzero(chosen, as_tuple=True)
            parts.append((block[local], j, torch.masked_select(terms, chosen), torch.masked_select(q, chosen)))
            if self.pool_policy.too_large(sum(part[0].numel() for part in parts)):
                return self._pool_overflow(level, cutoff, floor)
        if plain.any():
            plain_rows = torch.from_numpy(rows_host[plain]).to(self.device)
            for first in range(0, plain_rows.numel(), step):
                parts.extend(self._filtered_entries(plain_rows[first : first + step], level, floor, windows))
                if self.pool_policy.too_large(sum(part[0].numel() for part in parts)):
                    return self._pool_overflow(level, cutoff, floor)
        if parts:
            i, j, terms, q = (torch.cat(items) for items in zip(*parts))
        else:
            empty = torch.zeros(0, dtype=torch.int64, device=self.device)
            i, j, terms, q = empty, empty, empty.to(FLOAT), empty.to(FLOAT)
        self.pool = CandidatePool(i, j, terms, q, self._pair_ceilings(i, j), level, L, floor)

    def _pool_overflow(self, level: float, cutoff: float, floor: float) -> None:
        retry_level = self.pool_policy.level_after_overflow(level, cutoff)
        if retry_level is not None:
            self._rebuild_pool(retry_level, cutoff, floor)
        else:
            self.pool = None

    def _ceiling_windows(self, level: float, floor: float) -> tuple[np.ndarray, np.ndarray]:
        """Per slot (unmerged groups only), the positions `[start, end)` in `CeilingIndex.sorted_unmerged` of the
        unmerged partners that can pair with it at a cost `<= level` and a ceiling above `floor`.

        A cost is at least its ceiling less `(2α + L)·q`, and `q` is at most the row's bound `row_q_max`: past
        a ceiling of `level + (2α + L)·row_q_max` (and a rounding margin) no partner qualifies.
        """
        k, alpha, L = self.k, self.alpha, self.log_k_minus_1
        index = self._ceilings()
        starts, ends = np.zeros(k, dtype=np.int64), np.zeros(k, dtype=np.int64)
        if index.unmerged.size:
            s_top = float(self.diag_host[:k].max())
            margin = BOUND_MARGIN * (abs(level) + alpha * 2 * s_top + L * s_top + 1.0)
            q_bound = self.row_q_max[:k].cpu().numpy()[index.unmerged]
            ends[index.unmerged] = index.unmerged_prefixes(level + (2 * alpha + L) * q_bound + margin)
            if floor > -math.inf:
                starts[index.unmerged] = index.unmerged_prefixes(floor)
        return starts, np.maximum(starts, ends)

    def _filtered_entries(self, block: torch.Tensor, level: float, floor: float, windows) -> list[tuple[torch.Tensor, ...]]:
        """Pairs with cost `<= level` in rows of unmerged, narrow groups (boolean mode).

        For unmerged i and j, `cost_ij ≥ α·s_i + α·min s − (2α + L)·q_ij`, so only entries with
        `q_ij ≥ (α·s_i + α·min s − level)/(2α + L)` (less a margin) can qualify: one integer
        comparison per entry, and exact costs for the few that pass. Where the rows' ceiling
        windows (`_ceiling_windows`) are short, only the partners in them are read. Columns of
        merged groups are evaluated exactly. Pairs with a ceiling at most `floor` are left out.
        """
        k, alpha, L = self.k, self.alpha, self.log_k_minus_1
        unmerged_cols = self.sizes_host[:k] == 1
        merged_cols = np.flatnonzero(~unmerged_cols)
        s_min = float(self.diag_host[:k][unmerged_cols].min()) if unmerged_cols.any() else 0.0
        s_top = float(self.diag_host[:k].max())
        margin = BOUND_MARGIN * (abs(level) + alpha * 2 * s_top + L * s_top + 1.0)
        s_rows = self.diag.index_select(0, block)
        needed = torch.floor((alpha * s_rows + alpha * s_min - level - margin) / (2 * alpha + L))
        top = torch.iinfo(self.store.matrix.dtype).max
        needed = needed.clamp(0, top).to(self.store.matrix.dtype)
        parts = []
        starts, ends = (torch.from_numpy(bounds).to(self.device).index_select(0, block) for bounds in windows)
        by_window = floor > -math.inf or int((ends - starts).sum()) <= WINDOW_READ_SHARE * block.numel() * k
        if not by_window:
            counts = self.store.matrix.index_select(0, block)[:, :k]
            passes = counts >= needed[:, None]
            rows = torch.arange(block.numel(), device=self.device)
            passes[rows, block] = False
        if merged_cols.size:
            cols = torch.from_numpy(merged_cols).to(self.device)
            if not by_window:
                passes[:, cols] = False
            matrix = self.store.matrix
            flat = (block[:, None] * matrix.shape[1] + cols[None, :]).reshape(-1)
            q = matrix.reshape(-1).index_select(0, flat).reshape(block.numel(), cols.numel()).to(FLOAT)
            terms = self._merged_terms(q, s_rows, self.sizes.index_select(0, block), self.diag.index_select(0, cols),
                                       self.sizes.index_select(0, cols))
            costs = torch.add(terms, q, alpha=-L)
            chosen = costs <= level
            if floor > -math.inf:
                chosen &= self._pair_ceilings(block[:, None], cols) > floor
            local, j = torch.nonzero(chosen, as_tuple=True)
            parts.append((block[local], cols[j], torch.masked_select(terms, chosen), torch.masked_select(q, chosen)))
        if by_window:
            i, j, q = self._window_entries(block, needed, starts, ends)
        else:
            local, j = torch.nonzero(passes, as_tuple=True)
            i = block[local]
            q = counts[local, j].to(FLOAT)
        terms = q * (-2 * alpha)
        terms += self.diag.index_select(0, i) * alpha
        terms += self.diag.index_select(0, j) * alpha
        costs = torch.add(terms, q, alpha=-L)
        chosen = torch.nonzero(costs <= level).squeeze(1)
        parts.append(tuple(values.index_select(0, chosen) for values in (i, j, terms, q)))
        return parts

    def _window_entries(self, block: torch.Tensor, needed: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor):
        """`(i, j, q)` of the pairs of unmerged, narrow rows `block` with the unmerged columns in their windows
        (positions `[start, end)` in the groups sorted by count, `ceilings.CeilingIndex`) whose coactivation is
        at least the row's `needed`, read without touching the columns outside the windows."""
        device = self.device
        sorted_columns = torch.from_numpy(self._ceilings().sorted_unmerged).to(device)
        lengths = ends - starts
        total = int(lengths.sum())
        i = torch.repeat_interleave(block, lengths, output_size=total)
        shift = torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths - starts, lengths, output_size=total)
        j = sorted_columns.index_select(0, torch.arange(total, device=device) - shift)
        matrix = self.store.matrix
        q = matrix.reshape(-1).index_select(0, i * matrix.shape[1] + j)
        keep = torch.nonzero((q >= torch.repeat_interleave(needed, lengths, output_size=total)) & (i != j)).squeeze(1)
        return i.index_select(0, keep), j.index_select(0, keep), q.index_select(0, keep).to(FLOAT)

    # --- merging -----------------------------------------------------------------------------

    def merge(self, keep: int, drop: int, *, with_costs: bool = True) -> int:
        """Merge slot `drop` into slot `keep`, move the last live slot into `drop`; returns the merged group's slot.
        Without costs the merged row's costs are not folded into the bounds: `costs_again` rescans every row."""
        k = self.k
        new_row, new_diag = self._merge_groups(keep, drop)
        self.diag[keep] = new_diag
        self.store.write(keep, new_row, k, self.store.is_wide(new_diag))
        self.store.release(drop)
        if self.pool is not None:
            self.pool.forget_and_move(keep, drop, k - 1, drop)
        self._move_slot(k - 1, drop)
        self.k = k - 1
        merged = drop if keep == k - 1 else keep
        self.exact.fill_(False)
        self.exact_host[:] = False
        self._pool_costs_cache = None
        self._max_cache = None
        self._ceilings_cache = None
        self.last_full_passes, self.full_passes = self.full_passes, 0
        if self.component_slot is not None:
            self.component_slot[self.component_slot == drop] = keep
            self.component_slot[self.component_slot == k - 1] = drop
        if self.k >= 2 and with_costs:
            self._add_merged_row(merged)
        self._bounds_stale |= not with_costs
        return merged

    def costs_again(self) -> None:
        if self._bounds_stale and self.k >= 2:
            self._scan(torch.arange(self.k, device=self.device))
            self.lowest_q = min(self.lowest_q, float(self.row_q_min[: self.k].min()))
        self._bounds_stale = False

    def _exact_row(self, slot: int) -> torch.Tensor:
        return self.store.exact_row(slot, self.k)

    def _overlap(self, keep: int, drop: int, k: int) -> torch.Tensor:
        """For every live group l, the samples where keep, drop and l are all active (int64 `[k]`)."""
        both = self.masks[:, keep] & self.masks[:, drop]
        if self.structure is None:
            return overlap_counts(self.masks[:, :k], both).to(self.device)
        # CPU: through the samples where both are active. A singleton group is active on a sample
        # exactly when its component is, so counting component activations is exact for it; merged
        # groups (few) are counted on the packed masks.
        words_np = both.numpy()
        words = np.flatnonzero(words_np)
        bits = np.unpackbits(words_np[words].view(np.uint8).reshape(-1, 8), axis=1, bitorder="little")
        word_index, bit = np.nonzero(bits)
        samples = words[word_index] * 64 + bit
        indptr, indices = self.structure.indptr, self.structure.indices
        # One pass, no temporaries: merges of dense groups cover most samples.
        counts = kernels.slot_counts_of_samples(indptr, indices, self.component_slot, samples, k)
        merged = np.flatnonzero(self.sizes_host[:k] != 1)
        if merged.size:
            rows = self.masks.numpy()[np.ix_(words, merged)] & words_np[words][:, None]
            counts[merged] = np.bitwise_count(rows.view(np.uint64)).sum(axis=0, dtype=np.int64)
        return torch.from_numpy(counts.astype(np.int64))

    def _add_merged_row(self, merged: int) -> None:
        """Exact costs of the merged group's row (= its column: the merged formula is symmetric); fold
        them into every other row's bounds and into the pool."""
        k = self.k
        slot = torch.tensor([merged], device=self.device)
        min_bounds, max_bounds = self._min_bounds(), self._max_bounds()
        costs, q, terms = self._scan(slot)
        costs, q, terms = costs[0], q[0], terms[0]
        L = self.log_k_minus_1
        others = torch.ones(k, dtype=torch.bool, device=self.device)
        others[merged] = False
        self.row_min[:k] = torch.where(others, torch.minimum(min_bounds, costs), self.row_min[:k])
        self.row_max[:k] = torch.where(others, torch.maximum(max_bounds, costs), self.row_max[:k])
        self.row_q_max[:k] = torch.where(others, torch.maximum(self.row_q_max[:k], q), self.row_q_max[:k])
        self.row_q_min[:k] = torch.where(others, torch.minimum(self.row_q_min[:k], q), self.row_q_min[:k])
        self.row_min_at[:k] = L
        self.row_max_at[:k] = L
        self.lowest_q = min(self.lowest_q, float(self.row_q_min[merged]))
        if self.pool is not None:
            chosen = others & (costs <= self._pool_level())
            ceilings = None
            if self.pool.floor > -math.inf:
                ceilings = self._pair_ceilings(slot, torch.arange(k, device=self.device))
                chosen &= ceilings > self.pool.floor
            j = torch.nonzero(chosen).squeeze(1)
            i = torch.full_like(j, merged)
            ceilings = self._pair_ceilings(i, j) if ceilings is None else ceilings.index_select(0, j)
            self.pool.append(torch.cat([i, j]), torch.cat([j, i]), terms.index_select(0, j).repeat(2),
                             q.index_select(0, j).repeat(2), ceilings.repeat(2))

    def _move_slot(self, source: int, target: int) -> None:
        if source == target:
            return
        self.store.move(source, target, self.k)
        self._move_group(source, target, (self.diag, self.row_min, self.row_min_at, self.row_max, self.row_max_at,
                                          self.row_q_max, self.row_q_min))


class DenseGroupState(_SlotState):
    """The same state for small problems, kept as full k x k float64 matrices (coactivation, α-terms and
    a scratch cost matrix, 24·c² bytes): below `DENSE_MAX_COMPONENTS` one pass over the whole cost
    matrix costs less than the bookkeeping that avoids it. The operations are those of the original
    engine, so the costs are the same floats as `GroupState`'s (and the tests compare both).
    """

    def __init__(self, values: torch.Tensor, labels: list[str], threshold: float | None, alpha: float,
                 device: torch.device) -> None:
        n, c = values.shape
        self.n, self.k, self.alpha, self.device = n, c, alpha, device
        self.boolean = threshold is not None
        if self.boolean:
            masks, diag, structure, dense_counts = coactivation.boolean_setup(values, threshold, labels, device)
            self.masks, self.column_sums = masks, None
            if structure is not None:
                counts = np.zeros((c, c), dtype=np.int32)
                coactivation.count_structure_into(structure, counts)
                dense_counts = torch.from_numpy(counts)
            self.coact = dense_counts.to(device=device, dtype=FLOAT)
            self.coact.diagonal().copy_(torch.from_numpy(diag))
        else:
            self.coact, self.column_sums = coactivation.continuous_setup(values, labels, device)
            self.masks = None
        diag_t = self.coact.diagonal()
        # All sizes are 1 at the start, so the α-term s_i·r_j + s_j·r_i - q_ij·(r_i + r_j) is s_i + s_j - 2·q_ij.
        self.alpha_terms = torch.mul(self.coact, -2 * alpha)
        self.alpha_terms += diag_t[:, None] * alpha
        self.alpha_terms += diag_t[None, :] * alpha
        self.sizes = torch.ones(c, dtype=FLOAT, device=device)
        self.diag_host = diag_t.cpu().numpy().copy()
        self.sizes_host = np.ones(c, dtype=np.float64)
        self._scratch = torch.empty(c * c, dtype=FLOAT, device=device)
        self._costs: torch.Tensor | None = None
        self._extremes: tuple[float, float] | None = None

    def _scaled_costs(self) -> torch.Tensor:
        """`n · cost - S · log2((k-1)/k)` for the live slots, with +inf on the diagonal (computed once per merge)."""
        if self._costs is None:
            k = self.k
            out = self._scratch[: k * k].view(k, k)
            torch.add(self.alpha_terms[:k, :k], self.coact[:k, :k], alpha=-self.log_k_minus_1, out=out)
            diagonal = out.diagonal()
            # An off-diagonal value copied onto the diagonal changes neither extreme: one pass finds both.
            diagonal.copy_(out[0, 1].expand(k))
            lo, hi = torch.aminmax(out)
            diagonal.fill_(float("inf"))
            self._costs, self._extremes = out, (float(lo), float(hi))
        return self._costs

    def full_costs(self, order: np.ndarray) -> torch.Tensor:
        k = self.k
        order_t = torch.from_numpy(order).to(self.device)
        costs = torch.add(self.alpha_terms[:k, :k], self.coact[:k, :k], alpha=-self.log_k_minus_1)
        return costs.index_select(0, order_t).index_select(1, order_t)

    def offdiagonal_min(self) -> float:
        self._scaled_costs()
        return self._extremes[0]

    def offdiagonal_max(self) -> float:
        self._scaled_costs()
        return self._extremes[1]

    @classmethod
    def from_scalable(cls, scalable: GroupState) -> DenseGroupState:
        """The dense state of a scalable state's live groups, mid-run: the same counts, sizes, masks and α-terms
        (each α-term is the float `GroupState.cost_rows` gives, which is the one this class would hold)."""
        self = cls.__new__(cls)
        k = scalable.k
        self.n, self.k, self.alpha, self.device = scalable.n, k, scalable.alpha, scalable.device
        self.boolean, self.masks, self.column_sums = scalable.boolean, scalable.masks, scalable.column_sums
        self.coact = torch.empty((k, k), dtype=FLOAT, device=self.device)
        self.alpha_terms = torch.empty((k, k), dtype=FLOAT, device=self.device)
        slots = torch.arange(k, device=self.device)
        step = max(1, BLOCK_ENTRIES // k)
        for first in range(0, k, step):
            _, q, terms = scalable.cost_rows(slots[first : first + step])  # q's diagonal is the group's count
            self.coact[first : first + step] = q
            self.alpha_terms[first : first + step] = terms
        self.sizes = scalable.sizes[:k].clone()
        self.diag_host = scalable.diag_host[:k].copy()
        self.sizes_host = scalable.sizes_host[:k].copy()
        self._scratch = torch.empty(k * k, dtype=FLOAT, device=self.device)
        self._costs, self._extremes = None, None
        return self

    def candidates_at_most(self, cutoff: float, slack: float):
        return DenseCostView.candidates_of(self._scaled_costs(), cutoff)

    def row_blocks(self) -> list[tuple[int, int]]:
        return [(0, self.k)]

    def block_costs(self, first: int, stop: int) -> torch.Tensor:
        return self._scaled_costs()[first:stop]

    def merge(self, keep: int, drop: int, *, with_costs: bool = True) -> int:
        """Merge slot `drop` into slot `keep`, then move the last live slot into `drop`; returns the merged slot."""
        k = self.k
        coact = self.coact
        new_row, _ = self._merge_groups(keep, drop)
        coact[keep, :k] = new_row
        coact[:k, keep] = new_row
        diag = coact.diagonal()[:k]
        row = self._merged_row_terms(diag, keep, k, new_row)
        self.alpha_terms[keep, :k] = row
        self.alpha_terms[:k, keep] = row
        self._move_slot(k - 1, drop)
        self.k = k - 1
        self._costs = None
        return drop if keep == k - 1 else keep

    def costs_again(self) -> None:
        """Nothing to do: the dense state keeps every cost term exact."""

    def _exact_row(self, slot: int) -> torch.Tensor:
        return self.coact[slot, : self.k]

    def _overlap(self, keep: int, drop: int, k: int) -> torch.Tensor:
        both = self.masks[:, keep] & self.masks[:, drop]
        return overlap_counts(self.masks[:, :k], both).to(device=self.coact.device, dtype=FLOAT)

    def _merged_row_terms(self, diag: torch.Tensor, keep: int, k: int, new_row: torch.Tensor) -> torch.Tensor:
        s_i, r_i, s_j, r_j = diag[keep], self.sizes[keep], diag, self.sizes[:k]
        return (s_i * r_j + s_j * r_i - new_row * (r_i + r_j)) * self.alpha

    def _move_slot(self, source: int, target: int) -> None:
        if source == target:
            return
        k = self.k
        for matrix in (self.coact, self.alpha_terms):
            matrix[target, :k] = matrix[source, :k]
            matrix[:k, target] = matrix[:k, source]
        self._move_group(source, target, ())


# Up to this many components the dense state is used (24·c² bytes). Measured in ms per merge over 1,000 merges
# (`bench_merge.py --states dense,picked`, 24,576 samples), dense vs scalable, on planted / source / zipf data:
# 1.1/1.6, 1.3/2.0, 1.2/2.3 at 1,100 components; 1.9/1.6, 2.4/2.5, 3.0/3.0 at 1,400; 4.4/1.9, 4.3/2.6,
# 3.7/2.6 at 1,700. Continuous mode has no counts to bound costs with: 12.0 s dense vs 38.6 s scalable at
# 2,000 (300 merges), so it keeps the dense state up to 4,096 (400 MB).
DENSE_MAX_COMPONENTS = 1536
DENSE_MAX_COMPONENTS_CONTINUOUS = 4096
# Above this many pooled pairs per k² pairs, upkeep of the pool (several passes over 40 bytes a pair) costs
# more than the dense state's passes over every cost (8 bytes a pair): the run moves to the dense state
# where it fits. Continuous runs, whose costs have no ceilings, can get there once most pairs sit in the range
# sampler's window; so does any run whose sampler reads every cost (mcmc).
DENSE_SWITCH_SHARE = 0.25
# Share of the memory available at the start that the dense state may take when the run moves to it.
DENSE_MEMORY_SHARE = 0.5
DENSE_BYTES_PER_PAIR = 24


# Per-group vectors of the scalable state (sizes, bounds, slots: a few dozen numbers each) and its candidate pool
# (`PoolSettings.band_per_group` pairs of about 40 bytes per group), per group.
BYTES_PER_GROUP = 512


def merge_state_bytes(n_samples: int, n_components: int, boolean: bool = True) -> int:
    """About the memory the merge state of `n_samples` x `n_components` takes on its device (what the merge
    allocates besides its input): the exact coactivation counts (k x k in 16 bits, as sparse activations have them;
    32 bits, twice that, where many components are active on more than 32,767 samples), the packed masks (boolean
    mode) and per-group vectors; the dense state's matrices for small problems.

    Examples
    --------
    >>> round(merge_state_bytes(32_768, 16_000) / 2**20)
    559
    """
    c, n = int(n_components), int(n_samples)
    masks = c * ((n + 63) // 64) * 8 if boolean else c * 8
    if c <= (DENSE_MAX_COMPONENTS if boolean else DENSE_MAX_COMPONENTS_CONTINUOUS):
        return DENSE_BYTES_PER_PAIR * c * c + masks
    counts = 2 if boolean else 8
    return counts * c * c + masks + BYTES_PER_GROUP * c


def available_bytes(device: torch.device) -> int:
    """Memory free for a state on `device` now: CUDA's free memory, or the host's available memory."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


class SwitchingState:
    """The scalable state, moving for good to the dense one once that is cheaper and fits (see
    `DENSE_SWITCH_SHARE`). Both give the same costs, so the run's choices do not change."""

    def __init__(self, scalable: GroupState, dense_budget_bytes: int) -> None:
        self.inner: GroupState | DenseGroupState = scalable
        self.dense_budget_bytes = dense_budget_bytes

    @property
    def k(self) -> int:
        return self.inner.k

    @property
    def n(self) -> int:
        return self.inner.n

    def cost_offset(self) -> float:
        return self.inner.cost_offset()

    def mdl_loss(self) -> float:
        return self.inner.mdl_loss()

    def full_costs(self, order: np.ndarray) -> torch.Tensor:
        return self.inner.full_costs(order)

    def offdiagonal_min(self) -> float:
        return self.inner.offdiagonal_min()

    def offdiagonal_max(self) -> float:
        return self.inner.offdiagonal_max()

    def candidates_at_most(self, cutoff: float, slack: float):
        return self.inner.candidates_at_most(cutoff, slack)

    def row_blocks(self) -> list[tuple[int, int]]:
        return self.inner.row_blocks()

    def block_costs(self, first: int, stop: int) -> torch.Tensor:
        return self.inner.block_costs(first, stop)

    def merge(self, keep: int, drop: int, *, with_costs: bool = True) -> int:
        merged = self.inner.merge(keep, drop, with_costs=with_costs)
        if with_costs and isinstance(self.inner, GroupState) and self._dense_is_cheaper(self.inner):
            self.inner = DenseGroupState.from_scalable(self.inner)
        return merged

    def costs_again(self) -> None:
        self.inner.costs_again()
        if isinstance(self.inner, GroupState) and self._dense_is_cheaper(self.inner):
            self.inner = DenseGroupState.from_scalable(self.inner)

    def _dense_is_cheaper(self, scalable: GroupState) -> bool:
        k = scalable.k
        if k < 2 or DENSE_BYTES_PER_PAIR * k * k > self.dense_budget_bytes:
            return False
        pool = scalable.pool
        return scalable.last_full_passes > 0 or (pool is not None and pool.size >= DENSE_SWITCH_SHARE * k * k)


def group_state(values: torch.Tensor, labels: list[str], threshold: float | None, alpha: float, device: torch.device):
    """The state for a merge run: dense matrices for small problems, the scalable one beyond (moving to the
    dense one mid-run where that becomes cheaper and fits in memory)."""
    limit = DENSE_MAX_COMPONENTS if threshold is not None else DENSE_MAX_COMPONENTS_CONTINUOUS
    if values.shape[1] <= limit:
        return DenseGroupState(values, labels, threshold, alpha, device)
    budget = int(DENSE_MEMORY_SHARE * available_bytes(device))
    return SwitchingState(GroupState(values, labels, threshold, alpha, device), budget)
