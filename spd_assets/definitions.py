"""The Dagster code location: every registered experiment's assets, checks, resources, jobs and the executor.

`workspace.yaml` points `dagster dev` here; `spd-cluster run` executes the same jobs.
"""

from __future__ import annotations

from dagster import (
    Definitions,
    ExecutorDefinition,
    define_asset_job,
    in_process_executor,
    multi_or_in_process_executor,
)

from spd_assets.assets import (
    DEVICE_POOL_KEY,
    IO_MANAGER_KEY,
    experiment_assets,
    source_resource_key,
)
from spd_assets.config import ExperimentConfig
from spd_assets.deployment import DeploymentSettings, load_settings
from spd_assets.experiments import registered_experiments
from spd_assets.io_manager import ResultsIOManager
from spd_assets.resources import DevicePool, source_for


def members_job_name(experiment: str) -> str:
    return f"{experiment}__members"


def ensemble_job_name(experiment: str) -> str:
    return f"{experiment}__ensemble"


def executor_for(settings: DeploymentSettings) -> ExecutorDefinition:
    """multiprocess (default; each step in its own process, so its own CUDA context; a run may still pick
    in_process in its run config), in_process (debugging), or k8s (one pod per step)."""
    if settings.executor == "in_process":
        return in_process_executor
    if settings.executor == "k8s":
        from dagster_k8s import k8s_job_executor  # the optional `k8s` extra

        k8s = settings.k8s
        executor_config = {
            "job_namespace": k8s.job_namespace,
            "max_concurrent": k8s.max_concurrent or len(settings.device_names()),
            **({"job_image": k8s.job_image} if k8s.job_image else {}),
            **k8s.executor_config,
        }
        return k8s_job_executor.configured(executor_config, name="spd_k8s_job_executor")
    return multi_or_in_process_executor


def device_op_tags(settings: DeploymentSettings) -> dict | None:
    """Per-step pod resources on Kubernetes: the GPUs a device step needs."""
    if settings.executor != "k8s" or settings.k8s.gpus_per_step == 0:
        return None
    limits = {"nvidia.com/gpu": str(settings.k8s.gpus_per_step)}
    return {"dagster-k8s/config": {"container_config": {"resources": {"limits": limits}}}}


def build_definitions(
    configs: list[ExperimentConfig] | None = None, settings: DeploymentSettings | None = None
) -> Definitions:
    configs = registered_experiments() if configs is None else configs
    settings = load_settings() if settings is None else settings
    assets, jobs = [], []
    resources: dict[str, object] = {
        IO_MANAGER_KEY: ResultsIOManager(),
        DEVICE_POOL_KEY: DevicePool(devices=settings.device_names(), lease_timeout_s=settings.device_lease_timeout_s),
    }
    tags = device_op_tags(settings)
    for config in configs:
        source = source_for(config)
        experiment_asset_defs = experiment_assets(config, source.member_keys(), device_op_tags=tags)
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
    return Definitions(assets=assets, resources=resources, jobs=jobs, executor=executor_for(settings))


defs = build_definitions()
