"""spd_assets: activation sources, storage and the Dagster asset graph of spd-cluster.

For notebooks: `cluster_analysis_pipeline(config)` runs an experiment and returns its
`ClusteringResults`; `ClusteringResults.load(experiment)` reads an earlier run's.

For scripts without Dagster: `BatchProcessor(n_workers, devices).process_all_batches(batches, config)`
merges batch files in parallel on leased devices; `process_data_batch(config, batch_path)` merges one;
`extract_and_process_activations(model, batch, config)` gives a model's processed activations;
`save_merge_history(history, path)` and `load_merge_histories(paths)` write and read history files.

Every name is imported on first use, so `import spd_assets` stays light (the command line's queries
import neither torch nor Dagster).
"""

from __future__ import annotations

import importlib

_LAZY = {
    "cluster_analysis_pipeline": "spd_assets.notebook",
    "ClusteringResults": "spd_assets.results",
    "BatchProcessor": "spd_assets.batch_processor",
    "extract_and_process_activations": "spd_assets.processing",
    "process_data_batch": "spd_assets.processing",
    "load_merge_histories": "spd_assets.processing",
    "save_merge_history": "spd_assets.processing",
    "MergeHistoryEnsemble": "spd_math",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'spd_assets' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
