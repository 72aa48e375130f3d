"""Running an experiment through Dagster: the one place that does it, for every face.

`run_experiment` is what `spd-cluster run`, `spd-clustering` and `cluster_analysis_pipeline` call:

1. preflight: whatever would fail every member (a missing model, a bad directory) fails here;
2. the Dagster instance: prepared (settings from the template), runs of dead processes reaped;
3. registration: the config registered; a changed config is refused unless `replace`;
4. the results database: DuckDB views over the result tables;
5. the members: one Dagster run each, `parallel` at once, in worker processes;
6. the ensemble: one run for the ensemble, distances, consensus, explorer and the lineage tables.

What happens is reported as it happens to a `Progress` (the command line prints it, a notebook
shows one line per member) and returned as data, an `ExperimentRun`. An interruption (Ctrl-C, or
`Interrupted` raised by a caller's signal handler) stops the workers, marks their runs canceled,
cancels the SLURM jobs of those runs (executor slurm), brings the lineage tables up to date with what did finish, and is part of the returned run.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from spd_assets.config import ExperimentConfig
from spd_assets.defs.dead_runs import reap_dead_runs
from spd_assets.defs.jobs import ensemble_job_name, members_job_name
from spd_assets.defs.resources import pool_limit
from spd_assets.defs.slurm import cancel_jobs_of
from spd_assets.deployment.devices import leases_at_once
from spd_assets.deployment.home import results_store
from spd_assets.deployment.settings import DEVICE_POOL, DeploymentSettings, load_settings, settings_overridden
from spd_assets.errors import UsageError
from spd_assets.service import memory
from spd_assets.service.lineage import rebuild_lineage
from spd_assets.service.preflight import members_at_once_that_fit, preflight
from spd_assets.service.registration import register
from spd_assets.service.runs import (
    RUN_TAG_EXPERIMENT,
    RUN_TAG_INVOCATION,
    CheckOutcome,
    RunOutcome,
    cancel_runs_of,
    instance_at,
    prepare_instance,
    run_config_for,
)
from spd_assets.service.workers import RunTask, Workers
from spd_assets.storage.claims import ENSEMBLE, Claims
from spd_assets.storage.database import ensure_database
from spd_assets.storage.progress import StepProgress, read_progress

# Names the face that ran an experiment, in each of its runs' tags.
RUN_TAG_ORIGIN = "spd_cluster/origin"
# Marks the run that rebuilt the lineage tables after an interrupted or failed invocation.
RUN_TAG_LINEAGE = "spd_cluster/lineage"


class Interrupted(Exception):
    """Raised by a caller's signal handler (e.g. SIGTERM) to stop a running experiment as Ctrl-C does."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@dataclass(frozen=True)
class ExperimentPlan:
    """What is about to run: the experiment, its members, where, and how many at once."""

    experiment: str
    config_hash: str
    home: Path
    members: list[str]
    activation_shape: tuple[int, int] | None  # (samples, components) of one member, where known before running
    activation_bytes: int | None  # of the dense matrix; None: compact (only the entries above the threshold)
    memory_budgeted: bool  # streamed within the source's memory budget
    devices: list[str]
    executor: str
    pool: str
    pool_limit: int | None
    merges_at_once: int
    parallel: int
    invocation: str  # this run's tag `spd_cluster/invocation`: a timestamp
    log_path: Path
    run_config: dict | None  # of every run: how its steps execute
    instance_storage: str = "sqlite"  # the Dagster instance's storage: sqlite or postgres
    slurm_partition: str | None = None  # with executor slurm: where the members' jobs go (None: the default one)


@dataclass(frozen=True)
class Interruption:
    """How a run was interrupted: the signal, the members in flight and queued, and the Dagster runs canceled."""

    signal_name: str
    signum: int
    in_flight: list[str]
    queued: list[str]
    finished: list[str]
    canceled_runs: list[str]
    canceled_slurm_jobs: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ExperimentRun:
    """The outcome of `run_experiment`, as data: the plan, each member's run, the ensemble's, and any interruption."""

    plan: ExperimentPlan
    notes: list[str]
    members: list[RunOutcome] = field(default_factory=list)
    ensemble: RunOutcome | None = None
    seconds: float = 0.0
    interruption: Interruption | None = None

    @property
    def failed_members(self) -> list[str]:
        return [outcome.label for outcome in self.members if not outcome.success]

    @property
    def success(self) -> bool:
        """Every member and the ensemble succeeded, uninterrupted."""
        return self.interruption is None and not self.failed_members and self.ensemble is not None and self.ensemble.success

    @property
    def checks(self) -> list[CheckOutcome]:
        runs = [*self.members, *([self.ensemble] if self.ensemble is not None else [])]
        return [check for outcome in runs for check in outcome.checks]

    @property
    def consensus(self) -> dict:
        """The consensus step's plain metadata (iteration, rule, clusters, ...), or {} when it did not run."""
        return dict(self.ensemble.metadata.get("consensus_clusters", {})) if self.ensemble is not None else {}

    @property
    def results_dir(self) -> Path:
        return results_store(self.plan.home).experiment_dir(self.plan.experiment)

    @property
    def database_path(self) -> Path:
        return results_store(self.plan.home).database_path

    @property
    def explorer_path(self) -> Path | None:
        """The cluster explorer page, when this run wrote it."""
        if self.ensemble is None or "cluster_explorer" not in self.ensemble.metadata:
            return None
        return self.results_dir / "cluster_explorer.html"


class Progress:
    """What `run_experiment` reports as it goes; each method does nothing unless overridden."""

    def note(self, line: str) -> None:
        """Something done on the way (a dead run reaped, old results removed)."""

    def planned(self, plan: ExperimentPlan) -> None:
        """The members are about to start."""

    def member_finished(self, outcome: RunOutcome, done: int, total: int) -> None:
        """A member's run ended (successfully or not)."""

    def running(self, steps: dict[str, StepProgress]) -> None:
        """Where the members in flight are, about twice a second while runs execute (empty during the ensemble):
        member -> its long step's progress (its activations or its merge; members in a shorter step are not
        listed). An exception raised here (e.g. a remembered interruption) stops the run as Ctrl-C does."""

    def ensemble_started(self) -> None:
        """The ensemble's run is about to start."""

    def ensemble_finished(self, outcome: RunOutcome) -> None:
        """The ensemble's run ended."""


def members_at_once(settings: DeploymentSettings, devices: Sequence[str], limit: int | None, n_members: int) -> int:
    """How many member runs to execute at once by default: as many as merges can run at once; with SLURM (the
    devices are on the nodes) every member, so that all their jobs are submitted at once and SLURM queues them."""
    if settings.remote_devices:
        return max(1, n_members)
    return leases_at_once(list(devices), limit)


def run_experiment(
    config: ExperimentConfig,
    *,
    home: Path,
    parallel: int | None = None,
    only_members: Sequence[str] | None = None,
    replace: bool = False,
    origin: str = "spd-cluster run",
    progress: Progress | None = None,
    executor: str | None = None,
    slurm: Mapping[str, str] | None = None,
) -> ExperimentRun:
    """Materialize every asset of `config` into the Dagster instance at `home`: each member, then the ensemble.

    Parameters
    ----------
    config
        The experiment.
    home
        The Dagster instance (DAGSTER_HOME); created from the project's template when new.
    parallel
        Member runs at once; default: as many as merges can run at once (devices and the pool's limit).
    only_members
        Run only these members (e.g. to retry failed ones); the ensemble is built from every member with a history.
    replace
        Remove the results of another config (or of members that left) under the same name first.
    origin
        Who runs it, in each run's tags (`spd_cluster/origin`).
    progress
        Told what happens as it happens.
    executor
        The executor of this experiment's runs (`in_process`, `multiprocess`, `k8s` or `slurm`); default: the
        deployment's (`spd_cluster.yaml`, `$SPD_CLUSTER_EXECUTOR`).
    slurm
        SLURM settings of this experiment's jobs over the deployment's: `partition` and `job_name_prefix` (an
        original pipeline config's `slurm_partition` and `slurm_job_name_prefix`).

    Returns
    -------
    ExperimentRun
        Every run's outcome, the checks, the consensus metadata, and the interruption if there was one.

    Raises
    ------
    ExperimentConfigError, SourceError
        Nothing can run (the source fails its checks); nothing was started.
    ExperimentChangedError
        The name has results of another config or of departed members and `replace` is False.
    UsageError
        `only_members` names members the experiment does not have, or `parallel` is not positive.
    """
    if parallel is not None and parallel < 1:  # before any work (the preflight may load a model)
        raise UsageError(f"--parallel: expected a positive number, got {parallel}")
    progress = progress or Progress()
    # The worker processes load the deployment settings themselves: the overrides reach them through the environment.
    with settings_overridden(executor=executor, slurm=slurm):
        plan, notes = _prepare(config, Path(home).resolve(), parallel, only_members, replace, origin, progress)
        progress.planned(plan)
        return _execute(config, plan, notes, origin, progress)


def _prepare(config: ExperimentConfig, home: Path, parallel: int | None, only_members: Sequence[str] | None,
             replace: bool, origin: str, progress: Progress) -> tuple[ExperimentPlan, list[str]]:
    """Steps 1 to 4: check the source and the arguments, prepare the instance, register, open the database."""
    checked = preflight(config, check_all=True)
    members = checked.members
    if only_members is not None:
        unknown = sorted(set(only_members) - set(members))
        if unknown:
            raise UsageError(f"--members: {unknown} are not members of {config.name!r}; expected some of {members}")
        members = [member for member in members if member in only_members]
    home = prepare_instance(home)
    store = results_store(home)
    settings = load_settings(home)
    devices = settings.device_names()
    notes = []
    with instance_at(home) as instance:
        limit = pool_limit(instance)
        at_once = parallel or members_at_once(settings, devices, limit, len(members))
        merges_here = not settings.remote_devices and all(device.startswith("cpu") for device in devices)
        if merges_here:  # members merge in this machine's memory: they must fit it (checked before any change)
            at_once, fitting = members_at_once_that_fit(config, checked, min(at_once, max(len(members), 1)),
                                                        asked=parallel is not None, available=memory.available_bytes())
            notes += [fitting] if fitting else []
        for dead in reap_dead_runs(instance, reaper=origin):
            notes.append(f"  (run {dead.run_id[:8]}: its process {dead.pid} is gone; marked failed, pool slots freed)")
        notes += register(store, instance, config, checked.members, replace=replace)
    for line in notes:
        progress.note(line)
    ensure_database(store)
    invocation = time.strftime("%Y%m%dT%H%M%S")
    log_path = store.logs_dir / f"{config.name}-{invocation}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    plan = ExperimentPlan(
        experiment=config.name, config_hash=config.config_hash, home=home, members=members,
        activation_shape=checked.activation_shape, activation_bytes=checked.activation_bytes,
        memory_budgeted=checked.memory_budgeted, devices=devices, executor=settings.executor, pool=DEVICE_POOL,
        pool_limit=limit, merges_at_once=leases_at_once(devices, limit),
        parallel=at_once, invocation=invocation,
        log_path=log_path, run_config=run_config_for(settings), instance_storage=settings.instance,
        slurm_partition=settings.slurm.partition,
    )
    return plan, notes


def _execute(config: ExperimentConfig, plan: ExperimentPlan, notes: list[str], origin: str,
             progress: Progress) -> ExperimentRun:
    """Steps 5 and 6: the member runs, `plan.parallel` at once, then the ensemble run; or the interruption."""
    home, members = plan.home, plan.members
    tags = {RUN_TAG_EXPERIMENT: config.name, RUN_TAG_INVOCATION: plan.invocation, RUN_TAG_ORIGIN: origin}
    member_tasks = [RunTask(members_job_name(config.name), member, tags, plan.run_config) for member in members]
    ensemble_task = RunTask(ensemble_job_name(config.name), None, tags, plan.run_config)
    workers = Workers(min(plan.parallel, len(members)) or 1, str(plan.log_path), str(home))
    finished: list[RunOutcome] = []
    started = time.perf_counter()
    store, since = results_store(home), time.time()
    # Members another `spd-cluster run` of this experiment is computing are waited for, not computed twice.
    claims = Claims(store, config.name, plan.invocation)
    elsewhere: list[str] = []

    def show_progress() -> None:
        in_flight = set(workers.busy_labels()) | set(elsewhere)
        found = read_progress(store, config.name, since)
        progress.running({member: step for member, step in found.items() if member in in_flight})

    def member_finished(outcome: RunOutcome) -> None:
        claims.release(outcome.label)
        finished.append(outcome)
        progress.member_finished(outcome, len(finished), len(members))

    try:
        elsewhere += [member for member in members if not claims.try_claim(member)]
        for member in elsewhere:
            holder = claims.holder(member)
            progress.note(f"  {member}: being computed by another run of {config.name!r}"
                          + (f" ({holder.describe()})" if holder else "") + "; waiting for it and using its result")
        mine = [task for task in member_tasks if task.partition not in elsewhere]
        outcomes = workers.run(mine, member_finished, on_worker_death=lambda pid: _reap(home, origin),
                               on_tick=show_progress)
        outcomes += _wait_for_members_elsewhere(config, plan, claims, elsewhere, since, workers, member_tasks,
                                                member_finished, show_progress, origin)
        outcomes.sort(key=lambda outcome: members.index(outcome.label))
        if not claims.try_claim(ENSEMBLE):
            progress.note("  ensemble: another run of this experiment is writing it; waiting for it to finish")
            claims.wait_for(ENSEMBLE, on_wait=lambda: progress.running({}))
        progress.ensemble_started()
        ensemble = workers.run([ensemble_task], lambda outcome: None, on_tick=lambda: progress.running({}))[0]
        progress.ensemble_finished(ensemble)
    except (KeyboardInterrupt, Interrupted) as interruption:
        signum = getattr(interruption, "signum", signal.SIGINT)
        stopped = _stop(workers, plan, signum, finished)
        _bring_lineage_up_to_date(plan, tags)
        return ExperimentRun(plan, notes, finished, None, time.perf_counter() - started, stopped)
    except Exception:  # this process cannot go on (e.g. a full disk): its workers must not outlive it
        workers.stop()
        raise
    finally:
        claims.release_all()
    workers.close()
    if not ensemble.success:
        # The ensemble run failed before its lineage step: the tables must still agree with what was recorded.
        _bring_lineage_up_to_date(plan, tags)
    return ExperimentRun(plan, notes, outcomes, ensemble, time.perf_counter() - started)


def _wait_for_members_elsewhere(config: ExperimentConfig, plan: ExperimentPlan, claims: Claims, elsewhere: list[str],
                                since: float, workers: Workers, member_tasks: list[RunTask], member_finished,
                                show_progress, origin: str) -> list[RunOutcome]:
    """The members another run was computing: each waited for, then its stored result used (when that run stored
    it) or computed here (when it failed or was killed: its merge resumes from the checkpoint)."""
    outcomes, to_compute = [], []
    for member in list(elsewhere):
        waited = claims.wait_for(member, on_wait=show_progress)
        elsewhere.remove(member)
        run_id = _stored_since(plan.home, config, member, since)
        if run_id is None:
            to_compute.append(member)
            continue
        outcome = RunOutcome(label=member, success=True, run_id=run_id, seconds=waited, error=None,
                             metadata={"merge_history": {"computed_by_another_run": True}})
        outcomes.append(outcome)
        member_finished(outcome)
    if to_compute:
        # The other run failed or was killed: its runs in flight (their processes gone) must free their pool slots.
        _reap(plan.home, origin)
        tasks = [task for task in member_tasks if task.partition in to_compute]
        outcomes += workers.run(tasks, member_finished, on_worker_death=lambda pid: _reap(plan.home, origin),
                                on_tick=show_progress)
    return outcomes


def _stored_since(home: Path, config: ExperimentConfig, member: str, since: float) -> str | None:
    """The run that stored `member`'s history of this config after `since` (seconds since the epoch) and succeeded;
    None when none did."""
    from dagster import AssetKey, AssetRecordsFilter, DagsterRunStatus

    from spd_assets.defs.lineage import CONFIG_HASH_METADATA_KEY

    with instance_at(home) as instance:
        records = instance.fetch_materializations(
            AssetRecordsFilter(asset_key=AssetKey([config.name, "merge_history"]), asset_partitions=[member],
                               after_timestamp=since), limit=1).records
        if not records:
            return None
        record = records[0]
        stored_config = record.asset_materialization.metadata.get(CONFIG_HASH_METADATA_KEY)
        run = instance.get_run_by_id(record.run_id)
        if getattr(stored_config, "value", stored_config) != config.config_hash or run is None or (
                run.status != DagsterRunStatus.SUCCESS):
            return None
        return record.run_id


def _reap(home: Path, origin: str) -> None:
    """A worker died mid-run: mark its run failed and free its pool slots now, so other runs need not wait."""
    with instance_at(home) as instance:
        reap_dead_runs(instance, reaper=origin)


def _stop(workers: Workers, plan: ExperimentPlan, signum: int, finished: list[RunOutcome]) -> Interruption:
    """Stop the workers and mark their runs canceled; what was in flight, queued and finished."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
    try:
        in_flight = workers.busy_pids()
        workers.stop()
        with instance_at(plan.home) as instance:
            canceled = cancel_runs_of(instance, plan.invocation, set(in_flight))
        # The workers' own clean-up never ran (SIGKILL): the SLURM jobs their runs wait for are canceled here.
        canceled_jobs = cancel_jobs_of(canceled) if plan.executor == "slurm" else []
    finally:
        signal.signal(signal.SIGINT, previous)
    done = [outcome.label for outcome in finished]
    flying = sorted(label for label in in_flight.values() if label in plan.members)
    queued = [member for member in plan.members if member not in done and member not in flying]
    return Interruption(signal.Signals(signum).name, signum, flying, queued, done, canceled, canceled_jobs)


def _bring_lineage_up_to_date(plan: ExperimentPlan, tags: dict[str, str]) -> None:
    """Rebuild the lineage tables from Dagster's event log (only that asset), so they list what did finish.

    Runs in a worker of its own (its log in the invocation's); a failure is left for `spd-cluster doctor`.
    """
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # the clean-up of an interruption runs to its end
    workers = Workers(1, str(plan.log_path), str(plan.home))
    try:
        rebuild_lineage(plan.experiment, {**tags, RUN_TAG_LINEAGE: "catch-up"}, plan.run_config, workers=workers)
    finally:
        workers.close()
        signal.signal(signal.SIGINT, previous)
