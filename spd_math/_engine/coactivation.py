"""The initial state of a merge: which samples each component is active on, and exact coactivations.

Boolean mode (docs/math.md §2) needs `Q = MᵀM` for the mask `M = A > threshold`, as exact
integer counts. Activations arrive in any of the forms `ProcessedActivations` accepts
(dense floats, a boolean mask, a sparse CSR matrix); all are reduced to the mask, in row
chunks, without ever holding a dense float copy of the whole matrix.

How the counts are made depends on the device and the measured density:

- CPU, sparse mask (the usual SPD case, a few % active): the mask's CSR structure feeds a
  compiled Gustavson product that adds one to `Q[i, j]` for every sample holding both i and
  j (work ~ Σ_s active_s², never a near-dense sparse intermediate), writing the upper
  triangle straight into the narrow count matrix and mirroring it.
- otherwise (dense masks, other devices): chunked float32 products of 0/1
  rows, exact while a chunk has fewer than 2**24 rows.

Continuous mode keeps the dense float64 product of the original engine, chunk by chunk, so
its floating point sums are bit-identical to it.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from spd_math._engine import backend, kernels
from spd_math._engine.bitsets import BITS_PER_WORD, n_words, pack_words
from spd_math.errors import ActivationsError
from spd_math.validation import describe_columns, nonfinite_columns

# Rows per chunk when reading activations: bounded by a budget of entries per chunk
# (2**26 = 64 M booleans or 256 MB of float32) and a multiple of the word size.
MAX_CHUNK_ROWS = 4096
CHUNK_ENTRIES = 1 << 26
# Above this fraction of active entries the sparse product does more work than a dense one.
SPARSE_DENSITY = 0.1
# Rows of the count matrix per work item of the compiled product.
COUNT_BLOCK_ROWS = 32
# Tile size of the cache-friendly mirror of the upper triangle.
MIRROR_TILE = 64


def chunk_rows(n_components: int) -> int:
    rows = min(MAX_CHUNK_ROWS, max(BITS_PER_WORD, CHUNK_ENTRIES // max(n_components, 1)))
    return rows // BITS_PER_WORD * BITS_PER_WORD


def is_sparse(values: torch.Tensor) -> bool:
    return isinstance(values, torch.Tensor) and values.layout == torch.sparse_csr


def dense_row_chunks(values: torch.Tensor, rows: int, device: torch.device | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """`(first_row, chunk)` over the rows of a dense or sparse CSR `[n, c]` tensor, chunks dense."""
    n = values.shape[0]
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        if is_sparse(values):
            chunk = _csr_rows_dense(values, start, stop)
        else:
            chunk = values[start:stop]
        yield start, chunk if device is None else chunk.to(device)


def _csr_rows_dense(values: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    crow = values.crow_indices()
    first, last = int(crow[start]), int(crow[stop])
    local_crow = crow[start : stop + 1] - first
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)
        part = torch.sparse_csr_tensor(local_crow, values.col_indices()[first:last], values.values()[first:last],
                                       size=(stop - start, values.shape[1]), check_invariants=False)
    return part.to_dense()


def check_finite_chunk(chunk: torch.Tensor, first_row: int, labels: list[str] | None = None) -> None:
    if chunk.dtype == torch.bool:
        return
    bad = nonfinite_columns(chunk)
    if bad.numel():
        raise ActivationsError(
            f"activations: expected finite values, found NaN or inf in component(s) {describe_columns(bad.tolist(), labels)} "
            f"within rows {first_row}..{first_row + chunk.shape[0] - 1}"
        )


def active_mask(chunk: torch.Tensor, threshold: float) -> torch.Tensor:
    """`chunk > threshold`, with booleans read as 0/1 values."""
    if chunk.dtype == torch.bool:
        if 0 <= threshold < 1:
            return chunk
        return torch.full_like(chunk, threshold < 0)
    return chunk > threshold


@dataclass
class MaskStructure:
    """The boolean mask as CSR (rows = samples) with int32 column indices, on the CPU."""

    indptr: np.ndarray
    indices: np.ndarray
    n_samples: int
    n_components: int

    @property
    def nnz(self) -> int:
        return int(self.indices.size)


def csr_of_sparse_input(values: torch.Tensor, threshold: float) -> MaskStructure:
    """The mask of a sparse CSR input: stored entries above the threshold (absent ones are 0)."""
    if threshold < 0:
        raise ActivationsError(
            f"activation_threshold: sparse activations leave zeros unstored, so the threshold must be >= 0, got {threshold}"
        )
    data = values.values().detach().cpu()
    if data.dtype != torch.bool:
        bad = ~torch.isfinite(data)
        if bool(bad.any()):
            columns = values.col_indices().cpu()[bad].unique()
            raise ActivationsError(
                f"activations: expected finite values, found NaN or inf in component(s) {describe_columns(columns.tolist())}"
            )
        keep = (data > threshold).numpy()
    else:
        keep = active_mask(data, threshold).numpy()
    crow = values.crow_indices().cpu().numpy().astype(np.int64)
    cols = values.col_indices().cpu().numpy()
    n, c = values.shape
    kept_before = np.concatenate([[0], np.cumsum(keep, dtype=np.int64)])
    indptr = kept_before[crow]
    indices = cols[keep].astype(np.int32)
    _check_sorted_rows(indptr, indices)
    return MaskStructure(indptr=indptr, indices=indices, n_samples=n, n_components=c)


def _check_sorted_rows(indptr: np.ndarray, indices: np.ndarray) -> None:
    if indices.size < 2:
        return
    steps = np.diff(indices.astype(np.int64))
    row_boundary = np.zeros(steps.size, dtype=bool)
    starts = indptr[1:-1]
    row_boundary[starts[(starts > 0) & (starts < indices.size)] - 1] = True
    if (steps[~row_boundary] <= 0).any():
        raise ActivationsError("activations: sparse CSR rows must have strictly increasing column indices (coalesce first)")


def boolean_setup(values: torch.Tensor, threshold: float, labels: list[str] | None, device: torch.device):
    """Packed masks `[words, c]` on the device, the exact diagonal counts (float64 NumPy), and either the
    CSR mask structure (for the compiled CPU product) or None with the counts already made on the device.

    Returns `(masks, diag, structure, dense_counts)`: exactly one of `structure`, `dense_counts` is set.
    """
    n, c = values.shape
    use_compiled = backend.numpy_fast_path(torch.empty(0, device=device))
    if is_sparse(values) and use_compiled:
        structure = csr_of_sparse_input(values, threshold)
        if structure.nnz <= SPARSE_DENSITY * n * c:
            return _from_structure(structure, device)
    if use_compiled and not is_sparse(values):
        structure = _structure_from_dense(values, threshold, labels, limit=int(SPARSE_DENSITY * n * c))
        if structure is not None:
            return _from_structure(structure, device)
    return _dense_counts(values, threshold, labels, device)


def _from_structure(structure: MaskStructure, device: torch.device):
    c = structure.n_components
    words = kernels.pack_csr(structure.indptr, structure.indices, n_words(structure.n_samples), c)
    diag = np.bincount(structure.indices, minlength=c).astype(np.float64)
    return torch.from_numpy(words).to(device), diag, structure, None


def _structure_from_dense(values: torch.Tensor, threshold: float, labels, limit: int) -> MaskStructure | None:
    """The mask's CSR from dense chunks, or None as soon as it holds more than `limit` entries."""
    n, c = values.shape
    row_counts = np.zeros(n, dtype=np.int64)
    pieces: list[np.ndarray] = []
    total = 0
    for start, chunk in dense_row_chunks(values, chunk_rows(c), torch.device("cpu")):
        check_finite_chunk(chunk, start, labels)
        counts, cols = _active_columns(chunk, threshold)
        total += cols.size
        if total > limit:
            return None
        row_counts[start : start + chunk.shape[0]] = counts
        pieces.append(cols)
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(row_counts, out=indptr[1:])
    indices = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
    return MaskStructure(indptr=indptr, indices=indices, n_samples=n, n_components=c)


def _active_columns(chunk: torch.Tensor, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Per row the number of active entries, and their column indices (int32, row-major): float chunks through
    the compiled passes the compact builder uses (compared in the chunk's precision, as torch does), others
    through their mask."""
    if chunk.dtype in (torch.float32, torch.float64):
        array = np.ascontiguousarray(chunk.numpy())
        typed = array.dtype.type(threshold)
        row_counts, offsets = kernels.active_rows(array, typed)
        total = int(row_counts.sum())
        columns = np.empty(total, np.int32)
        kernels.gather_active(array, typed, offsets, columns, np.empty(total, array.dtype))
        return row_counts, columns
    rows, columns = np.nonzero(active_mask(chunk, threshold).numpy())
    return np.bincount(rows, minlength=chunk.shape[0]), columns.astype(np.int32)


def _dense_counts(values: torch.Tensor, threshold: float, labels, device: torch.device):
    """Masks and exact int64 counts from chunked float32 products of 0/1 rows (any device)."""
    n, c = values.shape
    masks = torch.zeros((n_words(n), c), dtype=torch.int64, device=device)
    counts = torch.zeros((c, c), dtype=torch.int64, device=device)
    rows = chunk_rows(c)
    for start, chunk in dense_row_chunks(values, rows, device):
        check_finite_chunk(chunk, start, labels)
        active = active_mask(chunk, threshold)
        as_float = active.to(torch.float32)
        counts += (as_float.T @ as_float).to(torch.int64)  # exact: a chunk has < 2**24 rows
        padded = torch.zeros((n_words(chunk.shape[0]) * BITS_PER_WORD, c), dtype=torch.bool, device=device)
        padded[: chunk.shape[0]] = active
        first_word = start // BITS_PER_WORD
        masks[first_word : first_word + n_words(chunk.shape[0])] = pack_words(padded)
    diag = counts.diagonal().double().cpu().numpy().copy()
    return masks, diag, None, counts


def count_structure_into(structure: MaskStructure, out: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fill `out` ([c, c], a NumPy integer matrix) with the symmetric counts (clipped to its range);
    returns the CSC structure for later exact look-ups."""
    col_ptr, col_rows, col_pos = kernels.transpose_structure(structure.indptr, structure.indices, structure.n_components)
    kernels.upper_counts(structure.indptr, structure.indices, col_ptr, col_rows, col_pos, out, COUNT_BLOCK_ROWS)
    kernels.mirror_upper(out, MIRROR_TILE)
    return col_ptr, col_rows, col_pos


def continuous_setup(values: torch.Tensor, labels, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 `AᵀA` and column sums, accumulated over 4096-row chunks as the original engine did."""
    n, c = values.shape
    coact = torch.zeros((c, c), dtype=torch.float64, device=device)
    column_sums = torch.zeros(c, dtype=torch.float64, device=device)
    for start, chunk in dense_row_chunks(values, MAX_CHUNK_ROWS, device):
        check_finite_chunk(chunk, start, labels)
        wide = chunk.to(torch.float64)
        coact += wide.T @ wide
        column_sums += wide.sum(dim=0)
    return coact, column_sums
