"""The lineage tables brought up to date with Dagster's event log: one run of an experiment's ensemble job that
materializes only the lineage asset, which rebuilds the tables from the log.

After an interrupted or failed invocation the service runs it (in a worker, its log in the invocation's), and
`spd-cluster doctor` does where the stored tables disagree with the log (in its own process).
"""

from __future__ import annotations

from spd_assets.defs.jobs import ensemble_job_name
from spd_assets.service.runs import RunOutcome
from spd_assets.service.workers import RunTask, Workers, execute_task
from spd_assets.storage.lineage import LINEAGE_TABLES


def rebuild_lineage(experiment: str, tags: dict[str, str], run_config: dict | None, *,
                    workers: Workers | None = None) -> RunOutcome:
    """Re-materialize `experiment`'s lineage tables from Dagster's event log, in a run with `tags` and
    `run_config`: on one of `workers`, or without them in this process. A run that failed, or never started,
    is an unsuccessful outcome (with its error), not an exception."""
    task = RunTask(ensemble_job_name(experiment), None, tags, run_config,
                   asset_selection=tuple((experiment, table) for table in LINEAGE_TABLES))
    if workers is None:
        return execute_task(task)
    return workers.run([task], lambda outcome: None)[0]
