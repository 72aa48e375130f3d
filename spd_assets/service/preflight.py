"""What is checked before any member runs: the source, and whether one member's activations fit its memory budget.

`spd-cluster run` checks everything (a failure stops it before any member starts);
`spd-cluster validate` skips what needs something this environment lacks (a package, the
network), saying so.
"""

from __future__ import annotations

from dataclasses import dataclass

from spd_assets.config import ExperimentConfig
from spd_assets.sources import ActivationSource, RunTimeNeed, source_for
from spd_assets.sources.streaming import BYTES_PER_VALUE, check_memory_budget, kept_widths, n_samples


@dataclass(frozen=True)
class Preflight:
    """The outcome of the checks: the source, its members, what it needs, and one member's activation size."""

    source: ActivationSource
    members: list[str]
    needs: list[RunTimeNeed]
    checked: bool  # False when a need is missing or cannot be told here, so the source was not loaded
    activation_shape: tuple[int, int] | None  # (samples, components) of one member, where known before running
    activation_bytes: int | None  # of the dense matrix (None: compact, only the entries above the threshold kept)
    memory_budgeted: bool = False  # the activations are streamed within the source's memory budget


def preflight(config: ExperimentConfig, *, check_all: bool) -> Preflight:
    """Check the experiment's source; raise a `SourceError` (or `ExperimentConfigError`) on what would fail.

    With `check_all` the source is checked whatever it needs (a run tries); without it, a source
    needing something missing here (or network access) is not loaded, and `checked` is False.
    """
    source = source_for(config.source)
    needs = source.run_time_needs()
    ready = all(need.available for need in needs)
    shape = size = None
    if check_all or ready:
        source.check()
        widths, dims = source.module_widths(), source.activation_dims()
        if widths is not None and dims is not None:
            merge = config.merge_config
            samples = n_samples(dims, config.seq_mode)
            components = sum(kept_widths(widths, merge.module_name_filter).values())
            shape = (samples, components)
            if not source.has_token_batches:  # loaded whole, dense
                size = samples * components * BYTES_PER_VALUE
            elif merge.activation_threshold is None:  # streamed: with a threshold only the entries above it are kept
                size = check_memory_budget(samples, components, source.memory_budget_bytes, what="each member")
    return Preflight(source, source.member_keys(), needs, check_all or ready, shape, size, source.has_token_batches)
