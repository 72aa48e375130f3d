"""Layer 2 as plain functions for scripts and notebooks: activations of a model, one batch file to a merge history,
and merge histories to and from their files.

Each is a face over the code the pipeline runs, so results are the same: a model's activations come from
the `spd` and `torch` sources' forward passes (`spd_assets.sources.spd.causal_importances`,
`spd_assets.sources.torch_model.hooked_forward`) processed as they stream
(`spd_assets.sources.streaming.activations_from_chunks`); a batch file is read by the `files` source's
reader (`spd_assets.sources.files.load_batch`) and merged by `spd_math.merge_iteration` with the
experiment's member seed; histories are written and read in the original research implementation's zip
format (`spd_assets.storage.history_format`).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from spd_assets.config import ExperimentConfig, load_config, parse_config
from spd_assets.config.sources import (
    DEFAULT_MEMORY_BUDGET_GB,
    DEFAULT_VALUE_RANGE,
    FilesSourceConfig,
    ModelSourceConfig,
    TorchSourceConfig,
)
from spd_assets.errors import BatchFileError, SourceError, StorageError
from spd_assets.sources.files import SUPPORTED_SUFFIXES, load_batch
from spd_assets.sources.model_source import BYTES_PER_GB
from spd_assets.sources.spd import causal_importances
from spd_assets.sources.streaming import activations_from_chunks, batch_activations
from spd_assets.sources.torch_model import hooked_forward, match_modules
from spd_assets.storage.history_format import read_history_zip, write_history_zip
from spd_assets.storage.values import load_history
from spd_math import (
    MergeHistory,
    MergeHistoryEnsemble,
    ProcessedActivations,
    merge_iteration,
)

__all__ = [
    "extract_and_process_activations",
    "load_merge_histories",
    "process_data_batch",
    "save_merge_history",
]

PathLike = str | os.PathLike[str]
# History files: the original zip format, and the results store's own (merges only).
HISTORY_FILE_SUFFIXES = (".zip", ".npz")


ConfigLike = ExperimentConfig | Mapping[str, Any] | str | os.PathLike[str]


def experiment_config(config: ConfigLike | None) -> ExperimentConfig:
    """An `ExperimentConfig` as it is, one validated from a mapping of its keys (as in a YAML file), one read
    from a YAML config file (relative paths in it are relative to the file), or for None the embedded default:
    the configs `cluster_analysis_pipeline`, `BatchProcessor` and the functions here take."""
    if isinstance(config, ExperimentConfig):
        return config
    if isinstance(config, Mapping):
        return parse_config(dict(config), origin="config")
    if config is None or isinstance(config, (str, os.PathLike)):
        return load_config(config)
    raise TypeError(f"config: expected an ExperimentConfig, a mapping of its keys or a config file path (None: the "
                    f"embedded default), got {type(config).__name__}")


def is_component_model(model: nn.Module) -> bool:
    """An SPD `ComponentModel` (what spd's clustering computes causal importances with), told by its interface."""
    return callable(getattr(model, "calc_causal_importances", None)) and hasattr(model, "module_to_c")


def extract_and_process_activations(
    model: nn.Module,
    batch: torch.Tensor | np.ndarray,
    config: ConfigLike,
    *,
    modules: Sequence[str] | None = None,
    chunk_size: int | None = None,
    memory_budget_gb: float | None = None,
) -> ProcessedActivations:
    """One batch's activations of a model, processed as the merge takes them (seq mode, module filter, dead filter).

    The same values as the `spd` and `torch` sources give for the same batch: an SPD `ComponentModel`'s
    upper-leaky causal importances exactly as spd's clustering computes them, or any torch module's outputs
    at the modules `modules` matches (each output unit a component, labelled `"<module>:<unit>"`).

    Parameters
    ----------
    model : torch.nn.Module
        An SPD `ComponentModel` (from `spd.models.component_model`; anything with `calc_causal_importances`
        and `module_to_c`), or any torch module. It runs where its parameters are (the batch is moved there),
        in eval mode (its own mode is restored afterwards).
    batch : torch.Tensor or numpy.ndarray
        The model input: token ids `[sequences, seq_len]`, or (SPD toy models) feature rows `[rows, features]`.
    config : ExperimentConfig, mapping or path
        Its `merge_config` (`activation_threshold`, `filter_dead_threshold`, `module_name_filter`) and
        `seq_mode`; with a `torch` source its `modules`, and with a model source its `chunk_size` and
        `memory_budget_gb`, unless given here.
    modules : sequence of str, optional
        Glob patterns over the torch module's `named_modules()` (e.g. `"encoder.layer.*.intermediate.dense"`);
        not used for an SPD model, whose decomposed modules are the components.
    chunk_size : int, optional
        Sequences per forward pass; default the config's, else the whole batch at once.
    memory_budget_gb : float, optional
        The most the kept entries (or, in continuous mode, the dense matrix) may take; default the
        config's, else 4 GB.

    Returns
    -------
    ProcessedActivations
        With an `activation_threshold`, in compact form (only the entries above it).

    Raises
    ------
    SourceError
        No module patterns for a torch module, a pattern matching no module, a module whose output is not
        `[batch, seq, units]`, non-finite values, or over the memory budget.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from spd_assets import extract_and_process_activations
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Embedding(50, 8), nn.Linear(8, 6), nn.Sigmoid())
    >>> batch = torch.randint(0, 50, (4, 5))
    >>> processed = extract_and_process_activations(model, batch, {"merge_config": {"activation_threshold": 0.5}},
    ...                                             modules=["2"])
    >>> processed.n_samples, processed.labels[:2], processed.is_compact
    (20, ['2:0', '2:1'], True)
    """
    config = experiment_config(config)
    source = config.source
    if chunk_size is None and isinstance(source, ModelSourceConfig):
        chunk_size = source.chunk_size
    if memory_budget_gb is None:
        memory_budget_gb = source.memory_budget_gb if isinstance(source, ModelSourceConfig) else DEFAULT_MEMORY_BUDGET_GB
    inputs = torch.as_tensor(batch)
    if inputs.ndim < 2 or len(inputs) == 0:
        raise SourceError(f"batch: expected token ids [sequences, seq_len] or feature rows [rows, features], "
                          f"got shape {tuple(inputs.shape)}")
    device = next(model.parameters(), torch.empty(0)).device
    size = chunk_size or len(inputs)
    # The sources run their models in eval mode (no dropout: activations must not depend on chance).
    with _eval_mode(model):
        if is_component_model(model):
            chunks = _component_model_chunks(model, inputs, size, device)
        else:
            patterns = (modules if modules is not None
                        else source.modules if isinstance(source, TorchSourceConfig) else None)
            if not patterns:
                raise SourceError(f"modules: a {type(model).__name__} needs glob patterns over its module names "
                                  "(modules=..., or a torch source's source.modules); "
                                  "expected e.g. ['encoder.layer.*.mlp']")
            names = match_modules(model, list(patterns))
            chunks = hooked_forward(model, names, inputs.cpu().numpy(), chunk_size=size, device=device)
        # The widths and sample dimensions are those of the first chunk's outputs; the rest stream after it.
        first = next(chunks)
        widths = {name: int(values.shape[-1]) for name, values in first.items()}
        sample_dims = (len(inputs), *(int(d) for d in next(iter(first.values())).shape[1:-1]))
        streamed = activations_from_chunks(
            itertools.chain([first], chunks), module_widths=widths, activation_dims=sample_dims,
            merge_config=config.merge_config, seq_mode=config.seq_mode,
            memory_budget_bytes=int(memory_budget_gb * BYTES_PER_GB),
        )
    return streamed.processed


def _component_model_chunks(model: nn.Module, inputs: torch.Tensor, size: int,
                            device: torch.device) -> Iterator[dict[str, torch.Tensor]]:
    """The `spd` source's causal importances, chunk by chunk."""
    for start in range(0, len(inputs), size):
        yield causal_importances(model, inputs[start : start + size].to(device))


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """`model` in eval mode for the block, then in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def process_data_batch(
    config: ConfigLike,
    batch_path: PathLike,
    *,
    device: torch.device | str | None = None,
) -> MergeHistory:
    """The merge history of one batch file, as the pipeline makes it for a `files` source member.

    The file is read by the `files` source's reader (checked against the layout most files of its folder
    share, or the config's `source.layout`, and its `source.value_range`), processed with the config's seq
    mode and merge config, and merged with the member seed of its partition key (the file name without its
    suffix): `config.member_seed(Path(batch_path).stem)`.

    Parameters
    ----------
    config : ExperimentConfig, mapping or path
        The experiment; a `files` source's `value_range` and `layout` apply when it has one.
    batch_path : str or path
        A `.safetensors`, `.npz` or `.pt` file mapping module name -> `[batch, seq, C]` or `[samples, C]`.
    device : torch.device or str, optional
        Where the merge runs (default: the CPU).

    Returns
    -------
    MergeHistory

    Raises
    ------
    BatchFileError
        The file is missing, unreadable, or holds the wrong content; the message names it.

    Examples
    --------
    >>> import tempfile, numpy as np
    >>> from pathlib import Path
    >>> from spd_assets import process_data_batch
    >>> folder = Path(tempfile.mkdtemp())
    >>> rows = np.random.default_rng(0).random((32, 6), dtype=np.float32)
    >>> np.savez(folder / "b0.npz", **{"mlp.up": rows})
    >>> history = process_data_batch({"source": {"kind": "files", "directory": str(folder)},
    ...                               "merge_config": {"iters": 3}}, folder / "b0.npz")
    >>> history.n_iters, history.labels[:2]
    (3, ['mlp.up:0', 'mlp.up:1'])
    """
    config = experiment_config(config)
    path = Path(batch_path)
    if path.suffix not in SUPPORTED_SUFFIXES:
        raise BatchFileError(f"{path}: expected a batch file ending in {', '.join(SUPPORTED_SUFFIXES)}")
    if not path.is_file():
        raise BatchFileError(f"{path}: no such file; expected a batch file ({', '.join(SUPPORTED_SUFFIXES)})")
    files = config.source if isinstance(config.source, FilesSourceConfig) else None
    batch = load_batch(path.parent, path.stem, value_range=files.value_range if files else DEFAULT_VALUE_RANGE,
                       layout=files.layout if files else None)
    # As the pipeline's component_activations step: every component first, then the dead ones dropped.
    _, processed = batch_activations(batch, config.merge_config, config.seq_mode)
    return merge_iteration(processed, config.merge_config, seed=config.member_seed(path.stem), device=device)


def save_merge_history(history: MergeHistory, path: PathLike) -> None:
    """Write a merge history in the original research implementation's zip format (atomically: readers see the
    old file or the complete new one).

    Parameters
    ----------
    history : MergeHistory
    path : str or path
        The file to write (conventionally ending in `.zip`).

    Raises
    ------
    HistoryFormatError
        Labels with newlines, or ids that the format cannot hold.

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> from spd_math import MergeHistory
    >>> from spd_assets import load_merge_histories, save_merge_history
    >>> folder = Path(tempfile.mkdtemp())
    >>> save_merge_history(MergeHistory(labels=["a:0", "a:1", "b:0"], group_idxs=[[0, 0, 2], [0, 0, 0]]),
    ...                    folder / "member_000.zip")
    >>> load_merge_histories(folder)[0].k_groups.tolist()
    [2, 1]
    """
    if not isinstance(history, MergeHistory):
        raise TypeError(f"history: expected a spd_math.MergeHistory, got {type(history).__name__}")
    write_history_zip(history, path)


def load_merge_histories(paths: PathLike | Iterable[PathLike]) -> MergeHistoryEnsemble:
    """Read merge history files (this project's or the original implementation's) into an ensemble.

    Parameters
    ----------
    paths : str or path, or iterable of them
        History files in member order (the original's `.zip`, or the results store's `.npz`), or one
        folder: its history files in name order (e.g. an experiment's `merge_history` folder in the
        results store).

    Returns
    -------
    MergeHistoryEnsemble

    Raises
    ------
    StorageError
        No files given, or a folder without history files.
    HistoryFormatError
        A file that is not a merge history; the message names it.

    Examples
    --------
    >>> from spd_assets import load_merge_histories
    >>> ensemble = load_merge_histories(["member_000.zip", "member_001.zip"])  # doctest: +SKIP
    >>> ensemble.normalized().merges_array.shape, ensemble.get_distances("matching_dist").shape  # doctest: +SKIP
    """
    if isinstance(paths, (str, os.PathLike)):
        single = Path(paths)
        paths = sorted(p for p in single.iterdir() if p.suffix in HISTORY_FILE_SUFFIXES) if single.is_dir() else [single]
        if not paths:
            raise StorageError(f"{single}: holds no merge history files ({', '.join(HISTORY_FILE_SUFFIXES)})")
    files = [Path(path) for path in paths]
    if not files:
        raise StorageError("paths: expected at least one merge history file, got none")
    return MergeHistoryEnsemble([read_history_zip(path) if path.suffix == ".zip" else load_history(path)
                                 for path in files])
