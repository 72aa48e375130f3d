"""The greedy MDL merge (docs/math.md §2-§7), doing work proportional to what each merge changes.

State per group lives in *slots* (see `_engine.state.GroupState`): a merge rewrites the surviving
group's row and column of the coactivation counts, and the vanished group's slot is reused
by moving the last slot into it, so nothing of size k² is ever copied. The history records
the merges (pairs of group ids in the numbering of docs/math.md §6, groups ordered by their
smallest member), from which every partition is replayed (`spd_math.replay`); no partition is
kept while merging.

Boolean mode keeps each group's activation mask packed 64 samples a word. The new group's
coactivation with a group l is `Q[a,l] + Q[b,l] - |a ∧ b ∧ l|`, which only looks at the
words where both merged groups are active. Continuous mode needs no samples at all after
the start: the new column is a sum, so its dot products are sums too.

The samplers read costs through the state's cost view, which evaluates only the rows that
can matter (bounds on row extremes, a pool of near-window candidates); the choices, and so
the histories, are bit-identical to evaluating the full cost matrix every iteration.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from spd_math._engine.cost_view import MergeState
from spd_math._engine.state import group_state
from spd_math._engine.state import merge_state_bytes as merge_state_bytes  # public here: callers size a merge's memory
from spd_math.activations import ProcessedActivations
from spd_math.checkpoint import CheckpointSink, MergeCheckpoint
from spd_math.config import ConfigError, MergeConfig
from spd_math.errors import ActivationsError, MergeError
from spd_math.history import MergeHistory
from spd_math.samplers import SAMPLERS

PairSampler = Callable[[torch.Tensor], tuple[int, int]]


@dataclass(frozen=True)
class MergeProgress:
    """Where a running merge is: `done` of `total` merges (`iters`, or until 3 groups are left), `k` groups and the
    MDL loss after the last one, and `seconds` since the merge state was set up."""

    done: int
    total: int
    k: int
    mdl_loss: float
    seconds: float

# Below this many groups the loop stops after a merge (docs/math.md §7, as is).
MIN_GROUPS = 3


def planned_merges(n_components: int, iters: int | None) -> int:
    """Merges a run makes: `iters` (all when None), or until at most MIN_GROUPS groups are left (one at least)."""
    max_iters = n_components - 1 if iters is None else min(iters, n_components - 1)
    return min(max_iters, max(n_components - MIN_GROUPS, 1))


def _validated_pair(pair: object, k: int) -> tuple[int, int]:
    try:
        i, j = (int(v) for v in pair)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise MergeError(f"pair_sampler: expected a pair (i, j) of group indices, got {pair!r}") from None
    if not (0 <= i < k and 0 <= j < k) or i == j:
        raise MergeError(f"pair_sampler: expected two different group indices in 0..{k - 1}, got ({i}, {j})")
    return i, j


def merge_iteration(
    activations: ProcessedActivations,
    config: MergeConfig,
    *,
    pair_sampler: PairSampler | None = None,
    seed: int | None = None,
    device: torch.device | str | None = None,
    progress: Callable[[MergeProgress], None] | None = None,
    resume_from: MergeCheckpoint | None = None,
    checkpoints: CheckpointSink | None = None,
) -> MergeHistory:
    """Run the greedy MDL merge on one batch of processed activations (docs/math.md §2-§7).

    Parameters
    ----------
    activations : ProcessedActivations
    config : MergeConfig
    pair_sampler : callable, optional
        `pair_sampler(costs) -> (i, j)` chooses every pair from the full `[k, k]` cost matrix of
        docs/math.md §4 (groups in the numbering of §6); replaces the configured sampler.
    seed : int, optional
        Seed of the configured sampler's CPU generator; a fresh random seed when None (it is
        recorded in the history). The same seed gives the same history on any device.
    device : torch.device or str, optional
        Where the merge state lives; defaults to the device of the activations.
    progress : callable, optional
        Called after every merge with a `MergeProgress` (merges done and planned, k, MDL loss, seconds
        since the merge state was ready); cheap calls only: it runs once per merge. Not called for the merges
        a resumed run replays.
    resume_from : MergeCheckpoint, optional
        Go on from a checkpoint of this run (same activations, config and seed): its merges are replayed
        without sampling, then sampling goes on from its generator state. The history is bit-identical to
        that of a run never stopped (spd_math.checkpoint).
    checkpoints : CheckpointSink, optional
        Asked `due()` after every merge; given a `MergeCheckpoint` of the run so far when it says so.

    Returns
    -------
    MergeHistory
        On the CPU.

    Raises
    ------
    ActivationsError
        No samples, fewer than 2 components, or NaN/inf in the activations.
    MergeError
        A pair sampler that answers something other than two different group indices, or a checkpoint of
        another run (other components or seed) or with pairs no run could have chosen.
    TypeError
        Arguments of the wrong type.

    Examples
    --------
    >>> import torch
    >>> from spd_math import MergeConfig, ProcessedActivations, merge_iteration
    >>> values = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
    >>> history = merge_iteration(ProcessedActivations(values, ["m:0", "m:1", "m:2", "m:3"]), MergeConfig(iters=1), seed=0)
    >>> history.group_idxs.tolist(), history.selected_pairs.tolist()
    ([[0, 0, 1, 2]], [[0, 1]])
    """
    if not isinstance(activations, ProcessedActivations):
        raise TypeError(f"activations: expected ProcessedActivations, got {type(activations).__name__}")
    if not isinstance(config, MergeConfig):
        raise TypeError(f"config: expected MergeConfig, got {type(config).__name__}")
    n, c = activations.activations.shape
    if n == 0:
        raise ActivationsError("activations: expected at least one sample, got 0")
    if c < 2:
        raise ActivationsError(f"activations: expected at least 2 components to merge, got {c}")
    dropped = activations.dropped_at_or_below
    if dropped is not None and (config.activation_threshold is None or config.activation_threshold < dropped):
        raise ActivationsError(
            f"activations: entries <= {dropped} were left out of these compact activations, so a merge needs "
            f"activation_threshold >= {dropped} (continuous mode needs dense values), got {config.activation_threshold}"
        )
    device = torch.device(device) if device is not None else activations.activations.device
    max_iters = c - 1 if config.iters is None else min(config.iters, c - 1)
    if resume_from is not None:
        if not isinstance(resume_from, MergeCheckpoint):
            raise TypeError(f"resume_from: expected a MergeCheckpoint, got {type(resume_from).__name__}")
        seed = resume_from.seed if seed is None else seed
        resume_from.check_resumes(c, seed, max_iters)
    if seed is None:
        seed = secrets.randbits(63)
    generator = torch.Generator().manual_seed(seed) if resume_from is None else resume_from.generator()
    state: MergeState = group_state(activations.activations, activations.labels, config.activation_threshold, config.alpha, device)

    # The history is its merges (O(c + iters)); partitions are replayed from them when asked for.
    selected_pairs = np.empty((max_iters, 2), dtype=np.int64)
    pair_costs = np.empty(max_iters, dtype=np.float64)
    mdl_losses = np.empty(max_iters, dtype=np.float64)
    slot_of_group = np.arange(c)  # slot holding each group (groups ordered by smallest member, docs/math.md §6)
    sampler = SAMPLERS.lookup(config.merge_pair_sampling_method, ConfigError)
    sampler_kwargs = config.merge_pair_sampling_kwargs

    def merge_pair(pair: tuple[int, int], with_costs: bool = True) -> None:
        nonlocal slot_of_group
        k = state.k
        low, high = min(pair), max(pair)
        keep, drop = int(slot_of_group[low]), int(slot_of_group[high])
        moved_group = int(np.flatnonzero(slot_of_group == k - 1)[0])
        state.merge(keep, drop, with_costs=with_costs)
        slot_of_group[moved_group] = drop
        slot_of_group = np.delete(slot_of_group, high)

    n_done = 0
    # The loop ends after max_iters merges, or once at most MIN_GROUPS groups are left.
    planned = planned_merges(c, config.iters)
    if resume_from is not None:  # the checkpoint's merges again, without choosing them (spd_math.checkpoint)
        n_done = resume_from.n_done
        selected_pairs[:n_done] = resume_from.selected_pairs
        pair_costs[:n_done] = resume_from.pair_costs
        mdl_losses[:n_done] = resume_from.mdl_losses
        # Costs for the sampler's bounds: each merged row's as it goes (~n_done·c costs), or every row's once at the
        # end ((c - n_done)² costs), whichever is fewer.
        with_costs = (c - n_done) ** 2 >= n_done * (c - n_done / 2)
        for pair in resume_from.selected_pairs.tolist():
            merge_pair(pair, with_costs)
        state.costs_again()
    # A run stops once at most MIN_GROUPS are left (after one merge at least): a resumed one may have nothing left.
    finished = n_done > 0 and state.k <= MIN_GROUPS
    started = time.perf_counter()
    for iteration in range(n_done, n_done if finished else max_iters):
        k = state.k
        offset = state.cost_offset()
        if pair_sampler is not None:
            full = (state.full_costs(slot_of_group) + offset) / n
            i, j = _validated_pair(pair_sampler(full), k)
            pair = (i, j)
            pair_costs[iteration] = float(full[i, j])
        else:
            slot_i, slot_j, scaled_cost = sampler.choose(state, sampler_kwargs, generator, n)
            group_of_slot = np.empty(k, dtype=np.int64)
            group_of_slot[slot_of_group] = np.arange(k)
            pair = (int(group_of_slot[slot_i]), int(group_of_slot[slot_j]))
            pair_costs[iteration] = (scaled_cost + offset) / n

        merge_pair(pair)
        selected_pairs[iteration] = pair
        mdl_losses[iteration] = state.mdl_loss()
        n_done = iteration + 1
        if progress is not None:
            progress(MergeProgress(n_done, planned, state.k, float(mdl_losses[iteration]),
                                   time.perf_counter() - started))
        if state.k <= MIN_GROUPS:
            break
        if checkpoints is not None and n_done < planned and checkpoints.due():
            checkpoints.save(MergeCheckpoint(
                seed=seed, n_components=c, selected_pairs=selected_pairs[:n_done].copy(),
                pair_costs=pair_costs[:n_done].copy(), mdl_losses=mdl_losses[:n_done].copy(),
                generator_state=generator.get_state().numpy().copy()))

    k_groups = np.arange(c - 1, c - 1 - n_done, -1, dtype=np.int64)
    return MergeHistory(
        labels=list(activations.labels),
        selected_pairs=torch.from_numpy(selected_pairs[:n_done].copy()),
        k_groups=torch.from_numpy(k_groups),
        pair_costs=torch.from_numpy(pair_costs[:n_done].copy()),
        mdl_losses=torch.from_numpy(mdl_losses[:n_done].copy()),
        config=config,
        seed=seed,
    )
