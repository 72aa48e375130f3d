"""The experiments a results folder knows: the embedded default plus every config registered in it.

`spd-cluster run --config FILE` registers its config here (as `experiments/<name>.yaml`), and
the code location loads every registered experiment, so `dagster dev` shows all of them. A
registered file that no longer loads (edited by hand, or from an older version) is reported
and skipped, so one bad file never takes the other experiments down with it.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from spd_assets.config import ExperimentConfig, dump_config, load_config
from spd_assets.errors import ExperimentConfigError
from spd_assets.storage.atomic import atomic_path
from spd_assets.storage.store import DEFAULT_EXPERIMENT, ResultsStore


@dataclass(frozen=True)
class RegisteredExperiments:
    """The configs that load, by name, and a message for each registered file that does not."""

    configs: list[ExperimentConfig]
    problems: list[str]


def registered_experiments(store: ResultsStore) -> RegisteredExperiments:
    """Registered configs by name; the embedded default unless one named "default" is registered."""
    configs = {DEFAULT_EXPERIMENT: ExperimentConfig()}
    problems = []
    directory = store.experiments_dir
    for path in sorted(directory.glob("*.yaml")) if directory.is_dir() else []:
        try:
            config = load_config(path)
        except ExperimentConfigError as error:
            problems.append(f"skipped registered experiment {path.name}: {error}")
            continue
        if config.name != path.stem:
            problems.append(f"skipped {path}: registered as {path.stem!r} but its name is {config.name!r}; "
                            "rename the file or the experiment")
            continue
        configs[config.name] = config
    return RegisteredExperiments(list(configs.values()), problems)


def registered_config(store: ResultsStore, name: str) -> ExperimentConfig | None:
    """The registered config named `name` (the embedded default for "default"), or None."""
    path = store.experiments_dir / f"{name}.yaml"
    if path.exists():
        return load_config(path)
    return ExperimentConfig() if name == DEFAULT_EXPERIMENT else None


def register_experiment(store: ResultsStore, config: ExperimentConfig) -> None:
    """Save the config (all defaults filled in) where the code location finds it."""
    path = store.experiments_dir / f"{config.name}.yaml"
    with atomic_path(path) as temporary:
        temporary.write_text(dump_config(config))


# Replacing an experiment's results is journaled: the intent is written first, then files go, then the
# new config is registered and the journal removed. A replacement cut short (killed) is finished by
# the next `spd-cluster run` or `doctor` from its journal, so results are never left half-deleted.
JOURNAL_SUFFIX = ".replacing.json"


@dataclass(frozen=True)
class Replacement:
    """An experiment's results being removed: all of them (`members` None) or those of some members."""

    experiment: str
    config_yaml: str  # the config to register once the old results are gone
    members: list[str] | None = None

    def describe(self) -> str:
        what = "all results" if self.members is None else f"the results of members {', '.join(self.members)}"
        return f"{what} of experiment {self.experiment!r}"


def _journal_path(store: ResultsStore, experiment: str):
    return store.experiments_dir / f".{experiment}{JOURNAL_SUFFIX}"


def begin_replacement(store: ResultsStore, replacement: Replacement) -> None:
    """Journal a replacement before anything is removed, so an interrupted one is finished later."""
    with atomic_path(_journal_path(store, replacement.experiment)) as temporary:
        temporary.write_text(json.dumps(dataclasses.asdict(replacement)))


def pending_replacements(store: ResultsStore) -> list[Replacement]:
    """Replacements begun and not ended (an earlier invocation was interrupted)."""
    directory = store.experiments_dir
    journals = sorted(directory.glob(f".*{JOURNAL_SUFFIX}")) if directory.is_dir() else []
    return [Replacement(**json.loads(path.read_text())) for path in journals]


def remove_result_files(store: ResultsStore, experiment: str, members: list[str] | None = None) -> list[Path]:
    """Delete the value and table files of `experiment` (only those of `members` when given); those deleted."""
    wanted = None if members is None else set(members)
    files = [*store.value_files(experiment).items(), *store.table_files(experiment).items()]
    removed = []
    for path, part in files:
        if wanted is None or part in wanted:
            path.unlink(missing_ok=True)
            removed.append(path)
    if wanted is None and store.experiment_dir(experiment).is_dir():
        shutil.rmtree(store.experiment_dir(experiment), ignore_errors=True)
    return removed


def end_replacement(store: ResultsStore, replacement: Replacement) -> None:
    """Register the new config and drop the journal: the replacement is complete."""
    path = store.experiments_dir / f"{replacement.experiment}.yaml"
    with atomic_path(path) as temporary:
        temporary.write_text(replacement.config_yaml)
    _journal_path(store, replacement.experiment).unlink(missing_ok=True)
