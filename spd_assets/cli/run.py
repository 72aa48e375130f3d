"""`spd-cluster run`: materialize an experiment through Dagster, one run per member, then the ensemble."""

import os
import signal
import sys
import time
from collections import defaultdict

from dagster import DagsterInstance

from spd_assets.cli.preflight import preflight
from spd_assets.cli.registration import register
from spd_assets.cli.runs import (
    RUN_TAG_EXPERIMENT,
    RUN_TAG_INVOCATION,
    CheckOutcome,
    RunOutcome,
    cancel_runs_of,
    prepare_instance,
    run_config_for,
)
from spd_assets.cli.validate import describe_loaded, storage_of
from spd_assets.cli.workers import RunTask, Workers
from spd_assets.config import ExperimentConfig, load_config_file
from spd_assets.defs.dead_runs import reap_dead_runs
from spd_assets.defs.deployment import DEVICE_POOL, SLURM_SETTING_ENVS, load_settings
from spd_assets.defs.devices import leases_at_once
from spd_assets.defs.home import PROJECT_ROOT, results_store
from spd_assets.defs.jobs import ensemble_job_name, members_job_name
from spd_assets.defs.resources import pool_limit
from spd_assets.defs.slurm import cancel_jobs_of
from spd_assets.errors import SpdClusterError
from spd_assets.storage.database import ensure_database

# Exit status after an interruption: 128 + the signal's number, as shells report it.
INTERRUPTED_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}


class Interrupted(Exception):
    """The command line received SIGINT or SIGTERM."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum, _frame) -> None:
    raise Interrupted(signum)


def _print_outcome(outcome: RunOutcome, done: int, total: int) -> None:
    mark = "ok    " if outcome.success else "FAILED"
    run = outcome.run_id[:8] if outcome.run_id else "-"
    print(f"  [{done}/{total}] {mark} {outcome.label:<24} {outcome.seconds:6.1f} s   run {run}", flush=True)
    if outcome.error:
        print(f"           {outcome.error}", flush=True)


def check_summary(checks: list[CheckOutcome]) -> list[str]:
    """One line per asset: each check's passes out of its evaluations, and which members failed it and why."""
    by_asset: dict[str, dict[str, list[CheckOutcome]]] = defaultdict(lambda: defaultdict(list))
    for check in checks:
        by_asset[check.asset][check.check].append(check)
    lines = []
    for asset, by_check in by_asset.items():
        parts = []
        for name, evaluations in by_check.items():
            passed = sum(e.passed for e in evaluations)
            part = f"{name} {passed}/{len(evaluations)} passed"
            failed = [e for e in evaluations if not e.passed]
            if failed:
                label = "warning" if all(e.severity == "WARN" for e in failed) else "FAILED"
                members = ", ".join(e.partition or "-" for e in failed)
                reason = f": {failed[0].description}" if failed[0].description else ""
                part += f" ({label}: {members}{reason})"
            parts.append(part)
        lines.append(f"  {asset:<22} " + "; ".join(parts))
    return lines


def run_config_file(path, overrides: list[str], *, parallel: int | None = None, only_members: list[str] | None = None,
                    program: str = "spd-cluster", not_used_flags: list[str] = (), replace: bool = False) -> int:
    """Load a config file (an experiment config or an original one) and run it; 2 when it is invalid."""
    try:
        loaded = load_config_file(path, overrides)
    except SpdClusterError as error:
        print(f"{program}: {error}", file=sys.stderr)
        return 2
    for line in describe_loaded(loaded):
        print(line)
    # An original pipeline's SLURM keys: for this invocation's jobs (its worker processes inherit them).
    for setting, value in loaded.slurm.items():
        os.environ[SLURM_SETTING_ENVS[setting]] = value
    if not_used_flags:
        print(f"  flags not used here: {' '.join(not_used_flags)}")
    try:
        return run_experiment(loaded.config, parallel=parallel, only_members=only_members, replace=replace)
    except SpdClusterError as error:
        print(f"{program}: {error}", file=sys.stderr)
        return 2


def run_experiment(config: ExperimentConfig, *, parallel: int | None, only_members: list[str] | None,
                   replace: bool = False) -> int:
    # Anything that would fail every member fails here, before any member starts.
    checked = preflight(config, check_all=True)
    members = checked.members
    home = prepare_instance()
    store = results_store(home)
    settings = load_settings(home)
    devices = settings.device_names()
    if only_members is not None:
        unknown = sorted(set(only_members) - set(members))
        if unknown:
            print(f"spd-cluster: --members: {unknown} are not members of {config.name!r}; expected some of {members}", file=sys.stderr)
            return 2
    with DagsterInstance.get() as instance:
        for dead in reap_dead_runs(instance, reaper="spd-cluster run"):
            print(f"  (run {dead.run_id[:8]}: its process {dead.pid} is gone; marked failed, pool slots freed)")
        for line in register(store, instance, config, members, replace=replace):
            print(line)
        limit = pool_limit(instance)
    if only_members is not None:
        members = [member for member in members if member in only_members]
    ensure_database(store)
    at_once = leases_at_once(devices, limit)
    # With SLURM the devices are on the nodes: every member's run submits its job at once and SLURM queues them.
    parallel = parallel or (len(members) if settings.remote_devices else at_once)
    invocation = time.strftime("%Y%m%dT%H%M%S")
    tags = {RUN_TAG_EXPERIMENT: config.name, RUN_TAG_INVOCATION: invocation}
    run_config = run_config_for(settings)
    log_path = store.logs_dir / f"{config.name}-{invocation}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"spd-cluster: experiment {config.name!r} (config {config.config_hash}), {len(members)} members, "
          f"DAGSTER_HOME={home}")
    if checked.activation_shape is not None:
        samples, components = checked.activation_shape
        print(f"activations: {samples:,} samples x {components:,} components per member ({storage_of(checked)})")
    if settings.remote_devices:
        partition = settings.slurm.partition or "the default partition"
        print(f"devices: on SLURM nodes (executor slurm, {partition}); one job per member's merge, all submitted "
              f"at once; instance storage {settings.instance}")
    else:
        print(f"devices: {', '.join(devices)} (executor {settings.executor}); at most {at_once} merges at once "
              f"(pool {DEVICE_POOL!r} limit {limit if limit is not None else 'none'}, across runs)")
    print(f"members ({parallel} at a time): activations and merge history per member", flush=True)
    started = time.perf_counter()
    workers = Workers(min(parallel, len(members)) or 1, str(log_path))
    member_tasks = [RunTask(members_job_name(config.name), member, tags, run_config) for member in members]
    ensemble_task = RunTask(ensemble_job_name(config.name), None, tags, run_config)
    finished: list[RunOutcome] = []
    previous = {sig: signal.signal(sig, _raise_interrupted) for sig in INTERRUPTED_EXIT}
    try:
        def report(outcome: RunOutcome) -> None:
            finished.append(outcome)
            _print_outcome(outcome, len(finished), len(members))

        outcomes = workers.run(member_tasks, report, on_worker_death=lambda pid: _reap_now())
        failed = [o.label for o in outcomes if not o.success]
        print("ensemble: normalized ensemble and distance matrices", flush=True)
        ensemble = workers.run([ensemble_task], lambda outcome: _print_outcome(outcome, 1, 1))[0]
    except (KeyboardInterrupt, Interrupted) as interruption:
        signum = getattr(interruption, "signum", signal.SIGINT)
        return _stop_after_interruption(workers, invocation, signum, members, finished)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    workers.close()
    total = time.perf_counter() - started
    print(f"\ndone in {total:.1f} s: {len(members) - len(failed)}/{len(members)} members"
          + (f" (failed: {', '.join(failed)}; retry with --members {','.join(failed)})" if failed else "")
          + (", ensemble and distances materialized" if ensemble.success else ", ensemble FAILED"))
    checks = [check for outcome in [*outcomes, ensemble] for check in outcome.checks]
    if checks:
        print("checks:")
        print("\n".join(check_summary(checks)))
    print(f"""
results   {store.experiment_dir(config.name)}
run logs  {log_path}  (and every run in the Dagster UI)
tables    {store.database_path}  (DuckDB views over Parquet; any DuckDB client can open it read-only)
  query:  spd-cluster sql "SELECT member, max(iteration) + 1 AS iterations, min(mdl_loss) AS best_mdl FROM merge_events WHERE experiment = '{config.name}' GROUP BY member ORDER BY member"
UI        DAGSTER_HOME={home} dagster dev -w {PROJECT_ROOT / 'workspace.yaml'}   (then open http://localhost:3000)""")
    return 0 if ensemble.success and not failed else 1


def _reap_now() -> None:
    """A worker died mid-run: mark its run failed and free its pool slots now, so other runs need not wait."""
    with DagsterInstance.get() as instance:
        reap_dead_runs(instance, reaper="spd-cluster run")


def _stop_after_interruption(workers: Workers, invocation: str, signum: int, members: list[str],
                             finished: list[RunOutcome]) -> int:
    """Stop the workers, mark their runs canceled, say so in one line; the exit status."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
    in_flight = workers.busy_pids()
    workers.stop()
    with DagsterInstance.get() as instance:
        canceled = cancel_runs_of(instance, invocation, set(in_flight))
    # The workers' own clean-up never ran (SIGKILL): the SLURM jobs of their runs are canceled here.
    jobs = cancel_jobs_of(canceled) if load_settings().executor == "slurm" else []
    done = {outcome.label for outcome in finished}
    queued = [m for m in members if m not in done and m not in in_flight.values()]
    # A member just handed to a worker may have no Dagster run yet: members and runs are counted apart.
    flight = (f" ({', '.join(sorted(in_flight.values()))}; {len(canceled)} of their Dagster runs had started, now marked "
              f"canceled)" if in_flight else "")
    print(f"\nspd-cluster: interrupted ({signal.Signals(signum).name}): canceled {len(in_flight)} member(s) in flight"
          f"{flight} and {len(queued)} queued member(s); {len(done)} finished before"
          + (f"; canceled SLURM job(s) {', '.join(jobs)}" if jobs else ""), file=sys.stderr, flush=True)
    return INTERRUPTED_EXIT.get(signum, 130)
