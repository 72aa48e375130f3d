"""Building one member's activations from forward chunks equals processing the whole batch at once."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spd_assets.errors import SourceError
from spd_assets.sources.streaming import activations_from_chunks
from spd_assets.sources.synthetic import SyntheticParams, build_model, generate_batch
from spd_assets.storage import tables
from spd_math import MergeConfig, drop_dead, merge_iteration, process_activations

PARAMS = SyntheticParams(n_layers=2, modules=("attn.q", "mlp.up"), components_per_module=(6, 9), n_planted_groups=3,
                         group_size=(2, 3), seq_len=12)
GIB = 2**30


def batch_in_chunks(batch: dict[str, torch.Tensor], rows: int) -> list[dict[str, torch.Tensor]]:
    n = next(iter(batch.values())).shape[0]
    return [{name: values[start : start + rows] for name, values in batch.items()} for start in range(0, n, rows)]


def whole_batch_result(batch, merge: MergeConfig, seq_mode):
    """What the step of the batch sources computes: process, drop dead, summarise."""
    every = process_activations(batch, filter_dead_threshold=0.0, seq_mode=seq_mode, module_filter=merge.module_name_filter)
    processed = drop_dead(every, merge.filter_dead_threshold)
    stats = tables.component_stats("e", "m", every, dead_labels=processed.dead_labels,
                                   activation_threshold=merge.activation_threshold)
    return processed, stats


@pytest.mark.parametrize(("seq_mode", "threshold", "module_filter", "chunk_rows"), [
    ("concat", 0.01, None, 3),
    ("seq_mean", None, None, 4),
    ("concat", 0.2, "layers.1.", 7),
])
def test_chunks_give_what_the_whole_batch_gives(seq_mode, threshold, module_filter, chunk_rows):
    batch = generate_batch(build_model(PARAMS), seed=5, batch_size=10)
    # Some dead components, so the dead filter has something to drop.
    batch["layers.0.attn.q"][..., :2] = 0.0
    batch["layers.1.mlp.up"][..., -1] = 0.0
    merge = MergeConfig(activation_threshold=threshold, filter_dead_threshold=0.001, module_name_filter=module_filter)
    expected, expected_stats = whole_batch_result(batch, merge, seq_mode)

    streamed = activations_from_chunks(
        batch_in_chunks(batch, chunk_rows), module_widths={n: v.shape[-1] for n, v in batch.items()},
        activation_dims=(10, PARAMS.seq_len), merge_config=merge, seq_mode=seq_mode, memory_budget_bytes=GIB,
    )
    assert streamed.processed.labels == expected.labels
    assert streamed.processed.dead_labels == expected.dead_labels and expected.dead_labels
    if threshold is None:  # continuous mode: the dense values
        assert torch.equal(streamed.processed.activations, expected.activations)
    else:  # compact: exactly the entries above the threshold, and the same merge
        assert streamed.processed.is_compact
        kept = expected.activations.numpy() * (expected.activations.numpy() > threshold)
        assert np.array_equal(streamed.processed.to_scipy_csr().toarray(), kept)
        first, second = (merge_iteration(p, merge, seed=1) for p in (streamed.processed, expected))
        assert torch.equal(first.group_idxs, second.group_idxs) and torch.equal(first.pair_costs, second.pair_costs)
    statistics = streamed.statistics
    stats = tables.component_stats_table(
        "e", "m", streamed.labels, activation_frequency=statistics.activation_frequency,
        mean_activation=statistics.mean, max_activation=statistics.maxima,
        dead_labels=streamed.processed.dead_labels)
    assert stats.select("label", "module", "component_index", "dead").equals(
        expected_stats.select("label", "module", "component_index", "dead"))
    for column in ("activation_frequency", "max_activation"):
        assert np.array_equal(stats[column].to_numpy(), expected_stats[column].to_numpy()), column
    np.testing.assert_allclose(stats["mean_activation"], expected_stats["mean_activation"], rtol=1e-12)


def test_continuous_mode_over_the_memory_budget_is_refused_before_any_chunk_is_computed():
    def forward_pass():
        raise AssertionError("the forward pass started")
        yield  # a generator, like a model source's chunks

    with pytest.raises(SourceError) as refused:
        activations_from_chunks(
            forward_pass(), module_widths={f"encoder.layer.{i}.intermediate.dense": 1536 for i in range(6)},
            activation_dims=(3125, 64), merge_config=MergeConfig(activation_threshold=None), seq_mode="concat",
            memory_budget_bytes=4 * GIB,
        )
    message = str(refused.value)
    assert "6.87 GiB" in message and "200,000 samples x 9,216 components" in message
    assert "memory_budget_gb = 4" in message


def test_bad_chunks_are_named():
    merge = MergeConfig()
    good = {"a": torch.rand(2, 3, 4), "b": torch.rand(2, 3, 5)}

    def run(chunks, dims=(4, 3)):
        return activations_from_chunks(chunks, module_widths={"a": 4, "b": 5}, activation_dims=dims,
                                       merge_config=merge, seq_mode="concat", memory_budget_bytes=GIB)

    with pytest.raises(SourceError, match=r"module 'b'.*NaN or inf in component\(s\) \['b:2'\]"):
        bad = dict(good, b=good["b"].clone())
        bad["b"][1, 2, 2] = float("nan")
        run([good, bad])
    with pytest.raises(SourceError, match="a chunk has modules"):
        run([good, {"a": good["a"], "b": good["b"][..., :3]}])
    with pytest.raises(SourceError, match="gave 6 samples; expected 12"):
        run([good])
    with pytest.raises(SourceError, match="keeps none of the modules"):
        activations_from_chunks([good], module_widths={"a": 4, "b": 5}, activation_dims=(2, 3),
                                merge_config=MergeConfig(module_name_filter="mlp."), seq_mode="concat",
                                memory_budget_bytes=GIB)


def test_with_a_threshold_the_dense_matrix_never_exists():
    """A member whose dense matrix is 8x the budget streams, as long as the entries above the threshold fit."""
    rng = np.random.default_rng(0)
    samples, width, budget = 20_000, 400, 4 * 2**20  # dense: 30.5 MiB
    values = torch.from_numpy((rng.random((samples, width)) < 0.01) * rng.random((samples, width))).float()
    chunks = ({"m": values[start : start + 1000]} for start in range(0, samples, 1000))
    streamed = activations_from_chunks(chunks, module_widths={"m": width}, activation_dims=(samples,),
                                       merge_config=MergeConfig(activation_threshold=0.0), seq_mode=None,
                                       memory_budget_bytes=budget)
    assert streamed.processed.is_compact and streamed.processed.n_samples == samples
    assert streamed.processed.to_scipy_csr().nnz == int((values > 0).sum())


def test_with_a_threshold_the_member_stops_once_its_kept_entries_outgrow_the_budget():
    computed = []

    def forward_pass():
        for index in range(100):
            computed.append(index)
            yield {"m": torch.ones(1000, 300)}  # every entry above the threshold: 2.3 MiB kept per chunk

    with pytest.raises(SourceError) as stopped:
        activations_from_chunks(forward_pass(), module_widths={"m": 300}, activation_dims=(100_000,),
                                merge_config=MergeConfig(activation_threshold=0.5), seq_mode=None,
                                memory_budget_bytes=2**23)
    message = str(stopped.value)
    assert "after 4,000 of 100,000 samples" in message and "memory_budget_gb = 0.0078125" in message
    assert len(computed) == 4  # stopped there, not at the end
