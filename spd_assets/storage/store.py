"""Where results live: one `ResultsStore` per results folder, which every read and write goes through.

    <root>/                                      $DAGSTER_HOME/spd_cluster by default
      experiments/<experiment>.yaml              registered experiment configs
      <experiment>/token_batches/<member>.npz          (model sources: the member's model inputs)
      <experiment>/component_activations/<member>.npz
      <experiment>/merge_history/<member>.npz          its merges: labels, merged pairs, costs, MDL losses
      <experiment>/normalized_ensemble.npz             the label alignment and each member's merges
      <experiment>/distance_matrices.npz
      <experiment>/exports/                            for other tools: the original's folders (on request)
      progress/<experiment>/<member>.json              how far a running member's long step is
      checkpoints/<experiment>/<member>.npz            a running merge so far, to resume from (see `checkpoints`)
      claims/<experiment>/<member>.lock                held by the run computing the member (see `claims`)
      tables/<table>/<experiment>__<part>.parquet      one file per experiment and partition
      device_leases/                             lock files of the device leases
      logs/                                      run logs of the command line
    <root>.duckdb                                views over the tables (see `database`)

The store knows paths and writes atomically; what a file holds is for `values`, `tables` and
`history_format` to say.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from pathlib import Path

from spd_assets.errors import UnknownExperimentError
from spd_assets.storage.atomic import atomic_path

# The experiment every results folder has: the embedded config, unless one named so is registered.
DEFAULT_EXPERIMENT = "default"

# Partition part of a table file name for assets that are not partitioned.
WHOLE_EXPERIMENT = "all"
TABLE_SUFFIX = ".parquet"
# Inside an experiment's folder: what is written for other tools, not the value of any asset.
EXPORTS = "exports"


@dataclass(frozen=True)
class ResultsStore:
    """The results folder `root` and the DuckDB database beside it (`<root>.duckdb`).

    Examples
    --------
    >>> store = ResultsStore(Path("/tmp/home/spd_cluster"))
    >>> store.database_path.as_posix()
    '/tmp/home/spd_cluster.duckdb'
    >>> store.table_file("merge_events", "default", "member_000").name
    'default__member_000.parquet'
    """

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root).resolve())

    @property
    def database_path(self) -> Path:
        return self.root.with_name(self.root.name + ".duckdb")

    @property
    def experiments_dir(self) -> Path:
        return self.root / "experiments"

    @property
    def tables_dir(self) -> Path:
        return self.root / "tables"

    @property
    def lease_dir(self) -> Path:
        return self.root / "device_leases"

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    def experiment_names(self) -> list[str]:
        """The experiments this folder knows: the default and every registered config's name."""
        directory = self.experiments_dir
        registered = {path.stem for path in directory.glob("*.yaml")} if directory.is_dir() else set()
        return sorted({DEFAULT_EXPERIMENT, *registered})

    def experiment_dir(self, experiment: str) -> Path:
        return self.root / experiment

    def exports_dir(self, experiment: str) -> Path:
        """Where an experiment's results are also written for other tools (the original's folders, the SPD app's
        mapping): inside its folder, so removing its results removes them, but no value file of an asset."""
        return self.experiment_dir(experiment) / EXPORTS

    def value_path(self, experiment: str, asset: str, partition: str | None, suffix: str) -> Path:
        """The file of an asset's value: one per partition for partitioned assets."""
        base = self.experiment_dir(experiment)
        return base / asset / f"{partition}{suffix}" if partition is not None else base / f"{asset}{suffix}"

    def table_dir(self, table: str) -> Path:
        return self.tables_dir / table

    def table_file(self, table: str, experiment: str, part: str | None = None) -> Path:
        return self.table_dir(table) / f"{experiment}__{part or WHOLE_EXPERIMENT}{TABLE_SUFFIX}"

    def table_files(self, experiment: str) -> dict[Path, str]:
        """Every table file of `experiment` -> its partition part (`WHOLE_EXPERIMENT` when not partitioned).

        File names are `<experiment>__<part>`; a file of another experiment whose name starts with
        `<experiment>__` (one registered or with a results folder) is not counted.
        """
        prefix = f"{experiment}__"
        longer = [p.name + "__" for p in self.root.glob(f"{glob_escape(prefix)}*") if p.is_dir()]
        longer += [p.stem + "__" for p in self.experiments_dir.glob(f"{glob_escape(prefix)}*.yaml")]
        found = {}
        for path in self.tables_dir.glob(f"*/{glob_escape(prefix)}*{TABLE_SUFFIX}"):
            if not any(path.name.startswith(other) for other in longer):
                found[path] = path.name[len(prefix):-len(TABLE_SUFFIX)]
        return found

    def value_files(self, experiment: str) -> dict[Path, str | None]:
        """Every value file of `experiment` -> its partition (None for a value of the whole experiment)."""
        base = self.experiment_dir(experiment)
        if not base.is_dir():
            return {}
        exports = self.exports_dir(experiment)
        return {path: (path.stem if path.parent != base else None)
                for path in base.rglob("*")
                if path.is_file() and not path.name.startswith(".") and exports not in path.parents}

    def write_table(self, frame, table: str, experiment: str, part: str | None = None) -> Path:
        """Write (or replace) one experiment partition's rows of a table (a Polars DataFrame); readers never
        see half a file."""
        path = self.table_file(table, experiment, part)
        with atomic_path(path) as temporary:
            frame.write_parquet(temporary)
        return path


def require_experiment(store: ResultsStore, name: str) -> None:
    """Raise `UnknownExperimentError`, naming the close matches, unless the folder knows experiment `name`.

    Every face that takes an experiment's name asks here first, so a misspelt name is said as such, not as
    missing results.
    """
    known = store.experiment_names()
    if name in known:
        return
    close = difflib.get_close_matches(name, known, n=3)
    hint = f"did you mean {' or '.join(map(repr, close))}?" if close else f"the experiments here: {', '.join(known)}"
    raise UnknownExperimentError(f"no experiment {name!r} in {store.root}; {hint}")


def glob_escape(text: str) -> str:
    """`text` matched literally in a glob pattern."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in text)


def default_results_root(dagster_home: str | os.PathLike[str]) -> Path:
    """The results folder of a Dagster instance: `<DAGSTER_HOME>/spd_cluster`."""
    return Path(dagster_home) / "spd_cluster"
