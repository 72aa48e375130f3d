"""The MDL merge cost of every pair of groups (MATH.md §4), in its simplified exact form.

Expanding MATH.md §4 with `OR_ij = s_i + s_j - q_ij`, the `s_i`, `s_j` terms of the
log part cancel because `log2(k-1) - log2((k-1)/k) - log2(k) = 0`, leaving

    cost[i,j] = S·log2((k-1)/k) - q_ij·log2(k-1) + α·(s_i·r_j + s_j·r_i - q_ij·(r_i + r_j))

The first term is the same for every pair, the second changes with k only, and the
α-term of a pair changes only when one of its two groups is merged. The merge engine
keeps the α-term as a matrix and updates one row and column per merge.
"""

from __future__ import annotations

import math

import torch


def log_factors(k: int) -> tuple[float, float]:
    """`(log2((k-1)/k), log2(k-1))` for k groups before a merge."""
    if k < 2:
        raise ValueError(f"merge costs need at least 2 groups, got k={k}")
    return math.log2((k - 1) / k), math.log2(k - 1)


def alpha_term(s_i, r_i, s_j, r_j, q_ij):
    """`s_i·r_j + s_j·r_i - q_ij·(r_i + r_j)`: the α part of the cost, elementwise with broadcasting."""
    return s_i * r_j + s_j * r_i - q_ij * (r_i + r_j)


def compute_merge_costs(coact_normalized: torch.Tensor, group_sizes: torch.Tensor, alpha: float) -> torch.Tensor:
    """`[k, k]` merge costs from the normalised group coactivation `Q / n` and the group sizes.

    Computed in float64 and returned in the dtype of `coact_normalized`.
    """
    q = torch.as_tensor(coact_normalized)
    if q.ndim != 2 or q.shape[0] != q.shape[1]:
        raise ValueError(f"coact_normalized: expected a square [k, k] matrix, got shape {tuple(q.shape)}")
    r = torch.as_tensor(group_sizes, device=q.device)
    if tuple(r.shape) != (q.shape[0],):
        raise ValueError(f"group_sizes: expected shape ({q.shape[0]},) to match coact_normalized, got {tuple(r.shape)}")
    out_dtype = q.dtype if q.is_floating_point() else torch.float64
    q = q.to(torch.float64)
    r = r.to(torch.float64)
    s = q.diagonal()
    log_ratio, log_k_minus_1 = log_factors(q.shape[0])
    costs = alpha_term(s[:, None], r[:, None], s[None, :], r[None, :], q) * alpha
    costs -= log_k_minus_1 * q
    costs += float(s.sum()) * log_ratio
    return costs.to(out_dtype)
