"""spd_math: the exact, fast clustering math of spd-cluster (pure computation, no I/O).

The math is specified in `docs/math.md`; the § after an entry below is the section it implements.

Inputs
------

   process_activations       -- module -> activations mapping to one labelled matrix, dead components dropped (§1)
   ProcessedActivations      -- a `[samples, c]` activation matrix with one label per column (§1)
   CompactActivationsBuilder -- builds compact `ProcessedActivations` from chunks of rows, never the dense matrix (§1)
   ColumnStats               -- per-component statistics over all samples (active counts, sums, maxima)
   drop_dead                 -- remove the components whose maximum is below a threshold (§1)
   MergeConfig               -- how one merge run works, under the original research configs' keys (§2-§7)

The merge
---------

   merge_iteration           -- the greedy MDL merge of one batch of activations, as a `MergeHistory` (§2-§7)
   MergeHistory              -- one merge run: the pair each merge joined, costs and MDL losses (§7)
   compute_merge_costs       -- the `[k, k]` merge costs from the normalised coactivation and group sizes (§4)
   SAMPLERS                  -- the pair samplers by `merge_pair_sampling_method`: "range", "mcmc" (§5)

Ensembles
---------

   normalize_ensemble        -- every member's history on the sorted union of labels (§8)
   MergeHistoryEnsemble      -- the members' merge histories, with `normalized()` and `get_distances()` (§8-§9)
   NormalizedEnsemble        -- an aligned ensemble: every member's partitions on one set of labels (§8)
   NormalizedHistories       -- a `NormalizedEnsemble` under the original's names, with its metadata (§8)

Distances and consensus
-----------------------

   compute_distances             -- one distance matrix between the members per iteration of an ensemble (§9)
   DISTANCE_METHODS              -- the distances by name: "perm_invariant_hamming", "matching_dist" (§9)
   perm_invariant_hamming_matrix -- perm-invariant Hamming distance between every two labellings (§9)
   matching_dist_matrix          -- matching distance between every two labellings (§9)
   consensus_clusters            -- items that share a group in enough members, as clusters with their stability
   co_association_counts         -- in how many members every two items share a group
   partition_clusters            -- one member's partition at one iteration, as clusters
   Clusters                      -- clusters as researchers read them: each item's cluster, each cluster's stability
   adjusted_rand_index           -- the adjusted Rand index of two labellings of the same items
   canonical_labels              -- a partition with its groups numbered in order of first occurrence

Errors
------

   SpdMathError              -- base class of every error raised for bad input
   ActivationsError          -- activations of the wrong shape, type or content (§1-§2)
   ConfigError               -- an invalid merge configuration value
   MergeError                -- bad input to the merge step itself: a cost matrix, group sizes, a sampler's answer
   HistoryError              -- an inconsistent merge history (§7)
   EnsembleError             -- an ensemble that cannot be aligned (§8)
   DistanceError             -- bad input to a distance computation (§9)
   PartitionError            -- bad labellings given to a partition comparison or consensus clustering

The merge engine's internals (its state, counts, candidate pool and compiled kernels) live in the private
`spd_math._engine`.
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
from spd_math.ensemble import MergeHistoryEnsemble, NormalizedHistories, normalize_ensemble
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
from spd_math.normalized import NormalizedEnsemble
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
