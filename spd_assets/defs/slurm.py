"""A member's device step as one SLURM job, through Dagster Pipes on the shared filesystem.

With `executor: slurm`, each member is still one Dagster run where Dagster runs (UI, retries,
backfills and lineage unchanged); its device step hands the work to SLURM:

1. `SlurmStepClient.run` opens a Pipes session whose context file and message file lie in the
   step's job folder under the results root (a shared filesystem on a cluster), and submits one
   `sbatch` job running `python -m spd_assets.defs.remote_step` on a node.
2. The job runs the same step function as a local run (`defs.steps`), writes the step's value and
   tables into the job folder, and reports its logs and materialization metadata over Pipes.
3. The client polls `squeue`/`scontrol` until the job ends, streaming the Pipes messages into the
   step's log as they come, then returns what the job wrote; the asset yields it through the IO
   managers, as a local step would.

Jobs are submitted requeueable (`slurm.requeue`): a job that SLURM requeues (preemption, `scontrol requeue`, a
node that failed) goes back to the queue and is waited for; its merge resumes from the member's checkpoint
(`spd_assets.storage.checkpoints`; on SIGTERM the job saves one before it ends). A job that ends preempted, on a
failed node or at its time limit is retried by Dagster (`slurm.transient_retries`), resuming likewise. A job
that fails, runs out of memory, is canceled, or is out of retries raises `SlurmError` with its state, reason
and the tail of its stderr; if the step itself is interrupted (Terminate in the UI, Ctrl-C) the
job is canceled (`scancel`). Jobs carry their Dagster run id in their comment, so that
`cancel_jobs_of` can cancel the jobs of runs whose processes were killed, and `slurm_jobs` lists
them for `spd-cluster doctor` (`dead_runs.examine_slurm_jobs`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from spd_assets.deployment.settings import SlurmSettings
from spd_assets.errors import SlurmError

# Run tag and materialization metadata key of a step's SLURM job id.
SLURM_JOB_TAG = "spd_cluster/slurm_job_id"
# A job's comment: this prefix, then the Dagster run id it works for.
COMMENT_PREFIX = "spd_cluster_run="
REMOTE_ENTRY = "spd_assets.defs.remote_step"
# The remote step writes this last: its presence says the job's outputs are complete.
DONE_FILE = "done.json"
STDERR_TAIL_LINES = 30
# States in which a job is over (https://slurm.schedmd.com/squeue.html#SECTION_JOB-STATE-CODES).
SUCCEEDED = {"COMPLETED"}
# A requeued job (REQUEUED, then PENDING again) is not over: it is waited for. After these a retry goes on from the
# merge's checkpoint (a time limit included: each attempt gets further).
TRANSIENT = {"PREEMPTED", "NODE_FAIL", "BOOT_FAIL", "TIMEOUT"}
# What a job's stderr says when SLURM killed it over its memory limit (without cgroups: jobacct_gather's
# OverMemoryKill, state FAILED) or the kernel's OOM killer did (state OUT_OF_MEMORY).
OUT_OF_MEMORY_SIGNS = ("exceeded memory limit", "exceeded job memory limit", "oom-kill", "out of memory")
ENDED = SUCCEEDED | TRANSIENT | {"FAILED", "TIMEOUT", "CANCELLED", "OUT_OF_MEMORY", "DEADLINE", "REVOKED",
                                 "SPECIAL_EXIT"}
COMMAND_TIMEOUT_S = 60


MISSING_COMMANDS = ("executor slurm needs the SLURM client commands (sbatch, squeue, scontrol, scancel) on the PATH "
                    "of the machine Dagster runs on")


def _command(*args: str, stdin: str | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run a SLURM client command; SlurmError when it is not installed."""
    try:
        return subprocess.run(args, input=stdin, env=env, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    except FileNotFoundError:
        raise SlurmError(f"{args[0]} not found: {MISSING_COMMANDS}") from None


@dataclass(frozen=True)
class JobState:
    """A job's state as SLURM reports it; `state` None when SLURM no longer knows the job."""

    job_id: str
    state: str | None
    reason: str | None = None
    exit_code: str | None = None

    @property
    def ended(self) -> bool:
        return self.state is None or self.state in ENDED


def job_state(job_id: str) -> JobState:
    """The state of job `job_id` (`scontrol show job`, which also knows jobs that ended a little while ago)."""
    answer = _command("scontrol", "show", "job", "--oneliner", job_id)
    if answer.returncode != 0:
        if "Invalid job id" in answer.stderr:
            return JobState(job_id, None)
        raise SlurmError(f"scontrol show job {job_id} failed: {answer.stderr.strip()}")
    fields = dict(part.split("=", 1) for part in answer.stdout.split() if "=" in part)
    return JobState(job_id, fields.get("JobState"), fields.get("Reason"), fields.get("ExitCode"))


def submit(script: str, *, options: list[str], env: dict[str, str]) -> str:
    """Submit a batch script with `options` and the environment `env`; the job id."""
    answer = _command("sbatch", "--parsable", *options, stdin=script, env=env)
    if answer.returncode != 0:
        raise SlurmError(f"sbatch refused the job (options {' '.join(options)}): {answer.stderr.strip()}")
    return answer.stdout.strip().split(";")[0]


def cancel(job_ids: Iterable[str]) -> None:
    job_ids = list(job_ids)
    if job_ids:
        answer = _command("scancel", *job_ids)
        if answer.returncode != 0 and "Invalid job id" not in answer.stderr:
            raise SlurmError(f"scancel {' '.join(job_ids)} failed: {answer.stderr.strip()}")


@dataclass(frozen=True)
class QueuedJob:
    job_id: str
    name: str
    state: str
    run_id: str | None  # the Dagster run it works for (from its comment)


def slurm_jobs() -> list[QueuedJob]:
    """This user's jobs in the queue (pending, running, completing) that work for a Dagster run of spd-cluster."""
    answer = _command("squeue", "--noheader", "--me", "--format=%i|%j|%T|%k")
    if answer.returncode != 0:
        raise SlurmError(f"squeue failed: {answer.stderr.strip()}")
    jobs = []
    for line in answer.stdout.splitlines():
        job_id, name, state, comment = (line.split("|", 3) + ["", "", ""])[:4]
        if comment.startswith(COMMENT_PREFIX):
            jobs.append(QueuedJob(job_id.strip(), name, state, comment.removeprefix(COMMENT_PREFIX).strip()))
    return jobs


def cancel_jobs_of(run_ids: Iterable[str]) -> list[str]:
    """Cancel every queued SLURM job working for one of the Dagster runs `run_ids`; their job ids.

    What a command line calls when it stops runs whose processes it killed (their own clean-up
    never ran), so that nothing of them is left in the queue.
    """
    wanted = set(run_ids)
    if not wanted or shutil.which("squeue") is None:
        return []
    jobs = [job.job_id for job in slurm_jobs() if job.run_id in wanted]
    cancel(jobs)
    return jobs


def stderr_tail(path: Path, lines: int = STDERR_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no stderr file)"
    tail = text.rstrip().splitlines()[-lines:]
    return "\n".join(tail) if tail else "(stderr is empty)"


@dataclass(frozen=True)
class SlurmStepResult:
    """What a step's job wrote (its folder) and reported (Pipes results: materialization metadata)."""

    job_id: str
    folder: Path
    reported: list  # MaterializeResult / AssetCheckResult objects reported over Pipes
    seconds: float
    queued_seconds: float


class SlurmStepClient:
    """Runs one step of a Dagster run as a SLURM job (see the module docstring)."""

    def __init__(self, settings: SlurmSettings) -> None:
        self.settings = settings

    def job_options(self, *, name: str, folder: Path, run_id: str) -> list[str]:
        return [f"--job-name={self.settings.job_name_prefix}{name}", f"--chdir={folder}",
                f"--output={folder / 'slurm-%j.out'}", f"--error={folder / 'slurm-%j.err'}",
                f"--comment={COMMENT_PREFIX}{run_id}", "--export=ALL", *self.settings.sbatch_options()]

    def script(self) -> str:
        python = self.settings.python or sys.executable
        return f"#!/bin/bash\nexec {python} -m {REMOTE_ENTRY}\n"

    def run(self, context, *, name: str, folder: Path, extras: dict) -> SlurmStepResult:
        """Submit the step's job, wait for it while streaming its Pipes messages, and return what it wrote.

        `context` is the step's Dagster context; `folder` (on the shared filesystem) is emptied first.
        """
        from dagster import PipesFileContextInjector, PipesFileMessageReader, open_pipes_session

        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        started = time.perf_counter()
        with open_pipes_session(
            context=context,
            context_injector=PipesFileContextInjector(str(folder / "pipes_context.json")),
            message_reader=PipesFileMessageReader(str(folder / "pipes_messages.jsonl"), cleanup_file=False),
            extras={**extras, "output_folder": str(folder)},
        ) as session:
            env = {**os.environ, **session.get_bootstrap_env_vars()}
            job_id = submit(self.script(), options=self.job_options(name=name, folder=folder, run_id=context.run_id),
                            env=env)
            context.log.info(f"submitted SLURM job {job_id} ({self.settings.job_name_prefix}{name})")
            context.instance.add_run_tags(context.run_id, {SLURM_JOB_TAG: job_id})
            final, queued_seconds = self._wait(context, job_id)
        reported = list(session.get_reported_results())
        seconds = time.perf_counter() - started
        if final.state not in SUCCEEDED or not (folder / DONE_FILE).exists():
            self._raise_failure(final, folder, name)
        return SlurmStepResult(job_id, folder, reported, seconds, queued_seconds)

    def _wait(self, context, job_id: str) -> tuple[JobState, float]:
        """Poll until the job ends; cancel it if this step is interrupted meanwhile."""
        started = time.perf_counter()
        queued_seconds = None
        finished = False
        try:
            while True:
                state = job_state(job_id)
                if queued_seconds is None and state.state not in (None, "PENDING", "CONFIGURING"):
                    queued_seconds = time.perf_counter() - started
                    context.log.info(f"SLURM job {job_id} is {state.state} after {queued_seconds:.1f} s in the queue")
                if state.ended:
                    finished = True
                    return state, queued_seconds or 0.0
                time.sleep(self.settings.poll_interval_s)
        finally:
            if not finished:  # Terminate in the UI, Ctrl-C, or a failure of this process: the job must not outlive it
                cancel([job_id])
                context.log.warning(f"canceled SLURM job {job_id}: the step was interrupted")

    def _raise_failure(self, final: JobState, folder: Path, name: str) -> None:
        from dagster import RetryRequested

        stderr = stderr_tail(folder / f"slurm-{final.job_id}.err")
        state = final.state or "no longer known to SLURM"
        out_of_memory = final.state == "OUT_OF_MEMORY" or any(sign in stderr.lower() for sign in OUT_OF_MEMORY_SIGNS)
        what = (f"SLURM job {final.job_id} ({self.settings.job_name_prefix}{name}) ended {state}"
                + (f" (reason {final.reason})" if final.reason and final.reason != "None" else "")
                + (f", exit code {final.exit_code}" if final.exit_code else "")
                + ("" if final.state not in SUCCEEDED else " without writing its results")
                + (f": it ran out of memory (its limit: --mem={self.settings.mem or 'the partition default'}); ask "
                   "for more with slurm.mem in spd_cluster.yaml, or give it fewer samples" if out_of_memory else "")
                + (": it hit its time limit" + (f" (--time={self.settings.time})" if self.settings.time else "")
                   + "; each retry resumes from the merge's checkpoint, so a re-run goes on from there"
                   if final.state == "TIMEOUT" else "")
                + f"; the tail of its stderr ({folder / f'slurm-{final.job_id}.err'}):\n{stderr}")
        if final.state in TRANSIENT:
            raise RetryRequested(max_retries=self.settings.transient_retries, seconds_to_wait=5) from SlurmError(what)
        raise SlurmError(what)


def job_end_time(job_id: str) -> float | None:
    """When job `job_id` ended (seconds since the epoch), if SLURM still says."""
    answer = _command("scontrol", "show", "job", "--oneliner", job_id)
    fields = dict(part.split("=", 1) for part in answer.stdout.split() if "=" in part)
    try:
        return time.mktime(time.strptime(fields["EndTime"], "%Y-%m-%dT%H:%M:%S"))
    except (KeyError, ValueError):
        return None
