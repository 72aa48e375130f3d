"""The Dagster instance in use (DAGSTER_HOME) and the results folder in it: read once, at the edges.

The command line and the code location ask here; everything below them is handed a
`ResultsStore` and never looks at the environment.
"""

from __future__ import annotations

import os
from pathlib import Path

from spd_assets.storage.store import ResultsStore, default_results_root

PROJECT_ROOT = Path(__file__).resolve().parents[2]
# The instance settings committed with the project; new instances start from a copy.
TEMPLATE_HOME = PROJECT_ROOT / "dagster_home"


def dagster_home() -> Path:
    """`$DAGSTER_HOME`, else the project's `dagster_home/` (where `dagster.yaml` is committed)."""
    configured = os.environ.get("DAGSTER_HOME")
    if configured:
        return Path(configured).resolve()
    return TEMPLATE_HOME if (TEMPLATE_HOME / "dagster.yaml").exists() else Path.cwd() / "dagster_home"


def point_at_instance() -> Path:
    """Set DAGSTER_HOME to the instance in use (the project's dagster_home/ by default), for Dagster and children."""
    home = dagster_home()
    os.environ["DAGSTER_HOME"] = str(home)
    return home


def results_store(home: Path | None = None) -> ResultsStore:
    """The results folder of the instance at `home` (default: `dagster_home()`)."""
    return ResultsStore(default_results_root(home or dagster_home()))
