"""Executing one Dagster run of an experiment's jobs, and what its outcome, asset checks and metadata say."""

import os
import shutil
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spd_assets.defs.dead_runs import RUN_TAG_HOST, RUN_TAG_PID
from spd_assets.deployment.home import TEMPLATE_HOME
from spd_assets.errors import InstanceUnreachableError

# Each member's run executes in a worker process of its own, and members run in parallel over workers; with
# the multiprocess executor too, the steps of a run need no further processes.
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
    """How one Dagster run ended: its label (member, or job), success, run id, time, first error, checks, and the
    plain metadata of what it materialized (asset name -> metadata name -> int, float, str or bool)."""

    label: str
    success: bool
    run_id: str | None  # None when no Dagster run was recorded
    seconds: float
    error: str | None
    checks: tuple[CheckOutcome, ...] = field(default_factory=tuple)
    metadata: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


def prepare_instance(home: Path) -> Path:
    """Make sure the Dagster instance at `home` exists, with its settings (from the template) and storage (SQLite,
    or PostgreSQL with `instance: postgres`)."""
    home.mkdir(parents=True, exist_ok=True)
    template = TEMPLATE_HOME / "dagster.yaml"
    if not (home / "dagster.yaml").exists() and template.exists():
        shutil.copy(template, home / "dagster.yaml")
    from spd_assets.deployment.instance_storage import configure_instance_storage
    from spd_assets.deployment.settings import load_settings

    configure_instance_storage(home, load_settings(home))
    # Create the instance's storage once, here: parallel workers creating it together would race.
    with instance_at(home):
        pass
    return home


def instance_at(home: Path):
    """The Dagster instance whose DAGSTER_HOME is `home` (a context manager), whatever the environment says;
    InstanceUnreachableError when its database does not answer."""
    from dagster import DagsterInstance

    try:
        return DagsterInstance.from_config(str(home))
    except Exception as error:
        raise unreachable_instance(error, home) or error


# What a step's failure says when the instance's database stopped answering while it ran.
DATABASE_DOWN_SIGNS = ("DagsterPostgresException", "psycopg2.OperationalError")


def _plain_failure(message: str | None) -> str | None:
    """A run's failure message, said plainly when the instance's database stopped answering."""
    if message is None or not any(sign in message for sign in DATABASE_DOWN_SIGNS):
        return message
    error = unreachable_instance(InstanceUnreachableError(message.strip().splitlines()[0]))
    return f"{type(error).__name__}: {error}"


def unreachable_instance(error: BaseException, home: Path | None = None) -> InstanceUnreachableError | None:
    """The plain error for `error` when it says that the instance's PostgreSQL server did not answer (refused,
    restarting, too many retries); None for any other error."""
    chain, cause = [], error
    while cause is not None:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    if not any(type(e).__name__ in ("DagsterPostgresException", "OperationalError", "InstanceUnreachableError")
               for e in chain):
        return None
    from urllib.parse import urlsplit

    from spd_assets.deployment.settings import SETTINGS_FILE, load_settings

    try:
        url = urlsplit(load_settings(home).postgres_url or "")
        where = f" at {url.hostname}:{url.port or 5432}" if url.hostname else ""
    except Exception:  # the settings themselves are at fault: the message still says what failed
        where = ""
    detail = str(chain[-1]).strip().splitlines()[0] if str(chain[-1]).strip() else type(chain[-1]).__name__
    return InstanceUnreachableError(
        f"the Dagster instance's PostgreSQL server{where} did not answer ({detail}); once it is up again (or "
        f"postgres_url in {SETTINGS_FILE} is fixed), run again: members stopped mid-merge resume from their checkpoints")


def _plain_metadata(result) -> dict[str, dict[str, Any]]:
    """Asset name -> the plain values (numbers, text, flags) of its materialization's metadata."""
    plain: dict[str, dict[str, Any]] = {}
    for event in result.get_asset_materialization_events():
        materialization = event.step_materialization_data.materialization
        values = {}
        for name, entry in materialization.metadata.items():
            value = getattr(entry, "value", entry)
            if isinstance(value, (bool, int, float, str)):
                values[name] = value
        plain[materialization.asset_key.path[-1]] = values
    return plain


def first_failure_message(result) -> str | None:
    """The user-facing message of a failed run: the first error of its first failed step that Dagster did not wrap."""
    for event in result.all_events:
        if event.is_step_failure or event.is_run_failure:
            error = getattr(event.event_specific_data, "error", None)
            # Dagster wraps the user's exception ("Error occurred while executing op ..."), and a step out of retries
            # says "Exceeded max_retries of N": the cause is the message.
            retries = None
            while error is not None and error.cause is not None and (
                    error.cls_name.startswith("Dagster") or error.cls_name == "RetryRequested"):
                if error.cls_name == "RetryRequested":
                    retries = error.message.strip().rsplit(" ", 1)[-1]
                error = error.cause
            if error is None:
                return event.message
            # The message already starts with the exception's qualified class name.
            return error.message.strip() + (f" (the last of {int(retries) + 1} attempts)" if retries else "")
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
            error=None if result.success else _plain_failure(first_failure_message(result)),
            checks=checks,
            metadata=_plain_metadata(result),
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
