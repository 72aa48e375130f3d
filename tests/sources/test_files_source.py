"""The directory-of-batch-files activation source, on real .safetensors, .npz and .pt files."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from spd_assets.sources.files import (
    SUPPORTED_SUFFIXES,
    BatchFileError,
    discover_batch_files,
    load_batch,
    read_layout,
)
from spd_math.activations import process_activations

# Deliberately not in sorted order, so that order handling is visible.
MODULE_CS = {"layers.1.mlp": 3, "layers.0.attn": 4}
SORTED_MODULES = sorted(MODULE_CS)


def write_batch(path: Path, mapping: dict[str, torch.Tensor]) -> Path:
    if path.suffix == ".safetensors":
        save_file(mapping, path)
    elif path.suffix == ".npz":
        np.savez(path, **{name: tensor.numpy() for name, tensor in mapping.items()})
    else:
        torch.save(mapping, path)
    return path


def batch(
    sample_shape: tuple[int, ...] = (2, 5), module_cs: dict[str, int] = MODULE_CS, seed: int = 0
) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.rand(*sample_shape, c, generator=generator) for name, c in module_cs.items()}


def expected_order(suffix: str, modules: list[str]) -> list[str]:
    return sorted(modules) if suffix == ".safetensors" else modules


def load_error(directory: Path, key: str, **kwargs) -> str:
    with pytest.raises(BatchFileError) as caught:
        load_batch(directory, key, **kwargs)
    return str(caught.value)


@pytest.mark.parametrize("sample_shape", [(2, 5), (7,)], ids=["3d", "2d"])
@pytest.mark.parametrize("suffix", SUPPORTED_SUFFIXES)
def test_each_format_round_trips_values_and_layout(tmp_path, suffix, sample_shape):
    mapping = batch(sample_shape)
    path = write_batch(tmp_path / f"b0{suffix}", mapping)

    loaded = load_batch(tmp_path, "b0")
    layout = read_layout(path)

    order = expected_order(suffix, list(mapping))
    assert list(loaded) == order
    assert list(layout) == order
    for name in order:
        assert loaded[name].dtype == torch.float32
        assert torch.equal(loaded[name], mapping[name])
        assert layout[name] == tuple(mapping[name].shape)


def test_npz_keeps_saved_order_and_byte_order(tmp_path):
    big_endian = np.linspace(0, 1, 6, dtype=">f4").reshape(2, 3)
    np.savez(tmp_path / "b0.npz", zeta=big_endian, alpha=np.zeros((2, 1), dtype=np.float16))

    loaded = load_batch(tmp_path, "b0")

    assert list(loaded) == ["zeta", "alpha"]
    np.testing.assert_array_equal(loaded["zeta"].numpy(), big_endian)
    assert loaded["alpha"].dtype == torch.float16


def test_compressed_npz_round_trips(tmp_path):
    mapping = batch()
    np.savez_compressed(tmp_path / "b0.npz", **{name: tensor.numpy() for name, tensor in mapping.items()})

    loaded = load_batch(tmp_path, "b0")

    assert list(loaded) == list(mapping)
    assert all(torch.equal(loaded[name], mapping[name]) for name in mapping)


def test_npz_member_that_is_not_an_array_is_reported(tmp_path):
    path = write_batch(tmp_path / "b0.npz", batch())
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr("notes.txt", "not an array")

    assert "b0.npz: archive member 'notes.txt' is not a .npy array" in load_error(tmp_path, "b0")


def test_read_layout_of_npz_reads_no_array_data(tmp_path, monkeypatch):
    path = write_batch(tmp_path / "b0.npz", batch())

    def fail_read_array(*args, **kwargs):
        raise AssertionError("read_layout read array data")

    monkeypatch.setattr(np.lib.format, "read_array", fail_read_array)
    assert read_layout(path) == {name: (2, 5, c) for name, c in MODULE_CS.items()}


def test_loaded_batch_feeds_process_activations(tmp_path):
    write_batch(tmp_path / "b0.pt", batch((2, 5)))

    processed = process_activations(load_batch(tmp_path, "b0"), seq_mode="concat")

    assert processed.n_samples == 10
    assert processed.labels[0] == "layers.1.mlp:0"


def test_discovery_sorts_by_key_and_skips_other_entries(tmp_path):
    for name in ["b2.pt", "b10.npz", "b1.safetensors"]:
        write_batch(tmp_path / name, batch())
    (tmp_path / "notes.txt").write_text("not a batch")
    (tmp_path / ".b0.npz.123.tmp").write_bytes(b"partial write")
    (tmp_path / ".hidden.npz").write_bytes(b"editor leftover")
    (tmp_path / "dir.pt").mkdir()

    files = discover_batch_files(tmp_path)

    assert list(files) == ["b1", "b10", "b2"]
    assert files["b10"] == tmp_path / "b10.npz"


def test_discovery_rejects_missing_directory(tmp_path):
    with pytest.raises(BatchFileError, match="does not exist"):
        discover_batch_files(tmp_path / "absent")


def test_discovery_rejects_a_file_as_directory(tmp_path):
    path = write_batch(tmp_path / "b0.pt", batch())
    with pytest.raises(BatchFileError, match="is not a directory"):
        discover_batch_files(path)


def test_discovery_rejects_directory_without_batch_files(tmp_path):
    (tmp_path / "b0.json").write_text("{}")
    expected = r"no batch files found; expected files ending in \.safetensors, \.npz, \.pt"
    with pytest.raises(BatchFileError, match=expected):
        discover_batch_files(tmp_path)


def test_discovery_rejects_two_files_with_the_same_key(tmp_path):
    write_batch(tmp_path / "b0.npz", batch())
    write_batch(tmp_path / "b0.pt", batch())
    write_batch(tmp_path / "b1.pt", batch())

    with pytest.raises(BatchFileError, match=r"files b0\.npz, b0\.pt share the partition key 'b0'"):
        discover_batch_files(tmp_path)
    with pytest.raises(BatchFileError, match=r"b0\.npz, b0\.pt"):
        load_batch(tmp_path, "b0")


def test_file_deleted_after_discovery_fails_its_partition(tmp_path):
    write_batch(tmp_path / "b0.npz", batch())
    write_batch(tmp_path / "b1.npz", batch())
    discover_batch_files(tmp_path)
    (tmp_path / "b1.npz").unlink()

    message = load_error(tmp_path, "b1")

    assert "no batch file for partition 'b1'" in message
    assert "b1.safetensors, b1.npz, b1.pt" in message
    assert torch.equal(load_batch(tmp_path, "b0")["layers.1.mlp"], batch()["layers.1.mlp"])


@pytest.mark.parametrize("suffix", SUPPORTED_SUFFIXES)
@pytest.mark.parametrize("content", [b"", b"this is not a tensor file at all" * 4], ids=["empty", "garbage"])
def test_corrupt_file_is_reported(tmp_path, suffix, content):
    (tmp_path / f"b0{suffix}").write_bytes(content)

    message = load_error(tmp_path, "b0")

    assert f"b0{suffix}: cannot be read" in message
    with pytest.raises(BatchFileError, match="cannot be read"):
        read_layout(tmp_path / f"b0{suffix}")


@pytest.mark.parametrize("suffix", SUPPORTED_SUFFIXES)
def test_truncated_file_is_reported(tmp_path, suffix):
    path = write_batch(tmp_path / f"b0{suffix}", batch())
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    assert f"b0{suffix}: cannot be read" in load_error(tmp_path, "b0")


def test_pt_file_holding_a_list_is_reported(tmp_path):
    torch.save([torch.zeros(2, 3)], tmp_path / "b0.pt")

    message = load_error(tmp_path, "b0")

    assert "b0.pt: contains a list; expected a dict of module name -> torch.Tensor" in message


def test_pt_file_with_a_non_tensor_entry_is_reported(tmp_path):
    torch.save({"mlp": [0.5, 0.5]}, tmp_path / "b0.pt")

    assert "b0.pt: entry 'mlp' -> list; expected a dict" in load_error(tmp_path, "b0")


def test_pt_file_with_numpy_arrays_is_refused_without_unpickling(tmp_path):
    torch.save({"mlp": np.zeros((2, 3), dtype=np.float32)}, tmp_path / "b0.pt")

    message = load_error(tmp_path, "b0")

    assert "b0.pt: cannot be read (UnpicklingError: Unsupported global" in message
    assert "weights_only set to `False`" not in message
    assert "tensors only" in message


def test_pt_file_with_an_empty_dict_is_reported(tmp_path):
    torch.save({}, tmp_path / "b0.pt")

    assert "b0.pt: contains no tensors" in load_error(tmp_path, "b0")


def test_npz_with_object_arrays_is_reported_without_unpickling(tmp_path):
    np.savez(tmp_path / "b0.npz", mlp=np.array([{"a": 1}], dtype=object))

    message = load_error(tmp_path, "b0")

    assert "module 'mlp' has dtype object, expected one of float16, bfloat16, float32, float64" in message


@pytest.mark.parametrize("suffix", SUPPORTED_SUFFIXES)
def test_non_float_tensor_is_reported(tmp_path, suffix):
    write_batch(tmp_path / f"b0{suffix}", {"mlp": torch.zeros(2, 3), "attn": torch.zeros(2, 4, dtype=torch.int64)})

    message = load_error(tmp_path, "b0")

    assert f"b0{suffix}" in message
    assert "module 'attn' has dtype" in message
    assert "expected one of float16, bfloat16, float32, float64" in message


@pytest.mark.parametrize("suffix", SUPPORTED_SUFFIXES)
@pytest.mark.parametrize("shape", [(6,), (1, 2, 3, 4)], ids=["1d", "4d"])
def test_wrong_ndim_is_reported(tmp_path, suffix, shape):
    write_batch(tmp_path / f"b0{suffix}", {"mlp": torch.zeros(shape)})

    message = load_error(tmp_path, "b0")

    assert f"b0{suffix}" in message
    assert f"module 'mlp' has shape {list(shape)}, expected [batch, seq, C] or [samples, C]" in message


@pytest.mark.parametrize("suffix", SUPPORTED_SUFFIXES)
def test_modules_covering_different_samples_within_a_file_are_reported(tmp_path, suffix):
    write_batch(tmp_path / f"b0{suffix}", {"attn": torch.zeros(2, 5, 4), "mlp": torch.zeros(2, 6, 3)})

    message = load_error(tmp_path, "b0")

    assert f"b0{suffix}" in message
    assert "module 'mlp' has sample dimensions [2, 6] but module 'attn' has [2, 5]" in message


def write_reference_and_member(tmp_path: Path, member: dict[str, torch.Tensor], suffix: str = ".npz") -> None:
    """Two files with the usual layout around one (b1) that differs."""
    write_batch(tmp_path / "b0.npz", batch())
    write_batch(tmp_path / f"b1{suffix}", member)
    write_batch(tmp_path / "b2.npz", batch(seed=2))


def test_missing_and_extra_modules_are_reported(tmp_path):
    write_reference_and_member(tmp_path, batch(module_cs={"layers.1.mlp": 3, "layers.2.mlp": 3}))

    message = load_error(tmp_path, "b1")

    assert ("b1.npz: has a different module layout than the layout most files of the directory share "
            "(2 of 3 readable files: b0.npz, b2.npz)") in message
    assert "missing modules ['layers.0.attn']" in message
    assert "extra modules ['layers.2.mlp']" in message


def test_different_component_count_is_reported(tmp_path):
    write_reference_and_member(tmp_path, batch(module_cs={"layers.1.mlp": 3, "layers.0.attn": 5}))

    message = load_error(tmp_path, "b1")

    assert "b1.npz" in message
    assert "module 'layers.0.attn' has C=5 components, expected C=4" in message


def test_different_module_order_is_reported(tmp_path):
    write_reference_and_member(tmp_path, batch(module_cs={"layers.0.attn": 4, "layers.1.mlp": 3}))

    message = load_error(tmp_path, "b1")

    assert "b1.npz" in message
    assert "modules are in the order ['layers.0.attn', 'layers.1.mlp'], " in message
    assert "expected ['layers.1.mlp', 'layers.0.attn']" in message
    assert "sorted name order" not in message


def test_order_error_explains_safetensors_sorting(tmp_path):
    write_reference_and_member(tmp_path, batch(), suffix=".safetensors")

    message = load_error(tmp_path, "b1")

    assert "b1.safetensors" in message
    assert "(.safetensors files list their modules in sorted name order)" in message


def test_safetensors_files_agree_on_order_whatever_order_they_were_written_in(tmp_path):
    write_batch(tmp_path / "b0.safetensors", batch(module_cs={"a": 2, "b": 3}))
    write_batch(tmp_path / "b1.safetensors", batch(module_cs={"b": 3, "a": 2}))

    assert list(load_batch(tmp_path, "b1")) == ["a", "b"]


def test_files_may_differ_in_sample_counts(tmp_path):
    write_batch(tmp_path / "b0.npz", batch((2, 5)))
    write_batch(tmp_path / "b1.npz", batch((3, 7)))

    assert load_batch(tmp_path, "b1")["layers.0.attn"].shape == (3, 7, 4)


@pytest.mark.parametrize("suffix", SUPPORTED_SUFFIXES)
def test_corrupt_first_file_fails_only_its_own_partition(tmp_path, suffix):
    (tmp_path / f"b0{suffix}").write_bytes(b"corrupt")
    write_batch(tmp_path / f"b1{suffix}", batch())
    write_batch(tmp_path / f"b2{suffix}", batch(seed=2))
    write_batch(tmp_path / f"b3{suffix}", batch(module_cs={"layers.1.mlp": 3}))

    assert f"b0{suffix}: cannot be read" in load_error(tmp_path, "b0")
    assert torch.equal(load_batch(tmp_path, "b2")["layers.1.mlp"], batch(seed=2)["layers.1.mlp"])
    message = load_error(tmp_path, "b3")
    assert f"different module layout than the layout most files of the directory share (2 of 3 readable files: b1{suffix}, b2{suffix})" in message
    assert "missing modules ['layers.0.attn']" in message


def test_an_odd_file_sorted_first_fails_alone(tmp_path):
    """The layout is what most files share, not what the first file by name has."""
    write_batch(tmp_path / "a_odd.npz", batch(module_cs={"layers.1.mlp": 3, "layers.0.attn": 5}))
    for index in range(3):
        write_batch(tmp_path / f"b{index}.npz", batch(seed=index))

    message = load_error(tmp_path, "a_odd")
    assert "a_odd.npz: has a different module layout than the layout most files of the directory share (3 of 4" in message
    assert "module 'layers.0.attn' has C=5 components, expected C=4" in message
    for index in range(3):
        assert torch.equal(load_batch(tmp_path, f"b{index}")["layers.0.attn"], batch(seed=index)["layers.0.attn"])


def test_a_tie_between_layouts_asks_for_a_declared_layout(tmp_path):
    write_batch(tmp_path / "b0.npz", batch())
    write_batch(tmp_path / "b1.npz", batch(module_cs={"layers.1.mlp": 3, "layers.0.attn": 5}))

    for key in ("b0", "b1"):
        message = load_error(tmp_path, key)
        assert "do not agree on a module layout" in message and "b0.npz; b1.npz" in message
        assert "source.layout" in message
    declared = {"layers.0.attn": 5, "layers.1.mlp": 3}
    assert load_batch(tmp_path, "b1", layout=declared)["layers.0.attn"].shape[-1] == 5
    message = load_error(tmp_path, "b0", layout=declared)
    assert "b0.npz: has a different module layout than the layout declared in the config (source.layout)" in message
    assert "module 'layers.0.attn' has C=4 components, expected C=5" in message


def test_a_declared_layout_overrides_the_majority(tmp_path):
    for index in range(3):
        write_batch(tmp_path / f"b{index}.npz", batch(module_cs={"layers.1.mlp": 3}, seed=index))
    write_batch(tmp_path / "b3.npz", batch())

    assert "missing modules ['layers.0.attn']" in load_error(tmp_path, "b0", layout=MODULE_CS)
    # A declared layout names modules and sizes; the order of a file's modules is free.
    assert list(load_batch(tmp_path, "b3", layout=dict(reversed(MODULE_CS.items())))) == list(MODULE_CS)


def test_reference_skips_files_with_invalid_tensors(tmp_path):
    write_batch(tmp_path / "b0.pt", {"mlp": torch.zeros(2, 3, dtype=torch.int64)})
    write_batch(tmp_path / "b1.pt", batch())

    assert list(load_batch(tmp_path, "b1")) == list(MODULE_CS)


def test_nan_and_inf_values_are_counted_per_module(tmp_path):
    mapping = batch()
    mapping["layers.0.attn"][0, 0, :3] = torch.tensor([float("nan"), float("nan"), float("inf")])
    write_batch(tmp_path / "b0.pt", mapping)

    message = load_error(tmp_path, "b0")

    assert "b0.pt: has invalid values" in message
    assert "module 'layers.0.attn' has 2 NaN and 1 inf values (of 40)" in message
    assert "layers.1.mlp" not in message


def test_values_outside_the_range_are_reported_with_min_and_max(tmp_path):
    mapping = batch()
    mapping["layers.1.mlp"][0, 0, 0] = -0.5
    mapping["layers.1.mlp"][1, 4, 2] = 1.25
    write_batch(tmp_path / "b0.safetensors", mapping)

    message = load_error(tmp_path, "b0")

    assert "b0.safetensors" in message
    assert "module 'layers.1.mlp' has values from -0.5 to 1.25, expected within [0, 1]" in message
    assert load_batch(tmp_path, "b0", value_range=None)["layers.1.mlp"][1, 4, 2] == 1.25
    assert "layers.1.mlp" in load_batch(tmp_path, "b0", value_range=(-1.0, 2.0))


def test_range_check_ignores_non_finite_values_it_already_reported(tmp_path):
    mapping = batch()
    mapping["layers.1.mlp"][0, 0, 0] = float("inf")
    write_batch(tmp_path / "b0.npz", mapping)

    message = load_error(tmp_path, "b0")

    assert "0 NaN and 1 inf" in message
    assert "expected within" not in message


def test_inverted_value_range_is_rejected(tmp_path):
    write_batch(tmp_path / "b0.npz", batch())
    with pytest.raises(ValueError, match=r"value_range: expected \(low, high\) with low <= high"):
        load_batch(tmp_path, "b0", value_range=(1.0, 0.0))


def test_read_layout_rejects_unsupported_suffix(tmp_path):
    path = tmp_path / "b0.json"
    path.write_text("{}")
    with pytest.raises(BatchFileError, match=r"b0\.json: unsupported file type '\.json'"):
        read_layout(path)


def test_pt_files_in_the_legacy_format_still_load(tmp_path):
    torch.save(batch(), tmp_path / "b0.pt", _use_new_zipfile_serialization=False)

    assert list(load_batch(tmp_path, "b0")) == list(MODULE_CS)
