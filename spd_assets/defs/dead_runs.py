"""Runs whose process died: found, marked failed in Dagster, and their concurrency pool slots freed.

A run whose process is killed (`kill -9`, out of memory, a closed terminal) stays STARTED in
Dagster and keeps the pool slots of its steps, so steps of the pool `spd_devices` queue behind
it for good. Dagster's run monitoring cannot notice: it asks the run launcher for the health
of a run's worker, and the default run launcher (what `dagster dev` uses) has no such check;
runs that `spd-cluster run` executes in its own worker processes have no launcher at all.

Where a run's process is known, whether it lives can be checked on this machine:
- runs of `spd-cluster run` carry the tags `spd_cluster/host` and `spd_cluster/pid`;
- runs the default run launcher starts log "Started process for run (pid: N)", an engine event
  with the pid in its metadata (that launcher starts run processes beside the code location).
A run is dead when that process is gone, is a zombie, or is a newer process that reuses its pid.
The command line reaps dead runs at start (`run`, `doctor`); under `dagster dev` the code
location's `dead_runs` sensor does, every few seconds.

With `executor: slurm`, a run's step waits on a SLURM job: `examine_slurm_jobs` (for `spd-cluster doctor`)
finds runs in flight whose job is gone and jobs that work for runs that are over.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from dagster import DagsterEventType, DagsterInstance, DagsterRunStatus, DefaultRunLauncher, RunsFilter

from spd_assets.defs.slurm import SLURM_JOB_TAG, cancel, cancel_jobs_of, job_end_time, job_state, slurm_jobs

RUN_TAG_HOST = "spd_cluster/host"
RUN_TAG_PID = "spd_cluster/pid"
# Statuses in which a run may hold pool slots or still be expected to finish.
IN_FLIGHT = [DagsterRunStatus.NOT_STARTED, DagsterRunStatus.STARTING, DagsterRunStatus.STARTED,
             DagsterRunStatus.CANCELING]
FINISHED = [DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED]
# A process that started this long after its run began is another process that got the same pid.
PID_REUSE_TOLERANCE_S = 2.0


def process_start_time(pid: int) -> float | None:
    """When process `pid` started (seconds since the epoch), or None when that cannot be read (no /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(line for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime"))
    except (OSError, IndexError, StopIteration):
        return None
    # Field 22 of stat (index 19 after the command) is the start time in clock ticks after boot.
    return int(boot.split()[1]) + int(fields[19]) / os.sysconf("SC_CLK_TCK")


def process_alive(pid: int, started_by: float | None = None) -> bool:
    """Whether process `pid` runs (not a zombie) and, given `started_by`, had started by then (no pid reuse)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: alive
    try:  # a killed process not yet reaped by its parent is a zombie: dead for our purposes
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state == "Z":
            return False
    except (OSError, IndexError):
        return True
    started = process_start_time(pid)
    return started is None or started_by is None or started <= started_by + PID_REUSE_TOLERANCE_S


@dataclass(frozen=True)
class DeadRun:
    """A run still in flight in Dagster whose process is gone: its status, pid and how the pid was known."""

    run_id: str
    status: DagsterRunStatus
    pid: int
    how_known: str  # which process it was: "spd-cluster worker" or "run process"


def _launcher_pid(instance: DagsterInstance, run_id: str) -> int | None:
    """The pid the default run launcher's run process logged for `run_id`, if any."""
    for entry in instance.all_logs(run_id, of_type=DagsterEventType.ENGINE_EVENT):
        data = entry.dagster_event.event_specific_data if entry.dagster_event else None
        pid = getattr(data, "metadata", {}).get("pid") if data is not None else None
        text = str(getattr(pid, "value", pid)) if pid is not None else ""
        if text.isdigit() and "Started process for run" in (entry.dagster_event.message or ""):
            return int(text)
    return None


def find_dead_runs(instance: DagsterInstance) -> list[DeadRun]:
    """Runs in flight whose process on this machine is gone."""
    host = socket.gethostname()
    local_launcher = isinstance(instance.run_launcher, DefaultRunLauncher)
    dead = []
    for record in instance.get_run_records(filters=RunsFilter(statuses=IN_FLIGHT)):
        run = record.dagster_run
        began = record.start_time or record.create_timestamp.timestamp()
        if RUN_TAG_PID in run.tags:
            pid, how_known = run.tags[RUN_TAG_PID], "spd-cluster worker"
            if run.tags.get(RUN_TAG_HOST) != host or not pid.isdigit():
                continue
            pid = int(pid)
        elif local_launcher and run.status in (DagsterRunStatus.STARTED, DagsterRunStatus.CANCELING):
            pid, how_known = _launcher_pid(instance, run.run_id), "run process"
            if pid is None:
                continue  # not started by a local process; Dagster's start timeout covers STARTING runs
        else:
            continue
        if not process_alive(pid, started_by=began):
            dead.append(DeadRun(run.run_id, run.status, pid, how_known))
    return dead


def reap_dead_runs(instance: DagsterInstance, *, reaper: str) -> list[DeadRun]:
    """Mark every dead run failed (canceled if it was being canceled) and free its pool slots; those reaped.

    `reaper` names who did it, in the run's event log (e.g. "spd-cluster doctor").
    """
    reaped = []
    for dead in find_dead_runs(instance):
        run = instance.get_run_by_id(dead.run_id)
        if run is None or run.status not in IN_FLIGHT:
            continue  # finished meanwhile
        message = f"its {dead.how_known} (pid {dead.pid}) is gone; marked by {reaper}"
        if run.status == DagsterRunStatus.CANCELING:
            instance.report_run_canceled(run, f"Canceled: {message}")
        else:
            instance.report_run_failed(run, f"Failed: {message}")
        free_pool_slots(instance, dead.run_id)
        if SLURM_JOB_TAG in run.tags:  # the SLURM job the dead process was waiting for would otherwise run on
            cancel_jobs_of([dead.run_id])
        reaped.append(dead)
    return reaped


def free_pool_slots(instance: DagsterInstance, run_id: str) -> None:
    """Give back every concurrency pool slot `run_id` holds or waits for."""
    if instance.event_log_storage.supports_global_concurrency_limits:
        instance.event_log_storage.free_concurrency_slots_for_run(run_id)


def free_slots_of_finished_runs(instance: DagsterInstance, *, older_than_s: float = 0.0) -> list[str]:
    """Free pool slots still held by runs that finished more than `older_than_s` ago; their run ids."""
    storage = instance.event_log_storage
    if not storage.supports_global_concurrency_limits:
        return []
    holders = storage.get_concurrency_run_ids()
    if not holders:
        return []
    freed = []
    now = time.time()
    for record in instance.get_run_records(filters=RunsFilter(run_ids=list(holders), statuses=FINISHED)):
        if record.end_time is None or now - record.end_time >= older_than_s:
            storage.free_concurrency_slots_for_run(record.dagster_run.run_id)
            freed.append(record.dagster_run.run_id)
    return freed


# A run still in flight this long after its SLURM job ended has no live process waiting for the job.
GONE_JOB_GRACE_S = 60.0


@dataclass(frozen=True)
class SlurmProblem:
    """What disagrees between a Dagster run and SLURM's queue, and what was (or would be) done about it."""

    problem: str
    repair: str


def examine_slurm_jobs(instance, *, repair: bool) -> list[SlurmProblem]:
    """What disagrees between Dagster's runs and SLURM's queue: jobs working for runs that are over or unknown
    (canceled), and runs in flight whose job is gone (marked failed); nothing where SLURM is not installed.

    `instance` is the Dagster instance; with `repair` False only what would be done is said.
    """
    if shutil.which("squeue") is None:
        return []
    problems = []
    in_flight = {run.run_id: run for run in instance.get_runs(filters=RunsFilter(statuses=IN_FLIGHT))}
    for job in slurm_jobs():
        if job.run_id in in_flight:
            continue
        run = instance.get_run_by_id(job.run_id) if job.run_id else None
        whose = f"run {job.run_id[:8]}, which is {run.status.value}" if run else f"run {job.run_id}, unknown here"
        if repair:
            cancel([job.job_id])
        problems.append(SlurmProblem(f"SLURM job {job.job_id} ({job.name}, {job.state}) works for {whose}",
                                     "canceled it" if repair else "would cancel it"))
    queued = {job.job_id for job in slurm_jobs()} if in_flight else set()
    for run in in_flight.values():
        job_id = run.tags.get(SLURM_JOB_TAG)
        if not job_id or job_id in queued:
            continue
        state = job_state(job_id)
        ended_at = job_end_time(job_id) if state.state is not None else None
        if ended_at is not None and time.time() - ended_at < GONE_JOB_GRACE_S:
            continue  # just ended: the run's process is taking in its results
        how = (f"ended {state.state}" if state.state else "is no longer known to SLURM")
        if repair:
            instance.report_run_failed(run, f"Failed: its SLURM job {job_id} {how} and no process took in its "
                                            "results; marked by spd-cluster doctor")
            free_pool_slots(instance, run.run_id)
        problems.append(SlurmProblem(f"run {run.run_id[:8]} is {run.status.value} but its SLURM job {job_id} {how}",
                                     "marked it failed" if repair else "would mark it failed"))
    return problems
