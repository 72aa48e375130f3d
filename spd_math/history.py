"""The record of one merge run (docs/math.md §7)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from spd_math.config import MergeConfig
from spd_math.errors import HistoryError
from spd_math.validation import as_tensor

__all__ = ["HistoryError", "MergeHistory"]


def _check_rows(name: str, value: torch.Tensor | None, n_iters: int, trailing: tuple[int, ...] = ()) -> None:
    if value is None:
        return
    expected = (n_iters, *trailing)
    if tuple(value.shape) != expected:
        raise HistoryError(f"{name}: expected shape {expected}, got {tuple(value.shape)}")


@dataclass(frozen=True)
class MergeHistory:
    """Partitions after every merge of one run, plus the per-iteration diagnostics when known (docs/math.md §7).

    `group_idxs[i, x]` is the group of component `labels[x]` after iteration `i`; groups are
    numbered by their smallest member, so `k_groups[i] == c - i - 1`. Histories read from
    older files may lack the diagnostics. Arrays and nested sequences are converted to tensors.

    Parameters
    ----------
    labels : list of str
        `[c]` component labels.
    group_idxs : torch.Tensor or numpy.ndarray
        `[n_iters, c]` integer group ids.
    selected_pairs : tensor or array, optional
        `[n_iters, 2]` the pairs as sampled (pre-merge group ids).
    k_groups : tensor or array, optional
        `[n_iters]` groups after each merge; derived from `group_idxs` when omitted.
    pair_costs, mdl_losses : tensor or array, optional
        `[n_iters]` cost of the chosen pair and the MDL loss after each merge.
    config : MergeConfig, optional
    seed : int, optional
        The seed the run's sampler used.

    Raises
    ------
    HistoryError
        Shapes that do not agree, or non-integer group ids.

    Examples
    --------
    >>> import numpy as np
    >>> from spd_math import MergeHistory
    >>> history = MergeHistory(labels=["a:0", "a:1", "a:2"], group_idxs=np.array([[0, 0, 1], [0, 0, 0]]))
    >>> history.n_iters, history.k_groups.tolist()
    (2, [2, 1])
    """

    labels: list[str]
    group_idxs: torch.Tensor
    selected_pairs: torch.Tensor | None = None
    k_groups: torch.Tensor | None = None
    pair_costs: torch.Tensor | None = None
    mdl_losses: torch.Tensor | None = None
    config: MergeConfig | None = None
    seed: int | None = None

    def __repr__(self) -> str:  # short: a history of real size has tens of thousands of labels
        k = f", k {int(self.k_groups[0]):,} -> {int(self.k_groups[-1]):,}" if self.n_iters else ""
        seed = f", seed {self.seed}" if self.seed is not None else ""
        return f"MergeHistory({len(self.labels):,} components, {self.n_iters:,} merges{k}{seed})"

    def __post_init__(self) -> None:
        # Arrays and sequences become tensors here, at the edge.
        for name in ("group_idxs", "selected_pairs", "k_groups", "pair_costs", "mdl_losses"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, as_tensor(name, value, HistoryError, allow_sequence=True))
        if self.group_idxs.is_floating_point() or self.group_idxs.dtype == torch.bool:
            raise HistoryError(f"group_idxs: expected integer group ids, got dtype {self.group_idxs.dtype}")
        if not isinstance(self.labels, list):
            object.__setattr__(self, "labels", [str(label) for label in np.asarray(self.labels).reshape(-1)])
        if self.config is not None and not isinstance(self.config, MergeConfig):
            raise HistoryError(f"config: expected a MergeConfig or None, got {type(self.config).__name__}")
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
