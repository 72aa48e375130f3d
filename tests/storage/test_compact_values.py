"""Histories and ensembles stored as merges: what is written, what is read back (the same value, fingerprint
included), how small it is, and results of the previous layout read as they are."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spd_assets.errors import StorageError
from spd_assets.storage.history_format import read_history_zip, write_history_zip
from spd_assets.storage.lineage import fingerprint
from spd_assets.storage.previous_layout import is_previous_layout, previous_fingerprint
from spd_assets.storage.values import (
    VALUE_FORMATS,
    MemberEnsemble,
    load_ensemble,
    load_history,
    save_ensemble,
    save_history,
)
from spd_math import MergeConfig, MergeHistory, ProcessedActivations, merge_iteration, normalize_ensemble


def merged(seed: int, c: int = 60, drop: int = 0) -> MergeHistory:
    rng = np.random.default_rng(seed)
    values = rng.random((400, c), dtype=np.float32) * (rng.random((400, c)) < 0.2)
    labels = [f"layers.{x % 2}.mlp:{x}" for x in range(c)]
    keep = np.sort(rng.choice(c, size=c - drop, replace=False))
    return merge_iteration(ProcessedActivations(values[:, keep], [labels[x] for x in keep]),
                           MergeConfig(activation_threshold=0.01), seed=seed)


def assert_same_history(loaded: MergeHistory, history: MergeHistory) -> None:
    assert loaded.labels == history.labels and loaded.seed == history.seed and loaded.config == history.config
    for name in ("merge_pairs", "selected_pairs", "k_groups", "pair_costs", "mdl_losses"):
        assert torch.equal(getattr(loaded, name), getattr(history, name)), name
    assert torch.equal(loaded.group_idxs, history.group_idxs)


def test_a_history_is_stored_as_its_merges_and_read_back_the_same(tmp_path):
    history = merged(0)
    path = tmp_path / "member_000.npz"
    save_history(path, history)
    loaded = load_history(path)
    assert_same_history(loaded, history)
    assert fingerprint(loaded) == fingerprint(history)  # the data version Dagster records is the content's
    # O(c + iters): a few bytes per merge and per label, not iters x c ids.
    assert path.stat().st_size < 40 * (history.c_components + history.n_iters) + 4096
    assert path.stat().st_size < history.n_iters * history.c_components * 2


def test_partitions_that_are_no_merge_sequence_are_stored_as_they_are(tmp_path):
    history = MergeHistory(labels=["a:0", "a:1", "b:0"], group_idxs=np.array([[0, 0, 2], [0, 0, 0]]))
    save_history(tmp_path / "h.npz", history)
    loaded = load_history(tmp_path / "h.npz")
    assert not loaded.is_merge_sequence and loaded.group_idxs.tolist() == [[0, 0, 2], [0, 0, 0]]
    assert fingerprint(loaded) == fingerprint(history)


def test_a_file_of_another_kind_is_named(tmp_path):
    np.savez(tmp_path / "other.npz", values=np.zeros(3))
    with pytest.raises(StorageError, match="other.npz is not a merge history of this version"):
        load_history(tmp_path / "other.npz")


def test_an_ensemble_is_stored_as_alignment_and_merges(tmp_path):
    histories = [merged(0), merged(1, drop=5), merged(2, drop=9)]
    ensemble = MemberEnsemble(normalize_ensemble(histories), ["m0", "m1", "m2"], ["m3"])
    save_ensemble(tmp_path / "e.npz", ensemble)
    loaded = load_ensemble(tmp_path / "e.npz")
    assert loaded.ensemble.is_compact and (loaded.members, loaded.missing) == (["m0", "m1", "m2"], ["m3"])
    assert torch.equal(loaded.ensemble.merges, ensemble.ensemble.merges)
    assert torch.equal(loaded.ensemble.present, ensemble.ensemble.present)
    assert fingerprint(loaded) == fingerprint(ensemble)
    dense_bytes = ensemble.ensemble.merges.numel() * 8
    assert (tmp_path / "e.npz").stat().st_size < dense_bytes / 4


def test_the_original_zip_is_written_and_read_a_block_at_a_time(tmp_path, monkeypatch):
    from spd_assets.storage import history_format

    history = merged(3, c=50)
    monkeypatch.setattr(history_format, "PARTITION_BLOCK_IDS", 3 * 50 + 1)  # blocks of 3 partitions
    write_history_zip(history, tmp_path / "h.zip")
    read = read_history_zip(tmp_path / "h.zip")
    assert read.is_merge_sequence
    assert_same_history(read, history)
    with np.load(tmp_path / "h.zip") as entries:  # the original's entries, as np.save wrote them before
        assert entries["merge.group_idxs.npy"].dtype == np.int16
        np.testing.assert_array_equal(entries["merge.group_idxs.npy"], history.group_idxs.numpy())


def test_results_of_the_previous_layout_are_read_as_they_are(tmp_path):
    """The previous layout: histories in the original zip, the ensemble as one dense array (key `merges`)."""
    history = merged(4)
    folder = tmp_path / "exp" / "merge_history"
    write_history_zip(history, folder / "member_000.zip")
    history_format = VALUE_FORMATS[MergeHistory]
    stored = history_format.stored_path(folder / "member_000.npz")
    assert stored.suffix == ".zip" and is_previous_layout(stored)
    assert_same_history(history_format.load(stored), history)

    ensemble = normalize_ensemble([history, merged(5)])
    np.savez(tmp_path / "exp" / "normalized_ensemble.npz", merges=ensemble.merges.numpy(),
             labels=np.array(ensemble.labels, dtype=str), present=ensemble.present.numpy(),
             members=np.array(["member_000", "member_001"]), missing=np.array([], dtype=str))
    assert is_previous_layout(tmp_path / "exp" / "normalized_ensemble.npz")
    previous = load_ensemble(tmp_path / "exp" / "normalized_ensemble.npz")
    assert not previous.ensemble.is_compact and torch.equal(previous.ensemble.merges, ensemble.merges)
    np.testing.assert_array_equal(previous.ensemble.partitions_at(3), ensemble.partitions_at(3))
    # Writing the value now replaces the previous file.
    history_format.replace(folder / "member_000.npz", history)
    assert not (folder / "member_000.zip").exists() and (folder / "member_000.npz").exists()


def test_the_previous_layouts_data_versions_are_those_it_recorded():
    """The previous layout's fingerprint of a history hashed its dense partitions as a field."""
    from dataclasses import dataclass

    history = merged(6, c=20)

    @dataclass(frozen=True)
    class MergeHistory:  # the previous layout's value class, as it was
        labels: list
        group_idxs: torch.Tensor
        selected_pairs: torch.Tensor | None = None
        k_groups: torch.Tensor | None = None
        pair_costs: torch.Tensor | None = None
        mdl_losses: torch.Tensor | None = None
        config: MergeConfig | None = None
        seed: int | None = None

    recorded = fingerprint(MergeHistory(history.labels, history.group_idxs, history.selected_pairs, history.k_groups,
                                        history.pair_costs, history.mdl_losses, history.config, history.seed))
    assert previous_fingerprint(history) == recorded != fingerprint(history)
