"""Input checks shared by the public functions: numbers, tensors, integer labellings, finiteness.

Each check either returns the value in the one form the math uses (a float, a torch tensor,
an int64 NumPy array) or raises the caller's error class with a message that names the
argument, the value and what was expected. Conversion happens here, at the edge.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from spd_math.errors import SpdMathError

ErrorClass = type[SpdMathError]


def finite_number(
    name: str,
    value: Any,
    error: ErrorClass,
    *,
    minimum: float | None = None,
    strictly_positive: bool = False,
    maximum: float | None = None,
) -> float:
    """`value` as a finite float within the bounds given, or `error`."""
    if isinstance(value, (np.integer, np.floating)):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise error(f"{name}: expected a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise error(f"{name}: expected a finite number, got {value!r}")
    if strictly_positive and value <= 0:
        raise error(f"{name}: expected a number > 0, got {value!r}")
    if minimum is not None and value < minimum:
        raise error(f"{name}: expected a number >= {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise error(f"{name}: expected a number <= {maximum}, got {value!r}")
    return value


def as_tensor(name: str, value: Any, error: ErrorClass, *, allow_sequence: bool = False) -> torch.Tensor:
    """A torch tensor from a tensor or NumPy array (sharing memory where it can); `error` otherwise.

    `allow_sequence` also accepts nested lists and tuples of numbers.
    """
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf":
            raise error(f"{name}: expected a numeric or boolean array, got dtype {value.dtype}")
        if not value.flags.writeable:
            value = value.copy()  # torch.from_numpy warns on read-only memory
        return torch.from_numpy(value)
    if allow_sequence and isinstance(value, (list, tuple)):
        try:
            array = np.asarray(value)
        except (TypeError, ValueError) as problem:
            raise error(f"{name}: expected a numeric array, got {type(value).__name__} ({problem})") from None
        if array.dtype.kind not in "biuf":
            raise error(f"{name}: expected numbers, got {type(value).__name__} of dtype {array.dtype}")
        return torch.from_numpy(array)
    raise error(f"{name}: expected a tensor or numpy array, got {type(value).__name__}")


def integer_labels(
    value: Any, name: str, error: ErrorClass, *, ndim: int, layout: str, integral_floats: bool = True
) -> np.ndarray:
    """Integer group ids as an int64 array with `ndim` dimensions, or `error`.

    Accepts torch tensors, NumPy arrays and nested sequences of integers, and floating arrays
    whose values are all integers (unless `integral_floats` is False). uint64 ids above 2**63 wrap around: still one distinct
    int64 per distinct id.
    """
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    try:
        array = np.asarray(value)
    except (TypeError, ValueError) as problem:
        raise error(f"{name}: expected a {layout} integer array, got {type(value).__name__} ({problem})") from None
    if array.ndim != ndim:
        raise error(f"{name}: expected a {ndim}-D {layout} integer array, got shape {array.shape}")
    if array.size == 0 and array.dtype.kind not in "iub":
        return array.astype(np.int64)
    if array.dtype.kind in "iub":
        return array.astype(np.int64, copy=False)
    if array.dtype.kind != "f" or not integral_floats:
        raise error(f"{name}: expected integer group ids, got dtype {array.dtype}")
    if not np.isfinite(array).all():
        raise error(f"{name}: expected integer group ids, found NaN or inf (dtype {array.dtype})")
    if (array != np.round(array)).any() or (np.abs(array) >= 2.0**63).any():
        raise error(f"{name}: expected integer group ids, found non-integer or out-of-int64 values (dtype {array.dtype})")
    return array.astype(np.int64)


def nonfinite_columns(values: torch.Tensor) -> torch.Tensor:
    """Indices of the columns of a 2-D floating tensor holding NaN or inf (empty when all are finite).

    NaN and inf propagate into column sums: one cheap reduction, an exact look only on failure.
    """
    if values.numel() == 0 or bool(torch.isfinite(values.sum(dim=0)).all()):
        return torch.empty(0, dtype=torch.int64)
    return torch.nonzero(~torch.isfinite(values).all(dim=0)).squeeze(1).cpu()


def describe_columns(columns: Sequence[int], labels: Sequence[str] | None = None, limit: int = 5) -> str:
    """A short human list of columns (by label when known): 'a:3, b:0 and 2 more'."""
    columns = list(columns)
    names = [labels[c] if labels is not None else str(c) for c in columns[:limit]]
    more = f" and {len(columns) - limit} more" if len(columns) > limit else ""
    return ", ".join(names) + more
