"""`spd-cluster run`: materialize an experiment through Dagster, one run per member, then the ensemble."""

import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed

from dagster import DagsterInstance

from spd_assets.cli.preflight import preflight
from spd_assets.cli.runs import (
    IN_PROCESS_RUN_CONFIG,
    RUN_TAG_EXPERIMENT,
    RUN_TAG_INVOCATION,
    RunOutcome,
    execute_run,
    outcome_of,
    prepare_instance,
    reap_orphaned_runs,
)
from spd_assets.cli.validate import describe_loaded
from spd_assets.config import ExperimentConfig, load_config_file
from spd_assets.defs.deployment import DEVICE_POOL, load_settings
from spd_assets.defs.devices import leases_at_once
from spd_assets.defs.home import PROJECT_ROOT, results_store
from spd_assets.defs.jobs import ensemble_job_name, members_job_name
from spd_assets.defs.resources import pool_limit
from spd_assets.errors import SpdClusterError
from spd_assets.storage.database import ensure_database
from spd_assets.storage.experiments import register_experiment


def _log_to(path: str) -> None:
    """Send a worker's output (Dagster's event log lines) to a file; the terminal shows progress only."""
    handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(handle, 1)
    os.dup2(handle, 2)
    os.close(handle)


def _print_outcome(outcome: RunOutcome, done: int, total: int) -> None:
    mark = "ok    " if outcome.success else "FAILED"
    print(f"  [{done}/{total}] {mark} {outcome.label:<24} {outcome.seconds:6.1f} s   run {outcome.run_id[:8]}", flush=True)
    if outcome.error:
        print(f"           {outcome.error}", flush=True)


def run_config_file(path, overrides: list[str], *, parallel: int | None = None, only_members: list[str] | None = None,
                    program: str = "spd-cluster", not_used_flags: list[str] = ()) -> int:
    """Load a config file (an experiment config or an original one) and run it; 2 when it is invalid."""
    try:
        loaded = load_config_file(path, overrides)
    except SpdClusterError as error:
        print(f"{program}: {error}", file=sys.stderr)
        return 2
    for line in describe_loaded(loaded):
        print(line)
    if not_used_flags:
        print(f"  flags not used here: {' '.join(not_used_flags)}")
    try:
        return run_experiment(loaded.config, parallel=parallel, only_members=only_members)
    except SpdClusterError as error:
        print(f"{program}: {error}", file=sys.stderr)
        return 2


def run_experiment(config: ExperimentConfig, *, parallel: int | None, only_members: list[str] | None) -> int:
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
        members = [member for member in members if member in only_members]
    register_experiment(store, config)
    ensure_database(store)
    with DagsterInstance.get() as instance:
        for run_id in reap_orphaned_runs(instance):
            print(f"  (marked orphaned run {run_id[:8]} failed and freed its pool slots)")
        limit = pool_limit(instance)
    at_once = leases_at_once(devices, limit)
    parallel = parallel or at_once
    invocation = time.strftime("%Y%m%dT%H%M%S")
    tags = {RUN_TAG_EXPERIMENT: config.name, RUN_TAG_INVOCATION: invocation}
    run_config = IN_PROCESS_RUN_CONFIG if settings.executor == "multiprocess" else None
    log_path = store.logs_dir / f"{config.name}-{invocation}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"spd-cluster: experiment {config.name!r} (config {config.config_hash}), {len(members)} members, "
          f"DAGSTER_HOME={home}")
    if checked.activation_shape is not None:
        samples, components = checked.activation_shape
        print(f"activations: {samples:,} samples x {components:,} components per member "
              f"({checked.activation_bytes / 2**20:,.1f} MiB)")
    print(f"devices: {', '.join(devices)} (executor {settings.executor}); at most {at_once} merges at once "
          f"(pool {DEVICE_POOL!r} limit {limit if limit is not None else 'none'}, across runs)")
    print(f"members ({parallel} at a time): activations and merge history per member", flush=True)
    started = time.perf_counter()
    outcomes = []
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=parallel, mp_context=context, initializer=_log_to, initargs=(str(log_path),)) as pool:
        futures = {pool.submit(execute_run, members_job_name(config.name), m, tags, run_config): m for m in members}
        for done, future in enumerate(as_completed(futures), start=1):
            outcomes.append(outcome_of(future, futures[future]))
            _print_outcome(outcomes[-1], done, len(members))
        failed = [o.label for o in outcomes if not o.success]
        print("ensemble: normalized ensemble and distance matrices", flush=True)
        ensemble_job = ensemble_job_name(config.name)
        ensemble = outcome_of(pool.submit(execute_run, ensemble_job, None, tags, run_config), ensemble_job)
    _print_outcome(ensemble, 1, 1)
    total = time.perf_counter() - started
    print(f"\ndone in {total:.1f} s: {len(members) - len(failed)}/{len(members)} members"
          + (f" (failed: {', '.join(failed)}; retry with --members {','.join(failed)})" if failed else "")
          + (", ensemble and distances materialized" if ensemble.success else ", ensemble FAILED"))
    print(f"""
results   {store.experiment_dir(config.name)}
run logs  {log_path}  (and every run in the Dagster UI)
tables    {store.database_path}  (DuckDB views over Parquet; any DuckDB client can open it read-only)
  query:  spd-cluster sql "SELECT member, max(iteration) + 1 AS iterations, min(mdl_loss) AS best_mdl FROM merge_events WHERE experiment = '{config.name}' GROUP BY member ORDER BY member"
UI        DAGSTER_HOME={home} dagster dev -w {PROJECT_ROOT / 'workspace.yaml'}   (then open http://localhost:3000)""")
    return 0 if ensemble.success and not failed else 1
