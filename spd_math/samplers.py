"""Choosing the pair to merge from a cost matrix (docs/math.md §5).

The samplers take costs up to a positive scale and an additive constant (the engine
hands them `n · cost - const` to skip a pass over the matrix); `range` is invariant to
both, and `mcmc` receives its temperature in the same scale. Randomness comes only from
the CPU generator passed in, so a seed gives the same choices on any device.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from spd_math import backend
from spd_math.errors import ConfigError
from spd_math.registry import Registry
from spd_math.validation import finite_number


def prepare_offdiagonal(costs: torch.Tensor) -> tuple[float, float]:
    """Min and max over off-diagonal entries; sets the diagonal to +inf in place."""
    diagonal = costs.diagonal()
    # An off-diagonal value copied onto the diagonal changes neither extreme: one pass finds both.
    diagonal.copy_(costs[0, 1].expand(costs.shape[0]))
    lo, hi = torch.aminmax(costs)
    diagonal.fill_(float("inf"))
    return float(lo), float(hi)


def _flat_indices_at_most(costs: torch.Tensor, cutoff: float) -> torch.Tensor:
    """Row-major flat indices of the entries `<= cutoff`, in ascending order."""
    if backend.numpy_fast_path(costs):
        return torch.from_numpy(np.flatnonzero(costs.numpy() <= cutoff))  # far faster than torch.nonzero here
    return torch.nonzero(costs.flatten() <= cutoff).squeeze(1)


def sample_range(costs: torch.Tensor, threshold: float, generator: torch.Generator) -> tuple[int, int]:
    """Uniform choice among off-diagonal pairs with `cost <= lo + threshold · (hi - lo)`."""
    lo, hi = prepare_offdiagonal(costs)
    candidates = _flat_indices_at_most(costs, lo + threshold * (hi - lo))
    pick = int(torch.randint(candidates.shape[0], (1,), generator=generator))
    flat = int(candidates[pick])
    return divmod(flat, costs.shape[0])


def sample_mcmc(costs: torch.Tensor, temperature: float, generator: torch.Generator) -> tuple[int, int]:
    """Choice with probability proportional to `exp((lo - cost) / temperature)` over off-diagonal pairs."""
    lo, _ = prepare_offdiagonal(costs)
    weights = torch.exp((lo - costs.to(torch.float64)) / temperature).flatten()  # diagonal: exp(-inf) = 0
    cumulative = torch.cumsum(weights, dim=0)
    target = float(torch.rand((), generator=generator, dtype=torch.float64)) * float(cumulative[-1])
    flat = int(torch.searchsorted(cumulative, torch.tensor([target], dtype=cumulative.dtype, device=cumulative.device), right=True))
    if flat >= weights.shape[0] or weights[flat] == 0:  # target rounded onto the very end
        flat = int(torch.nonzero(weights).max())
    k = costs.shape[0]
    return flat // k, flat % k


def _range_kwargs(kwargs: Mapping[str, float]) -> dict[str, float]:
    name = "merge_pair_sampling_kwargs.threshold"
    return {"threshold": finite_number(name, kwargs["threshold"], ConfigError, minimum=0.0, maximum=1.0)}


def _mcmc_kwargs(kwargs: Mapping[str, float]) -> dict[str, float]:
    name = "merge_pair_sampling_kwargs.temperature"
    return {"temperature": finite_number(name, kwargs["temperature"], ConfigError, strictly_positive=True)}


def _choose_range(costs: torch.Tensor, kwargs: Mapping[str, float], generator: torch.Generator, n_samples: int):
    return sample_range(costs, kwargs["threshold"], generator)


def _choose_mcmc(costs: torch.Tensor, kwargs: Mapping[str, float], generator: torch.Generator, n_samples: int):
    # The engine's costs are scaled by n (see the module docstring): so is the temperature.
    return sample_mcmc(costs, kwargs["temperature"] * n_samples, generator)


@dataclass(frozen=True)
class SamplerSpec:
    """One pair sampler: its keyword arguments with their defaults, their check, and the choice itself.

    `choose(costs, kwargs, generator, n_samples) -> (slot_i, slot_j)` takes the engine's scaled
    costs (`n · cost − const`), the validated kwargs, the seeded CPU generator and n.
    """

    kwarg_defaults: Mapping[str, float]
    check_kwargs: Callable[[Mapping[str, float]], dict[str, float]]
    choose: Callable[[torch.Tensor, Mapping[str, float], torch.Generator, int], tuple[int, int]]


# merge_pair_sampling_method -> sampler (docs/math.md §5). A new sampler is one function and one line here.
SAMPLERS: Registry[SamplerSpec] = Registry(
    "merge_pair_sampling_method",
    {
        "range": SamplerSpec({"threshold": 0.05}, _range_kwargs, _choose_range),
        "mcmc": SamplerSpec({"temperature": 1.0}, _mcmc_kwargs, _choose_mcmc),
    },
)
