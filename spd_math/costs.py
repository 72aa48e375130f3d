"""The MDL merge cost of every pair of groups (docs/math.md §4), in its simplified exact form.

Expanding docs/math.md §4 with `OR_ij = s_i + s_j - q_ij`, the `s_i`, `s_j` terms of the
log part cancel because `log2(k-1) - log2((k-1)/k) - log2(k) = 0`, leaving

    cost[i,j] = S·log2((k-1)/k) - q_ij·log2(k-1) + α·(s_i·r_j + s_j·r_i - q_ij·(r_i + r_j))

The first term is the same for every pair, the second changes with k only, and the
α-term of a pair changes only when one of its two groups is merged. The merge engine
(`spd_math._engine.state`) relies on that: its dense state, for small problems, keeps the α-term
as a matrix and rewrites only the merged group's row and column per merge; its scalable
state stores no α-term matrix, evaluates the α-terms of the rows it reads, and keeps
those of the pairs in its candidate pool.
"""

from __future__ import annotations

import math

import torch

from spd_math.errors import MergeError
from spd_math.validation import as_tensor, finite_number


def log_factors(k: int) -> tuple[float, float]:
    """`(log2((k-1)/k), log2(k-1))` for k groups before a merge."""
    if k < 2:
        raise MergeError(f"merge costs need at least 2 groups, got k={k}")
    return math.log2((k - 1) / k), math.log2(k - 1)


def alpha_term(s_i, r_i, s_j, r_j, q_ij):
    """`s_i·r_j + s_j·r_i - q_ij·(r_i + r_j)`: the α part of the cost, elementwise with broadcasting."""
    return s_i * r_j + s_j * r_i - q_ij * (r_i + r_j)


def compute_merge_costs(coact_normalized: torch.Tensor, group_sizes: torch.Tensor, alpha: float) -> torch.Tensor:
    """`[k, k]` merge costs of docs/math.md §4 from the normalised group coactivation and the group sizes.

    Computed in float64 (in the simplified exact form of the module docstring) and returned in
    the dtype of `coact_normalized`. The diagonal is computed by the same expression.

    Parameters
    ----------
    coact_normalized : torch.Tensor or numpy.ndarray
        `[k, k]` group coactivation divided by the number of samples, `Q / n`.
    group_sizes : torch.Tensor or numpy.ndarray
        `[k]` components per group.
    alpha : float
        The size weight (>= 0).

    Returns
    -------
    torch.Tensor
        `[k, k]` costs.

    Raises
    ------
    MergeError
        Shapes that do not fit, fewer than 2 groups, or a bad alpha.

    Examples
    --------
    >>> import numpy as np
    >>> from spd_math import compute_merge_costs
    >>> q = np.array([[0.5, 0.4, 0.0], [0.4, 0.5, 0.0], [0.0, 0.0, 0.1]])
    >>> costs = compute_merge_costs(q, np.ones(3), alpha=1.0)
    >>> round(float(costs[0, 1]), 4), round(float(costs[0, 2]), 4)
    (-0.8435, -0.0435)
    """
    q = as_tensor("coact_normalized", coact_normalized, MergeError, allow_sequence=True)
    if q.ndim != 2 or q.shape[0] != q.shape[1]:
        raise MergeError(f"coact_normalized: expected a square [k, k] matrix, got shape {tuple(q.shape)}")
    r = as_tensor("group_sizes", group_sizes, MergeError, allow_sequence=True).to(q.device)
    if tuple(r.shape) != (q.shape[0],):
        raise MergeError(f"group_sizes: expected shape ({q.shape[0]},) to match coact_normalized, got {tuple(r.shape)}")
    alpha = finite_number("alpha", alpha, MergeError, minimum=0.0)
    out_dtype = q.dtype if q.is_floating_point() else torch.float64
    q = q.to(torch.float64)
    r = r.to(torch.float64)
    s = q.diagonal()
    log_ratio, log_k_minus_1 = log_factors(q.shape[0])
    costs = alpha_term(s[:, None], r[:, None], s[None, :], r[None, :], q) * alpha
    costs -= log_k_minus_1 * q
    costs += float(s.sum()) * log_ratio
    return costs.to(out_dtype)
