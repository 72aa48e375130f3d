"""Source of past runs: merge histories the original research code (or spd-cluster) wrote, one member each.

    source:
      kind: histories
      directory: ./spd_out/clustering/ensembles/e-5f228e5f   # or a folder of run folders or .zip files

`directory` is one of:

- an original **ensemble folder** (`SPD_OUT_DIR/clustering/ensembles/<id>/`): its runs are the
  rows of `SPD_OUT_DIR/clustering/ensemble_registry.db` for that id, in ensemble order, each
  `runs/<run id>/history.zip`; members are named by run id;
- the original's **`clustering/` folder** (holding the registry): the same, for `ensemble_id`
  (which may be left out when the registry holds one ensemble);
- any other folder: each `*.zip` in it (a member named by the file name without `.zip`) and each
  sub-folder holding a `history.zip` (current runs) or `merge_history.zip` (September 2025 runs),
  named by the sub-folder; members in name order.

Each history is read in either original format (`storage.original_histories`). Its members skip
activations and merge: the ensemble, distances, consensus, explorer and tables are computed from
the histories as for any experiment. A file in neither format, a truncated zip, a missing file or
a history of another component set (modules other than those most histories share) fails its
own member, with the file and the problem named; the others are kept.
"""

from __future__ import annotations

import json
import sqlite3
from collections import Counter
from collections.abc import Mapping
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from spd_assets.config.sources import HistoriesSourceConfig
from spd_assets.errors import HistoryFileError, HistoryFormatError, SourceError
from spd_assets.sources.base import PARTITION_KEY_FORBIDDEN, ActivationSource
from spd_assets.storage.original_histories import OriginalHistory, read_labels, read_original_history

REGISTRY = "ensemble_registry.db"
RUN_HISTORY = "history.zip"
SEPTEMBER_HISTORY = "merge_history.zip"
RUN_CONFIG = "clustering_run_config.json"
_EXPECTED = (f"an original ensemble folder (beside ../../{REGISTRY}), the original's clustering/ folder (holding "
             f"{REGISTRY}), or a folder of .zip histories or of run folders holding {RUN_HISTORY} or {SEPTEMBER_HISTORY}")


def discover_histories(directory: Path, ensemble_id: str | None = None) -> dict[str, Path]:
    """Member key -> history file, in ensemble order (registry) or name order (a folder)."""
    return _discover(directory, ensemble_id)[1]


def _discover(directory: Path, ensemble_id: str | None) -> tuple[str | None, dict[str, Path]]:
    """The registry's ensemble id the histories are the runs of (None for a folder) and `discover_histories`."""
    root = Path(directory)
    if not root.is_dir():
        raise HistoryFileError(f"source.directory: {root} {'is not a directory' if root.exists() else 'does not exist'}; "
                               f"expected {_EXPECTED}")
    if (root / REGISTRY).is_file():
        ensemble_id, found = _from_registry(root / REGISTRY, ensemble_id)
    elif root.parent.name == "ensembles" and (root.parent.parent / REGISTRY).is_file():
        ensemble_id, found = _from_registry(root.parent.parent / REGISTRY, ensemble_id or root.name)
    else:
        ensemble_id, found = None, _from_folder(root)
    if not found:
        raise HistoryFileError(f"source.directory: {root} holds no merge histories; expected {_EXPECTED}")
    bad = [key for key in found if PARTITION_KEY_FORBIDDEN & set(key) or not key]
    if bad:
        raise HistoryFileError(f"source.directory: {root}: member names {bad} contain characters Dagster partition "
                               f"keys cannot hold ({''.join(sorted(PARTITION_KEY_FORBIDDEN))}); rename them")
    return ensemble_id, found


def _from_registry(registry: Path, ensemble_id: str | None) -> tuple[str, dict[str, Path]]:
    try:
        connection = sqlite3.connect(f"file:{registry}?mode=ro", uri=True)
        try:
            ensembles = [row[0] for row in connection.execute(
                "SELECT DISTINCT pipeline_run_id FROM ensemble_runs ORDER BY pipeline_run_id")]
            if ensemble_id is None:
                if len(ensembles) != 1:
                    raise HistoryFileError(f"source: {registry} holds {len(ensembles)} ensembles {ensembles}; "
                                           "expected source.ensemble_id naming one")
                ensemble_id = ensembles[0]
            runs = connection.execute("SELECT idx, clustering_run_id FROM ensemble_runs WHERE pipeline_run_id = ? "
                                      "ORDER BY idx", (ensemble_id,)).fetchall()
        finally:
            connection.close()
    except sqlite3.Error as error:
        raise HistoryFileError(f"source: {registry} is not a readable ensemble registry ({error})") from error
    if not runs:
        raise HistoryFileError(f"source: {registry} has no runs of ensemble {ensemble_id!r}; it holds {ensembles}")
    return ensemble_id, {str(run): registry.parent / "runs" / str(run) / RUN_HISTORY for _, run in runs}


def _from_folder(root: Path) -> dict[str, Path]:
    found: dict[str, list[Path]] = {}
    for path in sorted(root.iterdir()):
        if path.name.startswith("."):
            continue
        if path.is_file() and path.suffix == ".zip":
            found.setdefault(path.stem, []).append(path)
        elif path.is_dir():
            inside = [path / name for name in (RUN_HISTORY, SEPTEMBER_HISTORY) if (path / name).is_file()]
            if inside:
                found.setdefault(path.name, []).extend(inside)
    twice = {key: [str(p) for p in paths] for key, paths in found.items() if len(paths) > 1}
    if twice:
        raise HistoryFileError(f"source.directory: {root}: more than one history per member name: {twice}; expected one")
    return {key: paths[0] for key, paths in sorted(found.items())}


def modules_of(labels: list[str]) -> frozenset[str]:
    """The module names of component labels `<module>:<index>`."""
    return frozenset(label.rsplit(":", 1)[0] for label in labels)


class HistoriesSource(ActivationSource[HistoriesSourceConfig]):
    """Members are stored merge histories: read, never merged."""

    kind = "histories"
    config_type = HistoriesSourceConfig
    has_histories = True

    @cached_property
    def _discovered(self) -> tuple[str | None, dict[str, Path]]:
        return _discover(self.config.directory, self.config.ensemble_id)

    @property
    def _files(self) -> dict[str, Path]:
        return self._discovered[1]

    def member_keys(self) -> list[str]:
        keys = list(self._files)
        return keys[: self.config.n_members] if self.config.n_members is not None else keys

    def history_file(self, member: str) -> Path:
        if member not in self._files:
            raise HistoryFileError(f"source: no history of member {member!r} in {self.config.directory}; "
                                   f"members: {list(self._files)}")
        return self._files[member]

    def load_history(self, member: str) -> OriginalHistory:
        """Read one member's history (either format) and check that it has the component set of the others."""
        path = self.history_file(member)
        if not path.is_file():
            raise HistoryFileError(f"member {member!r}: {path} does not exist; expected its merge history "
                                   f"({RUN_HISTORY} of the run, as the registry lists it)")
        try:
            found = read_original_history(path)
        except HistoryFormatError as error:
            raise HistoryFileError(f"member {member!r}: {error}") from error
        except OSError as error:
            raise HistoryFileError(f"member {member!r}: cannot read {path} ({error})") from error
        reference = self._reference_modules()
        modules = modules_of(found.history.labels)
        if reference is not None and modules != reference:
            raise HistoryFileError(
                f"member {member!r}: {path} is a history of another component set: modules {_shown(modules)}, where "
                f"the other histories have {_shown(reference)}; the histories of one ensemble must decompose one model")
        return found

    def _reference_modules(self) -> frozenset[str] | None:
        """The module set most readable histories share (None when no set has a majority of one)."""
        votes: Counter[frozenset[str]] = Counter()
        for path in self._files.values():
            try:
                votes[modules_of(read_labels(path))] += 1
            except (HistoryFormatError, OSError):
                continue  # an unreadable file fails alone, when its member loads
        ranked = votes.most_common(2)
        if not ranked or (len(ranked) == 2 and ranked[0][1] == ranked[1][1]):
            return None
        return ranked[0][0]

    @cached_property
    def model_path(self) -> str | None:
        """The SPD run the histories' original run configs name (`clustering_run_config.json` beside a history's
        file, as the original writes it), when one does."""
        for path in self._files.values():
            try:
                found = json.loads((path.parent / RUN_CONFIG).read_text()).get("model_path")
            except (OSError, ValueError, AttributeError):
                continue
            if isinstance(found, str):
                return found
        return None

    def original_ids(self, members: list[str]) -> tuple[str | None, dict[str, str]]:
        """The original's ids of an ensemble of `members` (in its order), where they came from the original: its
        ensemble (pipeline run) id when the histories were read through its registry and the members are that
        ensemble's runs, all of them in its order (other members make another ensemble), and member -> clustering
        run id for each member whose history is an original run's (listed by the registry, or a `history.zip`
        beside its `clustering_run_config.json`): the run folder's name, which is also the member's."""
        ensemble_id, files = self._discovered
        runs = {member: files[member].parent.name for member in members if member in files
                and (ensemble_id is not None or (files[member].name == RUN_HISTORY
                                                 and (files[member].parent / RUN_CONFIG).is_file()))}
        return (ensemble_id if ensemble_id is not None and list(members) == list(files) else None), runs

    def load_batch(self, member: str, seed: int) -> Mapping[str, torch.Tensor]:
        raise SourceError(f"the histories source has no activations: member {member!r} is a stored merge history, "
                          "read instead of merged")

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "members": len(self.member_keys())}


def _shown(modules: frozenset[str]) -> str:
    names = sorted(modules)
    return str(names if len(names) <= 6 else [*names[:6], f"... {len(names) - 6} more"])
