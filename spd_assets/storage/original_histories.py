"""Merge history files the original research code wrote, in either of its two formats, as spd_math histories.

Both are zips of `merge.group_idxs.npy`, `merge.k_groups.npy`, `selected_pairs.npy`,
`labels.txt` and `metadata.json`; the metadata tells them apart:

- **current** (since late 2025; `storage.history_format`, exact both ways): metadata
  `merge_config`, `c_components`, `n_iters_current`, `labels`. Row i is the partition *after*
  merge i, as in spd_math.
- **September 2025** (spd commit 7ff6246): metadata `config` (the merge keys, plus the run keys of
  a `MergeRunConfig` and `pop_component_prob`), `wandb_url`, `c_components`, `n_iters_current`.
  Row i is the partition *before* merge i (row 0 is every component alone) and
  `selected_pairs[i]` the pair merged from it, so the partition after the last merge is in no
  row: it is made here by merging that pair, by the rule the original merges with (the pair's
  higher group joins the lower, the ids above it move down by one). Every other row is checked
  to be its predecessor with its pair merged.

What the September format lacks, so a history read from it lacks too: the merge-pair costs and
MDL losses (the current format has none either, so the consensus iteration then needs
`consensus.iteration` or `consensus.k`), the seed of the pair sampler, and the labels in the
metadata (only `labels.txt` has them). Its `wandb_url` and run keys have no place in a history;
`read_original_history` returns them beside it. A history merged with `pop_component_prob > 0`
(random popping, not the math implemented here) is refused.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from spd_assets.errors import HistoryFormatError
from spd_assets.storage.history_format import PartitionsEntry, read_history_zip
from spd_math import MergeHistory
from spd_math.config import ConfigError, MergeConfig

CURRENT = "current"
SEPTEMBER_2025 = "september-2025"
ENTRIES = ("merge.group_idxs.npy", "merge.k_groups.npy", "selected_pairs.npy", "labels.txt", "metadata.json")
SEPTEMBER_KEYS = ("config", "c_components", "n_iters_current")
CURRENT_KEYS = ("merge_config", "c_components", "n_iters_current", "labels")
MERGE_KEYS = tuple(MergeConfig.__dataclass_fields__)


@dataclass(frozen=True)
class OriginalHistory:
    """A history read from an original file: the format it was in, and what the file held beyond the history."""

    history: MergeHistory
    format: str
    extras: dict[str, Any] = field(default_factory=dict)


def history_format_of(path: str | os.PathLike[str]) -> str:
    """`CURRENT` or `SEPTEMBER_2025`, from the file's metadata keys; HistoryFormatError for a file in neither."""
    metadata = _metadata(path)
    if all(key in metadata for key in CURRENT_KEYS):
        return CURRENT
    if all(key in metadata for key in SEPTEMBER_KEYS) and "merge_config" not in metadata:
        return SEPTEMBER_2025
    raise HistoryFormatError(
        f"{path}: a zip in neither history format of the original: its metadata.json has the keys "
        f"{sorted(metadata)}; expected {list(CURRENT_KEYS)} (current) or {list(SEPTEMBER_KEYS)} and wandb_url "
        "(September 2025)")


def read_original_history(path: str | os.PathLike[str]) -> OriginalHistory:
    """Read a history file in either original format (see the module docstring)."""
    kind = history_format_of(path)
    if kind == CURRENT:
        return OriginalHistory(read_history_zip(path), CURRENT)
    return read_september_history(path)


def read_labels(path: str | os.PathLike[str]) -> list[str]:
    """The component labels of a history file of either format (`labels.txt` only: cheap)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.read("labels.txt").decode("utf-8").splitlines()
    except KeyError as error:
        raise HistoryFormatError(f"{path}: no labels.txt; expected a merge history zip") from error
    except (zipfile.BadZipFile, zlib.error, EOFError, UnicodeDecodeError) as error:
        raise HistoryFormatError(f"{path}: not a readable zip archive ({error})") from error


def read_september_history(path: str | os.PathLike[str]) -> OriginalHistory:
    """Read a September 2025 history, rows moved to 'after merge i' (the last one made from the last pair).

    Its rows are read a block at a time and checked against the merges its pairs make, so memory stays bounded
    whatever the history's length; a file whose first row is not every component alone is kept as it is.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            missing = [name for name in ENTRIES if name not in archive.namelist()]
            if missing:
                raise HistoryFormatError(f"{path}: missing entries {missing}; a September 2025 history holds {list(ENTRIES)}")
            k_groups = _array(archive, path, "merge.k_groups.npy", 1)
            pairs = _array(archive, path, "selected_pairs.npy", 2)
            labels = archive.read("labels.txt").decode("utf-8").splitlines()
            metadata = json.loads(archive.read("metadata.json").decode("utf-8"))
            c, n = metadata["c_components"], metadata["n_iters_current"]
            if not (isinstance(c, int) and isinstance(n, int) and c >= 0 and n >= 0):
                raise HistoryFormatError(f"{path}: c_components and n_iters_current must be non-negative integers, "
                                         f"got {c!r} and {n!r}")
            rows = PartitionsEntry(archive, path, "merge.group_idxs.npy")
            if len(labels) != c or rows.shape[1:] != (c,):
                raise HistoryFormatError(f"{path}: {len(labels)} labels and group_idxs of shape {rows.shape}, but "
                                         f"c_components is {c}")
            if not rows.shape[0] == k_groups.shape[0] == pairs.shape[0] >= n or pairs.shape[1:] != (2,):
                raise HistoryFormatError(f"{path}: n_iters_current is {n} but group_idxs, k_groups and selected_pairs "
                                         f"have shapes {rows.shape}, {k_groups.shape}, {pairs.shape}")
            config = _merge_config(metadata["config"], path)
            pairs = pairs[:n].astype(np.int64)
            if n and not np.array_equal(k_groups[:n], c - np.arange(n)):
                raise HistoryFormatError(f"{path}: k_groups must count c_components - i groups before merge i; got "
                                         f"{k_groups[:n][:5].tolist()}... for c_components {c}")
            k_after = torch.from_numpy(c - 1 - np.arange(n, dtype=np.int64))
            first = next(rows.blocks(1), None) if n else None
            if first is None or np.array_equal(first[0], np.arange(c)):
                history = _merge_sequence(path, rows, labels, pairs, k_after, config)
            else:  # partitions that do not start from every component alone: kept as they are
                history = _dense_history(path, rows, labels, pairs, k_after, config)
    except (zipfile.BadZipFile, zlib.error, EOFError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise HistoryFormatError(f"{path}: not a readable September 2025 history ({error})") from error
    run_keys = {key: value for key, value in metadata["config"].items()
                if key not in MERGE_KEYS and key != "pop_component_prob"}
    return OriginalHistory(history, SEPTEMBER_2025, {"wandb_url": metadata.get("wandb_url"), "run_config": run_keys})


def _check_pairs(path, pairs: np.ndarray, c: int) -> None:
    k = c - np.arange(pairs.shape[0])
    bad = np.flatnonzero((pairs.min(axis=1) < 0) | (pairs.max(axis=1) >= k) | (pairs[:, 0] == pairs[:, 1]))
    if bad.size:
        i = int(bad[0])
        raise HistoryFormatError(f"{path}: selected_pairs[{i}] is {pairs[i].tolist()}; expected two different groups "
                                 f"of the {int(k[i])} before merge {i}")


def _merge_sequence(path, rows: PartitionsEntry, labels, pairs: np.ndarray, k_after, config) -> MergeHistory:
    """Row 0 is every component alone: the history is the pairs' merges, and every later row must be the
    partition they make (checked block by block)."""
    _check_pairs(path, pairs, len(labels))
    history = MergeHistory(labels=labels, selected_pairs=torch.from_numpy(pairs), k_groups=k_after, config=config)
    n = pairs.shape[0]
    start = 0
    for block in rows.blocks(n):  # rows 0..n-1; row i + 1 must be the partition after merge i
        stop = start + block.shape[0]
        expected = history.dense_group_idxs(max(start - 1, 0), stop - 1)
        given = block[1:] if start == 0 else block
        different = np.flatnonzero((given != expected).any(axis=1))
        if different.size:
            i = int(different[0]) + max(start - 1, 0)
            raise HistoryFormatError(f"{path}: row {i + 1} of group_idxs is not row {i} with pair "
                                     f"{pairs[i].tolist()} merged; not a September 2025 history without popping")
        start = stop
    return history


def _dense_history(path, rows: PartitionsEntry, labels, pairs: np.ndarray, k_after, config) -> MergeHistory:
    """Rows that do not start from every component alone, moved to 'after merge i' as they are."""
    n, c = pairs.shape[0], len(labels)
    before = np.concatenate([block.astype(np.int64) for block in rows.blocks(n)])
    after = np.empty_like(before)
    for i in range(n):
        after[i] = _merged(before[i], pairs[i], c - i, path, i)
        if i + 1 < n and not np.array_equal(after[i], before[i + 1]):
            raise HistoryFormatError(f"{path}: row {i + 1} of group_idxs is not row {i} with pair "
                                     f"{pairs[i].tolist()} merged; not a September 2025 history without popping")
    return MergeHistory(labels=labels, group_idxs=torch.from_numpy(after), selected_pairs=torch.from_numpy(pairs),
                        k_groups=k_after, config=config)


def _merged(row: np.ndarray, pair: np.ndarray, k: int, path, i: int) -> np.ndarray:
    """The original's `GroupMerge.merge_groups`: the higher group joins the lower; ids above it move down one."""
    low, high = int(pair.min()), int(pair.max())
    if low < 0 or high >= k or low == high:
        raise HistoryFormatError(f"{path}: selected_pairs[{i}] is {pair.tolist()}; expected two different groups "
                                 f"of the {k} before merge {i}")
    merged = row.copy()
    merged[merged == high] = low
    merged[merged > high] -= 1
    return merged


def _array(archive: zipfile.ZipFile, path, name: str, ndim: int) -> np.ndarray:
    try:
        values = np.lib.format.read_array(io.BytesIO(archive.read(name)), allow_pickle=False)
    except (ValueError, EOFError, OSError) as error:
        raise HistoryFormatError(f"{path}: {name} is not a readable .npy array ({error})") from error
    if values.ndim != ndim or not np.issubdtype(values.dtype, np.integer):
        raise HistoryFormatError(f"{path}: {name} must be a {ndim}-D integer array, got {values.dtype} {values.shape}")
    return values


def _merge_config(values: Any, path) -> MergeConfig:
    if not isinstance(values, dict):
        raise HistoryFormatError(f"{path}: metadata.json config must be a mapping, got {type(values).__name__}")
    popping = values.get("pop_component_prob", 0) or 0
    if popping:
        raise HistoryFormatError(f"{path}: merged with pop_component_prob {popping}: random popping of components "
                                 "is not the merge implemented here (only 0 is)")
    try:
        return MergeConfig.from_dict({key: values[key] for key in MERGE_KEYS if key in values})
    except (ConfigError, TypeError) as error:
        raise HistoryFormatError(f"{path}: metadata.json config cannot be loaded ({error})") from error


def _metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    try:
        with zipfile.ZipFile(path) as archive:
            text = archive.read("metadata.json").decode("utf-8")
    except KeyError as error:
        raise HistoryFormatError(f"{path}: a zip without metadata.json; expected a merge history of the original "
                                 f"(entries {list(ENTRIES)})") from error
    except (zipfile.BadZipFile, zlib.error, EOFError, UnicodeDecodeError) as error:
        raise HistoryFormatError(f"{path}: not a readable zip archive ({error})") from error
    try:
        metadata = json.loads(text)
    except json.JSONDecodeError as error:
        raise HistoryFormatError(f"{path}: metadata.json is not valid JSON ({error})") from error
    if not isinstance(metadata, dict):
        raise HistoryFormatError(f"{path}: metadata.json must hold a JSON object, got {type(metadata).__name__}")
    return metadata
