"""Compact activations (boolean masks, sparse CSR, the streaming builder) give the dense results exactly."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse
import torch

from spd_math import (
    ActivationsError,
    CompactActivationsBuilder,
    MergeConfig,
    ProcessedActivations,
    drop_dead,
    merge_iteration,
    process_activations,
)
from spd_math._engine import backend


def sparse_values(seed: int, n: int = 700, c: int = 45, density: float = 0.08) -> np.ndarray:
    rng = np.random.default_rng(seed)
    values = (rng.random((n, c)) * (rng.random((n, c)) < density)).astype(np.float32)
    values[:, rng.random(c) < 0.1] = 0.0
    values[:, 3] = np.where(values[:, 3] > 0, 0.004, 0.0)  # dead at 0.005, alive at 0
    return values


def histories_equal(first, second) -> None:
    assert first.labels == second.labels
    np.testing.assert_array_equal(first.selected_pairs.numpy(), second.selected_pairs.numpy())
    np.testing.assert_array_equal(first.group_idxs.numpy(), second.group_idxs.numpy())
    np.testing.assert_array_equal(first.pair_costs.numpy(), second.pair_costs.numpy())
    np.testing.assert_array_equal(first.mdl_losses.numpy(), second.mdl_losses.numpy())


CONFIGS = [
    MergeConfig(iters=None, activation_threshold=0.01),
    MergeConfig(iters=30, activation_threshold=0.3, alpha=0.5, merge_pair_sampling_kwargs={"threshold": 0.0}),
    MergeConfig(iters=30, activation_threshold=0.01, merge_pair_sampling_method="mcmc", merge_pair_sampling_kwargs={}),
]


@pytest.mark.parametrize("config", CONFIGS, ids=["range", "range-ties", "mcmc"])
@pytest.mark.parametrize("seed", [0, 1])
def test_every_form_gives_the_dense_history(config, seed):
    values = sparse_values(seed)
    labels = [f"m:{x}" for x in range(values.shape[1])]
    dense = merge_iteration(ProcessedActivations(values, labels), config, seed=seed)
    forms = {
        "scipy csr": scipy.sparse.csr_array(values),
        "torch csr": torch.from_numpy(values).to_sparse_csr(),
        "mask": torch.from_numpy(values > config.activation_threshold),
        "bool csr": scipy.sparse.csr_array(values > config.activation_threshold),
    }
    for name, form in forms.items():
        histories_equal(merge_iteration(ProcessedActivations(form, labels), config, seed=seed), dense)
    with pytest.MonkeyPatch.context() as patch:  # the device path
        patch.setattr(backend, "numpy_fast_path", lambda tensor: False)
        histories_equal(merge_iteration(ProcessedActivations(forms["scipy csr"], labels), config, seed=seed), dense)


# m:3 is dead in both; in the second it kept entries above the activation threshold, which must go too.
@pytest.mark.parametrize("thresholds", [(0.01, 0.005), (0.001, 0.0045)], ids=["dead-kept-nothing", "dead-kept-entries"])
@pytest.mark.parametrize("chunk_rows", [1, 64, 333, 10_000])
def test_builder_equals_process_activations_and_drop_dead(chunk_rows, thresholds):
    values = sparse_values(5)
    labels = [f"m:{x}" for x in range(values.shape[1])]
    config = MergeConfig(iters=None, activation_threshold=thresholds[0], filter_dead_threshold=thresholds[1])
    dense = process_activations({"m": values}, filter_dead_threshold=config.filter_dead_threshold)
    builder = CompactActivationsBuilder(labels, config.activation_threshold, config.filter_dead_threshold)
    for start in range(0, values.shape[0], chunk_rows):
        builder.add(values[start : start + chunk_rows])
    assert (builder.stats.active_counts[3] > 0) == (thresholds[0] < 0.004)
    compact = builder.build()
    with pytest.raises(ActivationsError, match="already called"):
        builder.build()
    assert compact.is_compact and compact.labels == dense.labels and compact.dead_labels == dense.dead_labels
    assert "m:3" in compact.dead_labels
    histories_equal(merge_iteration(compact, config, seed=3), merge_iteration(dense, config, seed=3))
    expected = dense.column_stats(config.activation_threshold)
    stats = compact.column_stats(config.activation_threshold)
    np.testing.assert_array_equal(stats.active_counts, expected.active_counts)
    np.testing.assert_allclose(stats.sums, expected.sums, rtol=1e-12)
    np.testing.assert_array_equal(stats.maxima, expected.maxima)
    mask = compact.active_mask(config.activation_threshold).toarray()
    np.testing.assert_array_equal(mask, dense.activations.numpy() > config.activation_threshold)


def test_compact_drop_dead_and_sparse_continuous_mode():
    values = sparse_values(2)
    labels = [f"m:{x}" for x in range(values.shape[1])]
    sparse = ProcessedActivations(scipy.sparse.csr_array(values), labels)
    dense = ProcessedActivations(values, labels)
    kept_sparse, kept_dense = drop_dead(sparse, 0.005), drop_dead(dense, 0.005)
    assert kept_sparse.labels == kept_dense.labels and kept_sparse.dead_labels == kept_dense.dead_labels
    continuous = MergeConfig(iters=20, activation_threshold=None)
    histories_equal(merge_iteration(kept_sparse, continuous, seed=1), merge_iteration(kept_dense, continuous, seed=1))


def test_builder_output_refuses_lower_thresholds_and_continuous_mode():
    builder = CompactActivationsBuilder(["m:0", "m:1"], activation_threshold=0.2)
    builder.add(np.array([[0.5, 0.1], [0.3, 0.6]], dtype=np.float32))
    compact = builder.build()
    for config in (MergeConfig(activation_threshold=None), MergeConfig(activation_threshold=0.1)):
        with pytest.raises(ActivationsError, match="activation_threshold >= 0.2"):
            merge_iteration(compact, config, seed=0)
    merge_iteration(compact, MergeConfig(activation_threshold=0.25), seed=0)


def test_builder_reports_nan_with_the_component_label():
    builder = CompactActivationsBuilder(["a:0", "a:1", "b:0"], activation_threshold=0.01)
    builder.add(np.zeros((4, 3), dtype=np.float32))
    with pytest.raises(ActivationsError, match=r"row 4.*NaN or inf.*b:0"):
        builder.add(np.array([[0.0, 0.0, np.nan]], dtype=np.float32))
    with pytest.raises(ActivationsError, match=r"expected shape \[rows, 3\]"):
        builder.add(np.zeros((2, 4), dtype=np.float32))
    with pytest.raises(ActivationsError, match="activation_threshold"):
        CompactActivationsBuilder(["a:0"], activation_threshold=-0.1)


@pytest.mark.parametrize("block", [16, 1024], ids=["blocks", "one-block"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_builder_compiled_and_numpy_paths_agree_exactly(monkeypatch, dtype, block):
    """The compiled chunk path keeps exactly the entries, statistics and errors of the NumPy one, including
    values equal to the threshold in the chunk's precision, however the columns are split between threads."""
    from spd_math import activations
    from spd_math._engine import kernels

    monkeypatch.setattr(activations, "STATISTICS_BLOCK", block)
    monkeypatch.setattr(kernels, "max_threads", lambda: 4)  # 130 columns: 4 blocks of 33, or 1 of 1024

    values = sparse_values(5, n=900, c=130).astype(dtype)
    values[:, 11:13] = 0
    values[::7, 11] = dtype(0.05)  # exactly the threshold as the chunk stores it: not active
    values[::5, 12] = np.nextafter(dtype(0.05), dtype(1))  # just above: active
    labels = [f"m:{j}" for j in range(values.shape[1])]

    def built(compiled: bool):
        monkeypatch.setattr(activations, "COMPILED_DTYPES", (np.float32, np.float64) if compiled else ())
        builder = CompactActivationsBuilder(labels, activation_threshold=0.05, filter_dead_threshold=0.005)
        for start in range(0, len(values), 256):
            builder.add(values[start : start + 256])
        stats = builder.stats
        return builder.build(), stats

    (compiled, compiled_stats), (plain, plain_stats) = built(True), built(False)
    assert compiled.labels == plain.labels and compiled.dead_labels == plain.dead_labels
    mine, theirs = compiled.activations, plain.activations
    assert torch.equal(mine.crow_indices(), theirs.crow_indices())
    assert torch.equal(mine.col_indices(), theirs.col_indices())
    assert torch.equal(mine.values(), theirs.values())
    assert (compiled_stats.active_counts == plain_stats.active_counts).all()
    assert (compiled_stats.maxima == plain_stats.maxima).all()
    assert (compiled_stats.sums == plain_stats.sums).all()  # both add in row order
    assert int(compiled_stats.active_counts[11]) == 0 and int(compiled_stats.active_counts[12]) > 0

    bad = values[:256].copy()
    bad[3, 7] = np.nan
    for compiled_path in (True, False):
        monkeypatch.setattr(activations, "COMPILED_DTYPES", (np.float32, np.float64) if compiled_path else ())
        builder = CompactActivationsBuilder(labels, activation_threshold=0.05)
        with pytest.raises(ActivationsError, match="NaN or inf in component.s. m:7"):
            builder.add(bad)
        assert builder.n_samples == 0 and builder.stored_bytes == 0


def built_with(values: np.ndarray, chunk_rows: int, as_chunk, threshold: float = 0.05, dead: float = 0.005):
    """The builder's output and statistics after adding `values` a chunk of rows at a time through `as_chunk`."""
    width = as_chunk(values[:1]).shape[1]
    builder = CompactActivationsBuilder([f"m:{j}" for j in range(width)], activation_threshold=threshold,
                                        filter_dead_threshold=dead)
    for start in range(0, len(values), chunk_rows):
        builder.add(as_chunk(values[start : start + chunk_rows]))
    stats = builder.stats
    return builder.build(), stats


def assert_built_identically(first, second) -> None:
    """Same CSR (row pointers, column indices, values), labels, dead filter and statistics, bit for bit."""
    (mine, my_stats), (theirs, their_stats) = first, second
    assert mine.labels == theirs.labels and mine.dead_labels == theirs.dead_labels
    for part in ("crow_indices", "col_indices", "values"):
        assert torch.equal(getattr(mine.activations, part)(), getattr(theirs.activations, part)())
    for name in ("active_counts", "sums", "maxima"):
        assert getattr(my_stats, name).tobytes() == getattr(their_stats, name).tobytes(), name
    assert my_stats.n_samples == their_stats.n_samples


def torch_path_chunk(chunk: np.ndarray) -> torch.Tensor:
    """A CPU bfloat16-free chunk the builder sends down its torch path (the one of accelerator chunks)."""
    return torch.from_numpy(chunk)


@pytest.fixture
def torch_path(monkeypatch):
    """Routes every tensor chunk through `_add_tensor`, as chunks on an accelerator are: the device-agnostic
    torch operations run here on the CPU, so they are checked without a GPU."""
    original = CompactActivationsBuilder.add

    def add(self, chunk):
        if isinstance(chunk, torch.Tensor) and chunk.shape[0] and chunk.is_floating_point() and chunk.ndim == 2:
            return self._add_tensor(chunk)
        return original(self, chunk)

    monkeypatch.setattr(CompactActivationsBuilder, "add", add)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("chunk_rows", [1, 97, 256, 5000])
def test_builder_torch_path_equals_the_compiled_path_bit_for_bit(torch_path, dtype, chunk_rows):
    values = sparse_values(7, n=900, c=130).astype(dtype)
    values[:, 40] = np.random.default_rng(1).random(900).astype(dtype) * 1e-3  # below the threshold, in the sums
    values[::7, 11] = dtype(0.05)  # exactly the threshold: not active
    values[::5, 12] = np.nextafter(dtype(0.05), dtype(1))  # just above: active
    values[:, 90:] = np.random.default_rng(2).normal(size=(900, 40)).astype(dtype)  # negatives, other magnitudes
    compiled = built_with(values, chunk_rows, np.asarray)
    on_torch = built_with(values, chunk_rows, torch_path_chunk)
    assert_built_identically(on_torch, compiled)
    assert compiled[0].dead_labels  # the dead filter dropped something
    # A chunk that is a view (every other column of a wider one) gives the same as a contiguous copy.
    wide = np.repeat(values, 2, axis=1)
    strided = built_with(wide, chunk_rows, lambda chunk: torch.from_numpy(chunk)[:, ::2])
    assert_built_identically(strided, compiled)


def test_builder_torch_path_one_column_and_empty_chunks(torch_path):
    rng = np.random.default_rng(3)
    values = (rng.random((300, 1)) * (rng.random((300, 1)) < 0.3) + 1e-4).astype(np.float32)
    assert_built_identically(built_with(values, 64, torch_path_chunk, dead=0.0), built_with(values, 64, np.asarray, dead=0.0))
    builder = CompactActivationsBuilder(["m:0", "m:1"], activation_threshold=0.1)
    builder.add(torch.zeros((0, 2)))
    builder.add(torch.tensor([[0.5, 0.0]]))
    assert builder.n_samples == 1 and builder.build().to_scipy_csr().toarray().tolist() == [[0.5, 0.0]]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_builder_torch_path_refuses_nonfinite_like_the_compiled_path(torch_path, bad):
    values = sparse_values(5, n=300, c=30)
    labels = [f"m:{j}" for j in range(30)]
    chunk = values[:128].copy()
    chunk[3, 7] = bad
    chunk[100, 22] = bad
    messages = []
    for as_chunk in (np.asarray, torch_path_chunk):
        builder = CompactActivationsBuilder(labels, activation_threshold=0.05)
        builder.add(as_chunk(values[128:]))
        stored, stats = builder.stored_bytes, builder.stats
        with pytest.raises(ActivationsError, match=r"chunk at row 172: .*NaN or inf in component.s. m:7, m:22$") as error:
            builder.add(as_chunk(chunk))
        messages.append(str(error.value))
        # Nothing of the refused chunk was taken in.
        assert builder.n_samples == 172 and builder.stored_bytes == stored
        assert builder.stats.sums.tobytes() == stats.sums.tobytes()
    assert messages[0] == messages[1]


def test_builder_bfloat16_chunks_take_the_torch_path():
    values = torch.from_numpy(sparse_values(2, n=200, c=20)).to(torch.bfloat16)
    builder = CompactActivationsBuilder([f"m:{j}" for j in range(20)], activation_threshold=0.05)
    builder.add(values)
    kept = builder.build().to_scipy_csr().toarray()
    expected = values.float().numpy()
    cut = float(torch.tensor(0.05, dtype=torch.bfloat16))  # compared in the chunk's precision
    np.testing.assert_array_equal(kept, np.where(expected > cut, expected, 0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("chunk_rows", [1, 256, 5000])
def test_builder_cuda_chunks_equal_host_chunks_bit_for_bit(chunk_rows):
    values = sparse_values(7, n=900, c=130)
    values[:, 90:] = np.random.default_rng(2).normal(size=(900, 40)).astype(np.float32)
    on_device = built_with(values, chunk_rows, lambda chunk: torch.from_numpy(chunk).cuda())
    assert_built_identically(on_device, built_with(values, chunk_rows, np.asarray))
    bad = values[:64].copy()
    bad[5, 9] = np.nan
    builder = CompactActivationsBuilder([f"m:{j}" for j in range(130)], activation_threshold=0.05)
    with pytest.raises(ActivationsError, match="NaN or inf in component.s. m:9$"):
        builder.add(torch.from_numpy(bad).cuda())
