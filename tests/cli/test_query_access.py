"""What a query may do: `spd-cluster sql` (a real subprocess) and the read-only connection every query path
uses, against a real results database, refusing each kind of statement that is not a read of the results.

The results here are the tables' schemas and one file of rows; the README's queries over real results
run in tests/cli/test_results_queries.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import duckdb
import polars as pl
import pytest

from spd_assets.storage.database import connect_read_only, ensure_database
from tests.pipeline_helpers import make_home, store_at

RULE = "a query may only read the result tables under"


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    home = make_home(tmp_path_factory.mktemp("access") / "home")
    store = store_at(home)
    ensure_database(store)
    rows = pl.DataFrame({"experiment": ["default"] * 3, "member": ["member_000"] * 3, "iteration": [0, 1, 2],
                         "k_groups": [9, 8, 7], "mdl_loss": [3.0, 2.0, 2.5]})
    rows.write_parquet(store.table_file("merge_events", "default", "member_000"))
    return home


def sql(home: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spd_assets.cli", "sql", *args], env={**os.environ, "DAGSTER_HOME": str(home)},
                          capture_output=True, text=True, timeout=120, cwd=cwd)


def assert_refused(result: subprocess.CompletedProcess, home: Path, opened: int = 0) -> None:
    """Exit status 1 and one line saying what is allowed, after one line per path opened with --allow-read."""
    assert result.returncode == 1, result.stdout + result.stderr
    notes, lines = result.stderr.splitlines()[:opened], result.stderr.splitlines()[opened:]
    assert all("--allow-read: the query may also read" in note for note in notes), result.stderr
    assert len(lines) == 1 and lines[0].startswith("spd-cluster sql: refused"), result.stderr
    assert f"{RULE} {store_at(home).tables_dir}" in lines[0] and "--allow-read PATH" in lines[0]
    assert result.stdout == ""


def outside_file(home: Path) -> Path:
    path = home.parent / "outside.csv"
    path.write_text("a,b\n1,2\n3,4\n")
    return path


def results_target(home: Path) -> str:
    return str(store_at(home).table_dir("merge_events") / "default__member_999.parquet")


# Each refused kind, with a statement of it; `{outside}` is a CSV beside DAGSTER_HOME, `{results}` a new file
# among the result tables, `{home}` DAGSTER_HOME.
REFUSED = {
    "write: COPY TO a file elsewhere": "COPY (SELECT 42) TO '{home}/../written.csv'",
    "write: COPY TO among the result tables": "COPY (SELECT * FROM merge_events) TO '{results}' (FORMAT parquet)",
    "write: EXPORT DATABASE": "EXPORT DATABASE '{home}/../exported'",
    "write: EXPLAIN ANALYZE of a COPY": "EXPLAIN ANALYZE COPY (SELECT 42) TO '{results}'",
    "write: after a query": "SELECT 1; COPY (SELECT 42) TO '{home}/../written.csv'",
    "write: CREATE TEMP TABLE": "CREATE TEMP TABLE t AS SELECT 1",
    "foreign read: read_csv of /etc/passwd": "SELECT * FROM read_csv('/etc/passwd')",
    "foreign read: read_text beside the results": "SELECT * FROM read_text('{outside}')",
    "foreign read: a file by name": "SELECT * FROM '{outside}'",
    "foreign read: glob": "SELECT * FROM glob('/etc/*')",
    "foreign read: a path leaving the tables": "SELECT * FROM read_csv('{tables}/../../outside.csv')",
    "network: INSTALL": "INSTALL httpfs",
    "network: LOAD": "LOAD httpfs",
    "network: a URL": "SELECT * FROM read_parquet('https://example.com/results.parquet')",
    "attach: a database file": "ATTACH '{home}/../other.duckdb' AS other",
    "settings: SET": "SET enable_external_access = true",
    "settings: RESET": "RESET allowed_directories",
    "settings: PRAGMA": "PRAGMA threads = 1",
    "settings: SET VARIABLE": "SET VARIABLE x = 1",
}


@pytest.mark.parametrize("statement", list(REFUSED.values()), ids=list(REFUSED))
def test_sql_refuses_with_one_line_saying_what_is_allowed(home, statement):
    tables = store_at(home).tables_dir
    before = sorted(path.name for path in tables.rglob("*"))
    text = statement.format(home=home, outside=outside_file(home), results=results_target(home), tables=tables)
    assert_refused(sql(home, text), home)
    assert sorted(path.name for path in tables.rglob("*")) == before, "a refused statement changed the results"
    assert not (home.parent / "written.csv").exists() and not (home.parent / "exported").exists()
    assert not (home.parent / "other.duckdb").exists()


# The same holds in DuckDB itself, for code that runs its own SQL on the connection (no statement check there).
CONNECTION_REFUSED = {
    "COPY TO a file elsewhere": ("COPY (SELECT 42) TO '{home}/../written.csv'", duckdb.PermissionException),
    "EXPORT DATABASE elsewhere": ("EXPORT DATABASE '{home}/../exported'", duckdb.PermissionException),
    "read_csv of /etc/passwd": ("SELECT * FROM read_csv('/etc/passwd')", duckdb.PermissionException),
    "a file beside the results": ("SELECT * FROM read_text('{outside}')", duckdb.PermissionException),
    "INSTALL": ("INSTALL httpfs", duckdb.PermissionException),
    "LOAD": ("LOAD httpfs", duckdb.PermissionException),
    "a URL": ("SELECT * FROM read_parquet('https://example.com/results.parquet')", duckdb.PermissionException),
    "ATTACH": ("ATTACH '{home}/../other.duckdb' AS other", duckdb.PermissionException),
    "SET": ("SET enable_external_access = true", duckdb.InvalidInputException),
    "SET allowed_directories": ("SET allowed_directories = ['/']", duckdb.InvalidInputException),
    "RESET": ("RESET lock_configuration", duckdb.InvalidInputException),
    "PRAGMA": ("PRAGMA enable_profiling", duckdb.InvalidInputException),
    "CREATE TABLE": ("CREATE TABLE t AS SELECT 1", duckdb.InvalidInputException),
}


@pytest.mark.parametrize("statement,error", list(CONNECTION_REFUSED.values()), ids=list(CONNECTION_REFUSED))
def test_the_connection_itself_refuses(home, statement, error):
    with connect_read_only(store_at(home)) as connection:
        with pytest.raises(error):
            connection.execute(statement.format(home=home, outside=outside_file(home)))
        # Still usable, and still restricted, after a refusal.
        assert connection.execute("SELECT count(*) FROM merge_events").fetchone() == (3,)
        assert connection.execute("SELECT current_setting('enable_external_access')").fetchone() == (False,)
    assert not (home.parent / "written.csv").exists() and not (home.parent / "other.duckdb").exists()


def test_connections_with_different_access_are_independent(home, tmp_path):
    mine = tmp_path / "mine.csv"
    mine.write_text("a\n7\n")
    store = store_at(home)
    with connect_read_only(store, allow_read=[mine]) as wider, connect_read_only(store) as narrower:
        assert wider.execute(f"SELECT a FROM read_csv('{mine}')").fetchall() == [(7,)]
        with pytest.raises(duckdb.PermissionException):
            narrower.execute(f"SELECT a FROM read_csv('{mine}')")
        assert narrower.execute("SELECT count(*) FROM merge_events").fetchone() == (3,)


def test_allow_read_opens_a_file_or_folder_and_says_so(home, tmp_path):
    mine = tmp_path / "labels"
    mine.mkdir()
    (mine / "names.csv").write_text("iteration,name\n0,start\n2,end\n")
    query = (f"SELECT m.iteration, n.name FROM merge_events AS m JOIN read_csv('{mine}/names.csv') AS n USING (iteration) "
             "ORDER BY m.iteration")
    assert_refused(sql(home, query), home)
    for opened in (mine, mine / "names.csv"):
        result = sql(home, query, "--allow-read", str(opened), "--format", "csv")
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines() == ["iteration,name", "0,start", "2,end"]
        assert result.stderr.splitlines() == [f"spd-cluster sql: --allow-read: the query may also read {opened}"]
    # Relative to the working directory, repeatable; the rule then names the opened paths.
    (tmp_path / "note.txt").write_text("a note")
    both = sql(home, "SELECT n.name, t.content FROM read_csv('labels/names.csv') AS n, read_text('note.txt') AS t",
               "--allow-read", "labels", "--allow-read", "note.txt", "--format", "csv", cwd=tmp_path)
    assert both.returncode == 0 and both.stdout.splitlines() == ["name,content", "start,a note", "end,a note"], both.stderr
    elsewhere = sql(home, f"SELECT * FROM read_csv('{outside_file(home)}')", "--allow-read", str(mine))
    assert_refused(elsewhere, home, opened=1)
    assert f"{store_at(home).tables_dir}, {mine};" in elsewhere.stderr
    missing = sql(home, "SELECT 1", "--allow-read", str(tmp_path / "nothing"))
    assert missing.returncode == 2 and "--allow-read: expected an existing file or folder" in missing.stderr


@pytest.mark.parametrize("output_format", ["table", "csv", "json", "parquet"])
def test_output_is_written_by_spd_cluster(home, tmp_path, output_format):
    output = tmp_path / "answers" / f"answer.{output_format}"
    query = "SELECT iteration, mdl_loss FROM merge_events ORDER BY iteration"
    result = sql(home, query, "--format", output_format, "--output", str(output))
    assert result.returncode == 0 and result.stdout == "", result.stderr
    if output_format == "parquet":
        assert pl.read_parquet(output)["mdl_loss"].to_list() == [3.0, 2.0, 2.5]
    elif output_format == "csv":
        assert output.read_text().splitlines() == ["iteration,mdl_loss", "0,3.0", "1,2.0", "2,2.5"]
    elif output_format == "json":
        assert [row["mdl_loss"] for row in json.loads(output.read_text())] == [3.0, 2.0, 2.5]
    else:
        assert "mdl_loss" in output.read_text() and "2.5" in output.read_text()
    assert sorted(path.name for path in output.parent.iterdir()) == [output.name], "no temporary file left behind"
    # The answer's folder is not readable to the query for all that.
    assert_refused(sql(home, f"SELECT * FROM read_text('{output}')"), home)


def test_csv_on_standard_output_and_queries_of_every_kind(home):
    for query in ("SELECT count(*) AS n FROM merge_events", "FROM merge_events SELECT count(*) AS n",
                  "WITH e AS (SELECT * FROM merge_events) SELECT count(*) AS n FROM e",
                  "SELECT count(*) AS n FROM read_parquet('{tables}/merge_events/*.parquet')"):
        result = sql(home, query.format(tables=store_at(home).tables_dir), "--format", "csv")
        assert result.returncode == 0 and result.stdout.splitlines() == ["n", "3"], result.stderr
    for query in ("DESCRIBE merge_events", "SHOW TABLES", "SUMMARIZE merge_events",
                  "PIVOT merge_events ON member IN ('member_000') USING count(*)"):
        result = sql(home, query)
        assert result.returncode == 0 and result.stdout, result.stderr
