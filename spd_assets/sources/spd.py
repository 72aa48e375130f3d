"""Activation source `spd`: the causal importances of an SPD decomposition (goodfire-ai/spd), as the original.

    source:
      kind: spd
      model_path: ./runs/my_run       # a run directory, a model_<step>.pth checkpoint, or wandb:<entity>/<project>/runs/<id>
      batch_size: 64                  # sequences (lm) or feature rows (resid_mlp) per member
      n_members: 8
      dataset_seed: 0                 # member i draws its batch with seed dataset_seed + i, as the original

A thin adapter over the `spd` package, which is imported only here and only when used: it is an
optional install (not on PyPI). Per member it draws the batch with spd's own data loading for the
run's task, then runs `ComponentModel(batch, cache_type="input")` and
`calc_causal_importances(..., sampling="continuous", detach_inputs=False).upper_leaky` under
`torch.no_grad()`, exactly as `spd.clustering.activations.component_activations`; modules come in
the order the model runs them. Batches:

- `resid_mlp`: spd's `load_dataset`, whose features come from torch's global generator; that generator
  is seeded with the member's seed inside `torch.random.fork_rng`, so the batch depends on the seed alone
  (the original leaves it unseeded, so its resid_mlp batches cannot be reproduced) and is stored.
- `lm`: spd's `load_dataset` (the run's Hugging Face dataset, seeded with the member's seed; network or
  a local Hugging Face cache), or, with `token_ids`, windows of those ids drawn with the member's seed.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from spd_assets.config.sources import WANDB_PREFIX, SpdSourceConfig, local_task_name
from spd_assets.errors import SourceError
from spd_assets.sources.base import RunTimeNeed
from spd_assets.sources.model_source import ModelSource
from spd_assets.sources.text import draw_windows, text_files, token_id_windows
from spd_assets.sources.torch_model import vocab_size
from spd_assets.storage.values import TokenBatch

CHECKPOINT_GLOB = "model_*.pth"
_CHECKPOINT_STEP = re.compile(r"^model_(\d+)\.pth$")
SUPPORTED_TASKS = ("resid_mlp", "lm")
INSTALL_SPD = (
    "install the spd package from https://github.com/goodfire-ai/spd (it is not on PyPI; "
    "e.g. pip install git+https://github.com/goodfire-ai/spd) into this environment"
)


@contextmanager
def _logger_class_kept() -> Iterator[None]:
    """Importing spd sets its own class for every logger created afterwards, whose constructor takes no `level`;
    Dagster creates loggers with one, so every later run in the process would fail. Keep the class as it was."""
    logger_class = logging.getLoggerClass()
    try:
        yield
    finally:
        logging.setLoggerClass(logger_class)


def spd_available() -> bool:
    """Whether the `spd` package is importable here."""
    try:
        with _logger_class_kept():
            import spd.models.component_model  # noqa: F401
    except ImportError:
        return False
    return True


def require_spd() -> None:
    """Import spd (its model and clustering code), or a SourceError saying what to install."""
    try:
        with _logger_class_kept():
            import spd.clustering.dataset  # noqa: F401
            import spd.models.component_model  # noqa: F401
    except ImportError as error:
        raise SourceError(f"source kind 'spd' needs the `spd` package, which is not importable here ({error}); "
                          f"{INSTALL_SPD}, or use another source kind") from None


def latest_checkpoint(model_path: str) -> str:
    """A run directory -> its latest `model_<step>.pth`; a checkpoint file or `wandb:` path as it is.

    spd's `SPDRunInfo.from_path` reads a local path as a checkpoint file (its config beside it).
    """
    if model_path.startswith(WANDB_PREFIX):
        return model_path
    path = Path(model_path).expanduser()
    if path.is_file():
        return str(path)
    if not path.is_dir():
        raise SourceError(f"source.model_path: {model_path!r} does not exist; expected an SPD run directory, "
                          f"a {CHECKPOINT_GLOB} checkpoint, or a 'wandb:<entity>/<project>/runs/<id>' path")
    steps = {int(match.group(1)): file for file in path.glob(CHECKPOINT_GLOB)
             if (match := _CHECKPOINT_STEP.match(file.name))}
    if not steps:
        raise SourceError(f"source.model_path: run directory {model_path!r} holds no {CHECKPOINT_GLOB} checkpoint; "
                          "expected the folder of an SPD run")
    return str(steps[max(steps)])


class SpdSource(ModelSource[SpdSourceConfig]):
    """Causal importances of an SPD `ComponentModel` on each member's batch, drawn by spd's own data loading.

    Needs the `spd` package (not on PyPI; imported only when the source runs).

    Parameters
    ----------
    config : SpdSourceConfig
        `model_path` (a run directory, a `model_<step>.pth`, or `wandb:<entity>/<project>/runs/<id>`) or
        `experiment_key`, `batch_size`, `n_members`, `dataset_seed` (member i draws with `dataset_seed + i`).

    Examples
    --------
    >>> from spd_assets.config.sources import SpdSourceConfig
    >>> from spd_assets.sources import SpdSource
    >>> source = SpdSource(SpdSourceConfig(model_path="./spd_runs/resid_mlp", batch_size=64, n_members=4))
    >>> source.member_keys()
    ['member_000', 'member_001', 'member_002', 'member_003']
    >>> source.check()  # loads the run through spd; SourceError when spd or the run is missing  # doctest: +SKIP
    """

    kind = "spd"
    config_type = SpdSourceConfig

    @cached_property
    def model_path(self) -> str:
        """The model to load: `model_path`, or the canonical run of `experiment_key` in spd's registry."""
        if self.config.experiment_key is None:
            return self.config.model_path
        require_spd()
        from spd.registry import EXPERIMENT_REGISTRY

        preset = EXPERIMENT_REGISTRY.get(self.config.experiment_key)
        if preset is None or preset.canonical_run is None:
            known = sorted(key for key, value in EXPERIMENT_REGISTRY.items() if value.canonical_run)
            raise SourceError(f"source.experiment_key: {self.config.experiment_key!r} names no preset with a canonical "
                              f"run in spd's registry; expected one of {known}")
        if self.config.model_path not in (None, preset.canonical_run):
            raise SourceError(f"source: experiment_key {self.config.experiment_key!r} is {preset.canonical_run}, "
                              f"but model_path is {self.config.model_path!r}; expected one of them, or both equal")
        return preset.canonical_run

    @cached_property
    def checkpoint(self) -> str:
        return latest_checkpoint(self.model_path)

    @cached_property
    def run_info(self):
        require_spd()
        from spd.models.component_model import SPDRunInfo

        try:
            run_info = SPDRunInfo.from_path(self.checkpoint)
        except (OSError, ValueError) as error:
            raise SourceError(f"source.model_path: {self.model_path!r} does not load as an SPD run: {error}") from None
        task = run_info.config.task_config.task_name
        if task not in SUPPORTED_TASKS:
            raise SourceError(f"source.model_path: the SPD run's task is {task!r}; expected one of {SUPPORTED_TASKS}")
        if self.config.task_name not in (None, task):
            raise SourceError(f"source.task_name: {self.config.task_name!r}, but the SPD run's task is {task!r}")
        return run_info

    @property
    def task_name(self) -> str:
        return self.run_info.config.task_config.task_name

    @cached_property
    def model(self):
        run_info = self.run_info  # imports spd, or says what to install
        from spd.models.component_model import ComponentModel

        model = ComponentModel.from_run_info(run_info)
        model.eval()
        return model

    def check(self) -> None:
        self.model  # imports spd, resolves and loads the run, checks its task
        if self.config.token_ids is not None:
            if self.task_name != "lm":
                raise SourceError(f"source.token_ids: given, but the SPD run's task is {self.task_name!r}; "
                                  "expected token ids only for 'lm' runs")
            self._windows  # noqa: B018  the file's ids, checked against the run's sequence length
        if self.config.dataset_streaming and self.task_name != "lm":
            raise SourceError(f"source.dataset_streaming: only 'lm' runs stream their dataset; this run's task is "
                              f"{self.task_name!r}")

    def run_time_needs(self) -> list[RunTimeNeed]:
        available = spd_available()
        needs = [RunTimeNeed("the spd package", available, "" if available else INSTALL_SPD)]
        # Registry presets name wandb runs too.
        if self.config.experiment_key is not None or self.config.model_path.startswith(WANDB_PREFIX):
            run = self.config.model_path or f"the canonical run of experiment_key {self.config.experiment_key}"
            needs.append(RunTimeNeed(
                "network access to wandb", None,
                f"spd downloads {run} unless $SPD_OUT_DIR/runs/<project>-<run id> holds a copy"))
        task = self.config.task_name or local_task_name(self.config.model_path)
        if self.config.token_ids is None and task != "resid_mlp":
            needs.append(RunTimeNeed(
                "the run's Hugging Face dataset" + ("" if task == "lm" else " (lm runs)"), None,
                "spd loads the dataset named in the run's config (network or a local Hugging Face cache); "
                "source.token_ids avoids it"))
        return needs

    def batch_seed(self, member: str, member_seed: int) -> int:
        """`dataset_seed + index of the member`: member_000 draws the original's first batch."""
        return self.config.dataset_seed + self.member_keys().index(member)

    @cached_property
    def _windows(self) -> np.ndarray:
        files = text_files(self.config.token_ids, field="source.token_ids")
        if files[0].suffix != ".npy":
            raise SourceError(f"source.token_ids: {str(self.config.token_ids)!r}: expected .npy token ids")
        windows = token_id_windows(files, self.run_info.config.task_config.max_seq_len, field="source.token_ids")
        vocab = vocab_size(self.model.target_model)
        if vocab is not None and (windows.min() < 0 or windows.max() >= vocab):
            raise SourceError(f"source.token_ids: ids must lie in [0, {vocab}) for this run's model, "
                              f"got ids in [{windows.min()}, {windows.max()}]")
        return windows

    def token_batch(self, member: str, seed: int) -> TokenBatch:
        if self.task_name == "lm" and self.config.token_ids is not None:
            return self.batch_of(draw_windows(self._windows, self.config.batch_size, seed))
        from spd.clustering.dataset import load_dataset

        kwargs = {"config_kwargs": {"streaming": True}} if self.config.dataset_streaming else {}
        # resid_mlp features come from torch's global generator: seed it, and leave the caller's state as it was.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            try:
                batch = load_dataset(self.checkpoint, self.task_name, self.config.batch_size, seed, **kwargs)
            except (OSError, ValueError, ConnectionError) as error:
                raise SourceError(f"{member}: spd could not load a {self.task_name} batch for {self.model_path!r}: "
                                  f"{type(error).__name__}: {error}") from None
        batch = batch.cpu().numpy()
        return self.batch_of(batch.astype(np.int64) if self.task_name == "lm" else batch.astype(np.float32))

    @cached_property
    def tokenizer(self):
        """The run's tokenizer when it is available locally (else contexts are stored as ids only)."""
        name = self.run_info.config.tokenizer_name
        if not name:
            return None
        try:
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(name, local_files_only=True)
        except (ImportError, OSError, ValueError):
            return None

    def module_widths(self) -> dict[str, int]:
        return dict(self.model.module_to_c)

    def activation_dims(self) -> tuple[int, ...]:
        if self.task_name == "lm":
            return (self.config.batch_size, self.run_info.config.task_config.max_seq_len)
        return (self.config.batch_size,)

    def activation_chunks(self, batch: TokenBatch, device: torch.device) -> Iterator[dict[str, torch.Tensor]]:
        model = self.model.to(device)
        inputs = torch.from_numpy(batch.inputs)
        chunk_size = self.config.chunk_size or len(inputs)

        def chunks() -> Iterator[dict[str, torch.Tensor]]:
            for start in range(0, len(inputs), chunk_size):
                yield causal_importances(model, inputs[start : start + chunk_size].to(device))

        return chunks()


def causal_importances(model, batch: torch.Tensor) -> dict[str, torch.Tensor]:
    """Module name -> upper-leaky causal importances of `batch`, exactly as spd's clustering computes them."""
    with torch.no_grad():
        output = model(batch, cache_type="input")
        importances = model.calc_causal_importances(
            pre_weight_acts=output.cache, sampling="continuous", detach_inputs=False
        )
    return importances.upper_leaky
