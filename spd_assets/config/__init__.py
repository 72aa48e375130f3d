"""The experiment config, the lowest layer of spd_assets: one YAML file, validated before any work starts.

`ExperimentConfig` (`experiment.py`) is everything that determines an experiment's results; its
`source:` block is one of the source configs (`sources.py`); the original research code's config
files are translated into it (`original.py`). Nothing here imports the sources, storage or Dagster.
"""

from spd_assets.config.experiment import (
    EXPERIMENT_NAME,
    RESERVED_NAMES,
    ConsensusConfig,
    ExperimentConfig,
    LoadedConfig,
    apply_overrides,
    dump_config,
    load_config,
    load_config_file,
    parse_config,
)
from spd_assets.config.sources import SOURCE_CONFIGS, SourceConfig
from spd_assets.errors import ExperimentConfigError

__all__ = [
    "EXPERIMENT_NAME",
    "RESERVED_NAMES",
    "SOURCE_CONFIGS",
    "ConsensusConfig",
    "ExperimentConfig",
    "ExperimentConfigError",
    "LoadedConfig",
    "SourceConfig",
    "apply_overrides",
    "dump_config",
    "load_config",
    "load_config_file",
    "parse_config",
]
