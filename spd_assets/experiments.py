"""The experiments an instance knows: the embedded default plus every config registered under DAGSTER_HOME.

`spd-cluster run --config FILE` registers its config here (as `<name>.yaml`), and the
code location loads every registered experiment, so `dagster dev` shows all of them.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import polars as pl

from spd_assets.atomic import atomic_path
from spd_assets.config import (
    ExperimentConfig,
    ExperimentConfigError,
    dump_config,
    load_config,
)
from spd_assets.storage import experiments_dir, write_table


def registered_experiments(home: Path | None = None) -> list[ExperimentConfig]:
    """Registered configs by name; the embedded default unless one named "default" is registered."""
    configs = {"default": ExperimentConfig()}
    directory = experiments_dir(home)
    for path in sorted(directory.glob("*.yaml")) if directory.is_dir() else []:
        config = load_config(path)
        if config.name != path.stem:
            raise ExperimentConfigError(
                f"{path}: registered as {path.stem!r} but its name is {config.name!r}; rename the file or the experiment"
            )
        configs[config.name] = config
    return list(configs.values())


def register_experiment(config: ExperimentConfig, home: Path | None = None) -> Path:
    """Save the config (all defaults filled in) and its row of the experiments table."""
    path = experiments_dir(home) / f"{config.name}.yaml"
    with atomic_path(path) as temporary:
        temporary.write_text(dump_config(config))
    row = pl.DataFrame(
        {
            "experiment": [config.name],
            "config_hash": [config.config_hash],
            "config_json": [config.canonical_json()],
            "source_kind": [config.source.kind],
            "n_members": [config.source.n_members],
            "registered_at": [datetime.now(timezone.utc)],
        },
        schema_overrides={"n_members": pl.Int32, "registered_at": pl.Datetime("us", "UTC")},
    )
    write_table(row, "experiments", config.name, home=home)
    return path
