"""An ensemble's members on one sorted set of labels, as aligned partitions (docs/math.md §8).

What `normalize_ensemble` makes and the distances read. It lives apart from `spd_math.ensemble` so that the
dependency runs one way: `ensemble` imports `distances` (for `MergeHistoryEnsemble.get_distances`), and both
import this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from spd_math import replay
from spd_math.errors import EnsembleError
from spd_math.validation import as_tensor

__all__ = ["NormalizedEnsemble"]


@dataclass(frozen=True, init=False, eq=False)
class NormalizedEnsemble:
    """Every member of an ensemble on one sorted set of labels (docs/math.md §8).

    `merges[m, i, x]`: group of `labels[x]` in member m after iteration i. Labels a member
    lacks sit in singleton groups of their own; `present[m, x]` says whether member m had label
    x. Group ids are arbitrary: compare partitions up to relabelling.

    An ensemble aligned from merge histories (`normalize_ensemble`) keeps only the alignment and
    each member's merges, O(members x (c + iters)): `partitions_at(i)` gives one iteration's
    `[n_ens, c]` ids, `replay_items()` what the distances replay, and `merges` the whole
    `[n_ens, n_iters, c]` array (made, and kept, only when asked for). One made from an array keeps it.

    Parameters
    ----------
    merges : torch.Tensor or numpy.ndarray
        `[n_ens, n_iters, c]` integer group ids.
    labels : list of str
        `[c]` labels.
    present : torch.Tensor or numpy.ndarray
        `[n_ens, c]` booleans.

    Attributes
    ----------
    member_columns : tuple of numpy.ndarray, or None
        Per member, the position in `labels` of each of its own components (in its history's order); None
        for an ensemble made from an array.
    member_merges : torch.Tensor or None
        `[n_ens, n_iters, 2]` int64: each member's merges, (lower, higher) group ids before the merge in
        its own numbering (docs/math.md §6); None for an ensemble made from an array.

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

    labels: list[str]
    present: torch.Tensor
    member_columns: tuple[np.ndarray, ...] | None
    member_merges: torch.Tensor | None
    dense_merges: torch.Tensor | None  # the array an ensemble was made from (None when made from merges)

    def __init__(self, merges: Any = None, labels: Sequence[str] | None = None, present: Any = None, *,
                 member_columns: Sequence[Any] | None = None, member_merges: Any = None) -> None:
        if labels is None or present is None:
            raise EnsembleError("expected labels and present (and merges, or member_columns with member_merges)")
        present = as_tensor("present", present, EnsembleError, allow_sequence=True)
        if present.dtype != torch.bool:
            present = present.to(torch.bool)
        if not isinstance(labels, list):
            labels = [str(label) for label in np.asarray(labels).reshape(-1)]
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "present", present)
        object.__setattr__(self, "_cache", {})
        if merges is not None:
            merges = as_tensor("merges", merges, EnsembleError, allow_sequence=True)
            if merges.is_floating_point():
                raise EnsembleError(f"merges: expected integer group ids, got dtype {merges.dtype}")
            if merges.ndim != 3:
                raise EnsembleError(f"merges: expected [n_ens, n_iters, c], got shape {tuple(merges.shape)}")
            if merges.shape[2] != len(labels):
                raise EnsembleError(f"labels: expected {merges.shape[2]} labels, got {len(labels)}")
            object.__setattr__(self, "member_columns", None)
            object.__setattr__(self, "member_merges", None)
            object.__setattr__(self, "dense_merges", merges)
            n_members = merges.shape[0]
        else:
            if member_columns is None or member_merges is None:
                raise EnsembleError("expected merges, or member_columns with member_merges")
            columns = tuple(np.asarray(column, dtype=np.int64) for column in member_columns)
            member_merges = as_tensor("member_merges", member_merges, EnsembleError, allow_sequence=True).to(torch.int64)
            if member_merges.ndim != 3 or member_merges.shape[2] != 2 or member_merges.shape[0] != len(columns):
                raise EnsembleError(f"member_merges: expected [{len(columns)} members, n_iters, 2], got shape "
                                    f"{tuple(member_merges.shape)}")
            for m, column in enumerate(columns):
                if column.size and (column.min() < 0 or column.max() >= len(labels)):
                    raise EnsembleError(f"member_columns[{m}]: expected positions in 0..{len(labels) - 1}")
            object.__setattr__(self, "member_columns", columns)
            object.__setattr__(self, "member_merges", member_merges)
            object.__setattr__(self, "dense_merges", None)
            n_members = len(columns)
        if tuple(self.present.shape) != (n_members, len(labels)):
            raise EnsembleError(f"present: expected shape {(n_members, len(labels))}, got {tuple(self.present.shape)}")

    def __getstate__(self) -> dict:  # what is derived (and may be large) is made again after unpickling
        return {name: value for name, value in self.__dict__.items() if name != "_cache"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        object.__setattr__(self, "_cache", {})

    def __repr__(self) -> str:  # short: no tensors or label lists
        return f"NormalizedEnsemble({self.n_members} members, {self.n_iters:,} iterations, {len(self.labels):,} labels)"

    @property
    def n_members(self) -> int:
        return int(self.present.shape[0])

    @property
    def n_iters(self) -> int:
        return int((self.dense_merges if self.dense_merges is not None else self.member_merges).shape[1])

    @property
    def is_compact(self) -> bool:
        """Made from merges (partitions are replayed), not from an array."""
        return self.dense_merges is None

    def _member_reps(self) -> list[np.ndarray]:
        """Per member, the smallest component (its own numbering) of the two groups each merge joined."""
        if "reps" not in self._cache:
            reps = []
            for m, columns in enumerate(self.member_columns):
                found, invalid = replay.representatives(self.member_merges[m].numpy(), columns.size)
                if invalid != replay.ALL_VALID:
                    raise EnsembleError(f"member_merges[{m}, {invalid}]: not two different groups of the "
                                        f"{columns.size - invalid} before that merge")
                reps.append(found)
            self._cache["reps"] = reps
        return self._cache["reps"]

    def _placed(self, m: int, member_ids: np.ndarray, out: np.ndarray) -> None:
        """Member m's own group ids put on the union labels (docs/math.md §8): each missing label a singleton
        with an id above every real one."""
        columns = self.member_columns[m]
        out[..., columns] = member_ids
        missing = np.flatnonzero(~self.present[m].numpy())
        # Ids after the first merge are 0..c_m - 2, so c_m - 1 and up are free (as the dense alignment finds them).
        out[..., missing] = columns.size - 1 + np.arange(missing.size)

    def partitions_at(self, iteration: int) -> np.ndarray:
        """`[n_ens, c]` int64 group ids of every member after `iteration` (`merges[:, iteration]`, without the rest).

        Raises
        ------
        EnsembleError
            An iteration outside 0..n_iters - 1 (negative ones count from the end).
        """
        index = int(iteration) + (self.n_iters if int(iteration) < 0 else 0)
        if not 0 <= index < self.n_iters:
            raise EnsembleError(f"iteration: expected 0..{self.n_iters - 1} (the ensemble has {self.n_iters} "
                                f"iterations), got {iteration}")
        if self.dense_merges is not None:
            return self.dense_merges[:, index, :].numpy().astype(np.int64)
        out = np.empty((self.n_members, len(self.labels)), dtype=np.int64)
        for m, reps in enumerate(self._member_reps()):
            self._placed(m, replay.partition_at(reps, self.member_columns[m].size, index), out[m])
        return out

    def member_partitions(self, m: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        """`[stop - start, c]` int64 group ids of member m after iterations `start .. stop - 1`."""
        stop = self.n_iters if stop is None else min(int(stop), self.n_iters)
        if self.dense_merges is not None:
            return self.dense_merges[m, start:stop].numpy().astype(np.int64)
        columns = self.member_columns[m]
        own = replay.dense_partitions(self.member_merges[m].numpy(), self._member_reps()[m], columns.size, start, stop)
        out = np.empty((own.shape[0], len(self.labels)), dtype=np.int64)
        self._placed(m, own, out)
        return out

    def replay_items(self) -> np.ndarray:
        """`[n_ens, n_iters, 2]` int64: for every member and merge, one label position in each of the two groups
        it joined (the replay the distances make). Raises EnsembleError for an ensemble made from an array."""
        if self.dense_merges is not None:
            raise EnsembleError("this ensemble was made from an array of partitions, not from merges: it has no "
                                "merges to replay")
        items = np.empty((self.n_members, self.n_iters, 2), dtype=np.int64)
        for m, reps in enumerate(self._member_reps()):
            items[m] = self.member_columns[m][reps]
        return items

    @property
    def merges(self) -> torch.Tensor:
        """`[n_ens, n_iters, c]` int64 group ids: made on first use and kept (n_ens x n_iters x c x 8 bytes;
        `partitions_at` and `member_partitions` give parts without it)."""
        if self.dense_merges is not None:
            return self.dense_merges
        if "merges" not in self._cache:
            out = np.empty((self.n_members, self.n_iters, len(self.labels)), dtype=np.int64)
            for m in range(self.n_members):
                out[m] = self.member_partitions(m)
            self._cache["merges"] = torch.from_numpy(out)
        return self._cache["merges"]
