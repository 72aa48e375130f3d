"""What a merge state offers the pair samplers and the merge loop (`typing.Protocol`s), and the cost view of a matrix.

The samplers (`spd_math.samplers`) never see a cost matrix: they read a `CostView`, which the merge
states (`state.GroupState`, `state.DenseGroupState`, `state.SwitchingState`) and the plain
matrix wrapper `DenseCostView` (here) implement. The merge loop (`spd_math.merge`) reads a
`MergeState`: a cost view that can also merge two groups. Costs are the engine's scaled costs,
`n · cost − S·log2((k−1)/k)` (docs/math.md §4), identical to the float in every implementation.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import torch

from spd_math._engine import backend


@runtime_checkable
class Candidates(Protocol):
    """The pairs with cost at most a cutoff, in row-major slot order (the order the range sampler draws from)."""

    count: int

    def nth(self, index: int) -> tuple[int, int, float]:
        """The `index`-th candidate (0 <= index < count) as `(i, j, scaled cost)`."""
        ...


@runtime_checkable
class CostView(Protocol):
    """The scaled merge costs of the k live groups (slots 0..k-1), as the samplers read them."""

    @property
    def k(self) -> int: ...

    def offdiagonal_min(self) -> float:
        """The exact minimum over the pairs i != j."""
        ...

    def offdiagonal_max(self) -> float:
        """The exact maximum over the pairs i != j."""
        ...

    def candidates_at_most(self, cutoff: float, slack: float) -> Candidates:
        """The pairs i != j with cost `<= cutoff`; `slack`: how far above the cutoff later calls may look."""
        ...

    def row_blocks(self) -> list[tuple[int, int]]:
        """`(first, stop)` row ranges covering 0..k-1 in order."""
        ...

    def block_costs(self, first: int, stop: int) -> torch.Tensor:
        """Costs of rows first..stop-1, `[stop - first, k]`, with +inf on the diagonal."""
        ...


@runtime_checkable
class MergeState(CostView, Protocol):
    """A cost view of a merge in progress that the merge loop can advance (docs/math.md §3-§7)."""

    @property
    def n(self) -> int: ...

    def cost_offset(self) -> float:
        """`S · log2((k-1)/k)`: what turns a scaled cost back into `n · cost`."""
        ...

    def mdl_loss(self) -> float:
        """The MDL loss of the current partition (docs/math.md §7)."""
        ...

    def full_costs(self, order: np.ndarray) -> torch.Tensor:
        """The scaled `[k, k]` cost matrix, rows and columns in the given slot order (diagonal included)."""
        ...

    def merge(self, keep: int, drop: int, *, with_costs: bool = True) -> int:
        """Merge slot `drop` into `keep`, move the last live slot into `drop`; the merged group's slot. Without
        costs (replaying a checkpoint's merges), what the samplers read is brought up to date by `costs_again`."""
        ...

    def costs_again(self) -> None:
        """After merges without costs: make what the samplers read exact again (one pass over the rows)."""
        ...


class DenseCostView:
    """A cost view of a full `[k, k]` matrix (the diagonal is ignored)."""

    def __init__(self, costs: torch.Tensor) -> None:
        self.costs = costs.clone()
        self.k = costs.shape[0]
        self.costs.diagonal().fill_(float("inf"))

    def offdiagonal_min(self) -> float:
        return float(self.costs.min())

    def offdiagonal_max(self) -> float:
        masked = self.costs.clone()
        masked.diagonal().fill_(float("-inf"))
        return float(masked.max())

    def candidates_at_most(self, cutoff: float, slack: float) -> _FlatCandidates:
        return _FlatCandidates(self.costs, cutoff)

    @staticmethod
    def candidates_of(costs: torch.Tensor, cutoff: float) -> _FlatCandidates:
        """Candidates of a matrix whose diagonal is already +inf."""
        return _FlatCandidates(costs, cutoff)

    def row_blocks(self) -> list[tuple[int, int]]:
        return [(0, self.k)]

    def block_costs(self, first: int, stop: int) -> torch.Tensor:
        return self.costs[first:stop]


class _FlatCandidates:
    def __init__(self, costs: torch.Tensor, cutoff: float) -> None:
        self.costs = costs
        self.flat = _flat_indices_at_most(costs, cutoff)
        self.count = int(self.flat.numel())

    def nth(self, index: int) -> tuple[int, int, float]:
        i, j = divmod(int(self.flat[index]), self.costs.shape[0])
        return i, j, float(self.costs[i, j])


def _flat_indices_at_most(costs: torch.Tensor, cutoff: float) -> torch.Tensor:
    """Row-major flat indices of the entries `<= cutoff`, in ascending order."""
    if backend.numpy_fast_path(costs):
        return torch.from_numpy(np.flatnonzero(costs.numpy() <= cutoff))  # far faster than torch.nonzero here
    return torch.nonzero(costs.flatten() <= cutoff).squeeze(1)
