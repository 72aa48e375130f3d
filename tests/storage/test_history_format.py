"""Merge history zips: the original implementation's files load, ours load back intact, bad files fail clearly."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from spd_assets.storage.history_format import (
    HistoryFormatError,
    read_history_zip,
    write_history_zip,
)
from spd_math import MergeConfig, MergeHistory, ProcessedActivations, merge_iteration
from tests.conftest import GOLDEN_DIR

GOLDEN_HISTORY = GOLDEN_DIR / "spd_history_example.zip"


@pytest.fixture
def golden_history_path() -> Path:
    if not GOLDEN_HISTORY.exists():
        pytest.skip(f"golden history example not found at {GOLDEN_HISTORY} (it lives in ../shared/golden next to the project)")
    return GOLDEN_HISTORY


def zip_entries(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def npy(values: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, values)
    return buffer.getvalue()


def write_zip(path: Path, entries: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return path


def small_history(config: MergeConfig, seed: int = 3) -> MergeHistory:
    generator = torch.Generator().manual_seed(0)
    n, c = 300, 12
    values = torch.rand((n, c), generator=generator) * (torch.rand((n, c), generator=generator) < 0.2)
    activations = ProcessedActivations(activations=values, labels=[f"layer.{x % 2}.mlp:{x}" for x in range(c)])
    return merge_iteration(activations, config, seed=seed)


@pytest.fixture
def written_history(tmp_path) -> tuple[MergeHistory, Path]:
    history = small_history(MergeConfig(iters=6))
    path = tmp_path / "history.zip"
    write_history_zip(history, path)
    return history, path


def test_golden_example_reads_into_its_labels_and_partitions(golden_history_path):
    entries = zip_entries(golden_history_path)
    metadata = json.loads(entries["metadata.json"])
    history = read_history_zip(golden_history_path)

    assert history.labels == entries["labels.txt"].decode().split("\n") == metadata["labels"]
    np.testing.assert_array_equal(history.group_idxs.numpy(), np.load(io.BytesIO(entries["merge.group_idxs.npy"])))
    np.testing.assert_array_equal(history.k_groups.numpy(), np.load(io.BytesIO(entries["merge.k_groups.npy"])))
    np.testing.assert_array_equal(history.selected_pairs.numpy(), np.load(io.BytesIO(entries["selected_pairs.npy"])))
    assert history.n_iters == metadata["n_iters_current"]
    assert history.c_components == metadata["c_components"]
    assert history.config == MergeConfig.from_dict(metadata["merge_config"])
    assert history.pair_costs is None and history.mdl_losses is None and history.seed is None


def test_golden_example_written_back_is_identical_entry_for_entry(golden_history_path, tmp_path):
    out = tmp_path / "copy.zip"
    write_history_zip(read_history_zip(golden_history_path), out)

    original, ours = zip_entries(golden_history_path), zip_entries(out)
    assert list(ours) == list(original)
    for name in original:
        if name.endswith(".npy"):
            assert np.load(io.BytesIO(ours[name])).dtype == np.int16
        assert ours[name] == original[name], name
    assert json.loads(ours["metadata.json"]) == json.loads(original["metadata.json"])
    with zipfile.ZipFile(out) as archive:
        assert {info.compress_type for info in archive.infolist()} == {zipfile.ZIP_STORED}


@pytest.mark.parametrize(
    "config",
    [
        MergeConfig(iters=6),
        MergeConfig(activation_threshold=None, iters=None, merge_pair_sampling_method="mcmc", merge_pair_sampling_kwargs={"temperature": 0.5}),
    ],
    ids=["range", "continuous-mcmc-until-three"],
)
def test_round_trip_keeps_every_field(config, tmp_path):
    history = small_history(config, seed=2**62 + 5)
    path = tmp_path / "history.zip"
    write_history_zip(history, path)
    loaded = read_history_zip(path)

    assert loaded.labels == history.labels
    for name in ("group_idxs", "selected_pairs", "k_groups", "pair_costs", "mdl_losses"):
        torch.testing.assert_close(getattr(loaded, name), getattr(history, name), rtol=0, atol=0, msg=name)
    assert loaded.config == history.config
    assert loaded.seed == history.seed

    entries = zip_entries(path)
    assert json.loads(entries["metadata.json"])["seed"] == history.seed
    for name in ("merge.group_idxs.npy", "merge.k_groups.npy", "selected_pairs.npy"):
        assert np.load(io.BytesIO(entries[name])).dtype == np.int16
    for name in ("merge.pair_costs.npy", "merge.mdl_losses.npy"):
        assert np.load(io.BytesIO(entries[name])).dtype == np.float64


def test_missing_diagnostics_are_omitted_and_read_back_as_none(tmp_path):
    history = MergeHistory(labels=["a:0", "a:1", "a:2"], group_idxs=torch.tensor([[0, 0, 1], [0, 0, 0]]))
    path = tmp_path / "bare.zip"
    write_history_zip(history, path)

    entries = zip_entries(path)
    assert list(entries) == ["merge.group_idxs.npy", "merge.k_groups.npy", "labels.txt", "metadata.json"]
    metadata = json.loads(entries["metadata.json"])
    assert metadata["merge_config"] is None and "seed" not in metadata
    loaded = read_history_zip(path)
    assert loaded.selected_pairs is None and loaded.pair_costs is None and loaded.mdl_losses is None
    assert loaded.config is None and loaded.seed is None
    np.testing.assert_array_equal(loaded.k_groups.numpy(), [2, 1])


def test_ids_beyond_int16_are_written_as_int32(tmp_path):
    c = 2**15 + 1
    partition = torch.arange(c)
    partition[-1] = 0
    history = MergeHistory(labels=[f"m:{x}" for x in range(c)], group_idxs=partition[None, :], selected_pairs=torch.tensor([[c - 1, 0]]))
    path = tmp_path / "wide.zip"
    write_history_zip(history, path)

    entries = zip_entries(path)
    assert np.load(io.BytesIO(entries["merge.group_idxs.npy"])).dtype == np.int32
    loaded = read_history_zip(path)
    torch.testing.assert_close(loaded.group_idxs, history.group_idxs, rtol=0, atol=0)
    torch.testing.assert_close(loaded.selected_pairs, history.selected_pairs, rtol=0, atol=0)


def test_unfilled_rows_of_an_early_stopped_original_run_are_dropped(written_history, tmp_path):
    history, path = written_history
    entries = zip_entries(path)
    metadata = json.loads(entries["metadata.json"])
    # The original preallocates rows for the planned iterations: -1 ids, 0 group counts.
    unfilled = 3
    group_idxs = np.load(io.BytesIO(entries["merge.group_idxs.npy"]))
    entries["merge.group_idxs.npy"] = npy(np.vstack([group_idxs, np.full((unfilled, group_idxs.shape[1]), -1, np.int16)]))
    k_groups = np.load(io.BytesIO(entries["merge.k_groups.npy"]))
    entries["merge.k_groups.npy"] = npy(np.concatenate([k_groups, np.zeros(unfilled, np.int16)]))
    pairs = np.load(io.BytesIO(entries["selected_pairs.npy"]))
    entries["selected_pairs.npy"] = npy(np.vstack([pairs, np.full((unfilled, 2), -1, np.int16)]))
    for name in ("merge.pair_costs.npy", "merge.mdl_losses.npy"):
        del entries[name]
    metadata["merge_config"]["iters"] = history.n_iters + unfilled
    entries["metadata.json"] = json.dumps(metadata).encode()

    loaded = read_history_zip(write_zip(tmp_path / "preallocated.zip", entries))
    assert loaded.n_iters == history.n_iters
    torch.testing.assert_close(loaded.group_idxs, history.group_idxs, rtol=0, atol=0)
    torch.testing.assert_close(loaded.selected_pairs, history.selected_pairs, rtol=0, atol=0)


def test_non_zip_file_is_rejected(tmp_path):
    path = tmp_path / "notes.zip"
    path.write_text("not a zip at all")
    with pytest.raises(HistoryFormatError, match=r"notes\.zip: not a readable zip archive"):
        read_history_zip(path)


def test_truncated_zip_is_rejected(written_history, tmp_path):
    _, path = written_history
    truncated = tmp_path / "truncated.zip"
    truncated.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(HistoryFormatError, match=r"truncated\.zip: not a readable zip archive"):
        read_history_zip(truncated)


def test_corrupted_entry_is_rejected(written_history, tmp_path):
    _, path = written_history
    data = bytearray(path.read_bytes())
    position = data.index(b"layer.0.mlp:0")  # inside the stored labels.txt
    data[position] ^= 0xFF
    corrupted = tmp_path / "corrupted.zip"
    corrupted.write_bytes(bytes(data))
    with pytest.raises(HistoryFormatError, match=r"corrupted\.zip: not a readable zip archive.*CRC"):
        read_history_zip(corrupted)


@pytest.mark.parametrize("missing", ["merge.group_idxs.npy", "merge.k_groups.npy", "labels.txt", "metadata.json"])
def test_missing_entry_is_named(written_history, tmp_path, missing):
    _, path = written_history
    entries = zip_entries(path)
    del entries[missing]
    with pytest.raises(HistoryFormatError, match=rf"missing entries \['{missing}'\]"):
        read_history_zip(write_zip(tmp_path / "partial.zip", entries))


def replace_array(name: str, transform):
    def change(entries: dict[str, bytes], metadata: dict) -> None:
        entries[name] = npy(transform(np.load(io.BytesIO(entries[name]))))

    return change


def replace_metadata(transform):
    def change(entries: dict[str, bytes], metadata: dict) -> None:
        transform(metadata)
        entries["metadata.json"] = json.dumps(metadata).encode()

    return change


def replace_entry(name: str, data: bytes):
    def change(entries: dict[str, bytes], metadata: dict) -> None:
        entries[name] = data

    return change


@pytest.mark.parametrize(
    "change, message",
    [
        (replace_array("merge.k_groups.npy", lambda a: a[:-1]), r"disagree on the number of iterations"),
        (replace_array("selected_pairs.npy", lambda a: a[:-2]), r"disagree on the number of iterations"),
        (replace_array("merge.mdl_losses.npy", lambda a: a[:-1]), r"disagree on the number of iterations"),
        (replace_array("merge.group_idxs.npy", lambda a: a[:, :-1]), r"merge\.group_idxs\.npy has 11 columns but c_components is 12"),
        (replace_array("merge.group_idxs.npy", lambda a: a[0]), r"merge\.group_idxs\.npy must be 2-D"),
        (replace_array("merge.group_idxs.npy", lambda a: a + 100), r"group ids outside 0\.\.11"),
        (replace_array("merge.group_idxs.npy", lambda a: a.astype(np.float32)), r"must hold integer values"),
        (replace_array("selected_pairs.npy", lambda a: np.hstack([a, a])), r"selected_pairs\.npy must have shape \[iters, 2\]"),
        (replace_entry("merge.k_groups.npy", b"\x93NUMPY garbage"), r"merge\.k_groups\.npy is not a readable \.npy array"),
        (replace_entry("labels.txt", b"a\nb"), r"labels\.txt disagrees with the labels in metadata\.json: line 1"),
        (replace_entry("labels.txt", b"\xff\xfe"), r"labels\.txt is not UTF-8"),
        (replace_entry("metadata.json", b"{not json"), r"metadata\.json is not valid JSON"),
        (replace_metadata(lambda m: m.pop("n_iters_current")), r"metadata\.json lacks the keys \['n_iters_current'\]"),
        (replace_metadata(lambda m: m.update(c_components=13)), r"lists 12 labels but c_components is 13"),
        (replace_metadata(lambda m: m.update(n_iters_current=7)), r"n_iters_current is 7 but the entries hold only 6"),
        (replace_metadata(lambda m: m.update(n_iters_current="6")), r"n_iters_current must be a non-negative integer"),
        (replace_metadata(lambda m: m.update(seed=-1)), r"seed must be a non-negative integer or null"),
        (replace_metadata(lambda m: m["merge_config"].update(depth=3, width=2)), r"merge_config cannot be loaded \(depth: unknown key 'depth' .*; width: unknown key 'width'"),
        (replace_metadata(lambda m: m["merge_config"].update(alpha=-1.0)), r"merge_config cannot be loaded.*alpha"),
    ],
)
def test_inconsistent_contents_are_rejected_with_the_reason(written_history, tmp_path, change, message):
    _, path = written_history
    entries = zip_entries(path)
    change(entries, json.loads(entries["metadata.json"]))
    with pytest.raises(HistoryFormatError, match=r"bad\.zip: .*" + message):
        read_history_zip(write_zip(tmp_path / "bad.zip", entries))


def test_interrupted_write_leaves_the_existing_file_intact(written_history, monkeypatch):
    _, path = written_history
    before = path.read_bytes()
    calls = []
    original_writestr = zipfile.ZipFile.writestr

    def fail_on_third_entry(self, name, data, *args, **kwargs):
        calls.append(name)
        if len(calls) == 3:
            raise OSError("disk full")
        return original_writestr(self, name, data, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "writestr", fail_on_third_entry)
    replacement = small_history(MergeConfig(iters=3), seed=11)
    with pytest.raises(OSError, match="disk full"):
        write_history_zip(replacement, path)

    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_labels_with_newlines_cannot_be_written(tmp_path):
    history = MergeHistory(labels=["a:0", "a\n1"], group_idxs=torch.tensor([[0, 0]]))
    with pytest.raises(HistoryFormatError, match="cannot contain newlines"):
        write_history_zip(history, tmp_path / "history.zip")
    assert not (tmp_path / "history.zip").exists()
