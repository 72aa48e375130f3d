"""Executing Dagster runs for the CLI, and cleaning up after runs whose process was killed."""

import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from spd_assets.defs.home import TEMPLATE_HOME, point_at_instance

# With the default (multiprocess) executor the CLI runs each member's run in one worker process of
# its own and parallelises over runs; the steps of a run then need no further processes.
IN_PROCESS_RUN_CONFIG = {"execution": {"config": {"in_process": {}}}}
RUN_TAG_EXPERIMENT = "spd_cluster/experiment"
RUN_TAG_INVOCATION = "spd_cluster/invocation"
RUN_TAG_HOST = "spd_cluster/host"
RUN_TAG_PID = "spd_cluster/pid"


@dataclass(frozen=True)
class RunOutcome:
    label: str
    success: bool
    run_id: str
    seconds: float
    error: str | None


def prepare_instance() -> Path:
    """`point_at_instance`, and make sure the instance exists with its settings and storage."""
    home = point_at_instance()
    home.mkdir(parents=True, exist_ok=True)
    template = TEMPLATE_HOME / "dagster.yaml"
    if not (home / "dagster.yaml").exists() and template.exists():
        shutil.copy(template, home / "dagster.yaml")
    from dagster import DagsterInstance

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


def execute_run(job_name: str, partition: str | None, tags: dict[str, str], run_config: dict | None) -> RunOutcome:
    """Execute one job run (one partition) in this process's Dagster instance."""
    from dagster import DagsterInstance, build_reconstructable_job, execute_job

    # Rebuilt from the code location in whatever process executes it (a worker, or each step's process).
    job = build_reconstructable_job("spd_assets.defs.definitions", "job_named", (job_name,))
    # Host and pid let a later invocation recognise this run as orphaned if this process is killed.
    run_tags = {**tags, RUN_TAG_HOST: socket.gethostname(), RUN_TAG_PID: str(os.getpid())}
    if partition is not None:
        run_tags["dagster/partition"] = partition
    started = time.perf_counter()
    with DagsterInstance.get() as instance:
        result = execute_job(job, instance=instance, run_config=run_config, tags=run_tags)
        return RunOutcome(
            label=partition or job_name,
            success=result.success,
            run_id=result.run_id,
            seconds=time.perf_counter() - started,
            error=None if result.success else first_failure_message(result),
        )


def outcome_of(future, label: str) -> RunOutcome:
    """A run's outcome; a worker that died before Dagster could record a run counts as a failed run."""
    try:
        return future.result()
    except Exception as error:  # the run never started: instance unreachable, worker killed, ...
        return RunOutcome(label=label, success=False, run_id="-" * 8, seconds=0.0, error=f"{type(error).__name__}: {error}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed process not yet reaped by its new parent is a zombie: dead for our purposes
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state != "Z"


def reap_orphaned_runs(instance) -> list[str]:
    """Mark runs of killed `spd-cluster run` workers on this host as failed and free their pool slots.

    (`dagster dev`'s run monitoring does this for runs it launched; CLI runs have no monitor.)
    """
    from dagster import DagsterRunStatus, RunsFilter

    host = socket.gethostname()
    reaped = []
    in_flight = RunsFilter(statuses=[DagsterRunStatus.STARTED, DagsterRunStatus.STARTING], tags={RUN_TAG_HOST: host})
    for run in instance.get_runs(filters=in_flight):
        pid = run.tags.get(RUN_TAG_PID)
        if pid and pid.isdigit() and not _pid_alive(int(pid)):
            instance.report_run_failed(run, f"its process (pid {pid}) died without finishing; marked failed by spd-cluster")
            instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
            reaped.append(run.run_id)
    return reaped
