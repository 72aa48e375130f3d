"""The synthetic activation source: its model, its batches, and that the merge recovers what it plants."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

import spd_math
from spd_assets.sources.synthetic import (
    ACTIVE_RANGE,
    LIVE_FLOOR_CEILING,
    SyntheticModel,
    SyntheticParams,
    build_model,
    generate_batch,
    generate_chunks,
    generate_rows,
)
from spd_math.partitions import adjusted_rand_index

# What the product does with a batch (filter dead at 0.001, tokens as samples, range sampler).
DEAD_THRESHOLD = 0.001
ACTIVATION_THRESHOLD = 0.01
MERGE_CONFIG = spd_math.MergeConfig(
    activation_threshold=ACTIVATION_THRESHOLD,
    alpha=1.0,
    iters=None,
    merge_pair_sampling_method="range",
    merge_pair_sampling_kwargs={"threshold": 0.05},
    filter_dead_threshold=DEAD_THRESHOLD,
)
BATCH_SIZE = 32
# About 60 components: merges in well under a second.
SMALL = SyntheticParams(
    n_layers=2,
    modules=("attn", "mlp"),
    components_per_module=(12, 16),
    n_planted_groups=6,
    group_size=(3, 5),
    seq_len=64,
)


@pytest.fixture(scope="module")
def default_model() -> SyntheticModel:
    return build_model(SyntheticParams())


@pytest.fixture(scope="module")
def default_batch(default_model) -> dict[str, torch.Tensor]:
    return generate_batch(default_model, seed=0, batch_size=BATCH_SIZE)


def all_values(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """`[tokens, n_components]` in label order."""
    return torch.cat([tensor.reshape(-1, tensor.shape[-1]) for tensor in batch.values()], dim=1)


def test_model_layout_follows_params(default_model):
    params = default_model.params
    expected_modules = [f"layers.{layer}.{module}" for layer in range(params.n_layers) for module in params.modules]
    assert list(default_model.module_sizes) == expected_modules
    low, high = params.components_per_module
    assert all(low <= size <= high for size in default_model.module_sizes.values())
    assert default_model.labels == [
        f"{module}:{index}" for module, size in default_model.module_sizes.items() for index in range(size)
    ]
    assert 400 <= default_model.n_components <= 800
    assert default_model.planted_group.shape == default_model.dead.shape == (default_model.n_components,)
    assert default_model.n_planted_groups == params.n_planted_groups


def test_model_planted_groups_and_dead_components(default_model):
    params = default_model.params
    assert int(default_model.dead.sum()) == round(params.dead_fraction * default_model.n_components)
    grouped = default_model.planted_group >= 0
    assert not (grouped & default_model.dead).any(), "planted members must be live"
    sizes = np.bincount(default_model.planted_group[grouped], minlength=params.n_planted_groups)
    assert sizes.size == params.n_planted_groups
    assert ((params.group_size[0] <= sizes) & (sizes <= params.group_size[1])).all()
    low, high = params.feature_rate
    assert ((low <= default_model.feature_rates) & (default_model.feature_rates <= high)).all()
    # Members come from anywhere in the model, so groups span layers.
    layer_of = np.array([label.split(".")[1] for label in default_model.labels])
    n_layers_spanned = [np.unique(layer_of[default_model.planted_group == g]).size for g in range(params.n_planted_groups)]
    assert np.mean(np.array(n_layers_spanned) > 1) > 0.8


def test_model_is_deterministic_in_params_and_read_only(default_model):
    again = build_model(SyntheticParams())
    assert again.module_sizes == default_model.module_sizes
    assert again.labels == default_model.labels
    np.testing.assert_array_equal(again.planted_group, default_model.planted_group)
    np.testing.assert_array_equal(again.dead, default_model.dead)
    np.testing.assert_array_equal(again.feature_rates, default_model.feature_rates)
    other = build_model(SyntheticParams(model_seed=1))
    assert other.module_sizes != default_model.module_sizes
    with pytest.raises(ValueError, match="read-only"):
        default_model.planted_group[0] = 0


def test_batch_shapes_order_and_dtype(default_model, default_batch):
    assert list(default_batch) == list(default_model.module_sizes)
    for name, tensor in default_batch.items():
        assert tensor.dtype == torch.float32
        assert tuple(tensor.shape) == (BATCH_SIZE, default_model.params.seq_len, default_model.module_sizes[name])
    assert 2000 <= BATCH_SIZE * default_model.params.seq_len <= 4000


def test_batch_is_deterministic_in_seed_and_batch_size(default_model, default_batch):
    again = generate_batch(default_model, seed=0, batch_size=BATCH_SIZE)
    for name in default_batch:
        assert torch.equal(again[name], default_batch[name])
    other_seed = generate_batch(default_model, seed=1, batch_size=BATCH_SIZE)
    assert not torch.equal(all_values(other_seed), all_values(default_batch))
    smaller = generate_batch(default_model, seed=0, batch_size=2)
    assert torch.equal(all_values(smaller), all_values(generate_batch(default_model, seed=0, batch_size=2)))
    assert next(iter(smaller.values())).shape[0] == 2


def test_rows_are_the_batch_with_its_modules_side_by_side(default_model, default_batch):
    rows = generate_rows(default_model, seed=0, batch_size=BATCH_SIZE)
    assert rows.dtype == np.float32 and rows.flags.c_contiguous
    assert torch.equal(torch.from_numpy(rows), all_values(default_batch))


def test_batch_values_look_like_causal_importances(default_model, default_batch):
    values = all_values(default_batch)
    assert float(values.min()) >= 0.0 and float(values.max()) <= 1.0
    active = values > ACTIVATION_THRESHOLD
    low, high = ACTIVE_RANGE
    assert float(values[active].min()) >= low and float(values[active].max()) <= high
    # Silent entries: mostly exactly 0, the rest a faint floor.
    silent = values[~active]
    assert float((silent == 0).float().mean()) > 0.9
    assert 0 < float(silent.max()) < LIVE_FLOOR_CEILING
    assert 0.01 <= float(active.float().mean()) <= 0.06


def test_dead_components_stay_below_the_dead_threshold(default_model, default_batch):
    values = all_values(default_batch).numpy()
    assert values[:, default_model.dead].max() < DEAD_THRESHOLD
    processed = spd_math.process_activations(default_batch, filter_dead_threshold=DEAD_THRESHOLD, seq_mode="concat")
    assert processed.dead_labels == [label for label, is_dead in zip(default_model.labels, default_model.dead) if is_dead]


def test_firing_rates_follow_the_model():
    """Ungrouped components fire at the noise rate; members fire with their feature, at its rate times reliability."""
    model = build_model(SMALL)
    values = all_values(generate_batch(model, seed=3, batch_size=400)).numpy()
    active = values > ACTIVATION_THRESHOLD
    params = model.params
    ungrouped_live = (model.planted_group < 0) & ~model.dead
    assert active[:, ungrouped_live].mean() == pytest.approx(params.noise_rate, rel=0.15)
    for group in range(model.n_planted_groups):
        members = active[:, model.planted_group == group]
        expected = model.feature_rates[group] * params.member_reliability + params.noise_rate
        assert members.mean() == pytest.approx(expected, rel=0.15)
        # Two members fire together far more often than independent components would.
        both = (members[:, 0] & members[:, 1]).mean()
        assert both > 5 * members[:, 0].mean() * members[:, 1].mean()


def test_planted_partition(default_model):
    live = [label for label, is_dead in zip(default_model.labels, default_model.dead) if not is_dead]
    truth = default_model.planted_partition(live)
    n_ungrouped_live = int(((default_model.planted_group < 0) & ~default_model.dead).sum())
    assert np.unique(truth).size == default_model.n_planted_groups + n_ungrouped_live
    _, first = np.unique(truth, return_index=True)
    np.testing.assert_array_equal(truth[np.sort(first)], np.arange(first.size))
    position = {label: index for index, label in enumerate(default_model.labels)}
    groups = default_model.planted_group[[position[label] for label in live]]
    same_truth = truth[:, None] == truth[None, :]
    same_planted = (groups[:, None] == groups[None, :]) & (groups[:, None] >= 0)
    np.testing.assert_array_equal(same_truth, same_planted | np.eye(len(live), dtype=bool))
    # A subset in another order is the same truth restricted to it.
    subset = live[::-3]
    assert adjusted_rand_index(default_model.planted_partition(subset), truth[::-3]) == 1.0
    with pytest.raises(ValueError, match="unknown label"):
        default_model.planted_partition(["layers.9.attn.q:0"])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_merge_recovers_the_planted_partition(seed):
    model = build_model(SMALL)
    batch = generate_batch(model, seed=seed, batch_size=BATCH_SIZE)
    processed = spd_math.process_activations(batch, filter_dead_threshold=DEAD_THRESHOLD, seq_mode="concat")
    history = spd_math.merge_iteration(processed, MERGE_CONFIG, seed=seed)
    truth = model.planted_partition(processed.labels)
    planted_k = np.unique(truth).size
    iteration = int(np.flatnonzero(history.k_groups.numpy() == planted_k)[0])
    assert adjusted_rand_index(history.group_idxs[iteration], truth) >= 0.9


def test_default_batch_generates_fast(default_model):
    start = time.perf_counter()
    generate_batch(default_model, seed=7, batch_size=BATCH_SIZE)
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"n_layers": 0}, "n_layers: expected an integer >= 1, got 0"),
        ({"n_layers": 2.0}, "n_layers: expected an integer"),
        ({"modules": ()}, "modules: expected a non-empty tuple"),
        ({"modules": "attn"}, "modules: expected a non-empty tuple"),
        ({"modules": ("attn", "attn")}, "modules: expected distinct non-empty strings"),
        ({"components_per_module": (0, 4)}, r"components_per_module\[0\]: expected an integer >= 1, got 0"),
        ({"components_per_module": (30, 20)}, r"components_per_module\[1\]: expected an integer >= 30, got 20"),
        ({"components_per_module": 24}, r"components_per_module: expected an inclusive range"),
        ({"n_planted_groups": -1}, "n_planted_groups: expected an integer >= 0, got -1"),
        ({"group_size": (1, 4)}, r"group_size\[0\]: expected an integer >= 2, got 1"),
        ({"feature_rate": (0.0, 0.1)}, r"feature_rate\[0\]: expected a number in \(0, 1\], got 0.0"),
        ({"feature_rate": (0.01, 1.5)}, r"feature_rate\[1\]: expected a number in \(0, 1\], got 1.5"),
        ({"feature_rate": (0.1, 0.01)}, r"feature_rate: expected low <= high"),
        ({"member_reliability": 0}, r"member_reliability: expected a number in \(0, 1\], got 0"),
        ({"noise_rate": -0.1}, r"noise_rate: expected a number in \[0, 1\], got -0.1"),
        ({"noise_rate": float("nan")}, r"noise_rate: expected a number in \[0, 1\], got nan"),
        ({"dead_fraction": 1.0}, r"dead_fraction: expected a number in \[0, 1\), got 1.0"),
        ({"model_seed": -3}, "model_seed: expected an integer >= 0, got -3"),
        ({"seq_len": 0}, "seq_len: expected an integer >= 1, got 0"),
        ({"n_planted_groups": 200}, "n_planted_groups: 200 groups .* expected at most 432 planted members"),
    ],
)
def test_params_reject_bad_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        SyntheticParams(**overrides)


def test_params_from_config_lists_are_tuples():
    from_lists = {"modules": ["attn", "mlp"], "components_per_module": [4, 8], "group_size": [2, 3], "feature_rate": [0.1, 0.2]}
    params = SyntheticParams(n_planted_groups=2, **from_lists)
    expected = SyntheticParams(n_planted_groups=2, **{name: tuple(value) for name, value in from_lists.items()})
    assert params == expected
    assert hash(params) == hash(expected)


def test_generate_batch_rejects_bad_arguments(default_model):
    with pytest.raises(ValueError, match="seed: expected an integer >= 0, got -1"):
        generate_batch(default_model, seed=-1, batch_size=BATCH_SIZE)
    with pytest.raises(ValueError, match="batch_size: expected an integer >= 1, got 0"):
        generate_batch(default_model, seed=0, batch_size=0)
    with pytest.raises(TypeError, match="model: expected SyntheticModel"):
        generate_batch(SyntheticParams(), seed=0, batch_size=BATCH_SIZE)


def reference_rows(model: SyntheticModel, seed: int, batch_size: int) -> np.ndarray:
    """The batch as one random stream draws it, part after part over every token (how `generate_rows` was first
    written, and what its chunks must reproduce)."""
    from spd_assets.sources.synthetic import BATCH_STREAM, DEAD_FLOOR_CEILING, FLOOR_RATE

    params = model.params
    rng = np.random.default_rng([BATCH_STREAM, params.model_seed, seed])
    n = batch_size * params.seq_len
    feature_on = rng.random((n, model.n_planted_groups)) < model.feature_rates
    fires = rng.random((n, model.n_components), dtype=np.float32) < np.where(model.dead, 0.0, params.noise_rate).astype(np.float32)
    members = np.flatnonzero(model.planted_group >= 0)
    reliable = rng.random((n, members.size), dtype=np.float32) < params.member_reliability
    fires[:, members] |= feature_on[:, model.planted_group[members]] & reliable
    draw = rng.random((n, model.n_components), dtype=np.float32)
    ceiling = np.where(model.dead, DEAD_FLOOR_CEILING, LIVE_FLOOR_CEILING).astype(np.float32)
    values = np.where(draw < FLOOR_RATE, draw * (ceiling / FLOOR_RATE), np.float32(0)).astype(np.float32)
    values[fires] = rng.uniform(*ACTIVE_RANGE, size=int(fires.sum())).astype(np.float32)
    return values


@pytest.mark.parametrize("params", [
    SMALL,
    # Odd token and component counts: a part of float32 draws ends halfway through a 64-bit output.
    SyntheticParams(n_layers=1, modules=("a", "b", "c"), components_per_module=(5, 7), n_planted_groups=3,
                    group_size=(2, 3), seq_len=5),
    SyntheticParams(n_layers=1, modules=("a",), components_per_module=(5, 5), n_planted_groups=0, seq_len=3),
], ids=["small", "odd", "no-groups"])
def test_streamed_chunks_are_the_batch_drawn_from_one_stream(params):
    model = build_model(params)
    for seed, batch_size in ((0, 1), (3, 7), (11, 8)):
        expected = reference_rows(model, seed, batch_size)
        np.testing.assert_array_equal(generate_rows(model, seed=seed, batch_size=batch_size), expected)
        for chunk_sequences in (1, 2, 5):
            chunks = list(generate_chunks(model, seed=seed, batch_size=batch_size, chunk_sequences=chunk_sequences))
            assert [len(next(iter(chunk.values()))) for chunk in chunks][0] == min(chunk_sequences, batch_size)
            rows = np.concatenate([np.concatenate([chunk[name].reshape(-1, chunk[name].shape[-1]).numpy()
                                                   for name in model.module_sizes], axis=1) for chunk in chunks])
            np.testing.assert_array_equal(rows, expected)


def test_a_streamed_member_is_the_whole_batch_processed():
    """The component_activations step with the source streaming (compact, chunk by chunk) and with the batch whole:
    the same labels, dead components, statistics and merges."""
    from spd_assets.config import parse_config
    from spd_assets.defs import steps
    from spd_assets.sources import source_for

    config = parse_config({"name": "s", "source": {"kind": "synthetic", "batch_size": 8, "params": {
        "n_layers": 2, "modules": ["attn.q", "mlp.up"], "components_per_module": [20, 30], "n_planted_groups": 6}}})
    source = source_for(config.source)
    whole_source = type("Whole", (type(source),), {"streams_batches": False})(source.config)
    source.batch_chunks = lambda member, seed: generate_chunks(source.model, seed=seed, batch_size=8, chunk_sequences=3)
    streamed = steps.component_activations(source, config, "member_000")
    whole = steps.component_activations(whole_source, config, "member_000")
    assert streamed.value.is_compact and not whole.value.is_compact
    assert streamed.value.labels == whole.value.labels and streamed.value.dead_labels == whole.value.dead_labels
    assert streamed.tables["component_stats"].equals(whole.tables["component_stats"])
    merges = [spd_math.merge_iteration(result.value, config.merge_config, seed=1) for result in (streamed, whole)]
    assert torch.equal(merges[0].merge_pairs, merges[1].merge_pairs)
    assert torch.equal(merges[0].mdl_losses, merges[1].mdl_losses)
