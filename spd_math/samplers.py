"""Choosing the pair to merge from a cost matrix (MATH.md §5).

The samplers take costs up to a positive scale and an additive constant (the engine
hands them `n · cost - const` to skip a pass over the matrix); `range` is invariant to
both, and `mcmc` receives its temperature in the same scale. Randomness comes only from
the CPU generator passed in, so a seed gives the same choices on any device.
"""

from __future__ import annotations

import torch


def prepare_offdiagonal(costs: torch.Tensor) -> tuple[float, float, torch.Tensor]:
    """Min and max over off-diagonal entries, and per-row minima; sets the diagonal to +inf in place."""
    k = costs.shape[0]
    diagonal = costs.diagonal()
    # Copying an off-diagonal value onto the diagonal lets one pass find the off-diagonal max.
    diagonal.copy_(costs[0, 1].expand(k))
    hi = costs.max()
    diagonal.fill_(float("inf"))
    row_min = costs.amin(dim=1)
    lo = row_min.min()
    return float(lo), float(hi), row_min


def sample_range(costs: torch.Tensor, threshold: float, generator: torch.Generator) -> tuple[int, int]:
    """Uniform choice among off-diagonal pairs with `cost <= lo + threshold · (hi - lo)`."""
    lo, hi, row_min = prepare_offdiagonal(costs)
    cutoff = lo + threshold * (hi - lo)
    rows = torch.nonzero(row_min <= cutoff).squeeze(1)
    candidates = torch.nonzero(costs.index_select(0, rows) <= cutoff)
    pick = int(torch.randint(candidates.shape[0], (1,), generator=generator))
    row, col = candidates[pick].tolist()
    return int(rows[row]), col


def sample_mcmc(costs: torch.Tensor, temperature: float, generator: torch.Generator) -> tuple[int, int]:
    """Choice with probability proportional to `exp((lo - cost) / temperature)` over off-diagonal pairs."""
    lo, _, _ = prepare_offdiagonal(costs)
    weights = torch.exp((lo - costs.to(torch.float64)) / temperature).flatten()  # diagonal: exp(-inf) = 0
    cumulative = torch.cumsum(weights, dim=0)
    target = float(torch.rand((), generator=generator, dtype=torch.float64)) * float(cumulative[-1])
    flat = int(torch.searchsorted(cumulative, torch.tensor([target], dtype=cumulative.dtype, device=cumulative.device), right=True))
    if flat >= weights.shape[0] or weights[flat] == 0:  # target rounded onto the very end
        flat = int(torch.nonzero(weights).max())
    k = costs.shape[0]
    return flat // k, flat % k
