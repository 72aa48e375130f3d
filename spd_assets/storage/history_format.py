"""Merge histories in the original research implementation's zip format, so runs move both ways.

A history file is an uncompressed (stored) zip with these entries, named, typed and ordered as
the original writes them:

    merge.group_idxs.npy   [iters, c] int16   group of each component after each merge
    merge.k_groups.npy     [iters] int16      number of groups after each merge
    selected_pairs.npy     [iters, 2] int16   the pair merged at each iteration
    labels.txt             the component labels, one a line, no trailing newline
    metadata.json          {"merge_config", "c_components", "n_iters_current", "labels"}

Ids are int16 like the original's; a history with more than 2**15 components has ids that do
not fit, and its id arrays are written as int32 instead.

Our histories carry more, stored where original readers ignore it: `merge.pair_costs.npy` and
`merge.mdl_losses.npy` (float64 [iters]) as extra entries and `seed` as an extra metadata key,
each written only when known. `selected_pairs.npy` is left out when the history has none.
Reading treats all of these as optional, so files written by the original load as they are.

The partitions are most of such a file (iters x c ids: 2.2 GB for 33k components merged to the
end), so both ways go a block of partitions at a time: writing replays them from the history's
merges, reading recovers the merges from them (keeping the partitions as they are only for a
file whose rows are not one merge apart), and memory stays a few MB whatever the file's size.
"""

from __future__ import annotations

import io
import json
import os
import time
import zipfile
import zlib
from typing import Any

import numpy as np
import torch

from spd_assets.errors import HistoryFormatError
from spd_assets.storage.atomic import atomic_path
from spd_math import replay
from spd_math.config import ConfigError, MergeConfig
from spd_math.ensemble import history_metadata
from spd_math.history import MergeHistory

GROUP_IDXS = "merge.group_idxs.npy"
K_GROUPS = "merge.k_groups.npy"
SELECTED_PAIRS = "selected_pairs.npy"
LABELS = "labels.txt"
METADATA = "metadata.json"
PAIR_COSTS = "merge.pair_costs.npy"
MDL_LOSSES = "merge.mdl_losses.npy"

REQUIRED_ENTRIES = (GROUP_IDXS, K_GROUPS, LABELS, METADATA)
# Group ids written or read at once: bounds the memory of a history of any length to a few MB.
PARTITION_BLOCK_IDS = 1 << 22
# Entries at least this large need zip64 headers (written only where needed, as zipfile does for known sizes).
LARGE_ENTRY_BYTES = zipfile.ZIP64_LIMIT - (1 << 16)
REQUIRED_METADATA_KEYS = ("merge_config", "c_components", "n_iters_current", "labels")


def write_history_zip(history: MergeHistory, path: str | os.PathLike[str]) -> None:
    """Write `history` to `path` in the original format; readers see the old file or the complete new one.

    The `[iters, c]` partitions are replayed from the merges and written a few MB at a time, so memory stays
    bounded whatever the history's length (the file itself is iters x c x 2 bytes: `dense_bytes`).
    """
    c = history.c_components
    id_dtype = np.int16 if c - 1 <= np.iinfo(np.int16).max else np.int32
    multiline = [label for label in history.labels if "\n" in label]
    if multiline:
        raise HistoryFormatError(f"{path}: {LABELS} holds one label a line, so labels cannot contain newlines: {multiline[:3]}")

    entries = {K_GROUPS: _npy_bytes(_id_array(path, "k_groups", history.k_groups.numpy(), id_dtype))}
    if history.selected_pairs is not None:
        entries[SELECTED_PAIRS] = _npy_bytes(_id_array(path, "selected_pairs", history.selected_pairs.numpy(), id_dtype))
    entries[LABELS] = "\n".join(history.labels).encode("utf-8")
    entries[METADATA] = json.dumps(history_metadata(history)).encode("utf-8")
    for name, values in ((PAIR_COSTS, history.pair_costs), (MDL_LOSSES, history.mdl_losses)):
        if values is not None:
            entries[name] = _npy_bytes(values.detach().cpu().numpy().astype(np.float64))

    with atomic_path(path) as temporary, zipfile.ZipFile(temporary, "w", zipfile.ZIP_STORED) as archive:
        _write_partitions(archive, path, history, id_dtype)
        for name, data in entries.items():
            archive.writestr(name, data)


def dense_bytes(history: MergeHistory) -> int:
    """Bytes of the `[iters, c]` partitions in the original's history file (the bulk of it)."""
    itemsize = 2 if history.c_components - 1 <= np.iinfo(np.int16).max else 4
    return history.n_iters * history.c_components * itemsize


def _write_partitions(archive: zipfile.ZipFile, path, history: MergeHistory, id_dtype: type[np.integer]) -> None:
    """The `merge.group_idxs.npy` entry, as `np.save` writes it, streamed a block of partitions at a time."""
    c = history.c_components
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(id_dtype)), "fortran_order": False,
              "shape": (history.n_iters, c)}
    block = max(1, PARTITION_BLOCK_IDS // max(c, 1))
    large = dense_bytes(history) > LARGE_ENTRY_BYTES
    # Stamped and permitted as `writestr` stamps the other entries.
    info = zipfile.ZipInfo(GROUP_IDXS, date_time=time.localtime(time.time())[:6])
    info.compress_type = zipfile.ZIP_STORED
    info.external_attr = 0o600 << 16
    with archive.open(info, "w", force_zip64=large) as entry:
        np.lib.format.write_array_header_1_0(entry, header)
        for start in range(0, history.n_iters, block):
            rows = history.dense_group_idxs(start, min(start + block, history.n_iters))
            entry.write(_id_array(path, "group_idxs", rows, id_dtype).tobytes())


def read_history_zip(path: str | os.PathLike[str]) -> MergeHistory:
    """Read a history written by `write_history_zip` or by the original implementation.

    Raises HistoryFormatError when the file is not such a zip or its parts disagree; a missing or
    unreadable path raises the usual OSError.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            return _read_archive(archive, path)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as error:
        raise HistoryFormatError(f"{path}: not a readable zip archive ({error})") from error


def _npy_bytes(values: np.ndarray) -> bytes:
    # Through a buffer: np.save on a path would append ".npy" to names lacking it.
    buffer = io.BytesIO()
    np.save(buffer, values, allow_pickle=False)
    return buffer.getvalue()


def _id_array(path: str | os.PathLike[str], name: str, original: np.ndarray, dtype: type[np.integer]) -> np.ndarray:
    converted = original.astype(dtype)
    # A narrowing cast wraps silently; refuse rather than write wrong ids.
    if not np.array_equal(converted, original):
        raise HistoryFormatError(f"{path}: {name} holds values outside the {np.dtype(dtype).name} range of the format")
    return converted


def _read_archive(archive: zipfile.ZipFile, path: str | os.PathLike[str]) -> MergeHistory:
    present = set(archive.namelist())
    missing = [name for name in REQUIRED_ENTRIES if name not in present]
    if missing:
        raise HistoryFormatError(f"{path}: missing entries {missing}; the archive holds {sorted(present)}")

    metadata = _read_metadata(archive, path)
    labels = metadata["labels"]
    c = metadata["c_components"]
    label_lines = _read_text(archive, path, LABELS).split("\n")
    if label_lines != labels:
        raise HistoryFormatError(f"{path}: {LABELS} disagrees with the labels in {METADATA}: {_first_difference(label_lines, labels)}")
    if len(labels) != c:
        raise HistoryFormatError(f"{path}: {METADATA} lists {len(labels)} labels but c_components is {c}")

    partitions = PartitionsEntry(archive, path, GROUP_IDXS)
    if partitions.shape[1] != c:
        raise HistoryFormatError(f"{path}: {GROUP_IDXS} has {partitions.shape[1]} columns but c_components is {c}")
    per_iteration = {K_GROUPS: _read_array(archive, path, K_GROUPS, ndim=1, kind="integer")}
    if SELECTED_PAIRS in present:
        selected_pairs = _read_array(archive, path, SELECTED_PAIRS, ndim=2, kind="integer")
        if selected_pairs.shape[1] != 2:
            raise HistoryFormatError(f"{path}: {SELECTED_PAIRS} must have shape [iters, 2], got {selected_pairs.shape}")
        per_iteration[SELECTED_PAIRS] = selected_pairs
    for name in (PAIR_COSTS, MDL_LOSSES):
        if name in present:
            per_iteration[name] = _read_array(archive, path, name, ndim=1, kind="floating")
    rows = {GROUP_IDXS: partitions.shape[0], **{name: values.shape[0] for name, values in per_iteration.items()}}
    if len(set(rows.values())) != 1:
        raise HistoryFormatError(f"{path}: per-iteration entries disagree on the number of iterations: {rows}")

    # The original preallocates rows for every planned iteration and fills n_iters_current of
    # them; a run that stopped early leaves unfilled rows behind, which are not part of the history.
    n_iters = metadata["n_iters_current"]
    if n_iters > rows[GROUP_IDXS]:
        raise HistoryFormatError(f"{path}: {METADATA} n_iters_current is {n_iters} but the entries hold only {rows[GROUP_IDXS]} iterations")
    kept = {name: values[:n_iters] for name, values in per_iteration.items()}
    merge_pairs, dense = partitions.merges(n_iters)

    def tensor(name: str, dtype: type[np.generic]) -> torch.Tensor | None:
        return torch.from_numpy(kept[name].astype(dtype)) if name in kept else None

    return MergeHistory(
        labels=labels,
        group_idxs=None if dense is None else torch.from_numpy(dense),
        merge_pairs=None if merge_pairs is None else torch.from_numpy(merge_pairs),
        selected_pairs=tensor(SELECTED_PAIRS, np.int64),
        k_groups=tensor(K_GROUPS, np.int64),
        pair_costs=tensor(PAIR_COSTS, np.float64),
        mdl_losses=tensor(MDL_LOSSES, np.float64),
        config=_merge_config(metadata["merge_config"], path),
        seed=metadata.get("seed"),
    )


class PartitionsEntry:
    """The `[iters, c]` integer partitions entry of a history zip, read a block of rows at a time: as the merges
    they are (every row its predecessor with one pair merged, groups numbered by smallest member, as every
    merge writes them), else, for files holding other partitions, as they are."""

    def __init__(self, archive: zipfile.ZipFile, path, name: str) -> None:
        self.archive, self.path, self.name = archive, path, name
        try:
            with archive.open(name) as entry:
                version = np.lib.format.read_magic(entry)
                if version == (1, 0):
                    shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(entry)
                elif version == (2, 0):
                    shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(entry)
                else:
                    shape, fortran_order, dtype = None, True, None  # another version: read whole
                self.offset = entry.tell()
        except (ValueError, EOFError, OSError) as error:
            raise HistoryFormatError(f"{path}: {name} is not a readable .npy array ({error})") from error
        if shape is None or fortran_order or dtype.hasobject:
            whole = _read_array(archive, path, name, ndim=2, kind="integer")
            self.whole: np.ndarray | None = whole
            shape, dtype = whole.shape, whole.dtype
        else:
            self.whole = None
        if len(shape) != 2:
            raise HistoryFormatError(f"{path}: {name} must be 2-D, got shape {shape}")
        if not np.issubdtype(dtype, np.integer):
            raise HistoryFormatError(f"{path}: {name} must hold integer values, got dtype {dtype}")
        self.shape, self.dtype = tuple(int(v) for v in shape), dtype

    def blocks(self, n_rows: int):
        """The first `n_rows` rows, a block at a time."""
        c = self.shape[1]
        block = max(1, PARTITION_BLOCK_IDS // max(c, 1))
        if self.whole is not None:
            for start in range(0, n_rows, block):
                yield self.whole[start:min(start + block, n_rows)]
            return
        with self.archive.open(self.name) as entry:
            entry.seek(self.offset)
            for start in range(0, n_rows, block):
                rows = min(block, n_rows - start)
                data = entry.read(rows * c * self.dtype.itemsize)
                if len(data) != rows * c * self.dtype.itemsize:
                    raise HistoryFormatError(f"{self.path}: {self.name} ends before its {self.shape[0]} rows")
                yield np.frombuffer(data, dtype=self.dtype).reshape(rows, c)

    def merges(self, n_rows: int) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(merge pairs, None) when the first `n_rows` rows are a merge sequence, else (None, the rows as int64)."""
        c = self.shape[1]
        previous = np.arange(c, dtype=np.int64)
        found = []
        for rows in self.blocks(n_rows):
            pairs, invalid = replay.merge_pairs_of_partitions(rows, previous)
            if invalid != replay.ALL_VALID:
                return None, self._dense(n_rows)
            found.append(pairs)
        return (np.concatenate(found) if found else np.zeros((0, 2), dtype=np.int64)), None

    def _dense(self, n_rows: int) -> np.ndarray:
        rows = np.concatenate([block.astype(np.int64) for block in self.blocks(n_rows)]) if n_rows else np.zeros(
            (0, self.shape[1]), dtype=np.int64)
        c = self.shape[1]
        if rows.size and not (0 <= rows.min() and rows.max() < c):
            raise HistoryFormatError(f"{self.path}: {self.name} holds group ids outside 0..{c - 1}")
        return rows


def _first_difference(label_lines: list[str], labels: list[str]) -> str:
    for position, (line, label) in enumerate(zip(label_lines, labels)):
        if line != label:
            return f"line {position + 1} is {line!r}, metadata has {label!r}"
    return f"{len(label_lines)} lines against {len(labels)} labels"


def _read_text(archive: zipfile.ZipFile, path: str | os.PathLike[str], name: str) -> str:
    try:
        return archive.read(name).decode("utf-8")
    except UnicodeDecodeError as error:
        raise HistoryFormatError(f"{path}: {name} is not UTF-8 text ({error})") from error


def _read_metadata(archive: zipfile.ZipFile, path: str | os.PathLike[str]) -> dict[str, Any]:
    try:
        metadata = json.loads(_read_text(archive, path, METADATA))
    except json.JSONDecodeError as error:
        raise HistoryFormatError(f"{path}: {METADATA} is not valid JSON ({error})") from error
    if not isinstance(metadata, dict):
        raise HistoryFormatError(f"{path}: {METADATA} must hold a JSON object, got {type(metadata).__name__}")
    missing = [key for key in REQUIRED_METADATA_KEYS if key not in metadata]
    if missing:
        raise HistoryFormatError(f"{path}: {METADATA} lacks the keys {missing}")
    for key in ("c_components", "n_iters_current"):
        if not _is_count(metadata[key]):
            raise HistoryFormatError(f"{path}: {METADATA} {key} must be a non-negative integer, got {metadata[key]!r}")
    labels = metadata["labels"]
    if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
        raise HistoryFormatError(f"{path}: {METADATA} labels must be a list of strings")
    seed = metadata.get("seed")
    if seed is not None and not _is_count(seed):
        raise HistoryFormatError(f"{path}: {METADATA} seed must be a non-negative integer or null, got {seed!r}")
    return metadata


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _read_array(archive: zipfile.ZipFile, path: str | os.PathLike[str], name: str, *, ndim: int, kind: str) -> np.ndarray:
    try:
        # read_array, not np.load: np.load would also accept a nested zip (npz) or a pickle.
        values = np.lib.format.read_array(io.BytesIO(archive.read(name)), allow_pickle=False)
    except (ValueError, EOFError, OSError) as error:
        raise HistoryFormatError(f"{path}: {name} is not a readable .npy array ({error})") from error
    if values.ndim != ndim:
        raise HistoryFormatError(f"{path}: {name} must be {ndim}-D, got shape {values.shape}")
    expected_type = np.integer if kind == "integer" else np.floating
    if not np.issubdtype(values.dtype, expected_type):
        raise HistoryFormatError(f"{path}: {name} must hold {kind} values, got dtype {values.dtype}")
    return values


def _merge_config(values: Any, path: str | os.PathLike[str]) -> MergeConfig | None:
    if values is None:
        return None
    try:
        return MergeConfig.from_dict(values)
    except ConfigError as error:
        problems = "; ".join(str(error).splitlines())
        raise HistoryFormatError(f"{path}: {METADATA} merge_config cannot be loaded ({problems})") from error
