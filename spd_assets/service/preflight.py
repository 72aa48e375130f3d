"""What is checked before any member runs: the source, and whether one member's activations fit its memory budget.

`spd-cluster run` checks everything (a failure stops it before any member starts);
`spd-cluster validate` skips what needs something this environment lacks (a package, the
network), saying so.
"""

from __future__ import annotations

from dataclasses import dataclass

from spd_assets.config import ExperimentConfig
from spd_assets.errors import ExperimentConfigError, MemoryFitError
from spd_assets.sources import ActivationSource, RunTimeNeed, source_for
from spd_assets.sources.streaming import BYTES_PER_VALUE, check_memory_budget, kept_widths, n_samples
from spd_math.merge import MIN_GROUPS, merge_state_bytes, planned_merges


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
            streamed = source.has_token_batches or source.streams_batches
            if not streamed or (source.streams_batches and merge.activation_threshold is None):  # loaded whole, dense
                size = samples * components * BYTES_PER_VALUE
            elif merge.activation_threshold is None:  # streamed: with a threshold only the entries above it are kept
                size = check_memory_budget(samples, components, source.memory_budget_bytes, what="each member")
    check_consensus_range(config, None if shape is None else shape[1])
    return Preflight(source, source.member_keys(), needs, check_all or ready, shape, size, source.has_token_batches)


def check_consensus_range(config: ExperimentConfig, components: int | None) -> None:
    """Raise `ExperimentConfigError` where `consensus.iteration` or `consensus.k` is sure to fall outside every
    member's merges, so the mistake is said before any member runs, not after all of them.

    `components` is one member's count before dead ones are dropped (None where not known before running): the
    members merge at most `planned_merges(components, iters)` times, from at most `components` groups.
    """
    consensus, iters = config.consensus, config.merge_config.iters
    if consensus.iteration is not None:
        most = iters if components is None else planned_merges(components, iters)
        if most is not None and consensus.iteration >= most:
            why = f"merge_config.iters is {iters}" if components is None else (
                f"members of {components:,} components make at most {most:,} merges with merge_config.iters "
                f"{'null' if iters is None else iters}")
            raise ExperimentConfigError(f"consensus.iteration: expected 0..{most - 1}, got {consensus.iteration}: {why}")
    if consensus.k is not None and components is not None and components > MIN_GROUPS:
        if consensus.k >= components:
            raise ExperimentConfigError(f"consensus.k: expected fewer groups than a member's {components:,} components "
                                        f"(the merge starts from them), got {consensus.k:,}")
        if consensus.k < MIN_GROUPS:
            raise ExperimentConfigError(f"consensus.k: expected at least {MIN_GROUPS} (the merge stops at {MIN_GROUPS} "
                                        f"groups), got {consensus.k}")


# A worker process before it holds any data: Python, torch, Dagster, Numba and the code location.
WORKER_BASE_BYTES = 800 * 2**20
# A batch loaded whole is held about this many times over while it is processed (the batch, the processed
# matrix, the live columns).
DENSE_COPIES = 3
# Share of entries assumed above the activation threshold where only those are kept (causal importances of SPD
# models and the synthetic source keep 1-3%); 8 bytes an entry.
ASSUMED_DENSITY = 0.05
COMPACT_BYTES_PER_ENTRY = 8


def member_bytes(config: ExperimentConfig, checked: Preflight) -> int | None:
    """About the most memory one member's worker holds: its activations and its merge state (None: not known before
    running, or no merge here)."""
    if checked.activation_shape is None or checked.source.has_histories:
        return None
    samples, components = checked.activation_shape
    if checked.activation_bytes is not None:
        activations = checked.activation_bytes * (1 if checked.memory_budgeted else DENSE_COPIES)
    else:
        activations = int(samples * components * ASSUMED_DENSITY * COMPACT_BYTES_PER_ENTRY)
    boolean = config.merge_config.activation_threshold is not None
    return WORKER_BASE_BYTES + activations + merge_state_bytes(samples, components, boolean)


def members_at_once_that_fit(config: ExperimentConfig, checked: Preflight, parallel: int, *, asked: bool,
                             available: int | None) -> tuple[int, str | None]:
    """How many members may run at once in `available` bytes, and a note when that is fewer than `parallel`.

    Raises
    ------
    MemoryFitError
        One member would not fit, or `asked` (the user's `--parallel`) members would not.
    """
    needed = member_bytes(config, checked)
    if needed is None or available is None:
        return parallel, None
    samples, components = checked.activation_shape
    what = (f"each member needs about {needed / 2**30:.1f} GiB (its {samples:,} samples x {components:,} "
            f"components and the merge's {components:,} x {components:,} coactivation counts)")
    fit = available // needed
    if fit < 1:
        raise MemoryFitError(
            f"{what}, but {available / 2**30:.1f} GiB is available here; expected a smaller member: fewer samples "
            "(source.batch_size), fewer components (merge_config.module_name_filter, a higher "
            "filter_dead_threshold), or a machine (or SLURM node) with more memory")
    if parallel <= fit:
        return parallel, None
    if asked:
        raise MemoryFitError(f"--parallel {parallel}: {what}, and {available / 2**30:.1f} GiB is available here, "
                             f"enough for {fit} at once; expected --parallel {fit} or fewer")
    return int(fit), (f"  ({what}: {fit} at a time fit the {available / 2**30:.1f} GiB available, not "
                      f"{parallel})")
