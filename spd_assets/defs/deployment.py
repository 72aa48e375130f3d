"""Where and how steps run on this deployment: executor, devices, Kubernetes settings.

Read from `$DAGSTER_HOME/spd_cluster.yaml` (optional; see the committed
`dagster_home/spd_cluster.yaml`); the environment variables `SPD_CLUSTER_EXECUTOR` and
`SPD_CLUSTER_DEVICES` (comma-separated names, or `auto`) override it. These are facts about
the machine or cluster, not about an experiment, so they live beside the Dagster instance.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from spd_assets.defs.devices import validate_devices, visible_devices
from spd_assets.defs.home import dagster_home
from spd_assets.errors import DeploymentError, DeviceError

SETTINGS_FILE = "spd_cluster.yaml"
EXECUTOR_ENV = "SPD_CLUSTER_EXECUTOR"
DEVICES_ENV = "SPD_CLUSTER_DEVICES"
# The Dagster concurrency pool of every step that leases a device.
DEVICE_POOL = "spd_devices"


class KubernetesSettings(BaseModel):
    """Passed to dagster-k8s's `k8s_job_executor`; GPU limits are added per step from the device settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    job_namespace: str = "dagster"
    job_image: str | None = Field(None, description="image with spd-cluster installed; default: the run's image")
    gpus_per_step: int = Field(1, ge=0, description="nvidia.com/gpu limit of each device step's pod (0: CPU pods)")
    max_concurrent: int | None = Field(None, ge=1, description="step pods at once; default: the device pool size")
    executor_config: dict[str, Any] = Field(default_factory=dict, description="any other k8s_job_executor settings")


class DeploymentSettings(BaseModel):
    """Where and how steps run on this deployment (`$DAGSTER_HOME/spd_cluster.yaml`, environment overrides)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    executor: Literal["in_process", "multiprocess", "k8s"] = "in_process"
    devices: list[str] | Literal["auto"] = "auto"
    cpu_slots: int | None = Field(None, ge=1, description="with devices: auto and no GPU: CPU slots (default: one per core)")
    device_lease_timeout_s: float = Field(24 * 3600, gt=0, description="how long a step waits for a free device")
    k8s: KubernetesSettings = Field(default_factory=KubernetesSettings)

    @field_validator("devices")
    @classmethod
    def _valid_devices(cls, devices):
        if devices == "auto":
            return devices
        try:
            return validate_devices(devices)
        except DeviceError as error:
            raise ValueError(str(error)) from None

    def device_names(self) -> list[str]:
        return visible_devices(self.cpu_slots) if self.devices == "auto" else list(self.devices)


def load_settings(home: Path | None = None) -> DeploymentSettings:
    """The deployment settings of the instance at `home`; DeploymentError naming the setting at fault."""
    path = (home or dagster_home()) / SETTINGS_FILE
    values: dict[str, Any] = {}
    if path.exists():
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise DeploymentError(f"{path} is not valid YAML: {error}") from None
    if os.environ.get(EXECUTOR_ENV):
        values["executor"] = os.environ[EXECUTOR_ENV]
    if os.environ.get(DEVICES_ENV):
        raw = os.environ[DEVICES_ENV].strip()
        values["devices"] = raw if raw == "auto" else [name.strip() for name in raw.split(",") if name.strip()]
    try:
        return DeploymentSettings.model_validate(values)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg'].removeprefix('Value error, ')}" for e in error.errors())
        raise DeploymentError(f"deployment settings ({path} and ${EXECUTOR_ENV}/${DEVICES_ENV}) are invalid: {problems}") from None
