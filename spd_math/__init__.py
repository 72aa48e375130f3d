"""spd_math: the exact, fast clustering math of spd-cluster (pure computation, no I/O).

The math is specified in `docs/math.md`; every public name below cites the section it implements.
"""

from spd_math.activations import (
    ColumnStats,
    CompactActivationsBuilder,
    ProcessedActivations,
    drop_dead,
    process_activations,
)
from spd_math.config import MergeConfig
from spd_math.consensus import Clusters, co_association_counts, consensus_clusters, partition_clusters
from spd_math.costs import compute_merge_costs
from spd_math.distances import (
    DISTANCE_METHODS,
    compute_distances,
    matching_dist_matrix,
    perm_invariant_hamming_matrix,
)
from spd_math.ensemble import MergeHistoryEnsemble, NormalizedEnsemble, NormalizedHistories, normalize_ensemble
from spd_math.errors import (
    ActivationsError,
    ConfigError,
    DistanceError,
    EnsembleError,
    HistoryError,
    MergeError,
    PartitionError,
    SpdMathError,
)
from spd_math.history import MergeHistory
from spd_math.merge import merge_iteration
from spd_math.partitions import adjusted_rand_index, canonical_labels
from spd_math.samplers import SAMPLERS

__all__ = [
    "DISTANCE_METHODS",
    "SAMPLERS",
    "ActivationsError",
    "Clusters",
    "ColumnStats",
    "CompactActivationsBuilder",
    "ConfigError",
    "DistanceError",
    "EnsembleError",
    "HistoryError",
    "MergeConfig",
    "MergeError",
    "MergeHistory",
    "MergeHistoryEnsemble",
    "NormalizedEnsemble",
    "NormalizedHistories",
    "PartitionError",
    "ProcessedActivations",
    "SpdMathError",
    "adjusted_rand_index",
    "canonical_labels",
    "compute_distances",
    "compute_merge_costs",
    "co_association_counts",
    "consensus_clusters",
    "drop_dead",
    "matching_dist_matrix",
    "merge_iteration",
    "normalize_ensemble",
    "partition_clusters",
    "perm_invariant_hamming_matrix",
    "process_activations",
]
