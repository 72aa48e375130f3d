"""The torch source on a real pretrained model (all-MiniLM-L6-v2) and real English text, and on a random GPT-2."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from spd_assets.config import parse_config
from spd_assets.errors import SourceError
from spd_assets.sources import TorchSource, TorchSourceConfig, source_for
from spd_assets.sources.text import document_separator, load_windows
from tests.model_helpers import (
    GPT2_VOCAB,
    MINILM_MODULES,
    MINILM_UNITS,
    minilm_directory,
    save_random_gpt2,
    write_corpus,
    write_token_ids,
)

SEQ_LEN = 32


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def minilm(corpus) -> TorchSource:
    source = TorchSource(TorchSourceConfig(model=str(minilm_directory()), modules=(MINILM_MODULES,), text=corpus,
                                           seq_len=SEQ_LEN, batch_size=6, n_members=3, chunk_size=4))
    source.check()
    return source


def test_minilm_units_on_real_text(minilm):
    layers = [f"encoder.layer.{i}.intermediate.dense" for i in range(6)]
    assert minilm.module_names == layers
    assert minilm.module_widths() == {name: MINILM_UNITS for name in layers}
    assert type(minilm.loaded.model).__name__ == "BertModel" and not minilm.loaded.model.training
    windows = minilm.windows
    assert windows.shape[1] == SEQ_LEN and len(windows) > 100  # thousands of tokens of docstrings

    batch = minilm.token_batch("member_000", seed=11)
    assert batch.inputs.shape == (6, SEQ_LEN) and batch.inputs.dtype == np.int64
    tokenizer = minilm.tokenizer
    assert batch.vocab_strings == tuple(tokenizer.decode([token_id]) for token_id in batch.vocab_ids)
    assert set(batch.vocab_ids.tolist()) == set(np.unique(batch.inputs).tolist())
    words = " ".join(minilm.decode(row) for row in batch.inputs)
    assert {"the", "of"} & set(words.split()), words  # English prose, as the tokenizer reads it back

    chunks = list(minilm.activation_chunks(batch, torch.device("cpu")))
    assert len(chunks) == 2  # 6 sequences in chunks of 4
    layer0 = torch.cat([chunk[layers[0]] for chunk in chunks])
    assert layer0.shape == (6, SEQ_LEN, MINILM_UNITS)
    # The hooked value is the module's real output: recompute it from the model's parts, without hooks.
    with torch.inference_mode():
        model = minilm.loaded.model
        ids = torch.from_numpy(batch.inputs)
        hidden = model.embeddings(input_ids=ids)
        attention = model.encoder.layer[0].attention(hidden)
        attention = attention[0] if isinstance(attention, tuple) else attention
        direct = model.encoder.layer[0].intermediate.dense(attention)
    torch.testing.assert_close(layer0, direct, rtol=1e-5, atol=1e-5)


def test_chunking_and_early_stop_do_not_change_the_values(minilm):
    batch = minilm.token_batch("member_000", seed=3)
    whole = minilm.load_batch("member_000", seed=3)
    one_chunk = TorchSource(minilm.config.model_copy(update={"chunk_size": None}))
    one_chunk.loaded = minilm.loaded  # the same model, not loaded twice
    together = next(one_chunk.activation_chunks(batch, torch.device("cpu")))
    for name, values in together.items():
        torch.testing.assert_close(whole[name], values, rtol=1e-5, atol=1e-5)
    # Between chunks the model is untouched: no hooks, no inference mode; another forward pass is not captured.
    chunks = minilm.activation_chunks(batch, torch.device("cpu"))
    first = next(chunks)
    assert not torch.is_inference_mode_enabled()
    minilm.loaded.model(input_ids=torch.from_numpy(batch.inputs[:1]))
    rest = list(chunks)
    for name in first:
        assert torch.equal(torch.cat([first[name], *(chunk[name] for chunk in rest)]), whole[name])
    # Without the early stop (the whole model runs, pooler included) the hooked values are the same.
    last = minilm.module_names[-1]
    with torch.inference_mode():
        captured = {}
        handle = minilm.loaded.model.get_submodule(last).register_forward_hook(lambda m, a, o: captured.update(v=o))
        minilm.loaded.model(input_ids=torch.from_numpy(batch.inputs))
        handle.remove()
    torch.testing.assert_close(captured["v"], whole[last], rtol=1e-5, atol=1e-5)


def test_member_batches_are_drawn_from_the_seed(minilm):
    first, again, other = (minilm.token_batch("member_000", seed) for seed in (7, 7, 8))
    assert np.array_equal(first.inputs, again.inputs)
    assert not np.array_equal(first.inputs, other.inputs)
    # A fresh source (another process) draws the same batch from the same seed.
    fresh = TorchSource(minilm.config)
    fresh.loaded = minilm.loaded
    assert np.array_equal(fresh.token_batch("member_000", 7).inputs, first.inputs)


def test_documents_are_joined_with_the_separator(tmp_path, minilm):
    docs = ["First document about parsing.", "Second document, about files and paths."]
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(docs)) + "\n\n")
    (tmp_path / "txt").mkdir()
    for index, doc in enumerate(docs):
        (tmp_path / "txt" / f"{index}.txt").write_text(doc)
    tokenizer = minilm.tokenizer
    from_jsonl = load_windows(tmp_path / "docs.jsonl", tokenizer, 4)
    assert np.array_equal(from_jsonl, load_windows(tmp_path / "txt", tokenizer, 4))
    separator = document_separator(tokenizer)
    assert separator == tokenizer.sep_token_id and (from_jsonl == separator).sum() == 1
    assert tokenizer.cls_token_id not in from_jsonl  # no special tokens but the one between documents


def test_random_gpt2_from_a_config(tmp_path):
    model_dir = save_random_gpt2(tmp_path / "gpt2")
    ids = write_token_ids(tmp_path / "ids.npy", sequences=40, seq_len=16, vocab=GPT2_VOCAB)
    config = parse_config({"source": {"kind": "torch", "model": str(model_dir), "modules": ["transformer.h.*.mlp.c_fc"],
                                      "text": str(ids), "seq_len": 16, "batch_size": 8, "n_members": 2,
                                      "chunk_size": 3}}).source
    source = source_for(config)
    source.check()
    assert type(source.loaded.model).__name__ == "GPT2LMHeadModel"  # the class config.json names
    assert source.module_widths() == {"transformer.h.0.mlp.c_fc": 128, "transformer.h.1.mlp.c_fc": 128}
    batch = source.token_batch("member_000", seed=1)
    assert batch.vocab_strings == ()  # no tokenizer: ids only
    values = source.load_batch("member_000", seed=1)["transformer.h.1.mlp.c_fc"]
    # Causal: changing the later half of each sequence leaves the earlier positions' activations alone.
    edited = batch.inputs.copy()
    edited[:, 8:] = (edited[:, 8:] + 1) % GPT2_VOCAB
    chunks = source.activation_chunks(type(batch)(edited), torch.device("cpu"))
    changed = torch.cat([chunk["transformer.h.1.mlp.c_fc"] for chunk in chunks])
    assert torch.equal(changed[:, :8], values[:, :8]) and not torch.equal(changed[:, 8:], values[:, 8:])


def test_a_factory_model(tmp_path):
    ids = write_token_ids(tmp_path / "ids.npy", sequences=10, seq_len=8, vocab=100)
    config = TorchSourceConfig(model="tests.sources.tiny_models:build", modules=("up",), text=ids, seq_len=8,
                               batch_size=4, n_members=1)
    assert config.resolved(tmp_path).model == "tests.sources.tiny_models:build"  # a factory is not a path
    source = TorchSource(config)
    source.check()
    assert not source.loaded.model.training  # dropout off
    first = source.load_batch("member_000", seed=0)["up"]
    assert first.shape == (4, 8, 12) and torch.equal(first, source.load_batch("member_000", seed=0)["up"])


@pytest.mark.parametrize(("change", "expected"), [
    ({"modules": ["encoder.layer.*.intermediate.dnse"]},
     r"pattern 'encoder.layer.\*.intermediate.dnse' matches no module of BertModel.*encoder.layer.5.intermediate.dense"),
    ({"modules": ["pooler"]}, r"module 'pooler' gives shape \(1, 384\); expected \[batch, seq, units\]"),
    ({"seq_len": 1024}, "1024 tokens; expected at most the model's 512 positions"),
    ({"batch_size": 100_000}, r"100000 sequences asked for, but the text gives only \d+ windows"),
    ({"model": "/no/such/model"}, "'/no/such/model' is neither a model directory"),
    ({"model": "tests.sources.tiny_models:missing"}, "cannot import 'tests.sources.tiny_models:missing'"),
    ({"model": "tests.sources.tiny_models:broken"}, r"broken\(\) raised RuntimeError: weights file is corrupt"),
    ({"model": "tests.sources.tiny_models:not_a_model"}, "returned dict; expected a torch.nn.Module"),
    ({"model": "tests.sources.tiny_models:build", "modules": ["up"]},
     "is text, but the model comes without a tokenizer; expected .npy token ids"),
])
def test_clear_errors(minilm, corpus, change, expected):
    values = {"model": str(minilm_directory()), "modules": [MINILM_MODULES], "text": str(corpus), "seq_len": SEQ_LEN,
              "batch_size": 4, **change}
    source = TorchSource(TorchSourceConfig(**values))
    if "model" not in change:
        source.loaded = minilm.loaded  # the same model, not loaded again
    with pytest.raises(SourceError, match=expected):
        source.check()


def test_text_that_is_not_there(tmp_path):
    blank = tmp_path / "blank"
    blank.mkdir()
    (blank / "a.txt").write_text("  \n\n")
    (blank / "b.txt").write_text("")
    (tmp_path / "nothing").mkdir()
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "a.txt").write_text("words")
    np.save(tmp_path / "mixed" / "b.npy", np.zeros((1, 8), dtype=np.int64))
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "no text"}) + "\n")
    cases = {
        blank: r"holds no text: its files \['a.txt', 'b.txt'\] are empty or blank",
        tmp_path / "nothing": "holds no text: expected a .txt, .jsonl or .npy file",
        tmp_path / "missing": "does not exist",
        tmp_path / "mixed": "mixes text files and .npy token ids",
        tmp_path / "bad.jsonl": r"bad.jsonl:2: expected an object with a string field 'text'",
    }
    for text, expected in cases.items():
        source = TorchSource(TorchSourceConfig(model=str(minilm_directory()), modules=(MINILM_MODULES,), text=text))
        with pytest.raises(SourceError, match=expected):
            source.check()
            source.token_batch("member_000", 0)
