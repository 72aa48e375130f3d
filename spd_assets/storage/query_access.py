"""What a query over the results may do: read the result tables, and nothing else.

Every query path (`spd-cluster sql`, `spd-cluster clusters`, and any code that answers SQL over the
results) gets its DuckDB connection from `database.connect_read_only`, which opens it here. Two of
DuckDB's own mechanisms hold a query in; no SQL text is inspected by hand:

- DuckDB's settings: external access is off, with only the results' `tables/` folder (and the
  files or folders opened with `--allow-read`) allowed; extensions are neither installed nor
  loaded automatically; the configuration is locked, so no statement can widen any of it again.
  Reading any other file, a URL, `ATTACH`, `INSTALL`/`LOAD`, `SET` and `PRAGMA`s that change
  settings all fail inside DuckDB.
- DuckDB's parser (`check_query`): only queries run, i.e. statements DuckDB parses as `SELECT`
  (`WITH`, `FROM`, `VALUES`, `DESCRIBE`, `SHOW`, `SUMMARIZE`, `PIVOT ... IN (...)`). This is
  needed because DuckDB lets a connection write wherever it may read: without it, `COPY ... TO`
  or `EXPORT DATABASE` could overwrite the result files themselves.

An answer that spd-cluster writes (`--output FILE`, CSV on standard output) goes through one
scratch file that only spd-cluster names; the query cannot write it, as it can write nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import duckdb

from spd_assets.errors import QueryRefused, UsageError

# Statement types DuckDB's parser gives to what only reads: SELECT and the statements it rewrites into one.
QUERY_STATEMENTS = frozenset({duckdb.StatementType.SELECT})
# Extensions stay as the wheel has them (parquet, json and icu are built in): none is fetched or loaded later.
CONNECT_CONFIG = {"autoinstall_known_extensions": False, "autoload_known_extensions": False}
# Characters of a refused statement quoted in the message.
SHOWN_CHARACTERS = 60


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _list(paths: Sequence[Path]) -> str:
    return "[" + ", ".join(_literal(str(path)) for path in paths) + "]"


@dataclass(frozen=True)
class QueryAccess:
    """What one connection may read: the result tables' folder, and folders and files a user opened.

    `scratch_files` are files spd-cluster itself writes an answer to (never named by a query).
    """

    tables_dir: Path
    extra_dirs: tuple[Path, ...] = ()
    extra_files: tuple[Path, ...] = ()
    scratch_files: tuple[Path, ...] = ()

    @classmethod
    def with_reads(cls, tables_dir: Path, allow_read: Sequence[str | Path] = (),
                   scratch_files: Sequence[Path] = ()) -> QueryAccess:
        """The access of a query over `tables_dir`, widened by `allow_read` (existing files or folders).

        Raises
        ------
        UsageError
            A path of `allow_read` does not exist.
        """
        dirs, files = [], []
        for given in allow_read:
            path = Path(given).expanduser().resolve()
            if path.is_dir():
                dirs.append(path)
            elif path.exists():
                files.append(path)
            else:
                raise UsageError(f"--allow-read: expected an existing file or folder, got {given} (no such path)")
        return cls(Path(tables_dir), tuple(dirs), tuple(files), tuple(Path(p) for p in scratch_files))

    @property
    def readable(self) -> list[Path]:
        """Every folder and file a query may read, the result tables' folder first."""
        return [self.tables_dir, *self.extra_dirs, *self.extra_files]

    def rule(self) -> str:
        """One line saying what a query may and may not do."""
        extra = "".join(f", {path}" for path in [*self.extra_dirs, *self.extra_files])
        return (f"a query may only read the result tables under {self.tables_dir}{extra}; writing files, reading "
                "other files or URLs, installing or loading extensions, ATTACH and changing settings are refused "
                "(--output FILE saves an answer; --allow-read PATH lets a query read another file or folder)")


def attach_read_only(database: Path) -> duckdb.DuckDBPyConnection:
    """A new in-memory DuckDB with `database` attached read-only and in use.

    Each call is a DuckDB instance of its own (DuckDB shares one instance among connections to
    one file, and with it the settings), so connections with different access never meet.
    """
    connection = duckdb.connect(config=CONNECT_CONFIG)
    try:
        connection.execute(f"ATTACH {_literal(str(database))} AS {_identifier(database.stem)} (READ_ONLY)")
        connection.execute(f"USE {_identifier(database.stem)}")
    except BaseException:
        connection.close()
        raise
    return connection


def _identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def restrict(connection: duckdb.DuckDBPyConnection, access: QueryAccess, temporary_dir: Path) -> duckdb.DuckDBPyConnection:
    """`connection`, from now on able to read only what `access` allows (and to spill to `temporary_dir`), with
    external access off and its configuration locked; the same connection, for chaining."""
    try:
        connection.execute(f"SET temp_directory = {_literal(str(temporary_dir))}")
        connection.execute(f"SET allowed_directories = {_list([access.tables_dir, *access.extra_dirs])}")
        if access.extra_files or access.scratch_files:
            connection.execute(f"SET allowed_paths = {_list([*access.extra_files, *access.scratch_files])}")
        connection.execute("SET enable_external_access = false")
        connection.execute("SET lock_configuration = true")
    except BaseException:
        connection.close()
        raise
    return connection


def check_query(connection: duckdb.DuckDBPyConnection, query: str, access: QueryAccess) -> None:
    """Refuse `query` unless every statement in it is one DuckDB (the parser of `connection`) parses as a query.

    Raises
    ------
    QueryRefused
        A statement of another kind (COPY, EXPORT, ATTACH, INSTALL, LOAD, SET, PRAGMA, CREATE, ...), naming
        it and what a query may do.
    duckdb.ParserException
        `query` is not SQL DuckDB can parse.
    """
    for statement in connection.extract_statements(query):
        if statement.type not in QUERY_STATEMENTS:
            text = " ".join(statement.query.split())
            shown = text if len(text) <= SHOWN_CHARACTERS else text[:SHOWN_CHARACTERS] + "..."
            hint = "; PIVOT needs its values listed here: PIVOT ... ON column IN (...)" if statement.type.name == "MULTI" else ""
            raise QueryRefused(f"refused `{shown}` (a statement of type {statement.type.name}{hint}): only queries run here "
                               f"(SELECT, WITH, FROM, VALUES, DESCRIBE, SHOW, SUMMARIZE); {access.rule()}")


def refusal(error: duckdb.Error, access: QueryAccess) -> QueryRefused | None:
    """The `QueryRefused` for a DuckDB error that the access rules caused, or None for any other error."""
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if isinstance(error, duckdb.PermissionException) or "configuration has been locked" in first_line:
        reason = first_line.split(": ", 1)[-1]
        return QueryRefused(f"refused ({reason}): {access.rule()}")
    return None
