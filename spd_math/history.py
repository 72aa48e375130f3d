"""The record of one merge run (MATH.md §7)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from spd_math.config import MergeConfig


class HistoryError(ValueError):
    """A merge history is inconsistent; the message names the field and what was expected."""


def _check_rows(name: str, value: torch.Tensor | None, n_iters: int, trailing: tuple[int, ...] = ()) -> None:
    if value is None:
        return
    expected = (n_iters, *trailing)
    if tuple(value.shape) != expected:
        raise HistoryError(f"{name}: expected shape {expected}, got {tuple(value.shape)}")


@dataclass(frozen=True)
class MergeHistory:
    """Partitions after every merge of one run, plus the per-iteration diagnostics when known.

    `group_idxs[i, x]` is the group of component `labels[x]` after iteration `i`; groups are
    numbered by their smallest member, so `k_groups[i] == c - i - 1`. Histories read from
    older files may lack the diagnostics (`selected_pairs`, `pair_costs`, `mdl_losses`, `config`).
    """

    labels: list[str]
    group_idxs: torch.Tensor
    selected_pairs: torch.Tensor | None = None
    k_groups: torch.Tensor | None = None
    pair_costs: torch.Tensor | None = None
    mdl_losses: torch.Tensor | None = None
    config: MergeConfig | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.group_idxs.ndim != 2:
            raise HistoryError(f"group_idxs: expected a 2-D [n_iters, c] tensor, got shape {tuple(self.group_idxs.shape)}")
        n_iters, c = self.group_idxs.shape
        if len(self.labels) != c:
            raise HistoryError(f"labels: expected {c} labels (one per group_idxs column), got {len(self.labels)}")
        _check_rows("selected_pairs", self.selected_pairs, n_iters, (2,))
        for name in ("k_groups", "pair_costs", "mdl_losses"):
            _check_rows(name, getattr(self, name), n_iters)
        if self.k_groups is None:
            # Derived, not stored: the number of distinct groups in each partition.
            k = torch.tensor([int(row.unique().numel()) for row in self.group_idxs], dtype=torch.int64)
            object.__setattr__(self, "k_groups", k)

    @property
    def n_iters(self) -> int:
        return self.group_idxs.shape[0]

    @property
    def c_components(self) -> int:
        return self.group_idxs.shape[1]
