"""Aligning the merge histories of an ensemble on one set of labels (docs/math.md §8)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np
import torch

from spd_math.distances import compute_distances
from spd_math.errors import EnsembleError
from spd_math.history import MergeHistory
from spd_math.normalized import NormalizedEnsemble
from spd_math.validation import as_tensor

__all__ = ["EnsembleError", "MergeHistoryEnsemble", "NormalizedEnsemble", "NormalizedHistories", "normalize_ensemble"]


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
