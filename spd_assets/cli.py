"""`spd-cluster`: run an experiment through Dagster and say where the results are."""

import argparse
import multiprocessing
import os
import shutil
import socket
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from spd_assets.config import ExperimentConfig, ExperimentConfigError, load_config
from spd_assets.deployment import DEVICE_POOL as DEVICE_POOL_NAME
from spd_assets.deployment import DeploymentError
from spd_assets.devices import DeviceError
from spd_assets.sources.files import BatchFileError
from spd_assets.storage import PROJECT_ROOT, dagster_home, database_path, results_root

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


def _prepare_home_env() -> Path:
    home = dagster_home()
    os.environ["DAGSTER_HOME"] = str(home)
    return home


def _prepare_home() -> Path:
    """Point DAGSTER_HOME at the instance (the project's dagster_home/ by default) and make sure it exists."""
    home = dagster_home()
    home.mkdir(parents=True, exist_ok=True)
    template = PROJECT_ROOT / "dagster_home" / "dagster.yaml"
    if not (home / "dagster.yaml").exists() and template.exists():
        shutil.copy(template, home / "dagster.yaml")
    os.environ["DAGSTER_HOME"] = str(home)
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
    from dagster import DagsterInstance, execute_job
    from dagster._core.definitions.reconstruct import ReconstructableRepository

    repository = ReconstructableRepository.for_module("spd_assets.definitions", "defs", working_directory=str(PROJECT_ROOT))
    # Host and pid let a later invocation recognise this run as orphaned if this process is killed.
    run_tags = {**tags, RUN_TAG_HOST: socket.gethostname(), RUN_TAG_PID: str(os.getpid())}
    if partition is not None:
        run_tags["dagster/partition"] = partition
    started = time.perf_counter()
    with DagsterInstance.get() as instance:
        result = execute_job(
            repository.get_reconstructable_job(job_name), instance=instance, run_config=run_config, tags=run_tags
        )
        return RunOutcome(
            label=partition or job_name,
            success=result.success,
            run_id=result.run_id,
            seconds=time.perf_counter() - started,
            error=None if result.success else first_failure_message(result),
        )


def _outcome_of(future, label: str) -> RunOutcome:
    """A run's outcome; a worker that died before Dagster could record a run counts as a failed run."""
    try:
        return future.result()
    except Exception as error:  # the run never started: instance unreachable, worker killed, ...
        return RunOutcome(label=label, success=False, run_id="-" * 8, seconds=0.0, error=f"{type(error).__name__}: {error}")


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


def run_experiment(config: ExperimentConfig, *, parallel: int | None, only_members: list[str] | None) -> int:
    from dagster import DagsterInstance

    from spd_assets.database import ensure_database
    from spd_assets.definitions import ensemble_job_name, members_job_name
    from spd_assets.deployment import load_settings
    from spd_assets.experiments import register_experiment
    from spd_assets.resources import source_for

    home = _prepare_home()
    settings = load_settings(home)
    devices = settings.device_names()
    members = source_for(config).member_keys()
    if only_members is not None:
        unknown = sorted(set(only_members) - set(members))
        if unknown:
            print(f"spd-cluster: --members: {unknown} are not members of {config.name!r}; expected some of {members}", file=sys.stderr)
            return 2
        members = [member for member in members if member in only_members]
    parallel = parallel or len(devices)
    register_experiment(config)
    ensure_database()
    with DagsterInstance.get() as instance:
        for run_id in reap_orphaned_runs(instance):
            print(f"  (marked orphaned run {run_id[:8]} failed and freed its pool slots)")
    invocation = time.strftime("%Y%m%dT%H%M%S")
    tags = {RUN_TAG_EXPERIMENT: config.name, RUN_TAG_INVOCATION: invocation}
    run_config = IN_PROCESS_RUN_CONFIG if settings.executor == "multiprocess" else None
    log_path = results_root(home) / "logs" / f"{config.name}-{invocation}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"spd-cluster: experiment {config.name!r} (config {config.config_hash}), {len(members)} members, "
          f"DAGSTER_HOME={home}")
    print(f"devices: {', '.join(devices)} (executor {settings.executor}); pool {DEVICE_POOL_NAME!r} limits device steps across runs")
    print(f"members ({parallel} at a time): activations and merge history per member", flush=True)
    started = time.perf_counter()
    outcomes = []
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=parallel, mp_context=context, initializer=_log_to, initargs=(str(log_path),)) as pool:
        futures = {pool.submit(execute_run, members_job_name(config.name), m, tags, run_config): m for m in members}
        for done, future in enumerate(as_completed(futures), start=1):
            outcomes.append(_outcome_of(future, futures[future]))
            _print_outcome(outcomes[-1], done, len(members))
        failed = [o.label for o in outcomes if not o.success]
        print("ensemble: normalized ensemble and distance matrices", flush=True)
        ensemble_job = ensemble_job_name(config.name)
        ensemble = _outcome_of(pool.submit(execute_run, ensemble_job, None, tags, run_config), ensemble_job)
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


OUTPUT_FORMATS = ("table", "csv", "json", "parquet")


def run_sql(query: str, *, output_format: str, output: Path | None, max_rows: int) -> int:
    """Run one read-only query against the results database and print or write the answer."""
    import duckdb

    from spd_assets.database import connect_read_only

    if output_format == "parquet" and output is None:
        print("spd-cluster sql: --format parquet needs --output FILE", file=sys.stderr)
        return 2
    try:
        connection = connect_read_only()
    except (duckdb.Error, RuntimeError) as error:
        print(f"spd-cluster sql: cannot open the results database: {error}", file=sys.stderr)
        return 1
    try:
        relation = connection.sql(query)
        if relation is None:  # a statement without a result, e.g. SET
            return 0
        _write_result(relation, output_format, output, max_rows)
    except duckdb.Error as error:
        print(f"spd-cluster sql: {error}", file=sys.stderr)
        return 1
    finally:
        connection.close()
    return 0


def _write_result(relation, output_format: str, output: Path | None, max_rows: int) -> None:
    import json
    import tempfile

    from spd_assets.atomic import atomic_path

    if output_format == "table":
        rows = relation.shape[0]
        text = relation.__str__() if max_rows <= 0 or rows <= max_rows else relation.limit(max_rows).__str__()
        if 0 < max_rows < rows:
            text += f"({rows} rows, first {max_rows} shown: --max-rows 0 for all, or --format csv)\n"
        _emit(text, output)
    elif output_format == "json":
        records = [dict(zip(relation.columns, row)) for row in relation.fetchall()]
        _emit(json.dumps(records, default=str, indent=1), output)
    else:
        target = output if output is not None else Path(tempfile.mkdtemp()) / f"result.{output_format}"
        with atomic_path(target) as temporary:
            (relation.write_csv if output_format == "csv" else relation.write_parquet)(str(temporary))
        if output is None:
            sys.stdout.write(target.read_text())


def _emit(text: str, output: Path | None) -> None:
    if output is None:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
        return
    from spd_assets.atomic import atomic_path

    with atomic_path(output) as temporary:
        temporary.write_text(text if text.endswith("\n") else text + "\n")


def print_clusters(args) -> int:
    import json

    from spd_assets.clusters import ensemble_clusters, member_clusters
    from spd_assets.storage import StorageError
    from spd_math.history import HistoryError

    _prepare_home_env()
    try:
        if args.consensus:
            report = ensemble_clusters(args.experiment, args.iteration, threshold=args.threshold)
        else:
            report = member_clusters(args.experiment, args.member, args.iteration)
    except (StorageError, HistoryError, ValueError) as error:
        print(f"spd-cluster clusters: {error}", file=sys.stderr)
        return 1
    _emit(json.dumps(report, indent=1), args.output)
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
        _prepare_home_env()
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
