"""The public API at its edges: one error hierarchy, NumPy inputs accepted, registries, NaN reporting."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import spd_math
from spd_math import (
    DISTANCE_METHODS,
    SAMPLERS,
    ActivationsError,
    ConfigError,
    DistanceError,
    EnsembleError,
    HistoryError,
    MergeConfig,
    MergeError,
    MergeHistory,
    NormalizedEnsemble,
    PartitionError,
    ProcessedActivations,
    SpdMathError,
    adjusted_rand_index,
    compute_distances,
    compute_merge_costs,
    consensus_clusters,
    merge_iteration,
    normalize_ensemble,
    process_activations,
)


@pytest.mark.parametrize(
    "error", [ActivationsError, ConfigError, DistanceError, EnsembleError, HistoryError, MergeError, PartitionError]
)
def test_every_math_error_is_one_spd_math_error_and_a_value_error(error):
    assert issubclass(error, SpdMathError) and issubclass(error, ValueError)


@pytest.mark.parametrize(
    "call",
    [
        lambda: adjusted_rand_index([0, 1], [0, 1, 2]),
        lambda: consensus_clusters(np.zeros((2, 3), dtype=int), threshold=2.0),
        lambda: compute_merge_costs(torch.zeros((2, 3)), torch.ones(2), 1.0),
        lambda: compute_distances(np.zeros((2, 3), dtype=int), "perm_invariant_hamming"),
        lambda: compute_distances(np.zeros((2, 3, 4), dtype=int), "euclid"),
        lambda: MergeConfig(merge_pair_sampling_method="greedy"),
        lambda: MergeHistory(labels=["a"], group_idxs=np.zeros((2, 2), dtype=int)),
        lambda: normalize_ensemble([]),
        lambda: process_activations({"m": np.ones((3, 2))}, filter_dead_threshold=float("nan")),
        lambda: merge_iteration(
            ProcessedActivations(activations=torch.rand(20, 4), labels=list("abcd")), MergeConfig(), pair_sampler=lambda c: (0, 0)
        ),
    ],
)
def test_public_functions_raise_spd_math_errors_for_bad_input(call):
    with pytest.raises(SpdMathError):
        call()


@pytest.mark.parametrize("threshold", [0.0, 0.001, 0.5])
def test_nan_or_inf_in_activations_names_module_and_component(threshold):
    values = np.random.default_rng(0).random((6, 4)).astype(np.float32)
    values[:, 2] = 0.0
    values[3, 2] = np.nan
    other = np.random.default_rng(1).random((6, 3)).astype(np.float32)
    other[0, 1] = np.inf
    with pytest.raises(ActivationsError, match=r"'layer\.0'.*NaN or inf.*layer\.0:2"):
        process_activations({"layer.0": values, "layer.1": other}, filter_dead_threshold=threshold)
    with pytest.raises(ActivationsError, match=r"'layer\.1'.*layer\.1:1"):
        process_activations({"layer.1": other}, filter_dead_threshold=threshold)


def test_numpy_inputs_are_accepted_everywhere_and_equal_torch_inputs():
    rng = np.random.default_rng(3)
    values = (rng.random((200, 12)) * (rng.random((200, 12)) < 0.2)).astype(np.float32)
    from_numpy = process_activations({"m": values}, filter_dead_threshold=0.001)
    from_torch = process_activations({"m": torch.from_numpy(values)}, filter_dead_threshold=0.001)
    assert isinstance(from_numpy.activations, torch.Tensor)
    assert torch.equal(from_numpy.activations, from_torch.activations) and from_numpy.labels == from_torch.labels
    direct = ProcessedActivations(activations=values, labels=[f"m:{i}" for i in range(12)])
    config = MergeConfig(iters=5)
    history = merge_iteration(direct, config, seed=1)
    assert torch.equal(history.group_idxs, merge_iteration(from_torch, config, seed=1).group_idxs) or from_torch.dead_labels

    rebuilt = MergeHistory(labels=history.labels, group_idxs=history.group_idxs.numpy(), pair_costs=history.pair_costs.numpy())
    assert isinstance(rebuilt.group_idxs, torch.Tensor) and torch.equal(rebuilt.group_idxs, history.group_idxs)
    assert rebuilt.k_groups.tolist() == history.k_groups.tolist()

    ensemble = normalize_ensemble([history, history])
    from_arrays = NormalizedEnsemble(merges=ensemble.merges.numpy(), labels=ensemble.labels, present=ensemble.present.numpy())
    assert torch.equal(from_arrays.merges, ensemble.merges) and from_arrays.present.dtype == torch.bool
    assert torch.equal(compute_distances(from_arrays, "matching_dist"), compute_distances(ensemble, "matching_dist"))


def test_distance_methods_is_a_tuple_of_names_and_a_registry():
    assert DISTANCE_METHODS == ("perm_invariant_hamming", "matching_dist")
    assert isinstance(DISTANCE_METHODS, tuple) and "matching_dist" in DISTANCE_METHODS
    method = DISTANCE_METHODS.lookup("matching_dist")
    assert callable(method.on_partitions) and callable(method.on_merges)
    with pytest.raises(DistanceError, match="method: expected one of"):
        DISTANCE_METHODS.lookup("euclid", DistanceError, "method")


def test_sampler_registry_drives_config_defaults_and_checks():
    assert tuple(SAMPLERS) == ("range", "mcmc")
    for name in SAMPLERS:
        spec = SAMPLERS.lookup(name)
        config = MergeConfig(merge_pair_sampling_method=name, merge_pair_sampling_kwargs={})
        assert dict(config.merge_pair_sampling_kwargs) == dict(spec.kwarg_defaults)
    with pytest.raises(ConfigError, match="merge_pair_sampling_kwargs.threshold"):
        MergeConfig(merge_pair_sampling_kwargs={"threshold": 1.5})
    with pytest.raises(ConfigError, match="merge_pair_sampling_kwargs.temperature"):
        MergeConfig(merge_pair_sampling_method="mcmc", merge_pair_sampling_kwargs={"temperature": 0})


def test_every_public_name_has_a_numpydoc_docstring_with_an_example():
    for name in spd_math.__all__:
        value = getattr(spd_math, name)
        if isinstance(value, tuple):  # registries document themselves in their module
            continue
        doc = value.__doc__ or ""
        assert "Examples" in doc and ">>>" in doc, name
        if callable(value) and not isinstance(value, type):
            assert "Parameters" in doc and "Returns" in doc, name
