"""The DuckDB database: views over the Parquet result tables, so `duckdb $DAGSTER_HOME/spd_cluster.duckdb` answers SQL.

DuckDB lets one process open a file read-write, and none while others hold it. The pipeline
therefore never writes rows into the database: results are Parquet files (replaced
atomically), and the database only holds views over their globs. An open read-only
connection sees new files on its next query. The database is written only to (re)create
the views, which happens once per schema version; a pipeline that finds the views current
never opens it for writing, so users querying during a run never block it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import duckdb

from spd_assets.errors import DatabaseError
from spd_assets.storage.atomic import atomic_path
from spd_assets.storage.query_access import QueryAccess, attach_read_only, restrict
from spd_assets.storage.schemas import TABLE_SCHEMAS
from spd_assets.storage.store import ResultsStore

SCHEMA_VERSION = 5
# Files of this name hold no rows, only the schema, so every view works before any results exist. The name carries
# the version: a table that gained columns gets a new schema file (older data files then read them as null).
SCHEMA_FILE = f"_schema_v{SCHEMA_VERSION}.parquet"
OLD_SCHEMA_FILES = "_schema*.parquet"
LOCK_TIMEOUT_S = 30.0

# Views derived from the tables above (created after them, in this order).
DERIVED_VIEWS = {
    "latest_materializations": """
        SELECT * FROM materializations
        QUALIFY row_number() OVER (PARTITION BY experiment, asset, partition ORDER BY materialized_at DESC) = 1""",
    # Each edge with the materialization it consumed: the upstream run's materialization of that partition.
    "lineage": """
        SELECT e.*, u.code_version AS upstream_code_version,
               u.config_hash AS upstream_config_hash, u.materialized_at AS upstream_materialized_at
        FROM lineage_edges e
        LEFT JOIN (
            SELECT * FROM materializations
            QUALIFY row_number() OVER (PARTITION BY experiment, asset, partition, run_id ORDER BY materialized_at DESC) = 1
        ) u ON u.experiment = e.experiment AND u.asset = e.upstream_asset
           AND u.partition IS NOT DISTINCT FROM e.upstream_partition AND u.run_id = e.upstream_run_id""",
    # Every (member, iteration, label) expanded from the spans; memberships_at(i) is the fast way to one iteration.
    "memberships": """
        SELECT experiment, member, unnest(range(first_iteration, last_iteration + 1)) AS iteration, label, group_label
        FROM membership_spans""",
    # One row per consensus cluster.
    "consensus_clusters": """
        SELECT experiment, iteration, threshold, cluster, count(*) AS size, any_value(cluster_stability) AS stability,
               string_agg(DISTINCT module, ', ' ORDER BY module) AS modules
        FROM consensus_components WHERE cluster IS NOT NULL
        GROUP BY experiment, iteration, threshold, cluster""",
    "experiment_settings": """
        SELECT experiment, config_hash, source_kind, n_members, alpha, activation_threshold, iters, sampler, base_seed,
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


def _ensure_schema_files(store: ResultsStore, connection: duckdb.DuckDBPyConnection | None = None) -> None:
    """An empty Parquet file per table with its columns, so each view has a schema before any rows exist."""
    missing = [table for table in TABLE_SCHEMAS.values() if not (store.table_dir(table.name) / SCHEMA_FILE).exists()]
    if not missing:
        return
    for table in missing:  # older versions' schema files would bring back columns the tables no longer have
        for old in store.table_dir(table.name).glob(OLD_SCHEMA_FILES):
            old.unlink(missing_ok=True)
    writer = connection or duckdb.connect()
    try:
        for table in missing:
            columns = ", ".join(f"CAST(NULL AS {sql}) AS {name}" for name, (sql, _) in table.columns.items())
            path = store.table_dir(table.name) / SCHEMA_FILE
            with atomic_path(path) as temporary:
                writer.execute(f"COPY (SELECT {columns} WHERE false) TO '{quoted_path(temporary)}' (FORMAT parquet)")
    finally:
        if connection is None:
            writer.close()


def quoted_path(path: Path) -> str:
    """`path` as the inside of a SQL string literal: its POSIX form, single quotes doubled."""
    return path.as_posix().replace("'", "''")


def _view_sql(store: ResultsStore, table: str) -> str:
    pattern = quoted_path(store.table_dir(table) / "*.parquet")
    return f"CREATE OR REPLACE VIEW {table} AS SELECT * FROM read_parquet('{pattern}', union_by_name = true)"


def _is_current(connection: duckdb.DuckDBPyConnection, store: ResultsStore) -> bool:
    try:
        # Every row fetched: the connection stays usable for the next query.
        rows = connection.execute("SELECT schema_version, tables_root FROM spd_cluster_meta").fetchall()
    except duckdb.Error:
        return False
    return rows == [(SCHEMA_VERSION, str(store.tables_dir))]


def ensure_database(store: ResultsStore) -> Path:
    """Create or update the views; a no-op (read-only check) when they are current."""
    path = store.database_path
    _ensure_schema_files(store)
    if path.exists() and _current_read_only(store):
        return path
    from filelock import FileLock, Timeout  # here: queries, which never get this far, start faster without it

    lock = FileLock(str(path) + ".lock", timeout=LOCK_TIMEOUT_S)
    try:
        lock.acquire()
    except Timeout:
        raise DatabaseError(
            f"waited {LOCK_TIMEOUT_S:.0f} s for {lock.lock_file}, held by another spd-cluster process preparing "
            "the result views; if none is running, delete that file"
        ) from None
    try:
        _create_views(store)
    finally:
        lock.release()
    return path


def _create_views(store: ResultsStore) -> None:
    path = store.database_path
    deadline = time.monotonic() + LOCK_TIMEOUT_S
    while True:
        try:
            connection = duckdb.connect(str(path))
            break
        except duckdb.IOException as error:
            # Another process (a user's query session) holds the file; views may already be fine.
            if path.exists() and _current_read_only(store):
                return
            if time.monotonic() > deadline:
                raise DatabaseError(
                    f"cannot create the result views in {path}: another process keeps it open ({error}). "
                    "Close other DuckDB sessions on it once; afterwards they never block the pipeline."
                ) from None
            time.sleep(0.5)
    try:
        if not _is_current(connection, store):
            for table in TABLE_SCHEMAS:
                connection.execute(_view_sql(store, table))
            for view, query in DERIVED_VIEWS.items():
                connection.execute(f"CREATE OR REPLACE VIEW {view} AS {query}")
            for name, body in MACROS.items():
                connection.execute(f"CREATE OR REPLACE MACRO {name}{body}")
            connection.execute("CREATE OR REPLACE TABLE spd_cluster_meta (schema_version INTEGER, tables_root VARCHAR)")
            connection.execute("INSERT INTO spd_cluster_meta VALUES (?, ?)", [SCHEMA_VERSION, str(store.tables_dir)])
    finally:
        connection.close()


def _current_read_only(store: ResultsStore) -> bool:
    try:
        connection = duckdb.connect(str(store.database_path), read_only=True)
    except duckdb.Error:
        return False
    try:
        return _is_current(connection, store)
    finally:
        connection.close()


def connect_read_only(store: ResultsStore, *, allow_read: Sequence[str | Path] = (),
                      scratch_files: Sequence[Path] = ()) -> duckdb.DuckDBPyConnection:
    """A read-only connection with the views ready, which can read the result tables and nothing else.

    Many may be open while pipelines run. What the connection may do is fixed by DuckDB's own settings
    (`query_access`): it reads only `store.tables_dir` and the files or folders of `allow_read`, writes
    only `scratch_files` (where spd-cluster, never a query, writes an answer), installs and loads no
    extension, and cannot change its settings.

    Raises
    ------
    UsageError
        A path of `allow_read` does not exist.
    """
    access = QueryAccess.with_reads(store.tables_dir, allow_read, scratch_files)
    path = store.database_path
    temporary_dir = path.with_name(path.name + ".tmp")
    _ensure_schema_files(store)
    if path.exists():
        # Opening the database is most of a short query's time: open it once when the views are current.
        try:
            connection = attach_read_only(path)
        except duckdb.Error:
            connection = None
        if connection is not None:
            if _is_current(connection, store):
                return restrict(connection, access, temporary_dir)
            connection.close()
    ensure_database(store)
    return restrict(attach_read_only(path), access, temporary_dir)
