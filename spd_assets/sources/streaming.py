"""From forward-pass chunks to one member's processed activations and per-component statistics.

A model source yields its activations chunk by chunk (module name -> `[rows, seq, C]` or
`[rows, C]`). `activations_from_chunks` treats each chunk as `spd_math.process_activations`
would treat the whole batch (seq mode, module filter, float32, finite values), accumulates the
statistics of the `component_stats` table, and writes the chunk into the `[samples, components]`
matrix the merge takes; dead components are dropped at the end exactly as `spd_math.drop_dead`
drops them. The result equals `drop_dead(process_activations(whole batch))`.

Memory: the matrix is allocated once and filled in place, after checking that it fits the
source's memory budget, so a member too large is refused before its forward pass, with the size
it would take. For now the matrix is dense float32 in both merge modes; with an activation
threshold the merge needs only the packed mask (`PackedMask`, the layout of
`spd_math.bitsets.pack_words`), which is where a compact `ProcessedActivations` plugs in.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from spd_assets.errors import SourceError
from spd_math import MergeConfig, ProcessedActivations

BYTES_PER_VALUE = 4  # float32
BITS_PER_WORD = 64
LABELS_NAMED_IN_ERRORS = 5


def n_samples(activation_dims: tuple[int, ...], seq_mode: str | None) -> int:
    """Samples one member gives under `seq_mode`: tokens (`concat`), sequences (`seq_mean`) or rows (2-D)."""
    if len(activation_dims) == 1:
        return activation_dims[0]
    sequences, seq_len = activation_dims
    if seq_mode == "concat":
        return sequences * seq_len
    if seq_mode == "seq_mean":
        return sequences
    raise SourceError(
        f"seq_mode: {seq_mode!r} needs [samples, C] activations, but this source gives [sequences, seq_len, C]; "
        "expected seq_mode 'concat' (tokens are samples) or 'seq_mean' (sequences are samples)"
    )


def kept_widths(module_widths: Mapping[str, int], module_name_filter: str | None) -> dict[str, int]:
    """The modules the merge config's `module_name_filter` (a name prefix) keeps, with their widths."""
    kept = {name: width for name, width in module_widths.items()
            if module_name_filter is None or name.startswith(module_name_filter)}
    if not kept:
        raise SourceError(
            f"merge_config.module_name_filter: {module_name_filter!r} keeps none of the modules "
            f"{list(module_widths)[:LABELS_NAMED_IN_ERRORS]}; expected a prefix of at least one"
        )
    return kept


def check_memory_budget(samples: int, components: int, budget_bytes: int, *, what: str = "one member") -> int:
    """The bytes of a dense `[samples, components]` float32 matrix; a `SourceError` when over `budget_bytes`."""
    size = samples * components * BYTES_PER_VALUE
    if size > budget_bytes:
        raise SourceError(
            f"{what}: the activations would take {size / 2**30:.2f} GiB ({samples:,} samples x {components:,} "
            f"components x {BYTES_PER_VALUE} bytes), over source.memory_budget_gb = {budget_bytes / 2**30:g}; "
            "expected a smaller source.batch_size, fewer modules, or a larger budget"
        )
    return size


@dataclass(frozen=True)
class ComponentStatistics:
    """Per component over one member's samples: how often it is above the cutoff, its mean and its maximum."""

    labels: list[str]
    n_samples: int
    active_counts: np.ndarray  # int64
    sums: np.ndarray  # float64
    maxima: np.ndarray  # float32, as the activations

    @property
    def activation_frequency(self) -> np.ndarray:
        return self.active_counts / max(self.n_samples, 1)

    @property
    def mean_activation(self) -> np.ndarray:
        return self.sums / max(self.n_samples, 1)


@dataclass(frozen=True)
class StreamedActivations:
    """What `activations_from_chunks` gives: the merge's input and every component's statistics."""

    processed: ProcessedActivations
    statistics: ComponentStatistics
    modules: list[str]


def _rows(name: str, values: torch.Tensor, seq_mode: str | None) -> torch.Tensor:
    """One module's chunk as `[samples, C]` float32, as `process_activations` reshapes a whole batch."""
    values = values.float()
    if values.ndim == 3 and seq_mode == "concat":
        values = values.reshape(-1, values.shape[-1])
    elif values.ndim == 3 and seq_mode == "seq_mean":
        values = values.mean(dim=1)
    if values.ndim != 2:
        raise SourceError(f"module {name!r}: gave shape {tuple(values.shape)}; expected [rows, C] or [rows, seq, C] "
                          f"with seq_mode 'concat' or 'seq_mean' (got {seq_mode!r})")
    return values


def _column_statistics(rows: torch.Tensor, cutoff: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per column of `[samples, C]` float32 rows: samples above `cutoff`, float64 sum, maximum (on the CPU)."""
    if rows.device.type == "cpu":  # NumPy's column reductions are several times faster than torch's on the CPU
        values = rows.numpy()
        return (torch.from_numpy(np.count_nonzero(values > cutoff, axis=0).astype(np.int64)),
                torch.from_numpy(values.sum(axis=0, dtype=np.float64)), torch.from_numpy(values.max(axis=0)))
    return (rows > cutoff).sum(dim=0).cpu(), rows.sum(dim=0, dtype=torch.float64).cpu(), rows.amax(dim=0).cpu()


def _check_finite(sums: torch.Tensor, labels: list[str]) -> None:
    """A NaN or inf anywhere in a component makes its float64 sum non-finite (finite float32 values cannot)."""
    bad = torch.nonzero(~torch.isfinite(sums)).squeeze(1)[:LABELS_NAMED_IN_ERRORS].tolist()
    if bad:
        modules = list(dict.fromkeys(labels[index].rpartition(":")[0] for index in bad))
        raise SourceError(f"module {modules[0]!r}: NaN or inf in component(s) {[labels[index] for index in bad]}; "
                          "expected finite activations")


def activations_from_chunks(
    chunks: Iterable[Mapping[str, torch.Tensor]],
    *,
    module_widths: Mapping[str, int],
    activation_dims: tuple[int, ...],
    merge_config: MergeConfig,
    seq_mode: str | None,
    memory_budget_bytes: int,
) -> StreamedActivations:
    """One member's processed activations and component statistics, built chunk by chunk.

    Parameters
    ----------
    chunks : iterable of mappings of str to torch.Tensor
        Module name -> activations of consecutive rows of the batch, on any device. Nothing is
        read from it before the memory budget is checked (a generator's forward pass does not start).
    module_widths : mapping of str to int
        Components per module of the source (before the module filter).
    activation_dims : tuple of int
        `(sequences, seq_len)` or `(rows,)` of the whole member.
    merge_config : MergeConfig
        Its `activation_threshold` (the statistics' cutoff), `filter_dead_threshold` and `module_name_filter`.
    seq_mode : {"concat", "seq_mean", None}
    memory_budget_bytes : int
        The most the `[samples, components]` float32 matrix may take.

    Returns
    -------
    StreamedActivations
        Equal to `drop_dead(process_activations(batch, seq_mode=..., module_filter=...), filter_dead_threshold)`
        on the whole batch, with the statistics of every component (dead ones included).

    Raises
    ------
    SourceError
        The matrix would exceed the budget (before any chunk is read), no module is kept, a chunk
        has other modules or widths than the first, values are not finite, or the rows do not add up.
    """
    widths = kept_widths(module_widths, merge_config.module_name_filter)
    total_samples = n_samples(activation_dims, seq_mode)
    total_components = sum(widths.values())
    check_memory_budget(total_samples, total_components, memory_budget_bytes)
    # One matrix for the whole member, filled in place: nothing is concatenated.
    matrix = torch.empty((total_samples, total_components), dtype=torch.float32)
    cutoff = 0.0 if merge_config.activation_threshold is None else merge_config.activation_threshold
    active = torch.zeros(total_components, dtype=torch.int64)
    sums = torch.zeros(total_components, dtype=torch.float64)
    maxima = torch.full((total_components,), -math.inf, dtype=torch.float32)
    layout: dict[str, int] | None = None
    filled = 0
    for chunk in chunks:
        kept = {name: values for name, values in chunk.items() if name in widths}
        chunk_layout = {name: values.shape[-1] for name, values in kept.items()}
        if layout is None:
            if chunk_layout != widths:  # same modules and widths; the chunks' order is the labels' order
                raise SourceError(f"the model's activations have modules {chunk_layout}; expected {widths}")
            layout = chunk_layout
        elif list(chunk_layout.items()) != list(layout.items()):
            raise SourceError(f"a chunk has modules {chunk_layout}; expected {layout} like the first chunk")
        column = 0
        rows_in_chunk = None
        for name, values in kept.items():
            rows = _rows(name, values, seq_mode)
            if rows_in_chunk is None:
                rows_in_chunk = rows.shape[0]
                if filled + rows_in_chunk > total_samples:
                    raise SourceError(f"the chunks give more than the {total_samples:,} samples expected")
            elif rows.shape[0] != rows_in_chunk:
                raise SourceError(f"module {name!r}: has {rows.shape[0]} samples in a chunk, expected {rows_in_chunk} "
                                  "like the modules before it")
            columns = slice(column, column + rows.shape[1])
            chunk_active, chunk_sums, chunk_maxima = _column_statistics(rows, cutoff)
            active[columns] += chunk_active
            sums[columns] += chunk_sums
            maxima[columns] = torch.maximum(maxima[columns], chunk_maxima)
            matrix[filled : filled + rows.shape[0], columns] = rows.cpu()
            column = columns.stop
        filled += rows_in_chunk or 0
    if filled != total_samples:
        raise SourceError(f"the chunks gave {filled:,} samples; expected {total_samples:,}")
    labels = [f"{name}:{index}" for name, width in layout.items() for index in range(width)]
    _check_finite(sums, labels)
    statistics = ComponentStatistics(labels, total_samples, active.numpy(), sums.numpy(), maxima.numpy())
    return StreamedActivations(_drop_dead(matrix, labels, maxima, merge_config.filter_dead_threshold),
                               statistics, list(layout))


def _drop_dead(matrix: torch.Tensor, labels: list[str], maxima: torch.Tensor, threshold: float) -> ProcessedActivations:
    """`spd_math.drop_dead` from the maxima already known (the same float32 comparison)."""
    if threshold <= 0:
        return ProcessedActivations(matrix, labels)
    alive = maxima >= threshold
    if bool(alive.all()):
        return ProcessedActivations(matrix, labels)
    keep = alive.tolist()
    return ProcessedActivations(
        activations=matrix[:, alive],
        labels=[label for label, live in zip(labels, keep) if live],
        dead_labels=[label for label, live in zip(labels, keep) if not live],
    )


class PackedMask:
    """`activations > threshold` of a stream of `[rows, C]` chunks, packed 64 samples to an int64 word.

    The result is `[ceil(samples / 64), C]` int64 in the layout of `spd_math.bitsets.pack_words`
    (sample s is bit s % 64 of word s // 64; the last word zero-padded): 1/32 of the float32
    matrix. Chunks need not be multiples of 64 rows: up to 63 rows wait for the next chunk. The
    output is allocated once, when the number of samples is known up front.
    """

    def __init__(self, threshold: float, n_samples: int, n_components: int) -> None:
        self.threshold = threshold
        self.n_samples = n_samples
        self.words = np.zeros((-(-n_samples // BITS_PER_WORD), n_components), dtype=np.int64)
        self._written_words = 0
        self._waiting: np.ndarray | None = None  # fewer than 64 rows not yet packed
        self._seen = 0

    def add(self, rows: torch.Tensor) -> None:
        """Threshold one `[rows, C]` chunk where it is (e.g. on the GPU) and pack it."""
        mask = (rows > self.threshold).cpu().numpy()
        self._seen += len(mask)
        if self._seen > self.n_samples:
            raise SourceError(f"PackedMask: more than the {self.n_samples:,} samples announced")
        if self._waiting is not None:
            mask = np.concatenate([self._waiting, mask])
        whole = len(mask) // BITS_PER_WORD * BITS_PER_WORD
        if whole:
            self._store(pack_rows(mask[:whole]))
        self._waiting = mask[whole:] if whole < len(mask) else None

    def _store(self, words: np.ndarray) -> None:
        self.words[self._written_words : self._written_words + len(words)] = words
        self._written_words += len(words)

    def finish(self) -> np.ndarray:
        """The packed words, once every announced sample was added."""
        if self._seen != self.n_samples:
            raise SourceError(f"PackedMask: {self._seen:,} samples added, {self.n_samples:,} announced")
        if self._waiting is not None:
            padding = np.zeros((BITS_PER_WORD - len(self._waiting), self._waiting.shape[1]), dtype=bool)
            self._store(pack_rows(np.concatenate([self._waiting, padding])))
            self._waiting = None
        return self.words


def pack_rows(mask: np.ndarray) -> np.ndarray:
    """`[m, C]` bool (m a multiple of 64) -> `[m // 64, C]` int64, as `spd_math.bitsets.pack_words`."""
    m, c = mask.shape
    packed = np.packbits(mask, axis=0, bitorder="little")  # [m // 8, C]: 8 samples a byte
    words = packed.reshape(m // BITS_PER_WORD, 8, c).transpose(0, 2, 1)  # a word's 8 bytes together
    return np.ascontiguousarray(words).view(np.int64).reshape(-1, c)
