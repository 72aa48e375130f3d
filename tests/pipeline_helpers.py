"""Shared set-up for tests that materialize the real asset graph into a temporary Dagster instance."""

from __future__ import annotations

import shutil
from pathlib import Path

from dagster import DagsterInstance, Definitions
from dagster._core.instance.ref import InstanceRef

from spd_assets.config import ExperimentConfig, parse_config
from spd_assets.definitions import (
    build_definitions,
    ensemble_job_name,
    members_job_name,
)
from spd_assets.storage import PROJECT_ROOT

# A small synthetic model: seconds per member, still with planted groups to recover.
SMALL_SYNTHETIC = {
    "kind": "synthetic",
    "n_members": 3,
    "batch_size": 8,
    "params": {
        "n_layers": 2,
        "modules": ["attn.q", "mlp.up", "mlp.down"],
        "components_per_module": [8, 12],
        "n_planted_groups": 6,
        "group_size": [2, 4],
        "seq_len": 32,
    },
}


def small_config(name: str = "small", **overrides) -> ExperimentConfig:
    values = {"name": name, "source": SMALL_SYNTHETIC, "merge_config": {"iters": None}}
    values.update(overrides)
    return parse_config(values)


def make_home(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    shutil.copy(PROJECT_ROOT / "dagster_home" / "dagster.yaml", path / "dagster.yaml")
    return path


def materialize_experiment(defs: Definitions, instance: DagsterInstance, config: ExperimentConfig, members: list[str]):
    """Every member partition, then the ensemble and distances, in-process; returns the run results."""
    member_job = defs.resolve_job_def(members_job_name(config.name))
    member_results = {
        member: member_job.execute_in_process(instance=instance, partition_key=member, raise_on_error=False)
        for member in members
    }
    ensemble_result = defs.resolve_job_def(ensemble_job_name(config.name)).execute_in_process(instance=instance, raise_on_error=False)
    return member_results, ensemble_result


def definitions_for(*configs: ExperimentConfig) -> Definitions:
    return build_definitions(list(configs))


def instance_at(home: Path) -> DagsterInstance:
    """The Dagster instance stored in `home`, without touching the DAGSTER_HOME environment variable."""
    return DagsterInstance.from_ref(InstanceRef.from_dir(str(home)))
