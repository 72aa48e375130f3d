"""The errors spd_math raises for bad input: one base class, one subclass per kind of input.

Every error is a `ValueError` (existing `except ValueError` handlers keep working) and a
`SpdMathError`, so a caller can catch everything the math rejects in one clause.
"""

from __future__ import annotations


class SpdMathError(ValueError):
    """Base class of every error spd_math raises for bad input; the message names the argument,
    the value and what was expected.

    Examples
    --------
    >>> from spd_math import SpdMathError, adjusted_rand_index
    >>> try:
    ...     adjusted_rand_index([0, 1], [0, 1, 2])
    ... except SpdMathError as error:
    ...     print(type(error).__name__)
    PartitionError
    """


class ActivationsError(SpdMathError):
    """Activations have the wrong shape, type or content (docs/math.md §1-§2); the message says what was expected.

    Examples
    --------
    >>> import numpy as np
    >>> from spd_math import ActivationsError, process_activations
    >>> try:
    ...     process_activations({"m": np.array([[0.5, np.nan]])})
    ... except ActivationsError as error:
    ...     print(error)
    module 'm': expected finite values, found NaN or inf in component(s) m:1
    """


class ConfigError(SpdMathError):
    """A merge configuration value is invalid; the message names the field, the value and what was expected.

    Examples
    --------
    >>> from spd_math import ConfigError, MergeConfig
    >>> try:
    ...     MergeConfig(alpha=-1)
    ... except ConfigError as error:
    ...     print(error)
    alpha: expected a number >= 0.0, got -1.0
    """


class DistanceError(SpdMathError):
    """Bad input to a distance computation (docs/math.md §9); the message names the argument and what was expected.

    Examples
    --------
    >>> from spd_math import DistanceError, compute_distances
    >>> try:
    ...     compute_distances([[[0, 1]]], "euclid")
    ... except DistanceError as error:
    ...     print(error)
    method: expected one of ['perm_invariant_hamming', 'matching_dist'], got 'euclid'
    """


class EnsembleError(SpdMathError):
    """The ensemble cannot be aligned (docs/math.md §8); the message says which member and why.

    Examples
    --------
    >>> from spd_math import EnsembleError, normalize_ensemble
    >>> try:
    ...     normalize_ensemble([])
    ... except EnsembleError as error:
    ...     print(error)
    histories: expected at least one merge history, got none
    """


class HistoryError(SpdMathError):
    """A merge history is inconsistent (docs/math.md §7); the message names the field and what was expected.

    Examples
    --------
    >>> from spd_math import HistoryError, MergeHistory
    >>> try:
    ...     MergeHistory(labels=["a:0"], group_idxs=[[0, 0]])
    ... except HistoryError as error:
    ...     print(error)
    labels: expected 2 labels (one per group_idxs column), got 1
    """


class MergeError(SpdMathError):
    """Bad input to the merge step itself (docs/math.md §4-§6): a cost matrix, group sizes or a pair sampler's answer.

    Examples
    --------
    >>> from spd_math import MergeError, compute_merge_costs
    >>> try:
    ...     compute_merge_costs([[1.0, 0.0]], [1, 1], alpha=1.0)
    ... except MergeError as error:
    ...     print(error)
    coact_normalized: expected a square [k, k] matrix, got shape (1, 2)
    """


class PartitionError(SpdMathError):
    """Bad labellings given to a partition comparison or to consensus clustering.

    Examples
    --------
    >>> from spd_math import PartitionError, adjusted_rand_index
    >>> try:
    ...     adjusted_rand_index([0, 1], [0.5, 1.0])
    ... except PartitionError as error:
    ...     print(error)
    labels_b: expected integer group ids, got dtype float64
    """
