"""Clusters as researchers read them: one member's partition, or the ensemble's consensus.

Consensus: two components belong together when they share a group in at least `threshold`
(default half) of the members; clusters are the connected components of that
co-association graph. A cluster's stability is the mean co-association of its member pairs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.sparse
import torch
from scipy.sparse.csgraph import connected_components

from spd_math.errors import PartitionError
from spd_math.validation import finite_number, integer_labels


@dataclass(frozen=True)
class Clusters:
    """Clusters as researchers read them.

    Attributes
    ----------
    cluster_of : numpy.ndarray
        `cluster_of[x]`: cluster id of item x, or -1 when x is alone. Ids count up from 0 in order
        of each cluster's first item.
    stability : numpy.ndarray
        `stability[i]`: mean co-association of cluster i's pairs (1.0 for one partition).

    Examples
    --------
    >>> from spd_math import partition_clusters
    >>> clusters = partition_clusters([4, 4, 7, 1, 7])
    >>> clusters.cluster_of.tolist(), clusters.stability.tolist()
    ([0, 0, 1, -1, 1], [1.0, 1.0])
    """

    cluster_of: np.ndarray
    stability: np.ndarray


def _numbered(groups: np.ndarray) -> Clusters:
    """Groups of two or more items as clusters 0, 1, ... by first item; singletons -1."""
    _, first, inverse, counts = np.unique(groups, return_index=True, return_inverse=True, return_counts=True)
    shared = counts[inverse] > 1
    order = np.argsort(first)  # group ids by first appearance
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    group_rank = rank[inverse]
    kept = np.unique(group_rank[shared])
    renumber = np.full(order.size, -1)
    renumber[kept] = np.arange(kept.size)
    return Clusters(cluster_of=np.where(shared, renumber[group_rank], -1), stability=np.ones(kept.size))


def partition_clusters(groups: np.ndarray | torch.Tensor) -> Clusters:
    """One member's partition at one iteration, as clusters (singleton groups are not clusters).

    Parameters
    ----------
    groups : array-like of int
        `[c]` group ids (a NumPy array, torch tensor or sequence).

    Returns
    -------
    Clusters

    Raises
    ------
    PartitionError
        Not a 1-D array of integer group ids.

    Examples
    --------
    >>> from spd_math import partition_clusters
    >>> partition_clusters([2, 0, 2]).cluster_of.tolist()
    [0, -1, 0]
    """
    return _numbered(integer_labels(groups, "groups", PartitionError, ndim=1, layout="[c]"))


def co_association_counts(partitions: np.ndarray) -> scipy.sparse.csr_matrix:
    """In how many members items x and y share a group (the co-association counts).

    Parameters
    ----------
    partitions : numpy.ndarray
        `[n_members, c]` integer group ids, one partition of the same c items per member.

    Returns
    -------
    scipy.sparse.csr_matrix
        `[c, c]` int64 counts; the diagonal holds `n_members`.

    Examples
    --------
    >>> import numpy as np
    >>> co_association_counts(np.array([[0, 0, 1], [0, 1, 1]])).toarray().tolist()
    [[2, 1, 0], [1, 2, 1], [0, 1, 2]]
    """
    n_members, c = partitions.shape
    counts = scipy.sparse.csr_matrix((c, c), dtype=np.int64)
    for groups in partitions:
        _, dense = np.unique(groups, return_inverse=True)
        one_hot = scipy.sparse.csr_matrix((np.ones(c, dtype=np.int64), (np.arange(c), dense.reshape(-1))),
                                          shape=(c, int(dense.max()) + 1))
        counts = counts + one_hot @ one_hot.T
    return counts.tocsr()


def consensus_clusters(partitions: np.ndarray | torch.Tensor, threshold: float = 0.5) -> Clusters:
    """Consensus of `[n_members, c]` partitions (one iteration of a normalized ensemble).

    Two items are linked when they share a group in at least `threshold` of the members;
    clusters are the connected components of the links, and a cluster's stability is the mean
    co-association of its pairs.

    Parameters
    ----------
    partitions : array-like of int
        `[n_members, c]` group ids.
    threshold : float, default 0.5
        Fraction of members in (0, 1].

    Returns
    -------
    Clusters

    Raises
    ------
    PartitionError
        Bad shape, non-integer ids or a threshold outside (0, 1].

    Examples
    --------
    >>> from spd_math import consensus_clusters
    >>> clusters = consensus_clusters([[0, 0, 1, 2], [0, 0, 0, 1], [5, 5, 6, 6]])
    >>> clusters.cluster_of.tolist(), clusters.stability.tolist()
    ([0, 0, -1, -1], [1.0])
    """
    partitions = integer_labels(partitions, "partitions", PartitionError, ndim=2, layout="[n_members, c]")
    if partitions.shape[0] == 0:
        raise PartitionError(f"partitions: expected [n_members >= 1, c], got shape {partitions.shape}")
    threshold = finite_number("threshold", threshold, PartitionError)
    if not 0 < threshold <= 1:
        raise PartitionError(f"threshold: expected a fraction in (0, 1], got {threshold}")
    n_members = partitions.shape[0]
    counts = co_association_counts(partitions)
    # In whole members: "at least half" of 4 members is 2, of 5 members is 3.
    needed = math.ceil(threshold * n_members - 1e-9)
    upper = scipy.sparse.triu(counts, k=1).tocoo()
    linked = upper.data >= needed
    graph = scipy.sparse.coo_matrix((np.ones(int(linked.sum())), (upper.row[linked], upper.col[linked])), shape=counts.shape)
    _, components = connected_components(graph, directed=False)
    clusters = _numbered(components)
    # Stability: co-association summed over each cluster's pairs, divided by its pairs x members.
    cluster_of = clusters.cluster_of
    row_cluster, col_cluster = cluster_of[upper.row], cluster_of[upper.col]
    inside = (row_cluster == col_cluster) & (row_cluster >= 0)
    n_clusters = clusters.stability.size
    together = np.bincount(row_cluster[inside], weights=upper.data[inside], minlength=n_clusters)
    sizes = np.bincount(cluster_of[cluster_of >= 0], minlength=n_clusters)
    stability = together / (sizes * (sizes - 1) / 2 * n_members)
    return Clusters(cluster_of=cluster_of, stability=stability)
