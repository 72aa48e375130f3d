"""The Dagster code location: every registered experiment's assets, checks, resources and jobs.

`workspace.yaml` points `dagster dev` here; `spd-cluster run` executes the same jobs.
"""

from __future__ import annotations

from dagster import Definitions, define_asset_job

from spd_assets.assets import IO_MANAGER_KEY, experiment_assets, source_resource_key
from spd_assets.config import ExperimentConfig
from spd_assets.experiments import registered_experiments
from spd_assets.io_manager import ResultsIOManager
from spd_assets.resources import source_for


def members_job_name(experiment: str) -> str:
    return f"{experiment}__members"


def ensemble_job_name(experiment: str) -> str:
    return f"{experiment}__ensemble"


def build_definitions(configs: list[ExperimentConfig] | None = None) -> Definitions:
    configs = registered_experiments() if configs is None else configs
    assets, jobs = [], []
    resources: dict[str, object] = {IO_MANAGER_KEY: ResultsIOManager()}
    for config in configs:
        source = source_for(config)
        members = source.member_keys()
        experiment_asset_defs = experiment_assets(config, members)
        assets += experiment_asset_defs
        resources[source_resource_key(config.name)] = source
        per_member, whole = experiment_asset_defs[:2], experiment_asset_defs[2:]
        jobs.append(
            define_asset_job(
                members_job_name(config.name),
                selection=[key for a in per_member for key in a.keys],
                description=f"{config.name}: activations and merge history of one ensemble member",
            )
        )
        jobs.append(
            define_asset_job(
                ensemble_job_name(config.name),
                selection=[key for a in whole for key in a.keys],
                description=f"{config.name}: normalized ensemble and distance matrices",
            )
        )
    return Definitions(assets=assets, resources=resources, jobs=jobs)


defs = build_definitions()
