"""`spd-cluster`: run an experiment through Dagster and say where the results are; query the results; repair.

Each command imports only what it needs: `sql` answers without importing torch or Dagster.
"""

import argparse
import logging
import sys
from pathlib import Path

from spd_assets.cli.export import add_export_parser, run_export
from spd_assets.cli.sql import OUTPUT_FORMATS, emit, run_sql
from spd_assets.deployment.home import point_at_instance, results_store
from spd_assets.errors import SpdClusterError
from spd_assets.storage.store import require_experiment


def print_clusters(args) -> int:
    """`spd-cluster clusters`: one member's or the consensus clusters as JSON; the exit status."""
    import json

    from spd_assets.cli.clusters import ensemble_clusters, member_clusters

    store = results_store(point_at_instance())
    try:
        if args.consensus:
            report = ensemble_clusters(store, args.experiment, args.iteration, threshold=args.threshold)
        elif args.iteration is None:
            print("spd-cluster clusters: --member needs --iteration", file=sys.stderr)
            return 2
        else:
            report = member_clusters(store, args.experiment, args.member, args.iteration)
    except (SpdClusterError, ValueError) as error:
        print(f"spd-cluster clusters: {error}", file=sys.stderr)
        return 1
    emit(json.dumps(report, indent=1), args.output)
    return 0


class PrintVersion(argparse.Action):
    """`--version`: the installed package's version, looked up only when asked for."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        from importlib.metadata import version

        print(f"{parser.prog} {version('spd-cluster')}")
        parser.exit()


def main(argv: list[str] | None = None) -> int:
    """The `spd-cluster` command line; the exit status."""
    parser = argparse.ArgumentParser(prog="spd-cluster", description=__doc__)
    parser.add_argument("--version", action=PrintVersion, help="print the installed version of spd-cluster and exit")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="materialize every asset of an experiment (the embedded default without --config)")
    run.add_argument("--config", type=Path, help="experiment config (YAML), or an original clustering run, pipeline or "
                                                 "flat config (YAML or JSON); default: the embedded synthetic default")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config value, e.g. --set name=alpha_half --set merge_config.alpha=0.5")
    run.add_argument("--parallel", type=int, default=None, help="member runs at once (default: the number of devices)")
    run.add_argument("--members", help="only these members (comma-separated partition keys), e.g. to retry failed ones")
    run.add_argument("--replace", action="store_true",
                     help="the experiment has results of another config or of members no longer in it: remove them first")
    doctor = commands.add_parser("doctor", help="find and repair what disagrees between Dagster, the result files and "
                                 "the processes alive (dead runs, partial or unrecorded files, stale lineage tables)")
    doctor.add_argument("--dry-run", action="store_true", help="only report; change nothing")
    doctor.add_argument("--experiment", action="append", help="only this experiment's results (repeatable)")
    validate = commands.add_parser("validate", help="parse and check a config without running it (exit 0 valid, 2 invalid)")
    validate.add_argument("--config", type=Path, required=True, help="experiment config, or an original research config")
    validate.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    sql = commands.add_parser("sql", help="query the results (read-only; works while pipelines run)")
    sql.add_argument("query", nargs="?", help="SQL; omit to read it from --file or standard input")
    sql.add_argument("--file", type=Path, help="read the query from this file")
    sql.add_argument("--format", choices=OUTPUT_FORMATS, default="table")
    sql.add_argument("--output", type=Path, help="write to this file instead of standard output")
    sql.add_argument("--max-rows", type=int, default=40, help="rows shown in table format (0: all)")
    sql.add_argument("--allow-read", action="append", type=Path, default=[], metavar="PATH",
                     help="let the query also read this file or folder (repeatable); otherwise it reads only the "
                          "result tables")
    clusters = commands.add_parser("clusters", help="component label -> cluster at an iteration, as JSON")
    clusters.add_argument("--iteration", type=int,
                          help="after which merge (0-based, as in the tables); --consensus without it: the stored "
                               "consensus, at the iteration its rule chose")
    which = clusters.add_mutually_exclusive_group(required=True)
    which.add_argument("--member", help="one member's partition (its partition key)")
    which.add_argument("--consensus", action="store_true", help="components together in at least --threshold of the members")
    clusters.add_argument("--threshold", type=float,
                          help="consensus: fraction of members (default: the stored consensus's, else half)")
    clusters.add_argument("--experiment", default="default",
                          help="the experiment's name (its config's `name`; default: %(default)s)")
    clusters.add_argument("--output", type=Path, help="write the JSON to this file")
    add_export_parser(commands)
    args = parser.parse_args(argv)
    # dagster-postgres warns of each retry of a connection on the root logger; the command line says it once,
    # plainly, if they give up (InstanceUnreachableError).
    logging.getLogger().addFilter(lambda record: not record.getMessage().startswith("Retrying failed database"))
    try:
        return _dispatch(args)
    except KeyboardInterrupt:  # before any work was under way; `run` handles its own interruptions
        print(f"spd-cluster {args.command}: interrupted", file=sys.stderr)
        return 130


def run_doctor(args) -> int:
    """`spd-cluster doctor`: compare Dagster's record with the files and processes, repair; the exit status."""
    from dagster import DagsterInstance

    from spd_assets.cli.doctor import report
    from spd_assets.service.doctor import examine
    from spd_assets.service.runs import prepare_instance

    home = prepare_instance(point_at_instance())
    store = results_store(home)
    for name in args.experiment or []:
        if not store.experiment_dir(name).exists():  # results of an experiment no longer registered are examined
            require_experiment(store, name)
    print(f"spd-cluster doctor: DAGSTER_HOME={home}" + (" (dry run: nothing is changed)" if args.dry_run else ""))
    with DagsterInstance.get() as instance:
        findings = examine(store, instance, repair=not args.dry_run, only=args.experiment)
    return report(store, findings, repair=not args.dry_run)


def _dispatch(args) -> int:
    if args.command == "doctor":
        try:
            return run_doctor(args)
        except SpdClusterError as error:
            print(f"spd-cluster doctor: {error}", file=sys.stderr)
            return 2
    if args.command == "clusters":
        return print_clusters(args)
    if args.command == "export":
        return run_export(args)
    if args.command == "sql":
        store = results_store(point_at_instance())
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
        return run_sql(store, query, output_format=args.format, output=args.output, max_rows=args.max_rows,
                       allow_read=args.allow_read)
    if args.command == "validate":
        from spd_assets.cli.validate import validate

        return validate(args.config, args.set)
    if args.command == "run":
        # The config is read before Dagster and the service are imported, so a mistake in it is said at once.
        from spd_assets.config import load_config_file

        try:
            loaded = load_config_file(args.config, args.set)
        except SpdClusterError as error:
            print(f"spd-cluster: {error}", file=sys.stderr)
            return 2
        from spd_assets.cli.run import run_loaded

        only = [m.strip() for m in args.members.split(",") if m.strip()] if args.members else None
        return run_loaded(loaded, parallel=args.parallel, only_members=only, replace=args.replace)
    return 2


if __name__ == "__main__":
    sys.exit(main())
