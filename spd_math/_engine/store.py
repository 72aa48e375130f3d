"""Exact group coactivation counts by slot, in the narrowest integer type that holds them (docs/math.md §3, §6).

The scalable merge state (`state.GroupState`) keeps `Q` here rather than as a float64 matrix:
16-bit counts where every count fits, with the few pairs of *wide* groups (active on more
samples than 16 bits count) kept apart in an int64 side table; 32- or 64-bit counts where wide
groups are common. Rows come out as float64 (what costs are computed in) or in exact integer
arithmetic (what a merge updates).
"""

from __future__ import annotations

import numpy as np
import torch

from spd_math._engine import backend, coactivation, kernels

FLOAT = torch.float64
# Group counts of 16-bit storage; groups above it are "wide" and their mutual counts kept apart.
NARROW_MAX = torch.iinfo(torch.int16).max
# Above this share of wide components at the start, 32-bit storage is smaller than 16-bit plus a side table.
WIDE_SHARE = 1 / 64


class CoactivationStore:
    """Exact symmetric coactivations by slot.

    `matrix[i, j]` holds `Q[i, j]` wherever it fits the matrix's dtype. With 16-bit storage,
    `Q[i, j] ≤ min(Q[i, i], Q[j, j])`, so only pairs of two *wide* groups (diagonal above
    `NARROW_MAX`) can overflow; those pairs live in `wide` (int64), indexed by wide id.
    """

    def __init__(self, matrix: torch.Tensor, limit: int | None, wide_ids: np.ndarray | None = None,
                 wide: torch.Tensor | None = None) -> None:
        self.matrix = matrix
        self.limit = limit
        c = matrix.shape[0]
        self.wide_of_slot = np.full(c, -1, dtype=np.int64) if wide_ids is None else wide_ids
        self.wide = wide if wide is not None else torch.zeros((0, 0), dtype=torch.int64, device=matrix.device)
        used = set(self.wide_of_slot[self.wide_of_slot >= 0].tolist())
        self.free = [w for w in range(self.wide.shape[0]) if w not in used]
        self.on_cpu = matrix.device.type == "cpu"

    @property
    def device(self) -> torch.device:
        return self.matrix.device

    def is_wide(self, diagonal: float) -> bool:
        return self.limit is not None and diagonal > self.limit

    def rows(self, slots: torch.Tensor, k: int) -> torch.Tensor:
        """`[len(slots), k]` float64 coactivations of the given slots with slots 0..k-1 (diagonal as stored)."""
        if backend.numpy_fast_path(self.matrix):
            q = torch.from_numpy(self.matrix.numpy()[slots.numpy(), :k].astype(np.float64))
        else:
            q = self.matrix.index_select(0, slots)[:, :k].to(FLOAT)
        if self.limit is not None and self.wide.shape[0]:
            self._patch_wide(q, slots.cpu().numpy(), k)
        return q

    def _patch_wide(self, q: torch.Tensor, slots: np.ndarray, k: int) -> None:
        wide_cols = np.flatnonzero(self.wide_of_slot[:k] >= 0)
        wide_rows = np.flatnonzero(self.wide_of_slot[slots] >= 0)
        if wide_cols.size == 0 or wide_rows.size == 0:
            return
        w_rows = torch.from_numpy(self.wide_of_slot[slots[wide_rows]]).to(self.device)
        w_cols = torch.from_numpy(self.wide_of_slot[wide_cols]).to(self.device)
        values = self.wide.index_select(0, w_rows).index_select(1, w_cols).to(FLOAT)
        rows_t = torch.from_numpy(wide_rows).to(self.device)
        cols_t = torch.from_numpy(wide_cols).to(self.device)
        q[rows_t[:, None], cols_t[None, :]] = values

    def exact_row(self, slot: int, k: int) -> torch.Tensor:
        """Row `slot` over slots 0..k-1 in the matrix's exact arithmetic (int64, or float64 for continuous)."""
        row = self.matrix[slot, :k]
        if self.on_cpu:
            row = torch.from_numpy(row.numpy().astype(np.float64 if row.is_floating_point() else np.int64))
        else:
            row = row.to(FLOAT) if row.is_floating_point() else row.to(torch.int64)
        if self.limit is not None and self.wide_of_slot[slot] >= 0:
            wide_cols = np.flatnonzero(self.wide_of_slot[:k] >= 0)
            if wide_cols.size:
                cols_t = torch.from_numpy(wide_cols).to(self.device)
                w_cols = torch.from_numpy(self.wide_of_slot[wide_cols]).to(self.device)
                row[cols_t] = self.wide[int(self.wide_of_slot[slot])].index_select(0, w_cols)
        return row

    def write(self, slot: int, row: torch.Tensor, k: int, wide: bool) -> None:
        """Set row and column `slot` (over slots 0..k-1) to `row`; `wide` says whether the group is wide."""
        stored = row if self.limit is None else row.clamp(max=self.limit)
        if self.on_cpu:  # NumPy: torch's strided column writes are slow on a busy CPU
            values = stored.numpy().astype(self.matrix.numpy().dtype)
            matrix = self.matrix.numpy()
            matrix[slot, :k] = values
            matrix[:k, slot] = values
        else:
            stored = stored.to(self.matrix.dtype)
            self.matrix[slot, :k] = stored
            self.matrix[:k, slot] = stored
        if not wide:
            self.release(slot)
            return
        if self.wide_of_slot[slot] < 0:
            self.wide_of_slot[slot] = self._new_wide_id()
        w = int(self.wide_of_slot[slot])
        wide_cols = np.flatnonzero(self.wide_of_slot[:k] >= 0)
        cols_t = torch.from_numpy(wide_cols).to(self.device)
        w_cols = torch.from_numpy(self.wide_of_slot[wide_cols]).to(self.device)
        values = row.to(torch.int64).index_select(0, cols_t)
        self.wide[w, w_cols] = values
        self.wide[w_cols, w] = values

    def _new_wide_id(self) -> int:
        if not self.free:
            size = self.wide.shape[0]
            grown = max(16, 2 * size)
            bigger = torch.zeros((grown, grown), dtype=torch.int64, device=self.device)
            bigger[:size, :size] = self.wide
            self.wide = bigger
            self.free = list(range(size, grown))
        return self.free.pop()

    def release(self, slot: int) -> None:
        if self.wide_of_slot[slot] >= 0:
            self.free.append(int(self.wide_of_slot[slot]))
            self.wide_of_slot[slot] = -1

    def move(self, source: int, target: int, k: int) -> None:
        matrix = self.matrix.numpy() if self.on_cpu else self.matrix
        matrix[target, :k] = matrix[source, :k]
        matrix[:k, target] = matrix[:k, source]
        self.wide_of_slot[target] = self.wide_of_slot[source]
        self.wide_of_slot[source] = -1


def narrow_store(structure, dense_counts: torch.Tensor | None, diag: np.ndarray, n: int, device: torch.device) -> CoactivationStore:
    """The boolean-mode store in the narrowest exact layout for this data."""
    c = diag.size
    wide = np.flatnonzero(diag > NARROW_MAX)
    if n <= NARROW_MAX:
        dtype, limit = torch.int16, None
    elif wide.size <= WIDE_SHARE * c:
        dtype, limit = torch.int16, NARROW_MAX
    elif n <= torch.iinfo(torch.int32).max:
        dtype, limit = torch.int32, None
    else:
        dtype, limit = torch.int64, None
    if structure is not None:
        out = np.zeros((c, c), dtype=torch.empty(0, dtype=dtype).numpy().dtype)
        col_ptr, col_rows, _ = coactivation.count_structure_into(structure, out)
        matrix = torch.from_numpy(out).to(device)
        wide_block = None
        if limit is not None and wide.size:
            wide_block = torch.from_numpy(
                kernels.counts_between(structure.indptr, structure.indices, col_ptr, col_rows, wide, wide)
            )
    else:
        matrix = dense_counts.clamp(max=torch.iinfo(dtype).max).to(dtype)
        wide_t = torch.from_numpy(wide).to(device)
        wide_block = dense_counts.index_select(0, wide_t).index_select(1, wide_t).cpu() if (limit is not None and wide.size) else None
        del dense_counts
    if limit is None or wide.size == 0:
        return CoactivationStore(matrix, limit)
    wide_ids = np.full(c, -1, dtype=np.int64)
    wide_ids[wide] = np.arange(wide.size)
    return CoactivationStore(matrix, limit, wide_ids, wide_block.to(device))
