"""spd_math: the exact, fast clustering math of spd-cluster (pure computation, no I/O)."""

from spd_math.activations import ActivationsError, ProcessedActivations, process_activations
from spd_math.config import ConfigError, MergeConfig
from spd_math.costs import compute_merge_costs
from spd_math.history import HistoryError, MergeHistory
from spd_math.merge import merge_iteration

__all__ = [
    "ActivationsError",
    "ConfigError",
    "HistoryError",
    "MergeConfig",
    "MergeHistory",
    "ProcessedActivations",
    "compute_merge_costs",
    "merge_iteration",
    "process_activations",
]
