"""Answering one read-only SQL query from the results database, as a table, CSV, JSON or Parquet."""

import json
import os
import sys
import tempfile
from pathlib import Path

import duckdb

from spd_assets.storage.atomic import atomic_path
from spd_assets.storage.database import connect_read_only
from spd_assets.storage.store import ResultsStore

OUTPUT_FORMATS = ("table", "csv", "json", "parquet")
# Result files named in a warning before "and N more".
MISSING_SHOWN = 3
DOCTOR_HINT = "`spd-cluster doctor` says how to recompute them"


def run_sql(store: ResultsStore, query: str, *, output_format: str, output: Path | None, max_rows: int) -> int:
    """Run one read-only query against the results database and print or write the answer; the exit code."""
    if output_format == "parquet" and output is None:
        print("spd-cluster sql: --format parquet needs --output FILE", file=sys.stderr)
        return 2
    try:
        connection = connect_read_only(store)
    except (duckdb.Error, RuntimeError) as error:
        print(f"spd-cluster sql: cannot open the results database: {error}", file=sys.stderr)
        return 1
    try:
        _warn_about_missing_files(connection)
        relation = connection.sql(query)
        if relation is None:  # a statement without a result, e.g. SET
            return 0
        _write_result(relation, output_format, output, max_rows)
    except duckdb.Error as error:
        damaged = ".parquet" in str(error) and "read-only" not in str(error).lower()
        hint = f" (a damaged result file: {DOCTOR_HINT.replace('them', 'it')})" if damaged else ""
        print(f"spd-cluster sql: {error}{hint}", file=sys.stderr)
        return 1
    finally:
        connection.close()
    return 0


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


def _write_result(relation, output_format: str, output: Path | None, max_rows: int) -> None:
    if output_format == "table":
        rows = relation.shape[0]
        text = relation.__str__() if max_rows <= 0 or rows <= max_rows else relation.limit(max_rows).__str__()
        if 0 < max_rows < rows:
            text += f"({rows} rows, first {max_rows} shown: --max-rows 0 for all, or --format csv)\n"
        emit(text, output)
    elif output_format == "json":
        records = [dict(zip(relation.columns, row)) for row in relation.fetchall()]
        emit(json.dumps(records, default=str, indent=1), output)
    elif output is not None:
        with atomic_path(output) as temporary:
            (relation.write_csv if output_format == "csv" else relation.write_parquet)(str(temporary))
    else:  # csv to standard output, through a file DuckDB writes and that is removed right after
        with tempfile.TemporaryDirectory() as directory:
            target = Path(directory) / "result.csv"
            relation.write_csv(str(target))
            sys.stdout.write(target.read_text())


def emit(text: str, output: Path | None) -> None:
    """Print `text`, or write it atomically to `output`."""
    if output is None:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
        return
    with atomic_path(output) as temporary:
        temporary.write_text(text if text.endswith("\n") else text + "\n")
