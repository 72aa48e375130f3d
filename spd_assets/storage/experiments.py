"""The experiments a results folder knows: the embedded default plus every config registered in it.

`spd-cluster run --config FILE` registers its config here (as `experiments/<name>.yaml`), and
the code location loads every registered experiment, so `dagster dev` shows all of them. A
registered file that no longer loads (edited by hand, or from an older version) is reported
and skipped, so one bad file never takes the other experiments down with it.
"""

from __future__ import annotations

from dataclasses import dataclass

from spd_assets.config import ExperimentConfig, dump_config, load_config
from spd_assets.errors import ExperimentConfigError
from spd_assets.storage.atomic import atomic_path
from spd_assets.storage.store import ResultsStore

DEFAULT_EXPERIMENT = "default"


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
