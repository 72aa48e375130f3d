"""`extract_and_process_activations` on a real pretrained model (all-MiniLM-L6-v2) and real text: the same
processed activations as the `torch` source's pipeline step gives for the same batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spd_assets import extract_and_process_activations
from spd_assets.config import parse_config
from spd_assets.defs import steps
from spd_assets.errors import SourceError
from spd_assets.sources import TorchSource, source_for
from spd_math import ProcessedActivations
from tests.model_helpers import MINILM_MODULES, MINILM_UNITS, minilm_directory, write_corpus

SEQ_LEN = 32
CPU = torch.device("cpu")


def same_processed(ours: ProcessedActivations, theirs: ProcessedActivations) -> bool:
    if ours.labels != theirs.labels or ours.dead_labels != theirs.dead_labels or ours.is_compact != theirs.is_compact:
        return False
    if not ours.is_compact:
        return torch.equal(ours.activations, theirs.activations)
    left, right = ours.to_scipy_csr(), theirs.to_scipy_csr()
    return (left.shape == right.shape and np.array_equal(left.indptr, right.indptr)
            and np.array_equal(left.indices, right.indices) and np.array_equal(left.data, right.data))


@pytest.fixture(scope="module")
def torch_source_values(tmp_path_factory) -> dict:
    corpus = write_corpus(tmp_path_factory.mktemp("corpus"))
    return {"kind": "torch", "model": str(minilm_directory()), "modules": [MINILM_MODULES], "text": str(corpus),
            "seq_len": SEQ_LEN, "batch_size": 6, "n_members": 2, "chunk_size": 4}


@pytest.fixture(scope="module")
def minilm(torch_source_values) -> TorchSource:
    source = source_for(parse_config({"source": torch_source_values}).source)
    source.check()
    return source


@pytest.mark.parametrize(("merge_config", "seq_mode"), [
    ({}, "concat"),                                                         # compact: entries above the threshold
    ({"activation_threshold": None, "filter_dead_threshold": 0.05}, "concat"),  # continuous, dead components dropped
    ({"activation_threshold": None}, "seq_mean"),
    ({"module_name_filter": "encoder.layer.4"}, "concat"),
])
def test_equals_the_torch_sources_step_on_the_same_batch(minilm, torch_source_values, merge_config, seq_mode):
    config = parse_config({"source": torch_source_values, "merge_config": merge_config, "seq_mode": seq_mode})
    source = source_for(config.source)
    source.loaded = minilm.loaded  # the same model, not loaded again
    batch = source.token_batch("member_001", config.member_seed("member_001"))
    theirs = steps.model_activations(source, batch, config, "member_001", CPU).value
    ours = extract_and_process_activations(minilm.loaded.model, batch.inputs, config)
    assert same_processed(ours, theirs)
    assert ours.n_samples == (6 * SEQ_LEN if seq_mode == "concat" else 6)
    assert ours.n_components + len(ours.dead_labels) == MINILM_UNITS * (1 if "module_name_filter" in merge_config else 6)


def test_module_patterns_given_directly_and_a_tensor_batch(minilm, torch_source_values):
    config = parse_config({"source": torch_source_values})
    batch = minilm.token_batch("member_000", config.member_seed("member_000"))
    theirs = steps.model_activations(minilm, batch, config, "member_000", CPU).value
    # A config without a torch source: the patterns come as an argument, the batch as a tensor, in one chunk;
    # a model left in training mode (dropout on) runs in eval mode as the source's, and is left as it was.
    model = minilm.loaded.model
    model.train()
    try:
        ours = extract_and_process_activations(model, torch.from_numpy(batch.inputs), {}, modules=[MINILM_MODULES])
        assert model.training
    finally:
        model.eval()
    assert same_processed(ours, theirs)


def test_clear_errors(minilm):
    ids = np.zeros((2, 8), dtype=np.int64)
    with pytest.raises(SourceError, match=r"modules: a BertModel needs glob patterns"):
        extract_and_process_activations(minilm.loaded.model, ids, {})
    with pytest.raises(SourceError, match=r"pattern 'encoder.layer.*.mlp' matches no module of BertModel"):
        extract_and_process_activations(minilm.loaded.model, ids, {}, modules=["encoder.layer.*.mlp"])
    with pytest.raises(SourceError, match=r"batch: expected token ids \[sequences, seq_len\]"):
        extract_and_process_activations(minilm.loaded.model, np.zeros(8, dtype=np.int64), {}, modules=[MINILM_MODULES])
    with pytest.raises(SourceError, match="over source.memory_budget_gb"):
        extract_and_process_activations(minilm.loaded.model, ids, {"merge_config": {"activation_threshold": None}},
                                        modules=[MINILM_MODULES], memory_budget_gb=1e-6)
