"""From a module -> causal-importance mapping to one labelled activation matrix (MATH.md §1)."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

SeqMode = Literal["concat", "seq_mean"] | None
ModuleFilter = str | Collection[str] | Callable[[str], bool] | None

SEQ_MODES = ("concat", "seq_mean", None)


class ActivationsError(ValueError):
    """Activations have the wrong shape, type or content; the message says what was expected."""


@dataclass(frozen=True)
class ProcessedActivations:
    """A `[samples, c]` activation matrix with one label per column, and the labels dropped as dead."""

    activations: torch.Tensor
    labels: list[str]
    dead_labels: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        acts = self.activations
        if not isinstance(acts, torch.Tensor):
            raise ActivationsError(f"activations: expected a torch.Tensor, got {type(acts).__name__}")
        if acts.ndim != 2:
            raise ActivationsError(f"activations: expected a 2-D [samples, components] tensor, got shape {tuple(acts.shape)}")
        if not acts.is_floating_point():
            raise ActivationsError(f"activations: expected a floating point tensor, got dtype {acts.dtype}")
        if len(self.labels) != acts.shape[1]:
            raise ActivationsError(
                f"labels: expected one label per component column ({acts.shape[1]}), got {len(self.labels)}"
            )
        if len(set(self.labels)) != len(self.labels):
            raise ActivationsError("labels: expected unique labels, found duplicates")

    @property
    def n_samples(self) -> int:
        return self.activations.shape[0]

    @property
    def n_components(self) -> int:
        return self.activations.shape[1]


def _accepts(module_filter: ModuleFilter) -> Callable[[str], bool]:
    if module_filter is None:
        return lambda name: True
    if isinstance(module_filter, str):
        return lambda name: name.startswith(module_filter)
    if callable(module_filter):
        return module_filter
    if isinstance(module_filter, Collection):
        names = set(module_filter)
        return lambda name: name in names
    raise ActivationsError(
        f"module_filter: expected None, a prefix string, a set of names or a callable, got {module_filter!r}"
    )


def _as_tensor(name: str, value: object) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    if not isinstance(value, torch.Tensor):
        raise ActivationsError(f"module {name!r}: expected a tensor or numpy array, got {type(value).__name__}")
    if not value.is_floating_point():
        value = value.float()
    return value


def _reshape(name: str, tensor: torch.Tensor, seq_mode: SeqMode) -> torch.Tensor:
    if seq_mode == "concat" and tensor.ndim == 3:
        tensor = tensor.reshape(-1, tensor.shape[-1])
    elif seq_mode == "seq_mean" and tensor.ndim == 3:
        tensor = tensor.mean(dim=1)
    if tensor.ndim != 2:
        raise ActivationsError(
            f"module {name!r}: expected [samples, C] (or [batch, seq, C] with seq_mode 'concat'/'seq_mean'), "
            f"got shape {tuple(tensor.shape)} with seq_mode={seq_mode!r}"
        )
    return tensor


def process_activations(
    mapping: Mapping[str, torch.Tensor | np.ndarray],
    *,
    filter_dead_threshold: float = 0.0,
    seq_mode: SeqMode = None,
    module_filter: ModuleFilter = None,
) -> ProcessedActivations:
    """Reshape, filter modules, label and drop dead components, in mapping order."""
    if seq_mode not in SEQ_MODES:
        raise ActivationsError(f"seq_mode: expected one of {SEQ_MODES}, got {seq_mode!r}")
    if filter_dead_threshold < 0:
        raise ActivationsError(f"filter_dead_threshold: expected a number >= 0, got {filter_dead_threshold!r}")
    accepts = _accepts(module_filter)
    tensors: list[torch.Tensor] = []
    labels: list[str] = []
    for name, value in mapping.items():
        if not accepts(name):
            continue
        tensor = _reshape(name, _as_tensor(name, value), seq_mode)
        if tensors and tensor.shape[0] != tensors[0].shape[0]:
            raise ActivationsError(
                f"module {name!r}: has {tensor.shape[0]} samples, expected {tensors[0].shape[0]} like the modules before it"
            )
        tensors.append(tensor)
        labels.extend(f"{name}:{index}" for index in range(tensor.shape[1]))
    if not tensors:
        raise ActivationsError(
            f"no modules to cluster: the mapping has {len(mapping)} module(s) and the filter {module_filter!r} kept none"
        )
    activations = torch.cat(tensors, dim=1) if len(tensors) > 1 else tensors[0]
    if activations.shape[0] == 0:
        raise ActivationsError("activations: expected at least one sample, got 0")
    processed = ProcessedActivations(activations=activations, labels=labels)
    return drop_dead(processed, filter_dead_threshold)


def drop_dead(processed: ProcessedActivations, filter_dead_threshold: float) -> ProcessedActivations:
    """Remove components whose maximum is below the threshold (none when it is 0); their labels go to `dead_labels`."""
    if filter_dead_threshold <= 0:
        return processed
    alive = processed.activations.amax(dim=0) >= filter_dead_threshold
    if bool(alive.all()):
        return processed
    alive_list = alive.tolist()
    return ProcessedActivations(
        activations=processed.activations[:, alive],
        labels=[label for label, keep in zip(processed.labels, alive_list) if keep],
        dead_labels=processed.dead_labels + [label for label, keep in zip(processed.labels, alive_list) if not keep],
    )
