"""Aligning the merge histories of an ensemble on one set of labels (MATH.md §8)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from spd_math.history import MergeHistory


class EnsembleError(ValueError):
    """The ensemble cannot be aligned; the message says which member and why."""


@dataclass(frozen=True)
class NormalizedEnsemble:
    """`merges[m, i, x]`: group of `labels[x]` in member m after iteration i.

    Labels a member lacks sit in singleton groups of their own. `present[m, x]` says whether
    member m had label x. Group ids are arbitrary: compare partitions up to relabelling.
    """

    merges: torch.Tensor
    labels: list[str]
    present: torch.Tensor

    def __post_init__(self) -> None:
        if self.merges.ndim != 3:
            raise EnsembleError(f"merges: expected [n_ens, n_iters, c], got shape {tuple(self.merges.shape)}")
        if self.merges.shape[2] != len(self.labels):
            raise EnsembleError(f"labels: expected {self.merges.shape[2]} labels, got {len(self.labels)}")
        if tuple(self.present.shape) != (self.merges.shape[0], self.merges.shape[2]):
            raise EnsembleError(
                f"present: expected shape {(self.merges.shape[0], self.merges.shape[2])}, got {tuple(self.present.shape)}"
            )

    @property
    def n_members(self) -> int:
        return self.merges.shape[0]

    @property
    def n_iters(self) -> int:
        return self.merges.shape[1]


def normalize_ensemble(histories: Sequence[MergeHistory]) -> NormalizedEnsemble:
    """Put every member on the sorted union of labels, over the iterations all members completed."""
    if len(histories) == 0:
        raise EnsembleError("histories: expected at least one merge history, got none")
    for m, history in enumerate(histories):
        if not isinstance(history, MergeHistory):
            raise EnsembleError(f"histories[{m}]: expected a MergeHistory, got {type(history).__name__}")
    labels = sorted({label for history in histories for label in history.labels})
    position = {label: x for x, label in enumerate(labels)}
    n_iters = min(history.n_iters for history in histories)
    merges = np.empty((len(histories), n_iters, len(labels)), dtype=np.int64)
    present = np.zeros((len(histories), len(labels)), dtype=bool)
    for m, history in enumerate(histories):
        columns = np.fromiter((position[label] for label in history.labels), dtype=np.int64, count=len(history.labels))
        present[m, columns] = True
        missing = np.flatnonzero(~present[m])
        member_merges = history.group_idxs[:n_iters].numpy()
        merges[m][:, columns] = member_merges
        # Ids above every real group id of this member are free for the missing labels' singletons.
        first_free = int(member_merges.max()) + 1 if member_merges.size else 0
        merges[m][:, missing] = first_free + np.arange(missing.size)
    return NormalizedEnsemble(merges=torch.from_numpy(merges), labels=labels, present=torch.from_numpy(present))
