"""The merge engine against a textbook implementation of docs/math.md, its sampler, edge cases and errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spd_math import (
    ActivationsError,
    MergeConfig,
    ProcessedActivations,
    compute_merge_costs,
    merge_iteration,
)
from spd_math._engine import backend


def textbook_merge(activations: torch.Tensor, config: MergeConfig, choose) -> dict[str, list]:
    """docs/math.md §2-§7 written plainly: dense group columns, recomputed in float64 every iteration."""
    boolean = config.activation_threshold is not None
    columns = (activations > config.activation_threshold).double() if boolean else activations.double()
    n, c = columns.shape
    coact = columns.T @ columns
    sizes = torch.ones(c, dtype=torch.float64)
    partition = np.arange(c)
    record: dict[str, list] = {"pairs": [], "partitions": [], "costs": [], "mdl": [], "matrices": []}
    iters = c - 1 if config.iters is None else config.iters
    for _ in range(iters):
        k = columns.shape[1]
        q = coact / n
        s = q.diagonal()
        total = s.sum()
        union = s[:, None] + s[None, :] - q
        costs = (
            (total - s[:, None] - s[None, :]) * math.log2((k - 1) / k)
            + union * math.log2(k - 1)
            - s[:, None] * math.log2(k)
            - s[None, :] * math.log2(k)
            + config.alpha * (union * (sizes[:, None] + sizes[None, :]) - s[:, None] * sizes[:, None] - s[None, :] * sizes[None, :])
        )
        i, j = choose(costs)
        low, high = min(i, j), max(i, j)
        merged = torch.maximum(columns[:, low], columns[:, high]) if boolean else columns[:, low] + columns[:, high]
        keep = [g for g in range(k) if g != high]
        columns = columns.clone()
        columns[:, low] = merged
        columns = columns[:, keep]
        sizes = sizes.clone()
        sizes[low] += sizes[high]
        sizes = sizes[keep]
        coact = coact[keep][:, keep].clone()
        new_low = keep.index(low)
        row = merged @ columns
        coact[new_low, :] = row
        coact[:, new_low] = row
        coact[new_low, new_low] = merged.sum()
        partition = partition.copy()
        partition[partition == high] = low
        partition[partition > high] -= 1
        k_after = k - 1
        record["pairs"].append((i, j))
        record["partitions"].append(partition)
        record["costs"].append(float(costs[i, j]))
        record["matrices"].append(costs)
        record["mdl"].append(float((coact.diagonal() * (math.log2(k_after) + config.alpha * sizes)).sum()))
        if k_after <= 3:
            break
    return record


def random_candidate_chooser(seed: int, threshold: float):
    rng = np.random.default_rng(seed)

    def choose(costs: torch.Tensor) -> tuple[int, int]:
        values = costs.numpy().copy()
        np.fill_diagonal(values, np.nan)
        lo, hi = np.nanmin(values), np.nanmax(values)
        candidates = np.argwhere(values <= lo + threshold * (hi - lo))
        return tuple(int(v) for v in candidates[rng.integers(len(candidates))])

    return choose


def replayer(pairs):
    remaining = iter(pairs)
    return lambda costs: next(remaining)


@st.composite
def merge_problems(draw):
    n = draw(st.integers(1, 40))
    c = draw(st.integers(2, 10))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    density = draw(st.sampled_from([0.05, 0.2, 0.6]))
    values = rng.random((n, c)) * (rng.random((n, c)) < density)
    values[:, rng.random(c) < 0.15] = 0.0  # some never-active components
    threshold = draw(st.sampled_from([None, 0.0, 0.1, 0.5]))
    config = MergeConfig(
        activation_threshold=threshold,
        alpha=draw(st.sampled_from([0.0, 0.3, 1.0, 5.0])),
        iters=draw(st.sampled_from([None, 1, 3, 50])),
        filter_dead_threshold=0.0,
    )
    return torch.from_numpy(values.astype(np.float32)), config, seed


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(merge_problems())
def test_engine_equals_textbook_implementation(problem):
    values, config, seed = problem
    reference = textbook_merge(values, config, random_candidate_chooser(seed, threshold=0.3))
    labels = [f"m:{x}" for x in range(values.shape[1])]
    seen: list[torch.Tensor] = []
    replay = replayer(reference["pairs"])

    def recording_replay(costs):
        seen.append(costs.clone())
        return replay(costs)

    history = merge_iteration(ProcessedActivations(activations=values, labels=labels), config, pair_sampler=recording_replay)

    assert history.n_iters == len(reference["pairs"])
    np.testing.assert_array_equal(history.group_idxs.numpy(), np.array(reference["partitions"]))
    scale = max(1.0, max(float(m.abs().max()) for m in reference["matrices"]))
    for ours, textbook in zip(seen, reference["matrices"]):
        np.testing.assert_allclose(ours.numpy(), textbook.numpy(), rtol=1e-9, atol=1e-12 * scale)
    np.testing.assert_allclose(history.pair_costs.numpy(), reference["costs"], rtol=1e-9, atol=1e-12 * scale)
    np.testing.assert_allclose(history.mdl_losses.numpy(), reference["mdl"], rtol=1e-9, atol=1e-9)


@settings(max_examples=40, deadline=None)
@given(problem=merge_problems())
def test_torch_path_equals_numpy_path(problem, monkeypatch_module):
    """The torch primitives (what runs on a GPU) give the same history as the NumPy CPU fast path."""
    values, config, seed = problem
    activations = ProcessedActivations(activations=values, labels=[f"m:{x}" for x in range(values.shape[1])])
    fast = merge_iteration(activations, config, seed=seed)
    with monkeypatch_module.context() as patch:
        patch.setattr(backend, "numpy_fast_path", lambda tensor: False)
        portable = merge_iteration(activations, config, seed=seed)
    np.testing.assert_array_equal(fast.group_idxs.numpy(), portable.group_idxs.numpy())
    np.testing.assert_array_equal(fast.selected_pairs.numpy(), portable.selected_pairs.numpy())
    np.testing.assert_allclose(fast.mdl_losses.numpy(), portable.mdl_losses.numpy(), rtol=1e-12)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def sparse_activations(n: int, c: int, seed: int, density: float = 0.1) -> ProcessedActivations:
    generator = torch.Generator().manual_seed(seed)
    values = torch.rand((n, c), generator=generator) * (torch.rand((n, c), generator=generator) < density)
    return ProcessedActivations(activations=values, labels=[f"layer.{x % 3}:{x}" for x in range(c)])


@pytest.mark.parametrize("method, kwargs", [("range", {"threshold": 0.05}), ("range", {"threshold": 0.0}), ("mcmc", {"temperature": 0.5})])
def test_seeded_runs_are_reproducible_and_partitions_shrink_by_one(method, kwargs):
    activations = sparse_activations(500, 30, seed=1)
    config = MergeConfig(iters=20, merge_pair_sampling_method=method, merge_pair_sampling_kwargs=kwargs)
    first = merge_iteration(activations, config, seed=7)
    again = merge_iteration(activations, config, seed=7)
    assert first.seed == 7
    np.testing.assert_array_equal(first.group_idxs.numpy(), again.group_idxs.numpy())
    np.testing.assert_array_equal(first.selected_pairs.numpy(), again.selected_pairs.numpy())
    c = activations.n_components
    for i, partition in enumerate(first.group_idxs.numpy()):
        assert len(np.unique(partition)) == c - i - 1 == int(first.k_groups[i])
        # Groups are numbered by their smallest member: ids appear in order 0, 1, 2, ...
        _, first_seen = np.unique(partition, return_index=True)
        assert list(partition[np.sort(first_seen)]) == list(range(c - i - 1))


def test_different_seeds_explore_different_merges():
    activations = sparse_activations(500, 30, seed=1)
    config = MergeConfig(iters=20, merge_pair_sampling_kwargs={"threshold": 0.5})
    histories = [merge_iteration(activations, config, seed=s).selected_pairs.numpy() for s in range(4)]
    assert any(not np.array_equal(histories[0], other) for other in histories[1:])


def test_range_sampler_only_picks_candidates_within_threshold():
    activations = sparse_activations(400, 25, seed=3)
    threshold = 0.05
    config = MergeConfig(iters=15, merge_pair_sampling_kwargs={"threshold": threshold})
    history = merge_iteration(activations, config, seed=11)
    # Replaying the chosen pairs exposes each iteration's cost matrix; every choice must be a candidate.
    matrices: list[torch.Tensor] = []
    pairs = iter(history.selected_pairs.tolist())

    def replay(costs):
        matrices.append(costs.clone())
        return tuple(next(pairs))

    merge_iteration(activations, config, pair_sampler=replay)
    for (i, j), costs in zip(history.selected_pairs.tolist(), matrices):
        values = costs.numpy().copy()
        np.fill_diagonal(values, np.nan)
        lo, hi = np.nanmin(values), np.nanmax(values)
        assert i != j
        assert values[i, j] <= lo + threshold * (hi - lo) + 1e-12 * max(1.0, abs(hi))


def test_iters_none_runs_until_three_groups():
    activations = sparse_activations(300, 12, seed=5)
    history = merge_iteration(activations, MergeConfig(iters=None), seed=0)
    assert history.n_iters == 9
    assert int(history.k_groups[-1]) == 3


def test_iters_beyond_components_stops_at_three_groups():
    activations = sparse_activations(300, 8, seed=5)
    history = merge_iteration(activations, MergeConfig(iters=1000), seed=0)
    assert history.n_iters == 5 and int(history.k_groups[-1]) == 3


def test_two_components_merge_once():
    activations = sparse_activations(100, 2, seed=2, density=0.5)
    history = merge_iteration(activations, MergeConfig(iters=10), seed=0)
    assert history.n_iters == 1
    assert history.group_idxs.tolist() == [[0, 0]]


def test_never_active_components_are_merged_without_error():
    values = sparse_activations(200, 10, seed=4).activations.clone()
    values[:, [2, 5, 7]] = 0.0
    activations = ProcessedActivations(activations=values, labels=[f"m:{x}" for x in range(10)])
    history = merge_iteration(activations, MergeConfig(iters=None), seed=0)
    assert np.isfinite(history.pair_costs.numpy()).all()
    assert np.isfinite(history.mdl_losses.numpy()).all()


def test_continuous_mode_uses_sums():
    activations = sparse_activations(200, 10, seed=6, density=0.3)
    config = MergeConfig(activation_threshold=None, iters=5)
    history = merge_iteration(activations, config, seed=3)
    reference = textbook_merge(activations.activations, config, replayer(history.selected_pairs.tolist()))
    np.testing.assert_array_equal(history.group_idxs.numpy(), np.array(reference["partitions"]))
    np.testing.assert_allclose(history.mdl_losses.numpy(), reference["mdl"], rtol=1e-9)


def test_compute_merge_costs_diagonal_and_symmetry():
    q = torch.tensor([[0.5, 0.1, 0.0], [0.1, 0.3, 0.2], [0.0, 0.2, 0.4]], dtype=torch.float64)
    costs = compute_merge_costs(q, torch.tensor([1, 2, 3]), alpha=1.0)
    assert torch.allclose(costs, costs.T)
    k = 3
    expected_diagonal = q.diagonal().sum() * math.log2((k - 1) / k) - q.diagonal() * math.log2(k - 1)
    assert torch.allclose(costs.diagonal(), expected_diagonal)


@pytest.mark.parametrize(
    "values, labels, message",
    [
        (torch.zeros((0, 3)), ["a:0", "a:1", "a:2"], "at least one sample"),
        (torch.rand((10, 1)), ["a:0"], "at least 2 components"),
        (torch.tensor([[0.5, float("nan")], [0.2, 0.1]]), ["a:0", "a:1"], "NaN or inf"),
    ],
)
def test_bad_activations_give_clear_errors(values, labels, message):
    with pytest.raises(ActivationsError, match=message):
        merge_iteration(ProcessedActivations(activations=values, labels=labels), MergeConfig(), seed=0)


def test_mismatched_labels_are_rejected():
    with pytest.raises(ActivationsError, match="one label per component"):
        ProcessedActivations(activations=torch.rand((5, 3)), labels=["a:0", "a:1"])


@pytest.mark.parametrize("returned, message", [((0, 0), "two different"), ((0, 99), "two different"), ("no", "a pair")])
def test_bad_pair_sampler_result_is_rejected(returned, message):
    activations = sparse_activations(50, 5, seed=0)
    with pytest.raises(ValueError, match=message):
        merge_iteration(activations, MergeConfig(), pair_sampler=lambda costs: returned)


def test_reprs_are_short_at_any_size():
    import numpy as np

    from spd_math import MergeConfig, ProcessedActivations, merge_iteration, normalize_ensemble

    labels = [f"layers.{i // 500}.mlp.up:{i % 500}" for i in range(2000)]
    processed = ProcessedActivations(np.random.default_rng(0).random((40, 2000), dtype=np.float32) > 0.7, labels)
    history = merge_iteration(processed, MergeConfig(iters=3), seed=4)
    ensemble = normalize_ensemble([history, history])
    assert repr(processed) == "ProcessedActivations(40 samples x 2,000 components, compact, 0 dead)"
    assert repr(history) == "MergeHistory(2,000 components, 3 merges, k 1,999 -> 1,997, seed 4)"
    assert repr(ensemble) == "NormalizedHistories(2 members, 3 iterations, 2,000 labels)"
