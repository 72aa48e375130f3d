"""The greedy MDL merge (docs/math.md §2-§7), doing work proportional to what each merge changes.

State per group lives in *slots*: rows and columns of fixed-size matrices. A merge
rewrites the surviving group's row and column, and the vanished group's slot is reused by
moving the last slot into it, so no matrix is ever copied. The partition itself is kept
in the numbering of docs/math.md §6 (groups ordered by their smallest member).

Boolean mode keeps each group's activation mask packed 64 samples a word. The new
group's coactivation with a group l is `Q[a,l] + Q[b,l] - |a ∧ b ∧ l|`, which only looks
at the words where both merged groups are active. Continuous mode needs no samples at
all after the start: the new column is a sum, so its dot products are sums too.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable

import numpy as np
import scipy.sparse
import torch

from spd_math import backend
from spd_math.activations import ProcessedActivations
from spd_math.bitsets import BITS_PER_WORD, n_words, overlap_counts, pack_words
from spd_math.config import ConfigError, MergeConfig
from spd_math.costs import alpha_term, log_factors
from spd_math.errors import ActivationsError, MergeError
from spd_math.history import MergeHistory
from spd_math.samplers import SAMPLERS
from spd_math.validation import nonfinite_columns

PairSampler = Callable[[torch.Tensor], tuple[int, int]]

# Rows of activations processed at once when building masks and coactivations: bounds the
# temporary float copy (4096 x 2000 float32 = 32 MB) and is a multiple of the word size.
CHUNK_ROWS = 4096
# Below this many groups the loop stops after a merge (docs/math.md §7, as is).
MIN_GROUPS = 3
STATE_DTYPE = torch.float64
# Below this fraction of active entries, CPU coactivation counts go through a sparse product.
SPARSE_DENSITY = 0.1


def _check_finite(chunk: torch.Tensor, first_row: int) -> None:
    bad = nonfinite_columns(chunk)
    if bad.numel():
        raise ActivationsError(
            f"activations: expected finite values, found NaN or inf in component column(s) {bad[:5].tolist()} "
            f"within rows {first_row}..{first_row + chunk.shape[0] - 1}"
        )


def _count_coactivations(active: torch.Tensor) -> torch.Tensor:
    """`MᵀM` of a boolean chunk as exact float64 counts (chunks are far below 2**24 rows)."""
    if backend.numpy_fast_path(active):
        mask = active.numpy()
        if np.count_nonzero(mask) < SPARSE_DENSITY * mask.size:
            sparse = scipy.sparse.csr_matrix(mask, dtype=np.float32)
            return torch.from_numpy((sparse.T @ sparse).toarray().astype(np.float64))
    as_float = active.float()
    return (as_float.T @ as_float).to(STATE_DTYPE)


class _GroupState:
    """Coactivation, α-terms, sizes and (boolean mode) packed masks of the live groups, by slot."""

    def __init__(self, activations: torch.Tensor, config: MergeConfig, device: torch.device) -> None:
        n, c = activations.shape
        self.alpha = config.alpha
        self.boolean = config.activation_threshold is not None
        self.k = c
        self.coact = torch.zeros((c, c), dtype=STATE_DTYPE, device=device)
        # Boolean mode: packed masks. Continuous mode: plain column sums (the §6 diagonal rule).
        self.masks = torch.zeros((n_words(n), c), dtype=torch.int64, device=device) if self.boolean else None
        column_sums = torch.zeros(c, dtype=STATE_DTYPE, device=device)
        for start in range(0, n, CHUNK_ROWS):
            chunk = activations[start : start + CHUNK_ROWS].to(device)
            _check_finite(chunk, start)
            if self.boolean:
                active = chunk > config.activation_threshold
                self.coact += _count_coactivations(active)
                padded = torch.zeros((n_words(chunk.shape[0]) * BITS_PER_WORD, c), dtype=torch.bool, device=device)
                padded[: chunk.shape[0]] = active
                first_word = start // BITS_PER_WORD
                self.masks[first_word : first_word + n_words(chunk.shape[0])] = pack_words(padded)
            else:
                wide = chunk.to(STATE_DTYPE)
                self.coact += wide.T @ wide
                column_sums += wide.sum(dim=0)
        self.column_sums = None if self.boolean else column_sums
        self.sizes = torch.ones(c, dtype=STATE_DTYPE, device=device)
        diag = self.coact.diagonal()
        # All sizes are 1 at the start, so the α-term s_i·r_j + s_j·r_i - q_ij·(r_i + r_j) is s_i + s_j - 2·q_ij.
        self.alpha_terms = torch.mul(self.coact, -2 * self.alpha)
        self.alpha_terms += diag[:, None] * self.alpha
        self.alpha_terms += diag[None, :] * self.alpha
        # Python-side mirrors of the diagonal and sizes, for the MDL loss without device syncs.
        self.diag_host = diag.cpu().numpy().copy()
        self.sizes_host = np.ones(c, dtype=np.float64)
        self._scratch = torch.empty(c * c, dtype=STATE_DTYPE, device=device)

    def scaled_costs(self) -> torch.Tensor:
        """`n · cost - S · log2((k-1)/k)` for the live slots, in a scratch buffer."""
        k = self.k
        _, log_k_minus_1 = log_factors(k)
        out = self._scratch[: k * k].view(k, k)
        return torch.add(self.alpha_terms[:k, :k], self.coact[:k, :k], alpha=-log_k_minus_1, out=out)

    def cost_offset(self) -> float:
        """The term shared by all pairs, `S · log2((k-1)/k)`, in units of n."""
        log_ratio, _ = log_factors(self.k)
        return float(self.diag_host[: self.k].sum()) * log_ratio

    def mdl_loss(self) -> float:
        k = self.k
        diag, sizes = self.diag_host[:k], self.sizes_host[:k]
        return float((diag * (math.log2(k) + self.alpha * sizes)).sum())

    def merge(self, keep: int, drop: int) -> None:
        """Merge slot `drop` into slot `keep`, then move the last live slot into `drop`."""
        k = self.k
        coact = self.coact
        if self.boolean:
            both = self.masks[:, keep] & self.masks[:, drop]
            overlap = overlap_counts(self.masks[:, :k], both).to(device=coact.device, dtype=STATE_DTYPE)
            new_row = coact[keep, :k] + coact[drop, :k] - overlap
            new_diag = self.diag_host[keep] + self.diag_host[drop] - float(overlap[keep])
            self.masks[:, keep] |= self.masks[:, drop]
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
        row = alpha_term(diag[keep], self.sizes[keep], diag, self.sizes[:k], new_row) * self.alpha
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
        if self.masks is not None:
            self.masks[:, target] = self.masks[:, source]


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

    Returns
    -------
    MergeHistory
        On the CPU.

    Raises
    ------
    ActivationsError
        No samples, fewer than 2 components, or NaN/inf in the activations.
    MergeError
        A pair sampler that answers something other than two different group indices.
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
    device = torch.device(device) if device is not None else activations.activations.device
    if seed is None:
        seed = secrets.randbits(63)
    generator = torch.Generator().manual_seed(seed)
    state = _GroupState(activations.activations, config, device)

    max_iters = c - 1 if config.iters is None else min(config.iters, c - 1)
    group_idxs = np.empty((max_iters, c), dtype=np.int64)
    selected_pairs = np.empty((max_iters, 2), dtype=np.int64)
    pair_costs = np.empty(max_iters, dtype=np.float64)
    mdl_losses = np.empty(max_iters, dtype=np.float64)
    partition = np.arange(c)  # group of each component, groups ordered by smallest member
    slot_of_group = np.arange(c)  # slot holding each group
    sampler = SAMPLERS.lookup(config.merge_pair_sampling_method, ConfigError)
    sampler_kwargs = config.merge_pair_sampling_kwargs

    n_done = 0
    for iteration in range(max_iters):
        k = state.k
        offset = state.cost_offset()
        costs = state.scaled_costs()
        if pair_sampler is not None:
            order = torch.from_numpy(slot_of_group).to(device)
            full = (costs.index_select(0, order).index_select(1, order) + offset) / n
            i, j = _validated_pair(pair_sampler(full), k)
            pair = (i, j)
            pair_costs[iteration] = float(full[i, j])
        else:
            slot_pair = sampler.choose(costs, sampler_kwargs, generator, n)
            group_of_slot = np.empty(k, dtype=np.int64)
            group_of_slot[slot_of_group] = np.arange(k)
            pair = (int(group_of_slot[slot_pair[0]]), int(group_of_slot[slot_pair[1]]))
            pair_costs[iteration] = (float(costs[slot_pair]) + offset) / n

        low, high = min(pair), max(pair)
        keep, drop = int(slot_of_group[low]), int(slot_of_group[high])
        moved_group = int(np.flatnonzero(slot_of_group == k - 1)[0])
        state.merge(keep, drop)
        slot_of_group[moved_group] = drop
        slot_of_group = np.delete(slot_of_group, high)
        partition[partition == high] = low
        partition[partition > high] -= 1

        selected_pairs[iteration] = pair
        group_idxs[iteration] = partition
        mdl_losses[iteration] = state.mdl_loss()
        n_done = iteration + 1
        if state.k <= MIN_GROUPS:
            break

    k_groups = np.arange(c - 1, c - 1 - n_done, -1, dtype=np.int64)
    return MergeHistory(
        labels=list(activations.labels),
        group_idxs=torch.from_numpy(group_idxs[:n_done].copy()),
        selected_pairs=torch.from_numpy(selected_pairs[:n_done].copy()),
        k_groups=torch.from_numpy(k_groups),
        pair_costs=torch.from_numpy(pair_costs[:n_done].copy()),
        mdl_losses=torch.from_numpy(mdl_losses[:n_done].copy()),
        config=config,
        seed=seed,
    )
