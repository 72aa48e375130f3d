"""Activation source `torch`: the outputs of chosen modules of any torch model, on real text.

    source:
      kind: torch
      model: ./models/minilm          # a local Hugging Face model directory, or "package.module:factory"
      modules: ["encoder.layer.*.intermediate.dense"]   # glob patterns over the model's named modules
      text: ./corpus                  # .txt / .jsonl (field "text") / .npy token ids, or a directory of them
      seq_len: 64                     # tokens per sequence
      batch_size: 16                  # sequences per ensemble member
      n_members: 4

Every output unit (last dimension) of every matched module is a component, labelled
`"<module name>:<unit>"`; modules come in the model's `named_modules()` order. Forward hooks
capture the matched modules' outputs and nothing else of the model is kept; once the last
matched module has run, the rest of the forward pass is skipped. A factory returns the model, or
`(model, tokenizer)`; without a tokenizer, `text` must be token ids. Hugging Face directories
need `transformers` (the `models` extra).
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib
import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from spd_assets.config.sources import TorchSourceConfig, is_factory_spec
from spd_assets.errors import SourceError
from spd_assets.sources.base import RunTimeNeed
from spd_assets.sources.model_source import ModelSource
from spd_assets.sources.text import check_enough_windows, draw_windows, load_windows, text_files
from spd_assets.storage.values import TokenBatch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json")
NAMES_IN_ERRORS = 8
MODELS_EXTRA = "pip install 'spd-cluster[models]' (or pip install transformers)"


@dataclass(frozen=True)
class LoadedModel:
    """A loaded model, in eval mode, and its tokenizer (None: token-id input only)."""

    model: nn.Module
    tokenizer: Any | None  # a Hugging Face tokenizer, or None (token-id input only)


def load_model(spec: str) -> LoadedModel:
    """A local Hugging Face model directory, or `package.module:factory` giving a model or `(model, tokenizer)`.

    The model is put in eval mode (no dropout: activations must not depend on chance).
    """
    path = Path(spec).expanduser()
    if path.is_dir():
        loaded = _load_hugging_face_directory(path)
    elif is_factory_spec(spec):
        loaded = _load_factory(spec)
    else:
        raise SourceError(f"source.model: {spec!r} is neither a model directory (no such folder) "
                          "nor 'package.module:factory'; expected one of them")
    loaded.model.eval()
    return loaded


def _load_hugging_face_directory(path: Path) -> LoadedModel:
    if not (path / "config.json").is_file():
        raise SourceError(f"source.model: {str(path)!r} has no config.json; expected a Hugging Face model directory")
    try:
        import transformers
    except ImportError:
        raise SourceError(f"source.model: {str(path)!r} is a Hugging Face model directory, which needs the "
                          f"`transformers` package; {MODELS_EXTRA}") from None
    transformers.utils.logging.disable_progress_bar()
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
        # The class named in config.json keeps module names as saved (a GPT2LMHeadModel's
        # "transformer.h.0.mlp.c_fc"; AutoModel would build the bare GPT2Model: "h.0.mlp.c_fc").
        architectures = getattr(config, "architectures", None) or []
        model_class = getattr(transformers, architectures[0], None) if architectures else None
        model = (model_class or transformers.AutoModel).from_pretrained(path, local_files_only=True)
        tokenizer = None
        if any((path / name).exists() for name in TOKENIZER_FILES):
            tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise SourceError(f"source.model: {str(path)!r} does not load as a Hugging Face model: {error}") from None
    return LoadedModel(model=model, tokenizer=tokenizer)


def _load_factory(spec: str) -> LoadedModel:
    module_name, attribute = spec.split(":")
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise SourceError(f"source.model: cannot import {spec!r} ({error}); expected an importable "
                          "'package.module:factory'") from None
    try:
        result = factory()
    except Exception as error:  # the user's code: whatever it raises, say where it came from
        raise SourceError(f"source.model: {spec}() raised {type(error).__name__}: {error}") from error
    model, tokenizer = result if isinstance(result, (tuple, list)) else (result, None)
    if not isinstance(model, nn.Module):
        raise SourceError(f"source.model: {spec}() returned {type(model).__name__}; "
                          "expected a torch.nn.Module, or (module, tokenizer)")
    return LoadedModel(model=model, tokenizer=tokenizer)


def match_modules(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Names of the modules any pattern matches, in `named_modules()` order; every pattern must match one."""
    names = [name for name, _ in model.named_modules() if name]
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            close = difflib.get_close_matches(pattern, names, n=NAMES_IN_ERRORS, cutoff=0.5) or names
            raise SourceError(
                f"source.modules: pattern {pattern!r} matches no module of {type(model).__name__}; "
                f"expected a glob over its module names, e.g. {close[:NAMES_IN_ERRORS]} ({len(names)} in all)"
            )
    return [name for name in names if any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)]


def max_positions(model: nn.Module) -> int | None:
    """The longest sequence the model's config allows, or None when it does not say."""
    config = getattr(model, "config", None)
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def vocab_size(model: nn.Module) -> int | None:
    """The number of token ids the model's input embeddings take, or None when it has none."""
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embeddings = get_embeddings() if callable(get_embeddings) else None
    return getattr(embeddings, "num_embeddings", None)


def model_inputs(model: nn.Module, ids: torch.Tensor) -> tuple[tuple, dict]:
    """Hugging Face models get `input_ids`, an all-ones attention mask (windows are never padded) and no KV
    cache; other models get the ids tensor."""
    parameters = inspect.signature(model.forward).parameters
    if "input_ids" not in parameters:
        return (ids,), {}
    kwargs: dict[str, Any] = {"input_ids": ids}
    if "attention_mask" in parameters:
        kwargs["attention_mask"] = torch.ones_like(ids)
    if "use_cache" in parameters:
        kwargs["use_cache"] = False
    return (), kwargs


class _AllCaptured(Exception):
    """Raised by the last hook to fire: the rest of the forward pass is not needed."""


def _output_tensor(name: str, output: Any) -> torch.Tensor:
    """A module's output; of a tuple (e.g. attention's (hidden, weights)), its first tensor."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        for item in output:
            if isinstance(item, torch.Tensor):
                return item
    raise SourceError(f"source.modules: module {name!r} returned {type(output).__name__}; "
                      "expected a tensor or a tuple holding one")


def hooked_forward(
    model: nn.Module, module_names: Sequence[str], token_ids: np.ndarray, *, chunk_size: int, device: torch.device
) -> Iterator[dict[str, torch.Tensor]]:
    """Per chunk of `chunk_size` sequences, module name -> its output `[chunk, seq, units]` (on `device`).

    Each forward pass runs in inference mode and stops once every matched module has run; each
    must run exactly once per pass and give one value per token. The hooks exist only during the
    pass, so between chunks the model is untouched (other forward passes of it are not captured).
    """
    for start in range(0, len(token_ids), chunk_size):
        ids = torch.as_tensor(token_ids[start : start + chunk_size], dtype=torch.long, device=device)
        captured = _captured_outputs(model, module_names, ids)
        for name in module_names:
            shape = tuple(captured[name].shape)
            if len(shape) != 3 or shape[:2] != tuple(ids.shape):
                raise SourceError(f"source.modules: module {name!r} gives shape {shape}; expected "
                                  f"[batch, seq, units] with batch, seq = {tuple(ids.shape)}")
        yield captured


def _captured_outputs(model: nn.Module, module_names: Sequence[str], ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """One forward pass with a hook on each module, stopped once the last of them has run."""
    captured: dict[str, torch.Tensor] = {}

    def hook_for(name: str):
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            if name in captured:
                raise SourceError(f"source.modules: module {name!r} ran twice in one forward pass "
                                  "(a shared module?); expected modules that run once")
            captured[name] = _output_tensor(name, output)
            if len(captured) == len(module_names):
                raise _AllCaptured
        return hook

    handles = [model.get_submodule(name).register_forward_hook(hook_for(name)) for name in module_names]
    args, kwargs = model_inputs(model, ids)
    try:
        with torch.inference_mode():
            model(*args, **kwargs)
    except _AllCaptured:
        pass
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name in module_names if name not in captured]
    if missing:
        raise SourceError(f"source.modules: {missing[:NAMES_IN_ERRORS]} did not run in the forward pass; "
                          "expected modules the model's forward uses")
    return {name: captured[name] for name in module_names}


class TorchSource(ModelSource[TorchSourceConfig]):
    """Outputs of chosen modules of a torch model on member batches of text windows.

    Parameters
    ----------
    config : TorchSourceConfig
        `model` (a Hugging Face directory or `package.module:factory`), `modules` (glob patterns over its named
        modules), `text`, `seq_len`, `batch_size`, `n_members`, `chunk_size`, `memory_budget_gb`.

    Examples
    --------
    >>> from spd_assets.config.sources import TorchSourceConfig
    >>> from spd_assets.sources import TorchSource
    >>> source = TorchSource(TorchSourceConfig(model="./models/minilm", modules=["encoder.layer.*.intermediate.dense"],
    ...                                        text="./corpus.txt", n_members=2))  # doctest: +SKIP
    >>> source.check()  # loads the model and the text; raises SourceError naming what is wrong  # doctest: +SKIP
    >>> source.module_widths()["encoder.layer.0.intermediate.dense"]  # doctest: +SKIP
    1536
    """

    kind = "torch"
    config_type = TorchSourceConfig

    @cached_property
    def loaded(self) -> LoadedModel:
        return load_model(self.config.model)

    @cached_property
    def module_names(self) -> list[str]:
        return match_modules(self.loaded.model, self.config.modules)

    @cached_property
    def windows(self) -> np.ndarray:
        """Every `seq_len` window of the text, as token ids."""
        return load_windows(self.config.text, self.loaded.tokenizer, self.config.seq_len,
                            vocab_size=vocab_size(self.loaded.model))

    def check(self) -> None:
        text_files(self.config.text)  # before the model loads: a missing corpus is found at once
        limit = max_positions(self.loaded.model)
        if limit is not None and self.config.seq_len > limit:
            raise SourceError(f"source.seq_len: {self.config.seq_len} tokens; expected at most the model's {limit} positions")
        self.module_widths()
        check_enough_windows(len(self.windows), self.config.batch_size)

    def run_time_needs(self) -> list[RunTimeNeed]:
        if not Path(self.config.model).is_dir():
            return []
        try:
            import transformers  # noqa: F401
        except ImportError:
            return [RunTimeNeed("the transformers package", False, MODELS_EXTRA)]
        return [RunTimeNeed("the transformers package", True)]

    @property
    def tokenizer(self) -> Any | None:
        return self.loaded.tokenizer

    def token_batch(self, member: str, seed: int) -> TokenBatch:
        return self.batch_of(draw_windows(self.windows, self.config.batch_size, seed))

    @cached_property
    def _widths(self) -> dict[str, int]:
        # One forward pass over a window of token 0 (every vocabulary has it) tells each output width.
        model = self.loaded.model
        device = next(model.parameters(), torch.empty(0)).device
        probe = np.zeros((1, self.config.seq_len), dtype=np.int64)
        chunk = next(hooked_forward(model, self.module_names, probe, chunk_size=1, device=device))
        return {name: int(output.shape[-1]) for name, output in chunk.items()}

    def module_widths(self) -> dict[str, int]:
        return dict(self._widths)

    def activation_dims(self) -> tuple[int, ...]:
        return (self.config.batch_size, self.config.seq_len)

    def activation_chunks(self, batch: TokenBatch, device: torch.device) -> Iterator[dict[str, torch.Tensor]]:
        model = self.loaded.model.to(device)
        chunk_size = self.config.chunk_size or batch.n_sequences
        return hooked_forward(model, self.module_names, batch.inputs, chunk_size=chunk_size, device=device)
