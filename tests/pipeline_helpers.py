"""Shared set-up for tests that materialize the real asset graph into a temporary Dagster instance."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from dagster import DagsterInstance, Definitions

from spd_assets.config import ExperimentConfig, parse_config
from spd_assets.defs.definitions import build_definitions
from spd_assets.defs.jobs import ensemble_job_name, members_job_name
from spd_assets.deployment.home import TEMPLATE_HOME, results_store
from spd_assets.storage.store import ResultsStore
from spd_assets.storage.values import value_format

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

ROOT = Path(__file__).resolve().parents[1]


def merging_experiment(name: str, iters: int, n_members: int) -> dict:
    """An experiment whose members each merge 8,400 components over 3,072 samples: about 25 merges a second here,
    so `iters` sets how long a member merges (long enough for a fault to land mid-merge)."""
    return {"name": name, "merge_config": {"iters": iters},
            "source": {"kind": "synthetic", "n_members": n_members, "batch_size": 48,
                       "params": {"n_layers": 2, "modules": ["attn.q", "mlp.up", "mlp.down"],
                                  "components_per_module": [1300, 1500], "n_planted_groups": 6,
                                  "group_size": [2, 4], "seq_len": 64}}}


def cli_process(home: Path, *args: str, devices: str = "cpu:0", **popen) -> subprocess.Popen:
    """`spd-cluster ARGS` started on the instance at `home` with these devices (the deployment's executor), its
    output (stdout and stderr) on `.stdout`."""
    environment = {**os.environ, "DAGSTER_HOME": str(home), "SPD_CLUSTER_DEVICES": devices}
    environment.pop("SPD_CLUSTER_EXECUTOR", None)
    return subprocess.Popen([sys.executable, "-m", "spd_assets.cli", *args], env=environment, cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **popen)


# The type of each value asset's value, which decides its file format.
VALUE_TYPES = {
    "component_activations": "ProcessedActivations",
    "merge_history": "MergeHistory",
    "normalized_ensemble": "MemberEnsemble",
    "distance_matrices": "EnsembleDistances",
    "consensus_clusters": "ConsensusClusters",
    "cluster_explorer": "ExplorerPage",
}


def small_config(name: str = "small", **overrides) -> ExperimentConfig:
    values = {"name": name, "source": SMALL_SYNTHETIC, "merge_config": {"iters": None}}
    values.update(overrides)
    return parse_config(values)


def make_home(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    shutil.copy(TEMPLATE_HOME / "dagster.yaml", path / "dagster.yaml")
    return path


def store_at(home: Path) -> ResultsStore:
    return results_store(home)


def asset_path(experiment: str, asset: str, partition: str | None, home: Path) -> Path:
    """The file of a value asset (a partition of it) in the instance at `home`."""
    suffix = value_format(VALUE_TYPES[asset]).suffix
    return store_at(home).value_path(experiment, asset, partition, suffix)


def materialize_experiment(defs: Definitions, instance: DagsterInstance, config: ExperimentConfig, members: list[str]):
    """Every member partition, then the ensemble and distances, in-process; returns the run results."""
    member_job = defs.resolve_job_def(members_job_name(config.name))
    member_results = {
        member: member_job.execute_in_process(instance=instance, partition_key=member, raise_on_error=False)
        for member in members
    }
    ensemble_result = defs.resolve_job_def(ensemble_job_name(config.name)).execute_in_process(instance=instance, raise_on_error=False)
    return member_results, ensemble_result


def materialize_original_folder(home: Path, experiment: str):
    """The experiment's `original_ensemble_folder` asset (with the lineage tables), as the UI materializes it when
    asked: in-process, from the experiments registered in `home`."""
    from spd_assets.defs.jobs import original_folder_job_name
    from spd_assets.storage.experiments import registered_experiments

    configs = registered_experiments(store_at(home)).configs
    defs = definitions_for(*configs)
    with instance_at(home) as instance:
        return defs.resolve_job_def(original_folder_job_name(experiment)).execute_in_process(instance=instance)


def definitions_for(*configs: ExperimentConfig) -> Definitions:
    return build_definitions(list(configs))


def instance_at(home: Path) -> DagsterInstance:
    """The Dagster instance stored in `home` (as `DagsterInstance.get()` would open it with DAGSTER_HOME=home)."""
    return DagsterInstance.from_config(str(home))
