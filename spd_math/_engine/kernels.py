"""Compiled CPU kernels (Numba) for the exact integer work of the merge setup and for reducing
activation chunks to their compact form, and the decorator other modules compile theirs with.

Other devices than the CPU take torch paths that give the same exact integers.
"""

from __future__ import annotations

import functools

import numba
import numpy as np
import torch


def compiled(**options):
    """`numba.njit` (cached, releasing the GIL) with `options`.

    A parallel kernel runs on as many threads as torch's CPU operations may use here (a worker's
    share of the cores), and leaves torch's thread count as it found it: Numba's OpenMP layer sets
    the process-wide OpenMP thread count, which torch shares.
    """

    def wrap(function):
        kernel = numba.njit(cache=True, nogil=True, **options)(function)
        if not options.get("parallel"):
            return kernel

        @functools.wraps(function)
        def on_torch_threads(*args):
            threads = torch.get_num_threads()
            numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
            try:
                return kernel(*args)
            finally:
                torch.set_num_threads(threads)

        return on_torch_threads

    return wrap


# Loops and thread ids inside functions compiled with parallel=True.
parallel_range = numba.prange
thread_id = numba.get_thread_id


def max_threads() -> int:
    """How many threads a parallel compiled loop may use (thread ids are below it)."""
    return int(numba.config.NUMBA_NUM_THREADS)


@compiled()
def transpose_structure(indptr, indices, n_columns):  # pragma: no cover - compiled
    """CSR rows -> CSC: for every column its rows (ascending) and each entry's position in its row."""
    counts = np.zeros(n_columns + 1, np.int64)
    for t in range(indices.size):
        counts[indices[t] + 1] += 1
    for j in range(n_columns):
        counts[j + 1] += counts[j]
    col_ptr = counts.copy()
    fill = counts[:-1].copy()
    col_rows = np.empty(indices.size, np.int32)
    col_pos = np.empty(indices.size, np.int32)
    for row in range(indptr.size - 1):
        for t in range(indptr[row], indptr[row + 1]):
            j = indices[t]
            col_rows[fill[j]] = row
            col_pos[fill[j]] = t - indptr[row]
            fill[j] += 1
    return col_ptr, col_rows, col_pos


@compiled(parallel=True)
def upper_counts(indptr, indices, col_ptr, col_rows, col_pos, out, block):  # pragma: no cover - compiled
    """`out[i, j] = #rows holding both i and j` for j > i (and the column count on the diagonal,
    clipped to out's range); out's strict lower triangle is left untouched.

    Rows of `out` are filled a block at a time from a private int32 accumulator; blocks are
    dealt from both ends of the range so that the two halves of the work (row i has about
    c - i partners) are even across threads.
    """
    c = out.shape[0]
    limit = np.iinfo(out.dtype).max
    n_blocks = (c + block - 1) // block
    for b in numba.prange(n_blocks):
        chosen = b // 2 if b % 2 == 0 else n_blocks - 1 - b // 2
        acc = np.zeros(c, np.int32)
        for i in range(chosen * block, min(c, (chosen + 1) * block)):
            acc[i:] = 0
            for e in range(col_ptr[i], col_ptr[i + 1]):
                s = col_rows[e]
                for t in range(indptr[s] + col_pos[e] + 1, indptr[s + 1]):
                    acc[indices[t]] += 1
            for j in range(i + 1, c):
                value = acc[j]
                out[i, j] = value if value <= limit else limit
            diag = col_ptr[i + 1] - col_ptr[i]
            out[i, i] = diag if diag <= limit else limit
    return out


@compiled()
def counts_between(indptr, indices, col_ptr, col_rows, rows_of, columns_of):  # pragma: no cover - compiled
    """Exact int64 `[len(rows_of), len(columns_of)]` co-occurrence counts of the given columns."""
    n_columns = col_ptr.size - 1
    position = np.full(n_columns, -1, np.int64)
    for q in range(columns_of.size):
        position[columns_of[q]] = q
    out = np.zeros((rows_of.size, columns_of.size), np.int64)
    for p in range(rows_of.size):
        i = rows_of[p]
        for e in range(col_ptr[i], col_ptr[i + 1]):
            s = col_rows[e]
            for t in range(indptr[s], indptr[s + 1]):
                q = position[indices[t]]
                if q >= 0:
                    out[p, q] += 1
    return out


@compiled(parallel=True)
def mirror_upper(out, tile):  # pragma: no cover - compiled
    """Copy the strict upper triangle onto the lower one, tile by tile (cache-friendly transpose)."""
    c = out.shape[0]
    n_tiles = (c + tile - 1) // tile
    for bi in numba.prange(n_tiles):
        for bj in range(bi, n_tiles):
            for i in range(bi * tile, min(c, (bi + 1) * tile)):
                for j in range(max(i + 1, bj * tile), min(c, (bj + 1) * tile)):
                    out[j, i] = out[i, j]
    return out


@compiled()
def pack_csr(indptr, indices, n_words, n_columns):  # pragma: no cover - compiled
    """Word-major packed masks `[n_words, n_columns]` int64: row s is bit s % 64 of word s // 64."""
    words = np.zeros((n_words, n_columns), np.int64)
    for row in range(indptr.size - 1):
        word = row >> 6
        bit = np.int64(1) << np.int64(row & 63)
        for t in range(indptr[row], indptr[row + 1]):
            words[word, indices[t]] |= bit
    return words


@compiled(parallel=True)
def pair_score_extremes(matrix, diag, alpha, slope):  # pragma: no cover - compiled
    """Per row i, min and max over j != i of `alpha·(s_i + s_j) − slope·q_ij` in float64.

    With slope = 2α + log2(k−1) this is the cost of a pair of unmerged groups up to the
    rounding of a few operations: callers widen it by a margin and use it as bounds.
    """
    c = matrix.shape[0]
    lows = np.empty(c, np.float64)
    highs = np.empty(c, np.float64)
    for i in numba.prange(c):
        low, high = np.inf, -np.inf
        base = alpha * diag[i]
        for j in range(c):
            if j != i:
                value = base + alpha * diag[j] - slope * matrix[i, j]
                if value < low:
                    low = value
                if value > high:
                    high = value
        lows[i] = low
        highs[i] = high
    return lows, highs


@compiled(parallel=True)
def active_row_counts(array, threshold, row_counts):  # pragma: no cover - compiled
    """How many entries of each row of `array` are `> threshold`."""
    rows, c = array.shape
    for r in numba.prange(rows):
        n = 0
        for j in range(c):
            if array[r, j] > threshold:
                n += 1
        row_counts[r] = n


def active_rows(array: np.ndarray, threshold) -> tuple[np.ndarray, np.ndarray]:
    """Per row of a float chunk, how many entries are `> threshold` and where its entries start (int64 each)."""
    row_counts = np.empty(array.shape[0], np.int64)
    active_row_counts(array, threshold, row_counts)
    offsets = np.zeros(array.shape[0], np.int64)
    np.cumsum(row_counts[:-1], out=offsets[1:])
    return row_counts, offsets


@compiled(parallel=True)
def gather_active(array, threshold, offsets, indices, values):  # pragma: no cover - compiled
    """The column index and value of every entry `> threshold`, row-major, row r's from `offsets[r]` on."""
    rows, c = array.shape
    for r in numba.prange(rows):
        t = offsets[r]
        for j in range(c):
            value = array[r, j]
            if value > threshold:
                indices[t] = j
                values[t] = value
                t += 1


@compiled(parallel=True)
def chunk_statistics(array, threshold, block, counts, sums, maxima, block_row_counts):  # pragma: no cover - compiled
    """Per column of a `[rows, c]` chunk: entries `> threshold`, the float64 sum (in row order) and the maximum;
    and per block of columns and row, the entries `> threshold` (the rows' counts: `block_row_counts.sum(0)`).

    One pass over the chunk gives everything but the kept entries themselves. Columns are dealt out a
    block at a time; each block's columns add in row order whatever the block size or the number of
    threads, so the sums are those of a row-by-row NumPy reduction. Wide blocks read long stretches
    of each row (blocks of 64 columns, a 256-byte read per row, ran several times slower).
    """
    rows, c = array.shape
    n_blocks = (c + block - 1) // block
    for b in parallel_range(n_blocks):
        start, stop = b * block, min(c, (b + 1) * block)
        for j in range(start, stop):
            counts[j] = 0
            sums[j] = 0.0
            maxima[j] = -np.inf
        for r in range(rows):
            n = 0
            for j in range(start, stop):
                value = array[r, j]
                active = value > threshold
                counts[j] += active
                n += active
                sums[j] += value
                maxima[j] = max(maxima[j], value)  # the first of equal maxima, as `if value > maxima[j]`
            block_row_counts[b, r] = n


@compiled()
def slot_counts_of_samples(indptr, indices, slot_of_component, samples, k):  # pragma: no cover - compiled
    """Per slot below k, how many of its components' activations fall on the given samples (rows of a CSR
    structure); activations of components whose slot is k or above are not counted."""
    counts = np.zeros(k, np.int64)
    for sample in samples:
        for position in range(indptr[sample], indptr[sample + 1]):
            slot = slot_of_component[indices[position]]
            if slot < k:
                counts[slot] += 1
    return counts
