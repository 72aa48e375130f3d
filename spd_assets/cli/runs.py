"""Executing Dagster runs for the CLI, and what their outcomes and asset checks say."""

import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from spd_assets.defs.dead_runs import RUN_TAG_HOST, RUN_TAG_PID
from spd_assets.defs.home import TEMPLATE_HOME, point_at_instance

# The CLI runs each member's run in one worker process of its own and parallelises over runs; with the
# multiprocess executor too, the steps of a run need no further processes.
IN_PROCESS_RUN_CONFIG = {"execution": {"config": {"in_process": {}}}}
RUN_TAG_EXPERIMENT = "spd_cluster/experiment"
RUN_TAG_INVOCATION = "spd_cluster/invocation"


def run_config_for(settings) -> dict | None:
    """The run config that executes a run's steps in its own process, whichever executor is deployed."""
    return IN_PROCESS_RUN_CONFIG if settings.executor == "multiprocess" else None


@dataclass(frozen=True)
class CheckOutcome:
    """One asset check evaluation of a run: which asset and check, of which member, and its result."""

    asset: str
    check: str
    partition: str | None
    passed: bool
    severity: str  # "ERROR" or "WARN"
    description: str | None


@dataclass(frozen=True)
class RunOutcome:
    label: str
    success: bool
    run_id: str | None  # None when no Dagster run was recorded
    seconds: float
    error: str | None
    checks: tuple[CheckOutcome, ...] = field(default_factory=tuple)


def prepare_instance() -> Path:
    """`point_at_instance`, and make sure the instance exists with its settings and storage (SQLite, or PostgreSQL
    with `instance: postgres`)."""
    home = point_at_instance()
    home.mkdir(parents=True, exist_ok=True)
    template = TEMPLATE_HOME / "dagster.yaml"
    if not (home / "dagster.yaml").exists() and template.exists():
        shutil.copy(template, home / "dagster.yaml")
    from dagster import DagsterInstance

    from spd_assets.defs.deployment import load_settings
    from spd_assets.defs.instance_storage import configure_instance_storage

    configure_instance_storage(home, load_settings(home))

    # Create the instance's storage once, here: parallel workers creating it together would race.
    with DagsterInstance.get():
        pass
    return home


def first_failure_message(result) -> str | None:
    """The user-facing message of a failed run: the first error of its first failed step that Dagster did not wrap."""
    for event in result.all_events:
        if event.is_step_failure or event.is_run_failure:
            error = getattr(event.event_specific_data, "error", None)
            # Dagster wraps the user's exception ("Error occurred while executing op ..."); its cause is the message.
            while error is not None and error.cls_name.startswith("Dagster") and error.cause is not None:
                error = error.cause
            # The message already starts with the exception's qualified class name.
            return error.message.strip() if error is not None else event.message
    return None


def execute_run(job_name: str, partition: str | None, tags: dict[str, str], run_config: dict | None,
                asset_selection=None) -> RunOutcome:
    """Execute one job run (one partition; only `asset_selection` of its assets when given) in this process's
    Dagster instance."""
    from dagster import DagsterInstance, build_reconstructable_job, execute_job

    # Rebuilt from the code location in whatever process executes it (a worker, or each step's process).
    job = build_reconstructable_job("spd_assets.defs.definitions", "job_named", (job_name,))
    # Host and pid let a later invocation recognise this run as orphaned if this process is killed.
    run_tags = {**tags, RUN_TAG_HOST: socket.gethostname(), RUN_TAG_PID: str(os.getpid())}
    if partition is not None:
        run_tags["dagster/partition"] = partition
    started = time.perf_counter()
    with DagsterInstance.get() as instance:
        result = execute_job(job, instance=instance, run_config=run_config, tags=run_tags, asset_selection=asset_selection)
        checks = tuple(
            CheckOutcome(asset=evaluation.asset_key.path[-1], check=evaluation.check_name,
                         partition=evaluation.partition or partition, passed=evaluation.passed,
                         severity=evaluation.severity.value, description=evaluation.description)
            for evaluation in result.get_asset_check_evaluations()
        )
        return RunOutcome(
            label=partition or job_name,
            success=result.success,
            run_id=result.run_id,
            seconds=time.perf_counter() - started,
            error=None if result.success else first_failure_message(result),
            checks=checks,
        )


def cancel_runs_of(instance, invocation: str, pids: set[int]) -> list[str]:
    """Mark the runs in flight that this host's processes `pids` executed for `invocation` canceled, and free
    their pool slots (the processes must be gone already); their run ids."""
    from dagster import RunsFilter

    from spd_assets.defs.dead_runs import IN_FLIGHT, free_pool_slots

    host = socket.gethostname()
    canceled = []
    in_flight = RunsFilter(statuses=IN_FLIGHT, tags={RUN_TAG_INVOCATION: invocation, RUN_TAG_HOST: host})
    for run in instance.get_runs(filters=in_flight):
        if run.tags.get(RUN_TAG_PID, "").isdigit() and int(run.tags[RUN_TAG_PID]) in pids:
            instance.report_run_canceled(run, "Canceled: spd-cluster run was interrupted")
            free_pool_slots(instance, run.run_id)
            canceled.append(run.run_id)
    return canceled
