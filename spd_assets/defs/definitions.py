"""The Dagster code location: every registered experiment's definitions, merged with the shared resources.

`workspace.yaml` points `dagster dev` here; `spd-cluster run` executes the same jobs. An
experiment that cannot be loaded (a registered config gone bad, a files source whose directory
vanished) is skipped with a logged error, so the others stay usable.
"""

from __future__ import annotations

import logging

from dagster import Definitions, JobDefinition

from spd_assets.config import ExperimentConfig
from spd_assets.defs.assets import (
    DEVICE_POOL_KEY,
    STORAGE_KEY,
    TABLE_IO_MANAGER_KEY,
    VALUE_IO_MANAGER_KEY,
    experiment_assets,
)
from spd_assets.defs.executors import device_op_tags, executor_for
from spd_assets.defs.io_managers import TableIOManager, ValueIOManager
from spd_assets.defs.jobs import experiment_jobs
from spd_assets.defs.resources import (
    ActivationSourceResource,
    DevicePoolResource,
    StorageResource,
    source_resource_key,
)
from spd_assets.defs.sensors import dead_runs
from spd_assets.deployment.home import dagster_home, results_store
from spd_assets.deployment.settings import DeploymentSettings, load_settings
from spd_assets.errors import SpdClusterError
from spd_assets.sources import source_for
from spd_assets.storage.experiments import registered_experiments

logger = logging.getLogger("spd_cluster")


def experiment_definitions(config: ExperimentConfig, settings: DeploymentSettings) -> Definitions:
    """The assets, checks, jobs and activation source of one experiment."""
    members = source_for(config.source).member_keys()
    assets = experiment_assets(config, members, device_op_tags=device_op_tags(settings),
                               slurm=settings.slurm if settings.executor == "slurm" else None,
                               checkpoint_interval_s=settings.checkpoint_interval_s)
    return Definitions(
        assets=assets.assets,
        jobs=experiment_jobs(config.name, assets),
        resources={source_resource_key(config.name): ActivationSourceResource.for_experiment(config)},
    )


def shared_definitions(settings: DeploymentSettings, storage: StorageResource) -> Definitions:
    """The resources every experiment uses, the executor, and the sensor that clears dead runs."""
    return Definitions(
        sensors=[dead_runs],
        resources={
            STORAGE_KEY: storage,
            VALUE_IO_MANAGER_KEY: ValueIOManager(storage=storage),
            TABLE_IO_MANAGER_KEY: TableIOManager(storage=storage),
            DEVICE_POOL_KEY: DevicePoolResource(
                storage=storage, devices=settings.device_names(), lease_timeout_s=settings.device_lease_timeout_s
            ),
        },
        executor=executor_for(settings),
    )


def build_definitions(
    configs: list[ExperimentConfig] | None = None,
    settings: DeploymentSettings | None = None,
    storage: StorageResource | None = None,
) -> Definitions:
    """Definitions of `configs` (default: every experiment registered in the instance's results folder).

    `storage` defaults to the results folder of the Dagster instance that runs each step.
    """
    home = dagster_home()
    if configs is None:
        registered = registered_experiments(results_store(home))
        for problem in registered.problems:
            logger.error(problem)
        configs = registered.configs
    settings = load_settings(home) if settings is None else settings
    per_experiment = []
    for config in configs:
        try:
            per_experiment.append(experiment_definitions(config, settings))
        except SpdClusterError as error:
            logger.error(f"skipped experiment {config.name!r}: {error}")
    return Definitions.merge(shared_definitions(settings, storage or StorageResource()), *per_experiment)


defs = build_definitions()


def job_named(name: str) -> JobDefinition:
    """A job of the code location by name (how the command line's runs rebuild it in other processes)."""
    return defs.resolve_job_def(name)
