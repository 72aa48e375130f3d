"""spd_math: the exact, fast clustering math of spd-cluster (pure computation, no I/O)."""

from spd_math.activations import (
    ActivationsError,
    ProcessedActivations,
    drop_dead,
    process_activations,
)
from spd_math.config import ConfigError, MergeConfig
from spd_math.consensus import Clusters, consensus_clusters, partition_clusters
from spd_math.costs import compute_merge_costs
from spd_math.distances import (
    DISTANCE_METHODS,
    DistanceError,
    compute_distances,
    matching_dist_matrix,
    perm_invariant_hamming_matrix,
)
from spd_math.ensemble import EnsembleError, NormalizedEnsemble, normalize_ensemble
from spd_math.history import HistoryError, MergeHistory
from spd_math.merge import merge_iteration
from spd_math.partitions import adjusted_rand_index, canonical_labels

__all__ = [
    "DISTANCE_METHODS",
    "ActivationsError",
    "Clusters",
    "ConfigError",
    "DistanceError",
    "EnsembleError",
    "HistoryError",
    "MergeConfig",
    "MergeHistory",
    "NormalizedEnsemble",
    "ProcessedActivations",
    "adjusted_rand_index",
    "canonical_labels",
    "compute_distances",
    "compute_merge_costs",
    "consensus_clusters",
    "drop_dead",
    "matching_dist_matrix",
    "merge_iteration",
    "normalize_ensemble",
    "partition_clusters",
    "perm_invariant_hamming_matrix",
    "process_activations",
]
