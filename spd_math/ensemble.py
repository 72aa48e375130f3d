"""Aligning the merge histories of an ensemble on one set of labels (docs/math.md §8)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from spd_math.errors import EnsembleError
from spd_math.history import MergeHistory
from spd_math.validation import as_tensor

__all__ = ["EnsembleError", "NormalizedEnsemble", "normalize_ensemble"]


@dataclass(frozen=True)
class NormalizedEnsemble:
    """Every member of an ensemble on one sorted set of labels (docs/math.md §8).

    `merges[m, i, x]`: group of `labels[x]` in member m after iteration i. Labels a member
    lacks sit in singleton groups of their own; `present[m, x]` says whether member m had label
    x. Group ids are arbitrary: compare partitions up to relabelling.

    Parameters
    ----------
    merges : torch.Tensor or numpy.ndarray
        `[n_ens, n_iters, c]` integer group ids.
    labels : list of str
        `[c]` labels.
    present : torch.Tensor or numpy.ndarray
        `[n_ens, c]` booleans.

    Raises
    ------
    EnsembleError
        Shapes that do not agree, or non-integer group ids.

    Examples
    --------
    >>> import numpy as np
    >>> from spd_math import NormalizedEnsemble
    >>> ensemble = NormalizedEnsemble(np.zeros((2, 3, 4), dtype=int), list("abcd"), np.ones((2, 4), dtype=bool))
    >>> ensemble.n_members, ensemble.n_iters
    (2, 3)
    """

    merges: torch.Tensor
    labels: list[str]
    present: torch.Tensor

    def __repr__(self) -> str:  # short: no tensors or label lists
        return f"NormalizedEnsemble({self.n_members} members, {self.n_iters:,} iterations, {len(self.labels):,} labels)"

    def __post_init__(self) -> None:
        object.__setattr__(self, "merges", as_tensor("merges", self.merges, EnsembleError, allow_sequence=True))
        object.__setattr__(self, "present", as_tensor("present", self.present, EnsembleError, allow_sequence=True))
        if not isinstance(self.labels, list):
            object.__setattr__(self, "labels", [str(label) for label in np.asarray(self.labels).reshape(-1)])
        if self.merges.is_floating_point():
            raise EnsembleError(f"merges: expected integer group ids, got dtype {self.merges.dtype}")
        if self.present.dtype != torch.bool:
            object.__setattr__(self, "present", self.present.to(torch.bool))
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
    """Put every member on the sorted union of labels, over the iterations all members completed (docs/math.md §8).

    Parameters
    ----------
    histories : sequence of MergeHistory

    Returns
    -------
    NormalizedEnsemble

    Raises
    ------
    EnsembleError
        No histories, or an element that is not a MergeHistory.

    Examples
    --------
    >>> from spd_math import MergeHistory, normalize_ensemble
    >>> first = MergeHistory(labels=["a:0", "a:1"], group_idxs=[[0, 0]])
    >>> second = MergeHistory(labels=["a:1", "b:0"], group_idxs=[[0, 0], [0, 0]])
    >>> ensemble = normalize_ensemble([first, second])
    >>> ensemble.labels, ensemble.merges[:, 0].tolist()
    (['a:0', 'a:1', 'b:0'], [[0, 0, 1], [1, 0, 0]])
    """
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
