"""Aligning the merge histories of an ensemble on one set of labels (docs/math.md §8)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np
import torch

from spd_math import replay
from spd_math.errors import EnsembleError
from spd_math.history import MergeHistory
from spd_math.validation import as_tensor

__all__ = ["EnsembleError", "MergeHistoryEnsemble", "NormalizedEnsemble", "NormalizedHistories", "normalize_ensemble"]


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


@dataclass(frozen=True, init=False, eq=False)
class NormalizedHistories(NormalizedEnsemble):
    """An aligned ensemble (docs/math.md §8) under the names of the original research code: `merges_array`,
    `component_labels` and `metadata` (what its `MergeHistoryEnsemble.normalized()` returns, and its
    `ensemble_meta.json` holds).

    It is a `NormalizedEnsemble` (what `normalize_ensemble` returns), so everything that takes one takes it:
    `merges` is `merges_array`, `labels` is `component_labels`.

    Parameters
    ----------
    merges_array : torch.Tensor or numpy.ndarray
        `[n_ens, n_iters, c]` integer group ids.
    component_labels : list of str
        `[c]` labels, the sorted union of the members' labels.
    metadata : mapping, optional
        The original's keys when made by `normalize_ensemble`: `component_labels`, `n_ensemble`,
        `n_iters_min`, `n_iters_max`, `n_iters_range`, `c_components`, `config` (the members' merge config
        as a dict, or None when they lack one or differ) and `history_metadatas` (per member, what its
        history file's `metadata.json` holds: `history_metadata`). Kept read-only.
    present : torch.Tensor or numpy.ndarray, optional
        `[n_ens, c]` whether each member had each label; default every label in every member (the
        original's merge arrays do not record it).

    Raises
    ------
    EnsembleError
        Shapes that do not agree, or non-integer group ids.

    Examples
    --------
    >>> import numpy as np
    >>> from spd_math import NormalizedHistories, compute_distances
    >>> normalized = NormalizedHistories(np.array([[[0, 0, 1]], [[0, 1, 1]]]), ["a:0", "a:1", "b:0"], {"n_ensemble": 2})
    >>> normalized.merges_array.shape, normalized.component_labels, normalized.metadata["n_ensemble"]
    ((2, 1, 3), ['a:0', 'a:1', 'b:0'], 2)
    >>> compute_distances(normalized, "perm_invariant_hamming")[0].tolist()
    [[0, 1], [1, 0]]
    """

    metadata: Mapping[str, Any]

    def __init__(self, merges_array: Any, component_labels: Sequence[str], metadata: Mapping[str, Any] | None = None,
                 *, present: Any = None) -> None:
        merges = as_tensor("merges_array", merges_array, EnsembleError, allow_sequence=True)
        if present is None:
            if merges.ndim != 3:
                raise EnsembleError(f"merges_array: expected [n_ens, n_iters, c], got shape {tuple(merges.shape)}")
            present = torch.ones((merges.shape[0], merges.shape[2]), dtype=torch.bool)
        super().__init__(merges, component_labels, present)
        object.__setattr__(self, "metadata", _read_only_metadata(metadata))

    @classmethod
    def aligned(cls, ensemble: NormalizedEnsemble, metadata: Mapping[str, Any] | None) -> NormalizedHistories:
        """`ensemble` as it is (compact or not) under the original's names, with `metadata`."""
        normalized = cls.__new__(cls)
        normalized.__setstate__({**ensemble.__getstate__(), "metadata": _read_only_metadata(metadata)})
        return normalized

    def __getstate__(self) -> dict:  # the read-only metadata view cannot be pickled itself: kept as a dict
        state = super().__getstate__()
        state["metadata"] = dict(self.metadata)
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__({**state, "metadata": _read_only_metadata(state.get("metadata"))})

    def __repr__(self) -> str:  # short: no tensors or label lists
        return f"NormalizedHistories({self.n_members} members, {self.n_iters:,} iterations, {len(self.labels):,} labels)"

    @property
    def merges_array(self) -> np.ndarray:
        """`[n_ens, n_iters, c]` group ids as a NumPy array (sharing memory with `merges`; made when first asked
        for: at real scale that is gigabytes)."""
        return self.merges.detach().cpu().numpy()

    @property
    def component_labels(self) -> list[str]:
        """The `[c]` labels (`labels`)."""
        return self.labels

    @classmethod
    def from_ensemble(cls, ensemble: NormalizedEnsemble, histories: Sequence[MergeHistory]) -> NormalizedHistories:
        """An already aligned ensemble (e.g. one read back from storage) with the metadata of the histories it
        was aligned from, without aligning again.

        Raises
        ------
        EnsembleError
            `histories` are not the ensemble's members: another number, or other labels.
        """
        _check_histories(histories)
        if len(histories) != ensemble.n_members:
            raise EnsembleError(f"histories: expected the ensemble's {ensemble.n_members} members, got {len(histories)}")
        union = sorted({label for history in histories for label in history.labels})
        if union != list(ensemble.labels):
            raise EnsembleError("histories: their labels are not the ensemble's labels; expected the histories the "
                                "ensemble was aligned from, in its member order")
        return cls.aligned(ensemble, ensemble_metadata(histories, ensemble.labels))


def _read_only_metadata(metadata: Mapping[str, Any] | None) -> Mapping[str, Any]:
    if metadata is not None and not isinstance(metadata, Mapping):
        raise EnsembleError(f"metadata: expected a mapping, got {type(metadata).__name__}")
    return MappingProxyType(dict(metadata or {}))


@dataclass(frozen=True)
class MergeHistoryEnsemble:
    """The merge histories of an ensemble's members, in member order (the original research code's
    `MergeHistoryEnsemble`): aligned by `normalized()` (docs/math.md §8), compared by `get_distances()` (§9).

    Parameters
    ----------
    histories : sequence of MergeHistory
        At least one; stored as a tuple.

    Raises
    ------
    EnsembleError
        No histories, or an element that is not a MergeHistory.

    Examples
    --------
    >>> from spd_math import MergeHistory, MergeHistoryEnsemble
    >>> ensemble = MergeHistoryEnsemble([MergeHistory(labels=["a:0", "a:1"], group_idxs=[[0, 0]]),
    ...                                  MergeHistory(labels=["a:1", "b:0"], group_idxs=[[0, 0], [0, 0]])])
    >>> ensemble.n_ensemble, ensemble.n_iters_range
    (2, (1, 2))
    >>> ensemble.normalized().component_labels
    ['a:0', 'a:1', 'b:0']
    >>> ensemble.get_distances("perm_invariant_hamming").shape
    torch.Size([1, 2, 2])
    """

    histories: tuple[MergeHistory, ...]

    def __post_init__(self) -> None:
        histories = tuple(self.histories)
        _check_histories(histories)
        object.__setattr__(self, "histories", histories)

    def __repr__(self) -> str:
        low, high = self.n_iters_range
        return f"MergeHistoryEnsemble({self.n_ensemble} members, {low:,}-{high:,} iterations)"

    def __len__(self) -> int:
        return len(self.histories)

    def __iter__(self) -> Iterator[MergeHistory]:
        return iter(self.histories)

    def __getitem__(self, index: int) -> MergeHistory:
        return self.histories[index]

    @property
    def data(self) -> list[MergeHistory]:
        """The histories as a list (the original's attribute name)."""
        return list(self.histories)

    @property
    def n_ensemble(self) -> int:
        return len(self.histories)

    @property
    def n_iters_min(self) -> int:
        return min(history.n_iters for history in self.histories)

    @property
    def n_iters_max(self) -> int:
        return max(history.n_iters for history in self.histories)

    @property
    def n_iters_range(self) -> tuple[int, int]:
        return self.n_iters_min, self.n_iters_max

    def normalized(self) -> NormalizedHistories:
        """Every member on the sorted union of labels (`normalize_ensemble`)."""
        return normalize_ensemble(self.histories)

    def get_distances(self, method: str = "perm_invariant_hamming") -> torch.Tensor:
        """`[n_iters, n_ens, n_ens]` distances between the members' partitions (`compute_distances` on
        `normalized()`)."""
        from spd_math.distances import compute_distances  # distances imports this module

        return compute_distances(self.normalized(), method)


def _check_histories(histories: Sequence[MergeHistory]) -> None:
    if len(histories) == 0:
        raise EnsembleError("histories: expected at least one merge history, got none")
    for m, history in enumerate(histories):
        if not isinstance(history, MergeHistory):
            raise EnsembleError(f"histories[{m}]: expected a MergeHistory, got {type(history).__name__}")


def history_metadata(history: MergeHistory) -> dict[str, Any]:
    """What the original keeps of one history as its `meta`: the `metadata.json` of its zip (`merge_config`,
    `c_components`, `n_iters_current`, `labels`, and our `seed` when the history has one)."""
    metadata: dict[str, Any] = {
        "merge_config": history.config.to_dict() if history.config is not None else None,
        "c_components": history.c_components,
        "n_iters_current": history.n_iters,
        "labels": list(history.labels),
    }
    if history.seed is not None:
        metadata["seed"] = int(history.seed)
    return metadata


def ensemble_metadata(histories: Sequence[MergeHistory], labels: Sequence[str],
                      origin_paths: Sequence[str] | None = None) -> dict[str, Any]:
    """The original's ensemble metadata (what its `MergeHistoryEnsemble.normalized()` returns beside the array,
    and `ensemble_meta.json` holds), from what our histories record; `origin_paths` are the members' history files
    (the original reads its histories from files, and its `meta` names each one as `origin_path`)."""
    iterations = [history.n_iters for history in histories]
    configs = [history.config.to_dict() if history.config is not None else None for history in histories]
    metadatas = [history_metadata(history) for history in histories]
    if origin_paths is not None:
        metadatas = [{**metadata, "origin_path": str(path)} for metadata, path in zip(metadatas, origin_paths, strict=True)]
    return {
        "component_labels": list(labels),
        "n_ensemble": len(histories),
        "n_iters_min": min(iterations),
        "n_iters_max": max(iterations),
        "n_iters_range": (min(iterations), max(iterations)),
        "c_components": len(labels),
        # The original requires one config; ours may mix them, which is said by None.
        "config": configs[0] if all(config == configs[0] for config in configs) else None,
        "history_metadatas": metadatas,
    }


def normalize_ensemble(histories: Sequence[MergeHistory] | MergeHistoryEnsemble) -> NormalizedHistories:
    """Put every member on the sorted union of labels, over the iterations all members completed (docs/math.md §8).

    Parameters
    ----------
    histories : sequence of MergeHistory, or MergeHistoryEnsemble

    Returns
    -------
    NormalizedHistories
        A `NormalizedEnsemble` that also carries the original's names and ensemble metadata.

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
    if isinstance(histories, MergeHistoryEnsemble):
        histories = histories.histories
    _check_histories(histories)
    labels = sorted({label for history in histories for label in history.labels})
    position = {label: x for x, label in enumerate(labels)}
    n_iters = min(history.n_iters for history in histories)
    present = np.zeros((len(histories), len(labels)), dtype=bool)
    member_columns = []
    for m, history in enumerate(histories):
        columns = np.fromiter((position[label] for label in history.labels), dtype=np.int64, count=len(history.labels))
        present[m, columns] = True
        member_columns.append(columns)
    metadata = ensemble_metadata(histories, labels)
    if all(history.is_merge_sequence for history in histories):
        member_merges = torch.stack([history.merge_pairs[:n_iters] for history in histories])
        ensemble = NormalizedEnsemble(labels=labels, present=torch.from_numpy(present), member_columns=member_columns,
                                      member_merges=member_merges)
        return NormalizedHistories.aligned(ensemble, metadata)
    # Partitions given as they are (no merges to keep): aligned as one array.
    merges = np.empty((len(histories), n_iters, len(labels)), dtype=np.int64)
    for m, history in enumerate(histories):
        columns = member_columns[m]
        missing = np.flatnonzero(~present[m])
        member_merges = history.dense_group_idxs(0, n_iters)
        merges[m][:, columns] = member_merges
        # Ids above every real group id of this member are free for the missing labels' singletons.
        first_free = int(member_merges.max()) + 1 if member_merges.size else 0
        merges[m][:, missing] = first_free + np.arange(missing.size)
    return NormalizedHistories(torch.from_numpy(merges), labels, metadata, present=torch.from_numpy(present))
