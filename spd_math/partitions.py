"""Comparing a partition with a reference one: adjusted Rand index and canonical labels.

Both take labellings of the same n items by arbitrary integer group ids (NumPy arrays or
torch tensors); ids only say which items share a group.
"""

from __future__ import annotations

import numpy as np

from spd_math.errors import PartitionError
from spd_math.validation import integer_labels


def _as_labels(value: object, name: str) -> np.ndarray:
    """A 1-D int64 array of group ids, or a PartitionError naming the argument."""
    return integer_labels(value, name, PartitionError, ndim=1, layout="[n]", integral_floats=False)


def canonical_labels(labels) -> np.ndarray:
    """The same partition with groups numbered 0, 1, 2, ... in order of first occurrence.

    Parameters
    ----------
    labels : array-like of int
        `[n]` group ids.

    Returns
    -------
    numpy.ndarray
        `[n]` int64.

    Raises
    ------
    PartitionError
        Not a 1-D array of integer ids.

    Examples
    --------
    >>> from spd_math import canonical_labels
    >>> canonical_labels([7, 7, -2, 9, -2]).tolist()
    [0, 0, 1, 2, 1]
    """
    ids = _as_labels(labels, "labels")
    _, first_index, inverse = np.unique(ids, return_index=True, return_inverse=True)
    rank_of_id = np.empty(first_index.size, dtype=np.int64)
    rank_of_id[np.argsort(first_index)] = np.arange(first_index.size)
    return rank_of_id[inverse]


def _pairs(counts: np.ndarray) -> int:
    """Σ C(count, 2) as an exact Python integer."""
    counts = counts.astype(object)
    return int((counts * (counts - 1) // 2).sum())


def adjusted_rand_index(labels_a, labels_b) -> float:
    """Hubert-Arabie adjusted Rand index of two labellings of the same items, from their contingency table.

    1.0 means the same partition up to relabelling; about 0 is what independent partitions give.
    Where it is undefined (fewer than 2 items, or both partitions all singletons or both one
    group) the partitions are identical and it is 1.0, as is usual.

    Parameters
    ----------
    labels_a, labels_b : array-like of int
        `[n]` group ids each.

    Returns
    -------
    float

    Raises
    ------
    PartitionError
        Not 1-D integer arrays of the same length.

    Examples
    --------
    >>> from spd_math import adjusted_rand_index
    >>> adjusted_rand_index([0, 0, 1, 1], [5, 5, 3, 3])
    1.0
    >>> round(adjusted_rand_index([0, 0, 1, 1], [0, 1, 0, 1]), 3)
    -0.5
    """
    a = _as_labels(labels_a, "labels_a")
    b = _as_labels(labels_b, "labels_b")
    if a.size != b.size:
        raise PartitionError(f"labels_b: expected {a.size} group ids like labels_a, got {b.size}")
    _, a_group = np.unique(a, return_inverse=True)
    b_ids, b_group = np.unique(b, return_inverse=True)
    cells = np.unique(a_group * b_ids.size + b_group, return_counts=True)[1]
    together_in_both = _pairs(cells)
    together_in_a = _pairs(np.bincount(a_group))
    together_in_b = _pairs(np.bincount(b_group))
    all_pairs = a.size * (a.size - 1) // 2
    # (index - expected) / (max - expected) with both scaled by 2·all_pairs: integers, so exact
    # up to the final (correctly rounded) division.
    numerator = 2 * (all_pairs * together_in_both - together_in_a * together_in_b)
    denominator = all_pairs * (together_in_a + together_in_b) - 2 * together_in_a * together_in_b
    if denominator == 0:
        return 1.0
    return numerator / denominator
