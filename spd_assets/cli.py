"""`spd-cluster`: run an experiment through Dagster and say where the results are."""

import argparse
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from spd_assets.config import ExperimentConfig, ExperimentConfigError, load_config
from spd_assets.deployment import DEVICE_POOL, DeploymentError
from spd_assets.devices import DeviceError
from spd_assets.query import OUTPUT_FORMATS, emit, run_sql
from spd_assets.runs import (
    IN_PROCESS_RUN_CONFIG,
    RUN_TAG_EXPERIMENT,
    RUN_TAG_INVOCATION,
    RunOutcome,
    execute_run,
    outcome_of,
    point_at_instance,
    prepare_instance,
    reap_orphaned_runs,
)
from spd_assets.sources.files import BatchFileError
from spd_assets.storage import PROJECT_ROOT, database_path, results_root


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


def run_experiment(config: ExperimentConfig, *, parallel: int | None, only_members: list[str] | None) -> int:
    from dagster import DagsterInstance

    from spd_assets.database import ensure_database
    from spd_assets.definitions import ensemble_job_name, members_job_name
    from spd_assets.deployment import load_settings
    from spd_assets.devices import leases_at_once
    from spd_assets.experiments import register_experiment
    from spd_assets.resources import pool_limit, source_for

    home = prepare_instance()
    settings = load_settings(home)
    devices = settings.device_names()
    members = source_for(config).member_keys()
    if only_members is not None:
        unknown = sorted(set(only_members) - set(members))
        if unknown:
            print(f"spd-cluster: --members: {unknown} are not members of {config.name!r}; expected some of {members}", file=sys.stderr)
            return 2
        members = [member for member in members if member in only_members]
    register_experiment(config)
    ensure_database()
    with DagsterInstance.get() as instance:
        for run_id in reap_orphaned_runs(instance):
            print(f"  (marked orphaned run {run_id[:8]} failed and freed its pool slots)")
        limit = pool_limit(instance)
    at_once = leases_at_once(devices, limit)
    parallel = parallel or at_once
    invocation = time.strftime("%Y%m%dT%H%M%S")
    tags = {RUN_TAG_EXPERIMENT: config.name, RUN_TAG_INVOCATION: invocation}
    run_config = IN_PROCESS_RUN_CONFIG if settings.executor == "multiprocess" else None
    log_path = results_root(home) / "logs" / f"{config.name}-{invocation}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"spd-cluster: experiment {config.name!r} (config {config.config_hash}), {len(members)} members, "
          f"DAGSTER_HOME={home}")
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
results   {results_root(home) / config.name}
run logs  {log_path}  (and every run in the Dagster UI)
tables    {database_path(home)}  (DuckDB views over Parquet; any DuckDB client can open it read-only)
  query:  spd-cluster sql "SELECT member, max(iteration) + 1 AS iterations, min(mdl_loss) AS best_mdl FROM merge_events WHERE experiment = '{config.name}' GROUP BY member ORDER BY member"
UI        DAGSTER_HOME={home} dagster dev -w {PROJECT_ROOT / 'workspace.yaml'}   (then open http://localhost:3000)""")
    return 0 if ensemble.success and not failed else 1


def print_clusters(args) -> int:
    import json

    from spd_assets.clusters import ensemble_clusters, member_clusters
    from spd_assets.storage import StorageError
    from spd_math.history import HistoryError

    point_at_instance()
    try:
        if args.consensus:
            report = ensemble_clusters(args.experiment, args.iteration, threshold=args.threshold)
        else:
            report = member_clusters(args.experiment, args.member, args.iteration)
    except (StorageError, HistoryError, ValueError) as error:
        print(f"spd-cluster clusters: {error}", file=sys.stderr)
        return 1
    emit(json.dumps(report, indent=1), args.output)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="spd-cluster", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="materialize every asset of an experiment (the embedded default without --config)")
    run.add_argument("--config", type=Path, help="experiment config (YAML); default: the embedded synthetic default")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config value, e.g. --set name=alpha_half --set merge_config.alpha=0.5")
    run.add_argument("--parallel", type=int, default=None, help="member runs at once (default: the number of devices)")
    run.add_argument("--members", help="only these members (comma-separated partition keys), e.g. to retry failed ones")
    sql = commands.add_parser("sql", help="query the results (read-only; works while pipelines run)")
    sql.add_argument("query", nargs="?", help="SQL; omit to read it from --file or standard input")
    sql.add_argument("--file", type=Path, help="read the query from this file")
    sql.add_argument("--format", choices=OUTPUT_FORMATS, default="table")
    sql.add_argument("--output", type=Path, help="write to this file instead of standard output")
    sql.add_argument("--max-rows", type=int, default=40, help="rows shown in table format (0: all)")
    clusters = commands.add_parser("clusters", help="component label -> cluster at an iteration, as JSON")
    clusters.add_argument("--iteration", type=int, required=True, help="after which merge (0-based, as in the tables)")
    which = clusters.add_mutually_exclusive_group(required=True)
    which.add_argument("--member", help="one member's partition (its partition key)")
    which.add_argument("--consensus", action="store_true", help="components together in at least --threshold of the members")
    clusters.add_argument("--threshold", type=float, default=0.5, help="consensus: fraction of members (default: half)")
    clusters.add_argument("--experiment", default="default")
    clusters.add_argument("--output", type=Path, help="write the JSON to this file")
    args = parser.parse_args(argv)
    if args.command == "clusters":
        return print_clusters(args)
    if args.command == "sql":
        point_at_instance()
        if args.query is not None:
            query = args.query
        elif args.file is not None:
            try:
                query = args.file.read_text()
            except OSError as error:
                print(f"spd-cluster sql: cannot read {args.file}: {error.strerror}", file=sys.stderr)
                return 2
        else:
            query = sys.stdin.read()
        if not query.strip():
            print("spd-cluster sql: expected a query (argument, --file or standard input), got nothing", file=sys.stderr)
            return 2
        return run_sql(query, output_format=args.format, output=args.output, max_rows=args.max_rows)
    if args.command == "run":
        try:
            config = load_config(args.config, args.set)
        except ExperimentConfigError as error:
            print(f"spd-cluster: {error}", file=sys.stderr)
            return 2
        if args.parallel is not None and args.parallel < 1:
            print(f"spd-cluster: --parallel: expected a positive number, got {args.parallel}", file=sys.stderr)
            return 2
        only = [m.strip() for m in args.members.split(",") if m.strip()] if args.members else None
        try:
            return run_experiment(config, parallel=args.parallel, only_members=only)
        except (ExperimentConfigError, DeploymentError, BatchFileError, DeviceError) as error:
            print(f"spd-cluster: {error}", file=sys.stderr)
            return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
