"""spd_assets: activation sources, storage and the Dagster asset graph of spd-cluster.

For notebooks: `cluster_analysis_pipeline(config)` runs an experiment and returns its
`ClusteringResults`; `ClusteringResults.load(experiment)` reads an earlier run's. Both are
imported on first use, so `import spd_assets` stays light (the command line's queries import
neither torch nor Dagster).
"""

from __future__ import annotations

import importlib

_LAZY = {
    "cluster_analysis_pipeline": "spd_assets.notebook",
    "ClusteringResults": "spd_assets.results",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'spd_assets' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
