"""Choosing the pair to merge (docs/math.md §5), from a *cost view* rather than a cost matrix.

A cost view (`_engine.cost_view.CostView`) answers what a sampler asks (the merge engine's `GroupState`
answers without a full pass over the k² costs where it can; `DenseCostView` wraps a plain matrix):

- `k`: groups (slots) 0..k-1;
- `offdiagonal_min()`, `offdiagonal_max()`: exact extremes over the pairs i != j;
- `candidates_at_most(cutoff, slack)`: the pairs with cost `<= cutoff` as an object with
  `count` and `nth(index) -> (i, j, cost)` in row-major order (`slack` says how far above
  the cutoff the view may look ahead for later calls);
- `row_blocks()`: `(first, stop)` row ranges covering 0..k-1 in order, and
  `block_costs(first, stop)`: their costs `[stop - first, k]` with +inf on the diagonal.

Costs are the engine's scaled costs (`n · cost − const`): `range` is invariant to the scale
and the constant, and `mcmc` receives its temperature in the same scale. Randomness comes
only from the CPU generator passed in, one draw per choice exactly as the original
implementation made it, so a seed gives the same choices on any device and any engine.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from spd_math._engine.cost_view import CostView
from spd_math.errors import ConfigError
from spd_math.registry import Registry
from spd_math.validation import finite_number

# Look-ahead of the range sampler's candidate pool, as a share of the cost range, at least.
MIN_POOL_SLACK = 0.01


def range_choice(view: CostView, threshold: float, generator: torch.Generator) -> tuple[int, int, float]:
    """Uniform choice among off-diagonal pairs with `cost <= lo + threshold · (hi - lo)`."""
    lo, hi = view.offdiagonal_min(), view.offdiagonal_max()
    cutoff = lo + threshold * (hi - lo)
    candidates = view.candidates_at_most(cutoff, max(threshold, MIN_POOL_SLACK) * (hi - lo))
    pick = int(torch.randint(candidates.count, (1,), generator=generator))
    return candidates.nth(pick)


def mcmc_choice(view: CostView, temperature: float, generator: torch.Generator) -> tuple[int, int, float]:
    """Choice with probability proportional to `exp((lo - cost) / temperature)` over off-diagonal pairs.

    One pass over all k² costs, a row block at a time: the weights' running sum is carried
    from block to block by prepending it, so every partial sum is the same float as a
    sequential cumulative sum over the whole row-major matrix.
    """
    lo = view.offdiagonal_min()
    k = view.k
    blocks = view.row_blocks()
    carry, block_ends = None, []
    for first, stop in blocks:
        carry = _cumulative(view.block_costs(first, stop), lo, temperature, carry)[-1]
        block_ends.append(carry)
    ends = torch.stack(block_ends).cpu().numpy()
    target = float(torch.rand((), generator=generator, dtype=torch.float64)) * float(ends[-1])
    block = int(np.searchsorted(ends, target, side="right"))
    if block < len(blocks):
        first, stop = blocks[block]
        costs = view.block_costs(first, stop)
        cumulative = _cumulative(costs, lo, temperature, block_ends[block - 1] if block else None)
        target_t = torch.tensor([target], dtype=cumulative.dtype, device=cumulative.device)
        position = int(torch.searchsorted(cumulative[1:], target_t, right=True))
        if position < costs.numel() and bool(torch.exp((lo - costs.flatten()[position]) / temperature) != 0):
            i, j = divmod(position, k)
            return first + i, j, float(costs[i, j])
    # The target rounded onto the very end: the last pair with a nonzero weight.
    for first, stop in reversed(blocks):
        costs = view.block_costs(first, stop)
        nonzero = torch.nonzero(torch.exp((lo - costs) / temperature).flatten())
        if nonzero.numel():
            i, j = divmod(int(nonzero.max()), k)
            return first + i, j, float(costs[i, j])
    raise AssertionError("mcmc: no pair has a nonzero weight")  # lo itself has weight exp(0) = 1


def _cumulative(costs: torch.Tensor, lo: float, temperature: float, carry) -> torch.Tensor:
    weights = torch.exp((lo - costs.to(torch.float64)) / temperature).flatten()  # diagonal: exp(-inf) = 0
    start = torch.zeros(1, dtype=weights.dtype, device=weights.device) if carry is None else carry.reshape(1).to(weights)
    return torch.cumsum(torch.cat([start, weights]), dim=0)


def _range_kwargs(kwargs: Mapping[str, float]) -> dict[str, float]:
    name = "merge_pair_sampling_kwargs.threshold"
    return {"threshold": finite_number(name, kwargs["threshold"], ConfigError, minimum=0.0, maximum=1.0)}


def _mcmc_kwargs(kwargs: Mapping[str, float]) -> dict[str, float]:
    name = "merge_pair_sampling_kwargs.temperature"
    return {"temperature": finite_number(name, kwargs["temperature"], ConfigError, strictly_positive=True)}


def _choose_range(view: CostView, kwargs: Mapping[str, float], generator: torch.Generator, n_samples: int):
    return range_choice(view, kwargs["threshold"], generator)


def _choose_mcmc(view: CostView, kwargs: Mapping[str, float], generator: torch.Generator, n_samples: int):
    # The engine's costs are scaled by n (see the module docstring): so is the temperature.
    return mcmc_choice(view, kwargs["temperature"] * n_samples, generator)


@dataclass(frozen=True)
class SamplerSpec:
    """One pair sampler: its keyword arguments with their defaults, their check, and the choice itself.

    `choose(view, kwargs, generator, n_samples) -> (i, j, cost)` takes a cost view of the
    engine's scaled costs (`n · cost − const`, see the module docstring), the validated
    kwargs, the seeded CPU generator and n, and returns the pair (slots) with its scaled cost.
    """

    kwarg_defaults: Mapping[str, float]
    check_kwargs: Callable[[Mapping[str, float]], dict[str, float]]
    choose: Callable[[object, Mapping[str, float], torch.Generator, int], tuple[int, int, float]]


# merge_pair_sampling_method -> sampler (docs/math.md §5). A new sampler is one function and one line here.
SAMPLERS: Registry[SamplerSpec] = Registry(
    "merge_pair_sampling_method",
    {
        "range": SamplerSpec({"threshold": 0.05}, _range_kwargs, _choose_range),
        "mcmc": SamplerSpec({"temperature": 1.0}, _mcmc_kwargs, _choose_mcmc),
    },
)
