"""The record of one merge run (docs/math.md §7): its merges, from which every partition follows."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from spd_math import replay
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


def _integer_tensor(name: str, value: Any) -> torch.Tensor | None:
    if value is None:
        return None
    tensor = as_tensor(name, value, HistoryError, allow_sequence=True)
    if tensor.is_floating_point() or tensor.dtype == torch.bool or tensor.is_complex():
        raise HistoryError(f"{name}: expected integer group ids, got dtype {tensor.dtype}")
    return tensor


@dataclass(frozen=True, init=False, eq=False)
class MergeHistory:
    """One merge run: the pair of groups each merge joined, plus the per-iteration diagnostics when known
    (docs/math.md §7). O(c + iters) numbers; partitions are derived from them exactly.

    The partition after iteration `i` numbers groups by their smallest member (docs/math.md §6), so
    `k_groups[i] == c - i - 1`: `partition_at(i)` gives it, `partitions()` each in turn, and
    `group_idxs` all of them as one `[n_iters, c]` tensor (made, and kept, only when asked for: at real
    scale that is gigabytes). Histories read from older files may lack the diagnostics.

    Parameters
    ----------
    labels : list of str
        `[c]` component labels.
    group_idxs : tensor or array, optional
        `[n_iters, c]` integer group ids after every merge, instead of the merges: kept as given when they are
        not a merge sequence in the numbering of §6 (ids of another numbering, or rows that are not one merge
        apart), else only their merges are kept.
    selected_pairs : tensor or array, optional
        `[n_iters, 2]` the pairs as sampled (pre-merge group ids, in the order sampled); without
        `group_idxs` they are the merges.
    k_groups : tensor or array, optional
        `[n_iters]` groups after each merge; derived when omitted.
    pair_costs, mdl_losses : tensor or array, optional
        `[n_iters]` cost of the chosen pair and the MDL loss after each merge.
    config : MergeConfig, optional
    seed : int, optional
        The seed the run's sampler used.
    merge_pairs : tensor or array, optional
        `[n_iters, 2]` (lower, higher) pre-merge group ids of each merge; default `selected_pairs` sorted.

    Attributes
    ----------
    merge_pairs : torch.Tensor or None
        `[n_iters, 2]` int64 (lower, higher) group ids each merge joined; None when the history holds
        partitions that are no merge sequence (then `partitions` holds them).

    Raises
    ------
    HistoryError
        Shapes that do not agree, non-integer group ids, or merges that are not two different groups.

    Examples
    --------
    >>> import numpy as np
    >>> from spd_math import MergeHistory
    >>> history = MergeHistory(labels=["a:0", "a:1", "a:2"], group_idxs=np.array([[0, 0, 1], [0, 0, 0]]))
    >>> history.n_iters, history.k_groups.tolist(), history.merge_pairs.tolist()
    (2, [2, 1], [[0, 1], [0, 1]])
    >>> compact = MergeHistory(labels=["a:0", "a:1", "a:2", "b:0"], selected_pairs=[[2, 1], [0, 1]])
    >>> compact.partition_at(0).tolist(), compact.partition_at(-1).tolist()
    ([0, 1, 1, 2], [0, 0, 0, 1])
    >>> compact.merged_components(1).tolist()
    [0, 1, 2]
    """

    labels: list[str]
    merge_pairs: torch.Tensor | None
    selected_pairs: torch.Tensor | None
    k_groups: torch.Tensor
    pair_costs: torch.Tensor | None
    mdl_losses: torch.Tensor | None
    config: MergeConfig | None
    seed: int | None
    partitions: torch.Tensor | None  # group ids as given, only where they are no merge sequence

    def __init__(self, labels: Any, group_idxs: Any = None, selected_pairs: Any = None, k_groups: Any = None,
                 pair_costs: Any = None, mdl_losses: Any = None, config: MergeConfig | None = None,
                 seed: int | None = None, *, merge_pairs: Any = None, partitions: Any = None) -> None:
        if group_idxs is None:
            group_idxs = partitions  # the field's name (`dataclasses.replace` passes every field)
        if not isinstance(labels, list):
            labels = [str(label) for label in np.asarray(labels).reshape(-1)]
        if config is not None and not isinstance(config, MergeConfig):
            raise HistoryError(f"config: expected a MergeConfig or None, got {type(config).__name__}")
        c = len(labels)
        group_idxs = _integer_tensor("group_idxs", group_idxs)
        selected_pairs = _integer_tensor("selected_pairs", selected_pairs)
        merge_pairs = _integer_tensor("merge_pairs", merge_pairs)
        partitions = None
        if selected_pairs is not None and (selected_pairs.ndim != 2 or selected_pairs.shape[1] != 2):
            raise HistoryError(f"selected_pairs: expected shape [n_iters, 2], got {tuple(selected_pairs.shape)}")
        if group_idxs is not None:
            if group_idxs.ndim != 2:
                raise HistoryError(f"group_idxs: expected a 2-D [n_iters, c] tensor, got shape {tuple(group_idxs.shape)}")
            if group_idxs.shape[1] != c:
                raise HistoryError(f"labels: expected {group_idxs.shape[1]} labels (one per group_idxs column), got {c}")
            derived, invalid = replay.merge_pairs_of_partitions(group_idxs.detach().cpu().numpy())
            if invalid == replay.ALL_VALID:
                merge_pairs = torch.from_numpy(derived)
            else:
                partitions = group_idxs
        elif merge_pairs is None:
            if selected_pairs is None:
                raise HistoryError("expected the merges: selected_pairs (or merge_pairs, or group_idxs), got none")
            merge_pairs = torch.sort(selected_pairs, dim=1).values
        n_iters = group_idxs.shape[0] if group_idxs is not None else merge_pairs.shape[0]
        if partitions is None:
            merge_pairs = merge_pairs.to(torch.int64)
            _check_rows("merge_pairs", merge_pairs, n_iters, (2,))
        values = {"merge_pairs": merge_pairs if partitions is None else None, "selected_pairs": selected_pairs,
                  "k_groups": k_groups, "pair_costs": pair_costs, "mdl_losses": mdl_losses, "partitions": partitions}
        for name in ("k_groups", "pair_costs", "mdl_losses"):
            if values[name] is not None:
                values[name] = as_tensor(name, values[name], HistoryError, allow_sequence=True)
        _check_rows("selected_pairs", selected_pairs, n_iters, (2,))
        for name in ("k_groups", "pair_costs", "mdl_losses"):
            _check_rows(name, values[name], n_iters)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "config", config)
        object.__setattr__(self, "seed", seed)
        for name, value in values.items():
            object.__setattr__(self, name, value)
        object.__setattr__(self, "_cache", {})
        if partitions is None:
            reps, invalid = replay.representatives(merge_pairs.numpy(), c)
            if invalid != replay.ALL_VALID:
                k = c - invalid
                raise HistoryError(f"merge_pairs[{invalid}]: expected two different group ids in 0..{k - 1} (the "
                                   f"{k} groups before merge {invalid}), got {merge_pairs[invalid].tolist()}")
            self._cache["reps"] = reps
        if self.k_groups is None:
            if partitions is None:
                k = torch.arange(c - 1, c - 1 - n_iters, -1, dtype=torch.int64)
            else:  # the number of distinct groups in each given partition
                k = torch.tensor([int(row.unique().numel()) for row in partitions], dtype=torch.int64)
            object.__setattr__(self, "k_groups", k)

    def __getstate__(self) -> dict:  # what is derived (and may be large) is made again after unpickling
        return {name: value for name, value in self.__dict__.items() if name != "_cache"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        object.__setattr__(self, "_cache", {})

    def __repr__(self) -> str:  # short: a history of real size has tens of thousands of labels
        k = f", k {int(self.k_groups[0]):,} -> {int(self.k_groups[-1]):,}" if self.n_iters else ""
        seed = f", seed {self.seed}" if self.seed is not None else ""
        return f"MergeHistory({len(self.labels):,} components, {self.n_iters:,} merges{k}{seed})"

    @property
    def n_iters(self) -> int:
        return int(self.k_groups.shape[0])

    @property
    def c_components(self) -> int:
        return len(self.labels)

    @property
    def is_merge_sequence(self) -> bool:
        """Whether the partitions follow from `merge_pairs` (always, for histories a merge made)."""
        return self.partitions is None

    def merge_representatives(self) -> np.ndarray:
        """`[n_iters, 2]` int64: the smallest component of each of the two groups every merge joined (lower group
        first). Raises HistoryError for partitions that are no merge sequence."""
        if "reps" not in self._cache:
            if self.partitions is not None:
                raise HistoryError("this history holds partitions that are not one merge apart (or are numbered "
                                   "otherwise than by smallest member), so it has no merges to replay")
            self._cache["reps"] = replay.representatives(self.merge_pairs.numpy(), self.c_components)[0]
        return self._cache["reps"]

    def _iteration(self, iteration: int) -> int:
        index = int(iteration)
        if index < 0:
            index += self.n_iters
        if not 0 <= index < self.n_iters:
            raise HistoryError(f"iteration: expected 0..{self.n_iters - 1} (the history has {self.n_iters} merges), "
                               f"got {iteration}")
        return index

    def partition_at(self, iteration: int) -> np.ndarray:
        """`[c]` int64 group ids after merge `iteration` (negative counts from the end), without the others."""
        index = self._iteration(iteration)
        if self.partitions is not None:
            return self.partitions[index].numpy().astype(np.int64)
        return replay.partition_at(self.merge_representatives(), self.c_components, index)

    def merged_components(self, iteration: int) -> np.ndarray:
        """The components merge `iteration` changed (sorted): every component of the group it formed, the only
        ones whose group is another set of components after it than before."""
        index = self._iteration(iteration)
        partition = self.partition_at(index)
        return np.flatnonzero(partition == partition[int(self.merge_representatives()[index, 0])])

    def partitions_between(self, start: int = 0, stop: int | None = None) -> Iterator[np.ndarray]:
        """Each partition after merges `start .. stop - 1` in turn (`[c]` int64 arrays), made a few MB at a time."""
        stop = self.n_iters if stop is None else min(int(stop), self.n_iters)
        if self.partitions is not None:
            for index in range(start, stop):
                yield self.partitions[index].numpy().astype(np.int64)
            return
        yield from replay.iter_partitions(self.merge_pairs.numpy(), self.merge_representatives(), self.c_components,
                                          start, stop)

    def dense_group_idxs(self, start: int = 0, stop: int | None = None, dtype=np.int64) -> np.ndarray:
        """`[stop - start, c]` group ids after merges `start .. stop - 1` as one array (not kept)."""
        stop = self.n_iters if stop is None else min(int(stop), self.n_iters)
        if self.partitions is not None:
            return self.partitions[start:stop].numpy().astype(dtype)
        return replay.dense_partitions(self.merge_pairs.numpy(), self.merge_representatives(), self.c_components,
                                       start, stop, dtype)

    @property
    def group_idxs(self) -> torch.Tensor:
        """`[n_iters, c]` int64 group ids after every merge: made on first use and kept (n_iters x c x 8 bytes;
        `partition_at` and `partitions_between` give parts without it)."""
        if self.partitions is not None:
            return self.partitions
        if "group_idxs" not in self._cache:
            self._cache["group_idxs"] = torch.from_numpy(self.dense_group_idxs())
        return self._cache["group_idxs"]
