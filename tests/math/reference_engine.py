"""The merge engine as it was before the scale work (dense k x k float64 state), kept as a reference.

Tests run it side by side with `spd_math.merge_iteration` on random problems and require
identical histories for the same seed: the same pairs, partitions, costs and MDL losses,
bit for bit. It keeps the dense coactivation, alpha-term and scratch cost matrices and
rescans the whole cost matrix every iteration; only for small problems.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from spd_math.activations import ProcessedActivations
from spd_math.config import MergeConfig

STATE_DTYPE = torch.float64
MIN_GROUPS = 3


def _alpha_term(s_i, r_i, s_j, r_j, q_ij):
    return s_i * r_j + s_j * r_i - q_ij * (r_i + r_j)


def _log_factors(k: int) -> tuple[float, float]:
    return math.log2((k - 1) / k), math.log2(k - 1)


def _prepare_offdiagonal(costs: torch.Tensor) -> tuple[float, float]:
    diagonal = costs.diagonal()
    diagonal.copy_(costs[0, 1].expand(costs.shape[0]))
    lo, hi = torch.aminmax(costs)
    diagonal.fill_(float("inf"))
    return float(lo), float(hi)


def _sample_range(costs: torch.Tensor, threshold: float, generator: torch.Generator) -> tuple[int, int]:
    lo, hi = _prepare_offdiagonal(costs)
    candidates = torch.from_numpy(np.flatnonzero(costs.numpy() <= lo + threshold * (hi - lo)))
    pick = int(torch.randint(candidates.shape[0], (1,), generator=generator))
    return divmod(int(candidates[pick]), costs.shape[0])


def _sample_mcmc(costs: torch.Tensor, temperature: float, generator: torch.Generator) -> tuple[int, int]:
    lo, _ = _prepare_offdiagonal(costs)
    weights = torch.exp((lo - costs.to(torch.float64)) / temperature).flatten()
    cumulative = torch.cumsum(weights, dim=0)
    target = float(torch.rand((), generator=generator, dtype=torch.float64)) * float(cumulative[-1])
    flat = int(torch.searchsorted(cumulative, torch.tensor([target], dtype=cumulative.dtype), right=True))
    if flat >= weights.shape[0] or weights[flat] == 0:
        flat = int(torch.nonzero(weights).max())
    k = costs.shape[0]
    return flat // k, flat % k


class _State:
    def __init__(self, activations: torch.Tensor, config: MergeConfig) -> None:
        n, c = activations.shape
        self.alpha = config.alpha
        self.boolean = config.activation_threshold is not None
        self.k = c
        if self.boolean:
            self.columns = (activations > config.activation_threshold).to(torch.bool)
            as_float = self.columns.double()
        else:
            self.columns = activations.double()
            as_float = self.columns
        # The same exact counts (boolean) and the same chunked float64 sums (continuous) as before.
        self.coact = torch.zeros((c, c), dtype=STATE_DTYPE)
        for start in range(0, n, 4096):
            chunk = as_float[start : start + 4096]
            self.coact += chunk.T @ chunk
        self.column_sums = None if self.boolean else as_float.sum(dim=0)
        if not self.boolean:  # column sums accumulated per chunk, as before
            self.column_sums = torch.zeros(c, dtype=STATE_DTYPE)
            for start in range(0, n, 4096):
                self.column_sums += as_float[start : start + 4096].sum(dim=0)
        self.sizes = torch.ones(c, dtype=STATE_DTYPE)
        diag = self.coact.diagonal()
        self.alpha_terms = torch.mul(self.coact, -2 * self.alpha)
        self.alpha_terms += diag[:, None] * self.alpha
        self.alpha_terms += diag[None, :] * self.alpha
        self.diag_host = diag.numpy().copy()
        self.sizes_host = np.ones(c, dtype=np.float64)
        self._scratch = torch.empty(c * c, dtype=STATE_DTYPE)

    def scaled_costs(self) -> torch.Tensor:
        k = self.k
        _, log_k_minus_1 = _log_factors(k)
        out = self._scratch[: k * k].view(k, k)
        return torch.add(self.alpha_terms[:k, :k], self.coact[:k, :k], alpha=-log_k_minus_1, out=out)

    def cost_offset(self) -> float:
        log_ratio, _ = _log_factors(self.k)
        return float(self.diag_host[: self.k].sum()) * log_ratio

    def mdl_loss(self) -> float:
        k = self.k
        return float((self.diag_host[:k] * (math.log2(k) + self.alpha * self.sizes_host[:k])).sum())

    def merge(self, keep: int, drop: int) -> None:
        k = self.k
        coact = self.coact
        if self.boolean:
            merged = self.columns[:, keep] | self.columns[:, drop]
            overlap = (self.columns[:, keep] & self.columns[:, drop]).double() @ self.columns[:, :k].double()
            new_row = coact[keep, :k] + coact[drop, :k] - overlap
            new_diag = float(merged.sum())
            self.columns[:, keep] = merged
        else:
            new_row = coact[keep, :k] + coact[drop, :k]
            self.column_sums[keep] += self.column_sums[drop]
            new_diag = float(self.column_sums[keep])
        new_row[keep] = new_diag
        self.sizes[keep] += self.sizes[drop]
        self.sizes_host[keep] += self.sizes_host[drop]
        self.diag_host[keep] = new_diag
        coact[keep, :k] = new_row
        coact[:k, keep] = new_row
        diag = coact.diagonal()[:k]
        row = _alpha_term(diag[keep], self.sizes[keep], diag, self.sizes[:k], new_row) * self.alpha
        self.alpha_terms[keep, :k] = row
        self.alpha_terms[:k, keep] = row
        self._move_slot(k - 1, drop)
        self.k = k - 1

    def _move_slot(self, source: int, target: int) -> None:
        if source == target:
            return
        k = self.k
        for matrix in (self.coact, self.alpha_terms):
            matrix[target, :k] = matrix[source, :k]
            matrix[:k, target] = matrix[:k, source]
        for vector in (self.sizes, self.column_sums, self.diag_host, self.sizes_host):
            if vector is not None:
                vector[target] = vector[source]
        self.columns[:, target] = self.columns[:, source]


def reference_merge(activations: ProcessedActivations, config: MergeConfig, seed: int, pair_sampler=None) -> dict:
    """The pre-scale engine's history as plain arrays: pairs, group_idxs, pair_costs, mdl_losses."""
    values = activations.activations
    n, c = values.shape
    generator = torch.Generator().manual_seed(seed)
    state = _State(values, config)
    max_iters = c - 1 if config.iters is None else min(config.iters, c - 1)
    partition = np.arange(c)
    slot_of_group = np.arange(c)
    record: dict[str, list] = {"pairs": [], "group_idxs": [], "pair_costs": [], "mdl_losses": []}
    kwargs = config.merge_pair_sampling_kwargs
    for _ in range(max_iters):
        k = state.k
        offset = state.cost_offset()
        costs = state.scaled_costs()
        if pair_sampler is not None:
            order = torch.from_numpy(slot_of_group)
            full = (costs.index_select(0, order).index_select(1, order) + offset) / n
            pair = tuple(int(v) for v in pair_sampler(full))
            record["pair_costs"].append(float(full[pair]))
        else:
            if config.merge_pair_sampling_method == "range":
                slot_pair = _sample_range(costs, kwargs["threshold"], generator)
            else:
                slot_pair = _sample_mcmc(costs, kwargs["temperature"] * n, generator)
            group_of_slot = np.empty(k, dtype=np.int64)
            group_of_slot[slot_of_group] = np.arange(k)
            pair = (int(group_of_slot[slot_pair[0]]), int(group_of_slot[slot_pair[1]]))
            record["pair_costs"].append((float(costs[slot_pair]) + offset) / n)
        low, high = min(pair), max(pair)
        keep, drop = int(slot_of_group[low]), int(slot_of_group[high])
        moved_group = int(np.flatnonzero(slot_of_group == k - 1)[0])
        state.merge(keep, drop)
        slot_of_group[moved_group] = drop
        slot_of_group = np.delete(slot_of_group, high)
        partition[partition == high] = low
        partition[partition > high] -= 1
        record["pairs"].append(pair)
        record["group_idxs"].append(partition.copy())
        record["mdl_losses"].append(state.mdl_loss())
        if state.k <= MIN_GROUPS:
            break
    return {key: np.array(value) for key, value in record.items()}
