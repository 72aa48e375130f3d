"""Where steps execute: the executor of the code location and per-step resources on Kubernetes."""

from __future__ import annotations

from dagster import ExecutorDefinition, in_process_executor, multi_or_in_process_executor

from spd_assets.deployment.settings import DeploymentSettings


def executor_for(settings: DeploymentSettings) -> ExecutorDefinition:
    """in_process (default: each run is a process of its own, one per member, and its steps run in it),
    multiprocess (each step in a process of its own too, at the price of starting Python, torch and Dagster
    per step; a run may still pick in_process in its run config), k8s (one pod per step), or slurm (the run's
    steps in its process, as in_process; its device step submits a SLURM job and waits for it)."""
    if settings.executor in ("in_process", "slurm"):
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
