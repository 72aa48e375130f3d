"""The DuckDB database: views over the Parquet result tables, so `duckdb $DAGSTER_HOME/spd_cluster.duckdb` answers SQL.

DuckDB lets one process open a file read-write, and none while others hold it. The pipeline
therefore never writes rows into the database: results are Parquet files (replaced
atomically), and the database only holds views over their globs. An open read-only
connection sees new files on its next query. The database is written only to (re)create
the views, which happens once per schema version; a pipeline that finds the views current
never opens it for writing, so users querying during a run never block it.
"""

from __future__ import annotations

import fcntl
import time
from contextlib import contextmanager
from pathlib import Path

import duckdb
import polars as pl

from spd_assets.atomic import atomic_path
from spd_assets.storage import database_path, tables_dir

SCHEMA_VERSION = 1
# Files of this name hold no rows, only the schema, so every view works before any results exist.
SCHEMA_FILE = "_schema.parquet"
LOCK_TIMEOUT_S = 30.0

TABLE_SCHEMAS: dict[str, dict[str, pl.DataType]] = {
    "experiments": {
        "experiment": pl.String, "config_hash": pl.String, "config_json": pl.String,
        "source_kind": pl.String, "n_members": pl.Int32, "registered_at": pl.Datetime("us", "UTC"),
    },
    "component_stats": {
        "experiment": pl.String, "member": pl.String, "label": pl.String, "module": pl.String,
        "component_index": pl.Int32, "activation_frequency": pl.Float64, "mean_activation": pl.Float64,
        "max_activation": pl.Float64, "dead": pl.Boolean,
    },
    "merge_events": {
        "experiment": pl.String, "member": pl.String, "iteration": pl.Int32, "group_a": pl.Int32,
        "group_b": pl.Int32, "merged_group": pl.Int32, "k_groups": pl.Int32, "pair_cost": pl.Float64,
        "mdl_loss": pl.Float64,
    },
    "membership_spans": {
        "experiment": pl.String, "member": pl.String, "label": pl.String, "group_label": pl.String,
        "first_iteration": pl.Int32, "last_iteration": pl.Int32,
    },
    "ensemble_members": {
        "experiment": pl.String, "member": pl.String, "ensemble_index": pl.Int32, "status": pl.String,
        "n_components": pl.Int32, "n_iters_completed": pl.Int32, "union_coverage": pl.Float64,
    },
    "distances": {
        "experiment": pl.String, "method": pl.String, "iteration": pl.Int32, "member_a": pl.String,
        "member_b": pl.String, "distance": pl.Int64,
    },
}

MACROS = {
    # Memberships at one iteration, expanded from the compact spans.
    "memberships_at": (
        "(iteration_wanted) AS TABLE "
        "SELECT experiment, member, iteration_wanted AS iteration, label, group_label "
        "FROM membership_spans WHERE first_iteration <= iteration_wanted AND iteration_wanted <= last_iteration"
    ),
}


class DatabaseError(RuntimeError):
    """The results database cannot be opened or prepared; the message says why and what to do."""


def _ensure_schema_files(home: Path | None) -> None:
    for table, schema in TABLE_SCHEMAS.items():
        path = tables_dir(home) / table / SCHEMA_FILE
        if not path.exists():
            with atomic_path(path) as temporary:
                pl.DataFrame(schema=schema).write_parquet(temporary)


def _view_sql(table: str, home: Path | None) -> str:
    pattern = (tables_dir(home) / table / "*.parquet").as_posix().replace("'", "''")
    return f"CREATE OR REPLACE VIEW {table} AS SELECT * FROM read_parquet('{pattern}', union_by_name = true)"


def _is_current(connection: duckdb.DuckDBPyConnection, home: Path | None) -> bool:
    try:
        row = connection.execute("SELECT schema_version, tables_root FROM spd_cluster_meta").fetchone()
    except duckdb.Error:
        return False
    return row == (SCHEMA_VERSION, str(tables_dir(home)))


@contextmanager
def _exclusive(lock_path: Path):
    """Serialise view creation between pipeline processes (DuckDB itself would just fail the second)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_database(home: Path | None = None) -> Path:
    """Create or update the views; a no-op (read-only check) when they are current."""
    path = database_path(home)
    _ensure_schema_files(home)
    if path.exists() and _current_read_only(path, home):
        return path
    with _exclusive(path.with_name(path.name + ".lock")):
        deadline = time.monotonic() + LOCK_TIMEOUT_S
        while True:
            try:
                connection = duckdb.connect(str(path))
                break
            except duckdb.IOException as error:
                # Another process (a user's query session) holds the file; views may already be fine.
                if path.exists() and _current_read_only(path, home):
                    return path
                if time.monotonic() > deadline:
                    raise DatabaseError(
                        f"cannot create the result views in {path}: another process keeps it open ({error}). "
                        "Close other DuckDB sessions on it once; afterwards they never block the pipeline."
                    ) from None
                time.sleep(0.5)
        try:
            if not _is_current(connection, home):
                for table in TABLE_SCHEMAS:
                    connection.execute(_view_sql(table, home))
                for name, body in MACROS.items():
                    connection.execute(f"CREATE OR REPLACE MACRO {name}{body}")
                connection.execute("CREATE OR REPLACE TABLE spd_cluster_meta (schema_version INTEGER, tables_root VARCHAR)")
                connection.execute("INSERT INTO spd_cluster_meta VALUES (?, ?)", [SCHEMA_VERSION, str(tables_dir(home))])
        finally:
            connection.close()
    return path


def _current_read_only(path: Path, home: Path | None) -> bool:
    try:
        connection = duckdb.connect(str(path), read_only=True)
    except duckdb.Error:
        return False
    try:
        return _is_current(connection, home)
    finally:
        connection.close()


def connect_read_only(home: Path | None = None) -> duckdb.DuckDBPyConnection:
    """A read-only connection with the views ready; many may be open while pipelines run."""
    path = ensure_database(home)
    return duckdb.connect(str(path), read_only=True)
