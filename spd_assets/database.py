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

SCHEMA_VERSION = 2
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
    # Lineage: one row per materialization, one per input it consumed (history is kept).
    "materializations": {
        "experiment": pl.String, "asset": pl.String, "partition": pl.String, "run_id": pl.String, "step_key": pl.String,
        "materialized_at": pl.Datetime("us", "UTC"), "code_version": pl.String, "data_version": pl.String,
        "config_hash": pl.String, "storage_path": pl.String, "metadata_json": pl.String,
    },
    "lineage_edges": {
        "experiment": pl.String, "asset": pl.String, "partition": pl.String, "run_id": pl.String, "data_version": pl.String,
        "upstream_asset": pl.String, "upstream_partition": pl.String, "upstream_data_version": pl.String,
    },
}

# Views derived from the tables above (created after them, in this order).
DERIVED_VIEWS = {
    "latest_materializations": """
        SELECT * FROM materializations
        QUALIFY row_number() OVER (PARTITION BY experiment, asset, partition ORDER BY materialized_at DESC) = 1""",
    # Each edge with the materialization that produced the version it consumed.
    "lineage": """
        SELECT e.*, u.run_id AS upstream_run_id, u.code_version AS upstream_code_version,
               u.config_hash AS upstream_config_hash, u.materialized_at AS upstream_materialized_at
        FROM lineage_edges e
        LEFT JOIN (
            SELECT * FROM materializations
            QUALIFY row_number() OVER (PARTITION BY experiment, asset, partition, data_version ORDER BY materialized_at DESC) = 1
        ) u ON u.experiment = e.experiment AND u.asset = e.upstream_asset
           AND u.partition IS NOT DISTINCT FROM e.upstream_partition AND u.data_version = e.upstream_data_version""",
    # Every (member, iteration, label) expanded from the spans; memberships_at(i) is the fast way to one iteration.
    "memberships": """
        SELECT experiment, member, unnest(range(first_iteration, last_iteration + 1)) AS iteration, label, group_label
        FROM membership_spans""",
    "experiment_settings": """
        SELECT experiment, config_hash, source_kind, n_members,
               CAST(json_extract(config_json, '$.merge_config.alpha') AS DOUBLE) AS alpha,
               CAST(json_extract(config_json, '$.merge_config.activation_threshold') AS DOUBLE) AS activation_threshold,
               CAST(json_extract(config_json, '$.merge_config.iters') AS INTEGER) AS iters,
               json_extract_string(config_json, '$.merge_config.merge_pair_sampling_method') AS sampler,
               CAST(json_extract(config_json, '$.base_seed') AS BIGINT) AS base_seed,
               registered_at, config_json
        FROM experiments""",
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
                for view, query in DERIVED_VIEWS.items():
                    connection.execute(f"CREATE OR REPLACE VIEW {view} AS {query}")
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
