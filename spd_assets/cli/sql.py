"""Answering one read-only SQL query from the results database, as a table, CSV, JSON or Parquet."""

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import duckdb

from spd_assets.errors import QueryRefused, UsageError
from spd_assets.storage.atomic import atomic_path
from spd_assets.storage.database import connect_read_only
from spd_assets.storage.query_access import QueryAccess, check_query, refusal
from spd_assets.storage.store import ResultsStore

OUTPUT_FORMATS = ("table", "csv", "json", "parquet")
# Result files named in a warning before "and N more".
MISSING_SHOWN = 3
DOCTOR_HINT = "`spd-cluster doctor` says how to recompute them"


def run_sql(store: ResultsStore, query: str, *, output_format: str, output: Path | None, max_rows: int,
            allow_read: Sequence[Path] = ()) -> int:
    """Run one read-only query against the results database and print or write the answer; the exit code.

    The query reads the result tables, and the files or folders of `allow_read`, and nothing else
    (`storage.query_access`); an answer written to a file is written by spd-cluster, not by the query.
    """
    if output_format == "parquet" and output is None:
        print("spd-cluster sql: --format parquet needs --output FILE", file=sys.stderr)
        return 2
    try:
        access = QueryAccess.with_reads(store.tables_dir, allow_read)
    except UsageError as error:
        print(f"spd-cluster sql: {error}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="spd-cluster-sql-") as scratch:
        # The one file DuckDB may write: spd-cluster's copy of the answer, for CSV and Parquet.
        answer = Path(scratch) / f"answer.{output_format}"
        try:
            connection = connect_read_only(store, allow_read=allow_read, scratch_files=[answer])
        except (duckdb.Error, RuntimeError) as error:
            print(f"spd-cluster sql: cannot open the results database: {_first_line(error)}", file=sys.stderr)
            return 1
        try:
            try:
                check_query(connection, query, access)
            except QueryRefused as error:
                print(f"spd-cluster sql: {error}", file=sys.stderr)
                return 1
            for path in [*access.extra_dirs, *access.extra_files]:
                print(f"spd-cluster sql: --allow-read: the query may also read {path}", file=sys.stderr)
            _warn_about_missing_files(connection)
            relation = connection.sql(query)
            if relation is not None:
                _write_result(relation, output_format, output, max_rows, answer)
        except duckdb.Error as error:
            refused = refusal(error, access)
            if refused is not None:
                print(f"spd-cluster sql: {refused}", file=sys.stderr)
                return 1
            damaged = ".parquet" in str(error) and "read-only" not in str(error).lower()
            hint = f" (a damaged result file: {DOCTOR_HINT.replace('them', 'it')})" if damaged else ""
            print(f"spd-cluster sql: {error}{hint}", file=sys.stderr)
            return 1
        finally:
            connection.close()
    return 0


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def missing_result_files(connection: duckdb.DuckDBPyConnection) -> list[tuple[str, str, str | None, str]]:
    """(experiment, asset, partition, path) of each latest materialization whose file is gone (so its rows are
    absent from every answer), as far as the lineage tables have recorded them."""
    rows = connection.execute(
        "SELECT experiment, asset, partition, storage_path FROM latest_materializations "
        "WHERE storage_path IS NOT NULL ORDER BY experiment, asset, partition"
    ).fetchall()
    return [row for row in rows if not os.path.exists(row[3])]


def _warn_about_missing_files(connection: duckdb.DuckDBPyConnection) -> None:
    try:
        missing = missing_result_files(connection)
    except duckdb.Error as error:  # the lineage tables themselves are damaged; other tables may still answer
        print(f"spd-cluster sql: warning: cannot check for missing result files: {error}; {DOCTOR_HINT}",
              file=sys.stderr)
        return
    if not missing:
        return
    shown = "; ".join(f"{path} ({experiment} {asset}{' ' + partition if partition else ''})"
                      for experiment, asset, partition, path in missing[:MISSING_SHOWN])
    more = f" and {len(missing) - MISSING_SHOWN} more" if len(missing) > MISSING_SHOWN else ""
    print(f"spd-cluster sql: warning: {len(missing)} result file(s) that Dagster recorded are missing, so their "
          f"rows are absent from answers: {shown}{more}; {DOCTOR_HINT}", file=sys.stderr)


def _write_result(relation, output_format: str, output: Path | None, max_rows: int, answer: Path) -> None:
    if output_format == "table":
        rows = relation.shape[0]
        text = relation.__str__() if max_rows <= 0 or rows <= max_rows else relation.limit(max_rows).__str__()
        if 0 < max_rows < rows:
            text += f"({rows} rows, first {max_rows} shown: --max-rows 0 for all, or --format csv)\n"
        emit(text, output)
    elif output_format == "json":
        records = [dict(zip(relation.columns, row)) for row in relation.fetchall()]
        emit(json.dumps(records, default=str, indent=1), output)
    else:
        # DuckDB writes CSV and Parquet into the scratch file, the only file the connection may write.
        (relation.write_csv if output_format == "csv" else relation.write_parquet)(str(answer))
        if output is None:
            sys.stdout.write(answer.read_text())
        else:
            with atomic_path(output) as temporary:
                shutil.copyfile(answer, temporary)


def emit(text: str, output: Path | None) -> None:
    """Print `text`, or write it atomically to `output`."""
    if output is None:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
        return
    with atomic_path(output) as temporary:
        temporary.write_text(text if text.endswith("\n") else text + "\n")
