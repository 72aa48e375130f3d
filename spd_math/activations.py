"""From a module -> causal-importance mapping to one labelled activation matrix (docs/math.md §1)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import scipy.sparse
import torch

from spd_math._engine import kernels
from spd_math.errors import ActivationsError
from spd_math.validation import as_tensor, describe_columns, finite_number, nonfinite_columns

SeqMode = Literal["concat", "seq_mean"] | None
ModuleFilter = str | Collection[str] | Callable[[str], bool] | None

SEQ_MODES = ("concat", "seq_mean", None)


# Rows per chunk when reducing over dense activations (bounds temporaries to ~64 M entries).
STATS_CHUNK_ENTRIES = 1 << 26
REMAP_BLOCK = 1 << 24  # column indices remapped at a time when dead components are dropped
MIN_CAPACITY = 1 << 16  # kept entries a compact builder makes room for at first
STATISTICS_BLOCK = 1024  # fewest columns per work item of the compiled chunk statistics
COMPILED_DTYPES = (np.float32, np.float64)  # CPU chunks the compiled path reads; others (float16) go through NumPy
ROW_ORDER_SUM_ENTRIES = 1 << 24  # entries a device chunk's row-order sums scan at a time


@dataclass(frozen=True)
class ColumnStats:
    """Per-component statistics over all samples.

    Attributes
    ----------
    n_samples : int
    active_counts : numpy.ndarray
        `[c]` int64: samples where the component is `> threshold` (the threshold they were made with).
    sums : numpy.ndarray
        `[c]` float64: sum of the component's values.
    maxima : numpy.ndarray
        `[c]` float64: maximum value (over all samples, zeros included).
    threshold : float
        The activation threshold of `active_counts`.

    Examples
    --------
    >>> import numpy as np
    >>> from spd_math import ProcessedActivations
    >>> stats = ProcessedActivations(np.array([[0.5, 0.0], [0.2, 0.0]]), ["a:0", "a:1"]).column_stats(0.3)
    >>> stats.active_counts.tolist(), stats.mean.tolist(), stats.maxima.tolist()
    ([1, 0], [0.35, 0.0], [0.5, 0.0])
    """

    n_samples: int
    active_counts: np.ndarray
    sums: np.ndarray
    maxima: np.ndarray
    threshold: float

    @property
    def activation_frequency(self) -> np.ndarray:
        return self.active_counts / max(self.n_samples, 1)

    @property
    def mean(self) -> np.ndarray:
        return self.sums / max(self.n_samples, 1)

    def select(self, columns: np.ndarray) -> ColumnStats:
        return ColumnStats(self.n_samples, self.active_counts[columns], self.sums[columns], self.maxima[columns], self.threshold)


@dataclass(frozen=True)
class ProcessedActivations:
    """A `[samples, c]` activation matrix with one label per column, and the labels dropped as dead (docs/math.md §1).

    `activations` takes one of three forms; `merge_iteration` gives identical results for all
    of them (the same mask in boolean mode, the same values in continuous mode):

    - dense: a floating point `[samples, c]` tensor (the original form);
    - a boolean mask: a `torch.bool` `[samples, c]` tensor, read as 0/1 values (so with any
      activation threshold in [0, 1) the mask itself);
    - sparse (compact): a `torch.sparse_csr` `[samples, c]` tensor (float or bool values,
      sorted column indices per row; absent entries are 0), or a SciPy sparse matrix or
      array, converted to one. This is what `CompactActivationsBuilder` makes: a 100k x 65,536
      member at 1% density is ~0.5 GB (int32 column indices + float32 values) instead of
      26 GB of dense float32. Boolean mode needs a threshold >= 0 with sparse input.

    Whatever the form, `to_scipy_csr()` gives a SciPy CSR matrix of the stored entries,
    `active_mask(threshold)` the boolean mask as SciPy CSR, and `column_stats(threshold)`
    per-component counts, sums and maxima without densifying.

    Parameters
    ----------
    activations : torch.Tensor, numpy.ndarray or scipy.sparse matrix
        `[samples, c]` as above (arrays are converted to tensors).
    labels : list of str
        One unique label per column.
    dead_labels : list of str, optional
        Labels removed by the dead filter, in original order.
    dropped_at_or_below : float, optional
        Set when entries `<= dropped_at_or_below` were left out (`CompactActivationsBuilder`
        keeps only active entries): boolean merges then need an activation threshold at
        least this high, and continuous merges are refused.
    stats : ColumnStats, optional
        Exact statistics of the values before anything was dropped (the builder records them).

    Raises
    ------
    ActivationsError
        Not 2-D, not floating point or boolean, or labels that do not match the columns or repeat.

    Examples
    --------
    >>> import numpy as np
    >>> from spd_math import ProcessedActivations
    >>> processed = ProcessedActivations(np.zeros((10, 2), dtype=np.float32), ["m:0", "m:1"])
    >>> processed.n_samples, processed.n_components, processed.is_compact
    (10, 2, False)
    >>> import scipy.sparse
    >>> sparse = ProcessedActivations(scipy.sparse.csr_array(np.eye(3, dtype=np.float32)), ["a:0", "a:1", "a:2"])
    >>> sparse.is_compact, sparse.active_mask(0.5).toarray().sum()
    (True, np.int64(3))
    """

    activations: torch.Tensor
    labels: list[str]
    dead_labels: list[str] = field(default_factory=list)
    dropped_at_or_below: float | None = None
    stats: ColumnStats | None = None

    def __repr__(self) -> str:  # short: no values or label lists
        form = "compact" if self.is_compact else "dense"
        return (f"ProcessedActivations({self.n_samples:,} samples x {self.n_components:,} components, {form}, "
                f"{len(self.dead_labels):,} dead)")

    def __post_init__(self) -> None:
        acts = _as_activation_tensor(self.activations)
        object.__setattr__(self, "activations", acts)
        for name in ("labels", "dead_labels"):
            if not isinstance(getattr(self, name), list):
                object.__setattr__(self, name, [str(label) for label in np.asarray(getattr(self, name)).reshape(-1)])
        if acts.ndim != 2:
            raise ActivationsError(f"activations: expected a 2-D [samples, components] tensor, got shape {tuple(acts.shape)}")
        if not (acts.is_floating_point() or acts.dtype == torch.bool):
            raise ActivationsError(f"activations: expected a floating point or boolean tensor, got dtype {acts.dtype}")
        if len(self.labels) != acts.shape[1]:
            raise ActivationsError(
                f"labels: expected one label per component column ({acts.shape[1]}), got {len(self.labels)}"
            )
        if len(set(self.labels)) != len(self.labels):
            raise ActivationsError("labels: expected unique labels, found duplicates")
        if self.stats is not None and self.stats.maxima.shape != (acts.shape[1],):
            raise ActivationsError(f"stats: expected statistics of {acts.shape[1]} components, got {self.stats.maxima.shape}")

    @property
    def n_samples(self) -> int:
        return self.activations.shape[0]

    @property
    def n_components(self) -> int:
        return self.activations.shape[1]

    @property
    def is_compact(self) -> bool:
        """Whether `activations` is a boolean mask or a sparse CSR tensor rather than dense floats."""
        return self.activations.layout == torch.sparse_csr or self.activations.dtype == torch.bool

    def to_scipy_csr(self) -> scipy.sparse.csr_array:
        """The stored entries as a SciPy CSR array (`[samples, c]`; dense forms give their nonzeros)."""
        acts = self.activations
        if acts.layout == torch.sparse_csr:
            return scipy.sparse.csr_array(
                (acts.values().detach().cpu().numpy(), acts.col_indices().cpu().numpy(), acts.crow_indices().cpu().numpy()),
                shape=tuple(acts.shape),
            )
        return scipy.sparse.csr_array(acts.detach().cpu().numpy())

    def active_mask(self, threshold: float) -> scipy.sparse.csr_array:
        """`activations > threshold` as a boolean SciPy CSR array (threshold >= 0)."""
        if threshold < 0:
            raise ActivationsError(f"threshold: expected a number >= 0 for a sparse mask, got {threshold}")
        stored = self.to_scipy_csr()
        stored.data = stored.data.astype(np.float64) > threshold
        stored.eliminate_zeros()
        return stored

    def column_stats(self, threshold: float = 0.0) -> ColumnStats:
        """Per-component active counts (`> threshold`), sums and maxima over all samples, without densifying.

        Taken from `stats` when the builder recorded them with the same threshold (exact over
        the values before anything was dropped).
        """
        if self.stats is not None and self.stats.threshold == threshold:
            return self.stats
        if self.dropped_at_or_below is not None and threshold < self.dropped_at_or_below:
            raise ActivationsError(
                f"threshold: entries <= {self.dropped_at_or_below} were not kept, so counts above {threshold} are unknown"
            )
        n, c = self.activations.shape
        acts = self.activations
        if acts.layout == torch.sparse_csr:
            stored = self.to_scipy_csr().tocsc()
            data = stored.data.astype(np.float64)
            columns = np.repeat(np.arange(c), np.diff(stored.indptr))
            counts = np.bincount(columns, weights=data > threshold, minlength=c).astype(np.int64)
            if threshold < 0:
                counts += n - np.diff(stored.indptr)
            sums = np.bincount(columns, weights=data, minlength=c)
            maxima = np.full(c, -np.inf)
            np.maximum.at(maxima, columns, data)
            maxima = np.where(np.diff(stored.indptr) < n, np.maximum(maxima, 0.0), maxima)
            if self.stats is not None:  # exact over the values before anything was dropped
                sums, maxima = self.stats.sums, self.stats.maxima
            return ColumnStats(n, counts, sums, maxima, threshold)
        counts = np.zeros(c, dtype=np.int64)
        sums = np.zeros(c, dtype=np.float64)
        maxima = np.full(c, -np.inf)
        rows = max(1, STATS_CHUNK_ENTRIES // max(c, 1))
        for chunk in acts.split(rows):
            values = chunk.detach().cpu()
            values = values.to(torch.float32) if values.dtype == torch.bool else values
            counts += (values > threshold).sum(dim=0).numpy()
            sums += values.sum(dim=0, dtype=torch.float64).numpy()
            maxima = np.maximum(maxima, values.amax(dim=0).double().numpy())
        return ColumnStats(n, counts, sums, maxima, threshold)


def _as_activation_tensor(value: object) -> torch.Tensor:
    if scipy.sparse.issparse(value):
        csr = scipy.sparse.csr_array(value)
        csr.sort_indices()
        data = csr.data if csr.data.dtype == np.bool_ else csr.data.astype(np.float32, copy=False)
        return csr_tensor(csr.indptr, csr.indices, np.ascontiguousarray(data), csr.shape)
    return as_tensor("activations", value, ActivationsError)


def csr_tensor(indptr: np.ndarray, indices: np.ndarray, values: np.ndarray, shape: tuple[int, int]) -> torch.Tensor:
    """A torch sparse CSR tensor; index arrays int32 while the entries fit, int64 beyond."""
    index_dtype = np.int32 if indptr[-1] < np.iinfo(np.int32).max and shape[1] < np.iinfo(np.int32).max else np.int64
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)
        return torch.sparse_csr_tensor(
            torch.from_numpy(indptr.astype(index_dtype, copy=False)),
            torch.from_numpy(indices.astype(index_dtype, copy=False)),
            torch.from_numpy(values),
            size=shape,
            check_invariants=False,
        )


class CompactActivationsBuilder:
    """Builds compact `ProcessedActivations` from dense chunks of rows, never holding the dense matrix.

    For model sources that produce activations a forward pass at a time: feed `[rows, c]`
    chunks (already concatenated over modules, columns in `labels` order) with `add`; only
    entries `> activation_threshold` are kept (column indices int32, values float32), while
    exact per-component statistics of the dense values are accumulated: the running maximum
    for the dead filter (docs/math.md §1, step 4) and counts, sums and maxima for reports.
    `build()` applies the dead filter and returns a `ProcessedActivations` whose activations
    are a sparse CSR tensor; boolean-mode merges of it are identical to merges of the dense
    matrix put through `process_activations`/`drop_dead` (continuous mode needs dense values).

    Parameters
    ----------
    labels : list of str
        One label per column of every chunk.
    activation_threshold : float
        Entries above this are active (>= 0: zeros are never active).
    filter_dead_threshold : float, default 0.0
        Components whose maximum over all rows is below this are dropped (0 keeps all).

    Raises
    ------
    ActivationsError
        A chunk of the wrong shape, NaN or inf in a chunk (naming the components), no rows,
        or a negative threshold.

    Examples
    --------
    >>> import numpy as np
    >>> from spd_math import CompactActivationsBuilder
    >>> builder = CompactActivationsBuilder(["m:0", "m:1", "m:2"], activation_threshold=0.1, filter_dead_threshold=0.05)
    >>> builder.add(np.array([[0.9, 0.0, 0.01], [0.3, 0.5, 0.0]], dtype=np.float32))
    >>> builder.add(np.array([[0.0, 0.2, 0.02]], dtype=np.float32))
    >>> processed = builder.build()
    >>> processed.labels, processed.dead_labels, processed.n_samples
    (['m:0', 'm:1'], ['m:2'], 3)
    >>> processed.to_scipy_csr().toarray().astype(float).round(2).tolist()
    [[0.9, 0.0], [0.3, 0.5], [0.0, 0.2]]
    """

    def __init__(self, labels: list[str], activation_threshold: float, filter_dead_threshold: float = 0.0) -> None:
        self.labels = list(labels)
        if len(set(self.labels)) != len(self.labels):
            raise ActivationsError("labels: expected unique labels, found duplicates")
        self.threshold = finite_number("activation_threshold", activation_threshold, ActivationsError, minimum=0.0)
        self.dead_threshold = finite_number("filter_dead_threshold", filter_dead_threshold, ActivationsError, minimum=0.0)
        c = len(self.labels)
        self._counts = np.zeros(c, dtype=np.int64)
        self._sums = np.zeros(c, dtype=np.float64)
        self._maxima = np.full(c, -np.inf)
        self._row_counts: list[np.ndarray] = []
        # The kept entries, in buffers grown in place (realloc: no copy of what is already there), so
        # neither adding nor building ever holds two copies of them.
        self._indices = np.empty(0, dtype=np.int32)
        self._values = np.empty(0, dtype=np.float32)
        self._stored = 0
        self._rows = 0
        self._built = False

    @property
    def n_samples(self) -> int:
        return self._rows

    @property
    def stored_bytes(self) -> int:
        """Bytes the kept entries take so far (a column index and a value each)."""
        return self._stored * (self._indices.itemsize + self._values.itemsize)

    @property
    def stats(self) -> ColumnStats:
        """Statistics of every component over the rows added so far, dead ones included."""
        return ColumnStats(self._rows, self._counts.copy(), self._sums.copy(), self._maxima.copy(), self.threshold)

    def add(self, chunk) -> None:
        """Append `[rows, c]` dense values (tensor or array, any float dtype, on any device).

        A chunk on an accelerator is reduced there: only its kept entries and the per-component
        statistics come to the host, never the dense values.
        """
        values = as_tensor("chunk", chunk, ActivationsError).detach()
        c = len(self.labels)
        if values.ndim != 2 or values.shape[1] != c:
            raise ActivationsError(f"chunk: expected shape [rows, {c}], got {tuple(values.shape)}")
        if not values.is_floating_point():
            values = values.float()
        if values.shape[0] == 0:
            self._row_counts.append(np.zeros(0, dtype=np.int64))
            return
        if values.device.type != "cpu" or values.dtype == torch.bfloat16:  # NumPy has no bfloat16
            self._add_tensor(values)
            return
        array = values.numpy()
        if array.dtype in COMPILED_DTYPES:
            self._add_compiled(np.ascontiguousarray(array))  # a no-op for the usual contiguous chunk
            return
        self._refuse_nonfinite(nonfinite_columns(values).tolist())
        active = array > self.threshold
        self._counts += active.sum(axis=0)
        self._sums += array.sum(axis=0, dtype=np.float64)
        self._maxima = np.maximum(self._maxima, array.max(axis=0).astype(np.float64))
        rows, columns = np.nonzero(active)
        self._row_counts.append(np.bincount(rows, minlength=array.shape[0]))
        self._append(columns, array[rows, columns])
        self._rows += array.shape[0]

    def _add_compiled(self, array: np.ndarray) -> None:
        """`add` in two multithreaded passes over the chunk (statistics and row counts, then the kept entries),
        written straight into the buffers; the same numbers as the NumPy path. Nothing changes when NaN/inf
        is refused."""
        c = len(self.labels)
        threshold = array.dtype.type(self.threshold)  # compared in the chunk's precision, as NumPy and torch do
        counts, sums, maxima = np.empty(c, np.int64), np.empty(c, np.float64), np.empty(c, np.float64)
        # A block of columns per thread (at least STATISTICS_BLOCK): long stretches of each row to read.
        block = max(STATISTICS_BLOCK, -(-c // kernels.max_threads()))
        block_row_counts = np.empty((-(-c // block), array.shape[0]), np.int64)
        kernels.chunk_statistics(array, threshold, block, counts, sums, maxima, block_row_counts)
        if not np.isfinite(sums).all():  # NaN/inf propagate into the sums; an exact look only then
            self._refuse_nonfinite(np.flatnonzero(~np.isfinite(array).all(axis=0)).tolist())
        row_counts = block_row_counts.sum(axis=0)
        offsets = np.zeros(array.shape[0], np.int64)
        np.cumsum(row_counts[:-1], out=offsets[1:])
        end = self._reserve(int(offsets[-1] + row_counts[-1]))
        kernels.gather_active(array, threshold, offsets, self._indices[self._stored : end],
                              self._values[self._stored : end])
        self._accumulate(counts, sums, maxima, row_counts, end, array.shape[0])

    def _add_tensor(self, values: torch.Tensor) -> None:
        """`add` with torch operations where the chunk is (the path of accelerator chunks): the statistics and
        the kept entries are made on the chunk's device and only they are copied to the host. The same numbers
        as the compiled path, bit for bit: the sums add in row order too (see `_row_order_sums`)."""
        threshold = torch.tensor(self.threshold, dtype=values.dtype, device=values.device)  # the chunk's precision
        active = values > threshold
        sums = _row_order_sums(values)
        if not bool(torch.isfinite(sums).all()):  # NaN/inf propagate into the sums; an exact look only then
            self._refuse_nonfinite(nonfinite_columns(values).tolist())
        counts = active.sum(dim=0)
        maxima = values.amax(dim=0).to(torch.float64)
        row_counts = active.sum(dim=1)
        # Row-major, as the compiled path writes them: flat positions of the kept entries, then their columns.
        flat = torch.nonzero(active.reshape(-1)).squeeze(1)
        end = self._reserve(flat.numel())
        c = values.shape[1]
        torch.from_numpy(self._indices[self._stored : end]).copy_(torch.remainder(flat, c).to(torch.int32))
        kept = values.reshape(-1)[flat] if values.is_contiguous() else values[active]  # no dense copy either way
        torch.from_numpy(self._values[self._stored : end]).copy_(kept.to(torch.float32))
        self._accumulate(counts.cpu().numpy(), sums.cpu().numpy(), maxima.cpu().numpy(),
                         row_counts.cpu().numpy(), end, values.shape[0])

    def _accumulate(self, counts, sums, maxima, row_counts, end: int, rows: int) -> None:
        """Take in one chunk's statistics, row counts and the kept entries written up to `end`."""
        self._counts += counts
        self._sums += sums
        np.maximum(self._maxima, maxima, out=self._maxima)
        self._row_counts.append(row_counts.astype(np.int64, copy=False))
        self._stored = end
        self._rows += rows

    def _refuse_nonfinite(self, columns: list[int]) -> None:
        if columns:
            raise ActivationsError(
                f"chunk at row {self._rows}: expected finite values, found NaN or inf in component(s) "
                f"{describe_columns(columns, self.labels)}"
            )

    def _reserve(self, entries: int) -> int:
        """Room for `entries` more kept entries; where they end."""
        end = self._stored + entries
        if end > len(self._indices):  # grow by half: few reallocations; untouched capacity takes no memory
            capacity = max(end, len(self._indices) * 3 // 2, MIN_CAPACITY)
            self._indices.resize(capacity, refcheck=False)
            self._values.resize(capacity, refcheck=False)
        return end

    def _append(self, columns: np.ndarray, values: np.ndarray) -> None:
        end = self._reserve(len(columns))
        self._indices[self._stored : end] = columns
        self._values[self._stored : end] = values
        self._stored = end

    def build(self) -> ProcessedActivations:
        """The compact `ProcessedActivations` of all rows added, with dead components removed."""
        if self._rows == 0:
            raise ActivationsError("activations: expected at least one sample, got 0")
        if self._built:
            raise ActivationsError("build: already called; a builder gives its activations once")
        self._built = True
        c = len(self.labels)
        indptr = np.zeros(self._rows + 1, dtype=np.int64)
        np.cumsum(np.concatenate(self._row_counts), out=indptr[1:])
        self._indices.resize(self._stored, refcheck=False)  # shrink in place to what is used
        self._values.resize(self._stored, refcheck=False)
        indices, values = self._indices, self._values
        stats = self.stats
        alive = np.ones(c, dtype=bool) if self.dead_threshold <= 0 else stats.maxima >= self.dead_threshold
        labels = [label for label, keep in zip(self.labels, alive) if keep]
        dead = [label for label, keep in zip(self.labels, alive) if not keep]
        if not alive.all() and not self._counts[~alive].any():
            # The usual case (dead threshold <= activation threshold): dead components kept no entries, so
            # only the column indices shift; in place, a block at a time.
            new_index = (np.cumsum(alive) - 1).astype(np.int32)
            for start in range(0, len(indices), REMAP_BLOCK):
                block = indices[start : start + REMAP_BLOCK]
                block[:] = new_index[block]
            stats = stats.select(np.flatnonzero(alive))
        elif not alive.all():
            new_index = np.cumsum(alive) - 1
            kept = alive[indices]
            row_of_entry = np.repeat(np.arange(self._rows), np.diff(indptr))
            indptr = np.zeros(self._rows + 1, dtype=np.int64)
            np.cumsum(np.bincount(row_of_entry[kept], minlength=self._rows), out=indptr[1:])
            indices = new_index[indices[kept]].astype(np.int32)
            values = values[kept]
            stats = stats.select(np.flatnonzero(alive))
        activations = csr_tensor(indptr, indices, values, (self._rows, len(labels)))
        return ProcessedActivations(activations, labels, dead, dropped_at_or_below=self.threshold, stats=stats)


def _row_order_sums(values: torch.Tensor) -> torch.Tensor:
    """Per column of a `[rows, c]` tensor, the float64 sum of its values added one row after another.

    The compiled and NumPy paths add in row order, and float64 sums depend on the order; a cumulative
    sum along rows is a sequential scan per column in torch (CPU, and CUDA's kernel for a dimension
    other than the last), so its last row is that same sum. Scanned a slab of rows at a time, the
    running sum carried in as the slab's first row, to bound the float64 temporaries.
    """
    rows, c = values.shape
    if c == 1:  # a one-column scan is of a single dimension, which CUDA scans in parallel: add on the CPU
        values = values.cpu()
    slab = max(1, ROW_ORDER_SUM_ENTRIES // c)
    total = torch.zeros((1, c), dtype=torch.float64, device=values.device)
    for start in range(0, rows, slab):
        part = values[start : start + slab].to(torch.float64)
        total = torch.cat([total, part]).cumsum(dim=0)[-1:]
    return total[0]


def _accepts(module_filter: ModuleFilter) -> Callable[[str], bool]:
    if module_filter is None:
        return lambda name: True
    if isinstance(module_filter, str):
        return lambda name: name.startswith(module_filter)
    if callable(module_filter):
        return module_filter
    if isinstance(module_filter, Collection):
        names = set(module_filter)
        return lambda name: name in names
    raise ActivationsError(
        f"module_filter: expected None, a prefix string, a set of names or a callable, got {module_filter!r}"
    )


def _as_tensor(name: str, value: object) -> torch.Tensor:
    tensor = as_tensor(f"module {name!r}", value, ActivationsError)
    if not tensor.is_floating_point():
        tensor = tensor.float()
    return tensor


def _reshape(name: str, tensor: torch.Tensor, seq_mode: SeqMode) -> torch.Tensor:
    if seq_mode == "concat" and tensor.ndim == 3:
        tensor = tensor.reshape(-1, tensor.shape[-1])
    elif seq_mode == "seq_mean" and tensor.ndim == 3:
        tensor = tensor.mean(dim=1)
    if tensor.ndim != 2:
        raise ActivationsError(
            f"module {name!r}: expected [samples, C] (or [batch, seq, C] with seq_mode 'concat'/'seq_mean'), "
            f"got shape {tuple(tensor.shape)} with seq_mode={seq_mode!r}"
        )
    return tensor


def process_activations(
    mapping: Mapping[str, torch.Tensor | np.ndarray],
    *,
    filter_dead_threshold: float = 0.0,
    seq_mode: SeqMode = None,
    module_filter: ModuleFilter = None,
) -> ProcessedActivations:
    """Reshape, filter modules, label and drop dead components, in mapping order (docs/math.md §1).

    Parameters
    ----------
    mapping : mapping of str to torch.Tensor or numpy.ndarray
        Module name -> activations `[samples, C_m]` or `[batch, seq, C_m]`; order is meaningful.
    filter_dead_threshold : float, default 0.0
        Components whose maximum over all samples is below this are dropped as dead (0 keeps all).
    seq_mode : {"concat", "seq_mean", None}
        How `[batch, seq, C]` tensors become `[samples, C]`.
    module_filter : str, collection of str, callable or None
        A name prefix, a set of names, or a predicate on the name.

    Returns
    -------
    ProcessedActivations
        The concatenated activations with labels `"module:index"` and the dead labels.

    Raises
    ------
    ActivationsError
        Bad shapes, no module kept, mismatched sample counts, no samples, or NaN/inf anywhere in
        the input (the message names the module and the component(s)).

    Examples
    --------
    >>> import numpy as np
    >>> from spd_math import process_activations
    >>> processed = process_activations(
    ...     {"mlp.0": np.array([[0.9, 0.0], [0.2, 0.0]]), "mlp.1": np.array([[0.0], [0.7]])},
    ...     filter_dead_threshold=0.01,
    ... )
    >>> processed.labels, processed.dead_labels
    (['mlp.0:0', 'mlp.1:0'], ['mlp.0:1'])
    """
    if seq_mode not in SEQ_MODES:
        raise ActivationsError(f"seq_mode: expected one of {SEQ_MODES}, got {seq_mode!r}")
    filter_dead_threshold = finite_number("filter_dead_threshold", filter_dead_threshold, ActivationsError, minimum=0.0)
    accepts = _accepts(module_filter)
    tensors: list[torch.Tensor] = []
    labels: list[str] = []
    for name, value in mapping.items():
        if not accepts(name):
            continue
        tensor = _reshape(name, _as_tensor(name, value), seq_mode)
        bad = nonfinite_columns(tensor)
        if bad.numel():
            # A NaN is not below the dead threshold: the dead filter must not hide it.
            raise ActivationsError(
                f"module {name!r}: expected finite values, found NaN or inf in component(s) "
                f"{describe_columns([f'{name}:{index}' for index in bad.tolist()])}"
            )
        if tensors and tensor.shape[0] != tensors[0].shape[0]:
            raise ActivationsError(
                f"module {name!r}: has {tensor.shape[0]} samples, expected {tensors[0].shape[0]} like the modules before it"
            )
        tensors.append(tensor)
        labels.extend(f"{name}:{index}" for index in range(tensor.shape[1]))
    if not tensors:
        raise ActivationsError(
            f"no modules to cluster: the mapping has {len(mapping)} module(s) and the filter {module_filter!r} kept none"
        )
    activations = torch.cat(tensors, dim=1) if len(tensors) > 1 else tensors[0]
    if activations.shape[0] == 0:
        raise ActivationsError("activations: expected at least one sample, got 0")
    processed = ProcessedActivations(activations=activations, labels=labels)
    return drop_dead(processed, filter_dead_threshold)


def drop_dead(processed: ProcessedActivations, filter_dead_threshold: float) -> ProcessedActivations:
    """Remove components whose maximum is below the threshold (docs/math.md §1, step 4).

    Parameters
    ----------
    processed : ProcessedActivations
    filter_dead_threshold : float
        A component is dead when its maximum over all samples is `< filter_dead_threshold`;
        0 (or less) removes nothing.

    Returns
    -------
    ProcessedActivations
        The live columns; the dead labels are appended to `dead_labels` in original order.

    Raises
    ------
    ActivationsError
        The threshold is not a finite number.

    Examples
    --------
    >>> import torch
    >>> from spd_math import ProcessedActivations, drop_dead
    >>> kept = drop_dead(ProcessedActivations(torch.tensor([[0.5, 0.0005]]), ["a:0", "a:1"]), 0.001)
    >>> kept.labels, kept.dead_labels
    (['a:0'], ['a:1'])
    """
    filter_dead_threshold = finite_number("filter_dead_threshold", filter_dead_threshold, ActivationsError)
    if filter_dead_threshold <= 0:
        return processed
    if processed.is_compact:
        maxima = processed.stats.maxima if processed.stats is not None else processed.column_stats().maxima
        alive_np = maxima >= filter_dead_threshold
        if alive_np.all():
            return processed
        columns = np.flatnonzero(alive_np)
        kept = processed.to_scipy_csr()[:, columns] if processed.activations.layout == torch.sparse_csr else None
        activations = kept if kept is not None else processed.activations[:, torch.from_numpy(columns)]
        alive_list = alive_np.tolist()
        return ProcessedActivations(
            activations=activations,
            labels=[label for label, keep in zip(processed.labels, alive_list) if keep],
            dead_labels=processed.dead_labels + [label for label, keep in zip(processed.labels, alive_list) if not keep],
            dropped_at_or_below=processed.dropped_at_or_below,
            stats=None if processed.stats is None else processed.stats.select(columns),
        )
    alive = processed.activations.amax(dim=0) >= filter_dead_threshold
    if bool(alive.all()):
        return processed
    alive_list = alive.tolist()
    return ProcessedActivations(
        activations=processed.activations[:, alive],
        labels=[label for label, keep in zip(processed.labels, alive_list) if keep],
        dead_labels=processed.dead_labels + [label for label, keep in zip(processed.labels, alive_list) if not keep],
    )
