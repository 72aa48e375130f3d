"""From forward-pass chunks to one member's processed activations and per-component statistics.

A model source yields its activations chunk by chunk (module name -> `[rows, seq, C]` or
`[rows, C]`). `activations_from_chunks` treats each chunk as `spd_math.process_activations`
would treat the whole batch (seq mode, module filter, float32, finite values), accumulates the
statistics of the `component_stats` table, and drops dead components at the end exactly as
`spd_math.drop_dead` drops them. The result equals `drop_dead(process_activations(whole batch))`,
which is what `batch_activations` computes for a batch held whole.

Memory: with an activation threshold (the usual case) each chunk goes straight into
spd_math's compact form (`CompactActivationsBuilder`: only entries above the threshold, as a
sparse CSR), so the dense `[samples, components]` matrix never exists; a member whose kept
entries outgrow the source's memory budget is stopped as soon as they do. Continuous mode (no
threshold) needs every value: the dense float32 matrix is allocated once, after checking that it
fits the budget (so a member too large is refused before its forward pass, with the size it
would take), and filled in place.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from spd_assets.errors import SourceError
from spd_math import CompactActivationsBuilder, MergeConfig, ProcessedActivations, drop_dead, process_activations
from spd_math.activations import ColumnStats
from spd_math.errors import ActivationsError

BYTES_PER_VALUE = 4  # float32
BYTES_PER_ENTRY = 8  # compact form: an int32 column index and a float32 value per kept entry
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
class StreamedActivations:
    """What `activations_from_chunks` gives: the merge's input, and statistics of every component
    (`labels`, dead ones included) over the member's samples."""

    processed: ProcessedActivations
    labels: list[str]
    statistics: ColumnStats
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
        With a threshold: the most the kept entries may take (8 bytes each); in continuous mode:
        the most the dense `[samples, components]` float32 matrix may take.

    Returns
    -------
    StreamedActivations
        Equal to `drop_dead(process_activations(batch, seq_mode=..., module_filter=...), filter_dead_threshold)`
        on the whole batch, with the statistics of every component (dead ones included); with an
        activation threshold in compact form (only the entries above it, as a sparse CSR tensor).

    Raises
    ------
    SourceError
        Over the budget (continuous mode: before any chunk is read; with a threshold: as soon as the
        kept entries outgrow it), no module is kept, a chunk
        has other modules or widths than the first, values are not finite, or the rows do not add up.
    """
    widths = kept_widths(module_widths, merge_config.module_name_filter)
    total_samples = n_samples(activation_dims, seq_mode)
    total_components = sum(widths.values())
    threshold = merge_config.activation_threshold
    if threshold is None:  # continuous mode needs the dense values
        check_memory_budget(total_samples, total_components, memory_budget_bytes)
    layout: dict[str, int] | None = None
    sink: _DenseSink | _CompactSink | None = None
    filled = 0
    for chunk in chunks:
        kept = {name: values for name, values in chunk.items() if name in widths}
        chunk_layout = {name: values.shape[-1] for name, values in kept.items()}
        if layout is None:
            if chunk_layout != widths:  # same modules and widths; the chunks' order is the labels' order
                raise SourceError(f"the model's activations have modules {chunk_layout}; expected {widths}")
            layout = chunk_layout
            labels = [f"{name}:{index}" for name, width in layout.items() for index in range(width)]
            sink = (_DenseSink(labels, total_samples) if threshold is None
                    else _CompactSink(labels, threshold, merge_config.filter_dead_threshold, memory_budget_bytes,
                                      total_samples))
        elif list(chunk_layout.items()) != list(layout.items()):
            raise SourceError(f"a chunk has modules {chunk_layout}; expected {layout} like the first chunk")
        parts = [_rows(name, values, seq_mode) for name, values in kept.items()]
        for (name, _), rows in zip(kept.items(), parts):
            if rows.shape[0] != parts[0].shape[0]:
                raise SourceError(f"module {name!r}: has {rows.shape[0]} samples in a chunk, expected "
                                  f"{parts[0].shape[0]} like the modules before it")
        if parts and filled + parts[0].shape[0] > total_samples:
            raise SourceError(f"the chunks give more than the {total_samples:,} samples expected")
        if parts:
            sink.add(parts, filled)
            filled += parts[0].shape[0]
    if filled != total_samples:
        raise SourceError(f"the chunks gave {filled:,} samples; expected {total_samples:,}")
    processed, statistics = sink.finish(merge_config.filter_dead_threshold)
    return StreamedActivations(processed, sink.labels, statistics, list(layout))


class _DenseSink:
    """Continuous mode: the `[samples, components]` float32 matrix, allocated once and filled in place."""

    def __init__(self, labels: list[str], samples: int) -> None:
        self.labels = labels
        self.matrix = torch.empty((samples, len(labels)), dtype=torch.float32)
        self.active = torch.zeros(len(labels), dtype=torch.int64)
        self.sums = torch.zeros(len(labels), dtype=torch.float64)
        self.maxima = torch.full((len(labels),), -math.inf, dtype=torch.float32)

    def add(self, parts: list[torch.Tensor], first_row: int) -> None:
        column = 0
        for rows in parts:
            columns = slice(column, column + rows.shape[1])
            chunk_active, chunk_sums, chunk_maxima = _column_statistics(rows, 0.0)
            self.active[columns] += chunk_active
            self.sums[columns] += chunk_sums
            self.maxima[columns] = torch.maximum(self.maxima[columns], chunk_maxima)
            self.matrix[first_row : first_row + rows.shape[0], columns] = rows.cpu()
            column = columns.stop

    def finish(self, dead_threshold: float) -> tuple[ProcessedActivations, ColumnStats]:
        _check_finite(self.sums, self.labels)
        statistics = ColumnStats(self.matrix.shape[0], self.active.numpy(), self.sums.numpy(),
                                 self.maxima.double().numpy(), 0.0)
        return _drop_dead(self.matrix, self.labels, self.maxima, dead_threshold), statistics


class _CompactSink:
    """Threshold mode: only the entries above the activation threshold are kept (spd_math's compact form),
    so the dense matrix never exists; refused as soon as the kept entries outgrow the memory budget."""

    def __init__(self, labels: list[str], threshold: float, dead_threshold: float, budget_bytes: int,
                 samples: int) -> None:
        self.labels = labels
        self.builder = CompactActivationsBuilder(labels, activation_threshold=threshold,
                                                 filter_dead_threshold=dead_threshold)
        self.budget_bytes = budget_bytes
        self.samples = samples

    def add(self, parts: list[torch.Tensor], first_row: int) -> None:
        rows = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        try:
            self.builder.add(rows)
        except ActivationsError:  # NaN or inf: name the module and the components, as the dense path does
            _check_finite(rows.double().sum(dim=0).cpu(), self.labels)
            raise
        stored = self.builder.stored_bytes
        if stored > self.budget_bytes:
            seen = self.builder.n_samples
            raise SourceError(
                f"one member: the entries above activation_threshold {self.builder.threshold:g} already take "
                f"{stored / 2**30:.2f} GiB after {seen:,} of {self.samples:,} samples "
                f"({stored / BYTES_PER_ENTRY / (seen * len(self.labels)):.1%} of entries), over "
                f"source.memory_budget_gb = {self.budget_bytes / 2**30:g}; expected a higher activation_threshold, "
                "a smaller source.batch_size, fewer modules, or a larger budget"
            )

    def finish(self, dead_threshold: float) -> tuple[ProcessedActivations, ColumnStats]:
        statistics = self.builder.stats
        return self.builder.build(), statistics


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


def batch_activations(batch: Mapping[str, torch.Tensor | np.ndarray], merge_config: MergeConfig,
                      seq_mode: str | None) -> tuple[ProcessedActivations, ProcessedActivations]:
    """A whole batch processed as the merge takes it: (every component, the components kept).

    Every component first (seq mode, module filter; the statistics are of them all), then the dead ones
    dropped by `merge_config.filter_dead_threshold`: what `activations_from_chunks` gives a chunk at a time.
    """
    every_component = process_activations(batch, filter_dead_threshold=0.0, seq_mode=seq_mode,
                                          module_filter=merge_config.module_name_filter)
    return every_component, drop_dead(every_component, merge_config.filter_dead_threshold)
