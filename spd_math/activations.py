"""From a module -> causal-importance mapping to one labelled activation matrix (docs/math.md §1)."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from spd_math.errors import ActivationsError
from spd_math.validation import as_tensor, describe_columns, finite_number, nonfinite_columns

SeqMode = Literal["concat", "seq_mean"] | None
ModuleFilter = str | Collection[str] | Callable[[str], bool] | None

SEQ_MODES = ("concat", "seq_mean", None)


@dataclass(frozen=True)
class ProcessedActivations:
    """A `[samples, c]` activation matrix with one label per column, and the labels dropped as dead (docs/math.md §1).

    Parameters
    ----------
    activations : torch.Tensor or numpy.ndarray
        `[samples, c]` floating point values (arrays are converted to tensors).
    labels : list of str
        One unique label per column.
    dead_labels : list of str, optional
        Labels removed by the dead filter, in original order.

    Raises
    ------
    ActivationsError
        Not 2-D, not floating point, or labels that do not match the columns or repeat.

    Examples
    --------
    >>> import numpy as np
    >>> from spd_math import ProcessedActivations
    >>> processed = ProcessedActivations(np.zeros((10, 2), dtype=np.float32), ["m:0", "m:1"])
    >>> processed.n_samples, processed.n_components
    (10, 2)
    """

    activations: torch.Tensor
    labels: list[str]
    dead_labels: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        acts = as_tensor("activations", self.activations, ActivationsError)
        object.__setattr__(self, "activations", acts)
        for name in ("labels", "dead_labels"):
            if not isinstance(getattr(self, name), list):
                object.__setattr__(self, name, [str(label) for label in np.asarray(getattr(self, name)).reshape(-1)])
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
    tensor = as_tensor(f"module {name!r}", value, ActivationsError)
    if not tensor.is_floating_point():
        tensor = tensor.float()
    return tensor


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
    """Reshape, filter modules, label and drop dead components, in mapping order (docs/math.md §1).

    Parameters
    ----------
    mapping : mapping of str to torch.Tensor or numpy.ndarray
        Module name -> activations `[samples, C_m]` or `[batch, seq, C_m]`; order is meaningful.
    filter_dead_threshold : float, default 0.0
        Components whose maximum over all samples is below this are dropped as dead (0 keeps all).
    seq_mode : {"concat", "seq_mean", None}
        How `[batch, seq, C]` tensors become `[samples, C]`.
    module_filter : str, collection of str, callable or None
        A name prefix, a set of names, or a predicate on the name.

    Returns
    -------
    ProcessedActivations
        The concatenated activations with labels `"module:index"` and the dead labels.

    Raises
    ------
    ActivationsError
        Bad shapes, no module kept, mismatched sample counts, no samples, or NaN/inf anywhere in
        the input (the message names the module and the component(s)).

    Examples
    --------
    >>> import numpy as np
    >>> from spd_math import process_activations
    >>> processed = process_activations(
    ...     {"mlp.0": np.array([[0.9, 0.0], [0.2, 0.0]]), "mlp.1": np.array([[0.0], [0.7]])},
    ...     filter_dead_threshold=0.01,
    ... )
    >>> processed.labels, processed.dead_labels
    (['mlp.0:0', 'mlp.1:0'], ['mlp.0:1'])
    """
    if seq_mode not in SEQ_MODES:
        raise ActivationsError(f"seq_mode: expected one of {SEQ_MODES}, got {seq_mode!r}")
    filter_dead_threshold = finite_number("filter_dead_threshold", filter_dead_threshold, ActivationsError, minimum=0.0)
    accepts = _accepts(module_filter)
    tensors: list[torch.Tensor] = []
    labels: list[str] = []
    for name, value in mapping.items():
        if not accepts(name):
            continue
        tensor = _reshape(name, _as_tensor(name, value), seq_mode)
        bad = nonfinite_columns(tensor)
        if bad.numel():
            # A NaN is not below the dead threshold: the dead filter must not hide it.
            raise ActivationsError(
                f"module {name!r}: expected finite values, found NaN or inf in component(s) "
                f"{describe_columns([f'{name}:{index}' for index in bad.tolist()])}"
            )
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
    """Remove components whose maximum is below the threshold (docs/math.md §1, step 4).

    Parameters
    ----------
    processed : ProcessedActivations
    filter_dead_threshold : float
        A component is dead when its maximum over all samples is `< filter_dead_threshold`;
        0 (or less) removes nothing.

    Returns
    -------
    ProcessedActivations
        The live columns; the dead labels are appended to `dead_labels` in original order.

    Raises
    ------
    ActivationsError
        The threshold is not a finite number.

    Examples
    --------
    >>> import torch
    >>> from spd_math import ProcessedActivations, drop_dead
    >>> kept = drop_dead(ProcessedActivations(torch.tensor([[0.5, 0.0005]]), ["a:0", "a:1"]), 0.001)
    >>> kept.labels, kept.dead_labels
    (['a:0'], ['a:1'])
    """
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
