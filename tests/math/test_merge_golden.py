"""Golden replay: the engine reproduces the original implementation's merges, costs and MDL losses."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from spd_math import (
    MergeConfig,
    ProcessedActivations,
    compute_merge_costs,
    merge_iteration,
    process_activations,
)
from tests.conftest import golden_files, load_golden

RTOL = 1e-4


def assert_close_to_float32_reference(actual: np.ndarray, expected: np.ndarray) -> None:
    """Relative tolerance 1e-4, plus the absolute error float32 arithmetic makes at the matrix's scale.

    The reference was computed in float32: entries that are tiny differences of large terms
    carry absolute errors of order 1e-7 x the largest entry, which no exact method can match
    relatively.
    """
    scale = float(np.abs(expected).max())
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=1e-5 * scale)


@pytest.mark.parametrize("path", golden_files("costs_*.npz"), ids=lambda p: p.name)
def test_merge_costs_match_golden(path):
    data = load_golden(path)
    coact_normalized = torch.from_numpy(data["coact"]).double() / float(data["n_samples"])
    costs = compute_merge_costs(coact_normalized, torch.from_numpy(data["group_sizes"]), float(data["alpha"]))
    assert costs.shape == data["expected_costs"].shape
    assert_close_to_float32_reference(costs.numpy(), data["expected_costs"])


def off_diagonal(costs: torch.Tensor) -> np.ndarray:
    values = costs.double().numpy()
    return values[~np.eye(values.shape[0], dtype=bool)]


@pytest.mark.parametrize("path", golden_files("merge_*.npz"), ids=lambda p: p.name)
def test_merge_replay_matches_golden(path):
    data = load_golden(path)
    config = MergeConfig(**json.loads(str(data["config_json"])))
    activations = ProcessedActivations(
        activations=torch.from_numpy(data["activations"]), labels=[str(label) for label in data["labels"]]
    )
    recorded_pairs = iter(data["selected_pairs"].tolist())
    seen_costs: list[torch.Tensor] = []

    def replay(costs: torch.Tensor) -> tuple[int, int]:
        seen_costs.append(costs.clone())
        return tuple(next(recorded_pairs))

    history = merge_iteration(activations, config, pair_sampler=replay)

    assert history.n_iters == int(data["n_iters"])
    np.testing.assert_array_equal(history.group_idxs.numpy(), data["group_idxs"])
    np.testing.assert_array_equal(history.k_groups.numpy(), data["k_groups"])
    np.testing.assert_array_equal(history.selected_pairs.numpy(), data["selected_pairs"])
    np.testing.assert_allclose(history.pair_costs.numpy(), data["pair_costs"], rtol=RTOL)
    np.testing.assert_allclose(history.mdl_losses.numpy(), data["mdl_losses"], rtol=RTOL)
    np.testing.assert_allclose([off_diagonal(c).min() for c in seen_costs], data["costs_offdiag_min"], rtol=RTOL)
    np.testing.assert_allclose([off_diagonal(c).max() for c in seen_costs], data["costs_offdiag_max"], rtol=RTOL)
    for iteration in range(3):
        assert_close_to_float32_reference(seen_costs[iteration].numpy(), data[f"costs_iter{iteration}"])


@pytest.mark.parametrize("path", golden_files("process_*.npz"), ids=lambda p: p.name)
def test_process_activations_matches_golden(path):
    data = load_golden(path)
    mapping = {key.removeprefix("input::"): torch.from_numpy(value) for key, value in data.items() if key.startswith("input::")}
    prefix = str(data["module_prefix"])
    processed = process_activations(
        mapping,
        filter_dead_threshold=float(data["filter_dead_threshold"]),
        seq_mode=str(data["seq_mode"]),
        module_filter=prefix or None,
    )
    np.testing.assert_allclose(processed.activations.numpy(), data["expected_activations"], rtol=1e-6)
    assert processed.labels == [str(label) for label in data["expected_labels"]]
    assert processed.dead_labels == [str(label) for label in data["expected_dead_labels"]]
