"""Where and how steps run on this deployment: executor, devices, Kubernetes and SLURM settings, and the
Dagster instance's storage.

Read from `$DAGSTER_HOME/spd_cluster.yaml` (optional; see the committed
`dagster_home/spd_cluster.yaml`); the environment variables `SPD_CLUSTER_EXECUTOR`,
`SPD_CLUSTER_DEVICES` (comma-separated names, or `auto`), `SPD_CLUSTER_INSTANCE` and
`SPD_CLUSTER_POSTGRES_URL` override it. These are facts about the machine or cluster, not about
an experiment, so they live beside the Dagster instance.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from spd_assets.deployment.devices import validate_devices, visible_devices
from spd_assets.deployment.home import dagster_home
from spd_assets.errors import DeploymentError, DeviceError

SETTINGS_FILE = "spd_cluster.yaml"
EXECUTOR_ENV = "SPD_CLUSTER_EXECUTOR"
DEVICES_ENV = "SPD_CLUSTER_DEVICES"
INSTANCE_ENV = "SPD_CLUSTER_INSTANCE"
POSTGRES_URL_ENV = "SPD_CLUSTER_POSTGRES_URL"
# `slurm:` settings an invocation may override (an original pipeline config's slurm_partition, slurm_job_name_prefix).
SLURM_SETTING_ENVS = {"partition": "SPD_CLUSTER_SLURM_PARTITION", "job_name_prefix": "SPD_CLUSTER_SLURM_JOB_NAME_PREFIX"}
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


class SlurmSettings(BaseModel):
    """How each member's device step is submitted with `executor: slurm` (one `sbatch` job per step)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    partition: str | None = Field(None, description="sbatch --partition (default: the cluster's default partition)")
    account: str | None = Field(None, description="sbatch --account")
    qos: str | None = Field(None, description="sbatch --qos")
    time: str | None = Field(None, description="sbatch --time, e.g. 02:00:00 (default: the partition's limit)")
    mem: str | None = Field(None, description="sbatch --mem, e.g. 32G (default: the partition's default)")
    cpus_per_task: int | None = Field(None, ge=1, description="sbatch --cpus-per-task")
    gpus_per_job: int = Field(0, ge=0, description="GPUs of each job, as --gres=gpu:N (0: a CPU job)")
    job_name_prefix: str = Field("spd-", description="each job is named <prefix><experiment>-<member>-<step>")
    extra_sbatch_args: list[str] = Field(default_factory=list, description="any other sbatch arguments, verbatim")
    python: str | None = Field(None, description="the interpreter on the nodes with spd-cluster installed "
                                                 "(default: this one, on a shared filesystem)")
    poll_interval_s: float = Field(2.0, gt=0, description="how often a job's state is asked (squeue)")
    transient_retries: int = Field(2, ge=0, description="Dagster retries of a step whose job was preempted, "
                                                       "whose node failed or that hit its time limit (each retry "
                                                       "resumes the merge from its checkpoint)")
    requeue: bool = Field(True, description="submit jobs requeueable (sbatch --requeue): a job preempted or on a "
                                            "failed node goes back to the queue and resumes from its checkpoint")

    def sbatch_options(self) -> list[str]:
        """The sbatch options these settings stand for."""
        options = [f"--{name.replace('_', '-')}={value}" for name, value in
                   (("partition", self.partition), ("account", self.account), ("qos", self.qos), ("time", self.time),
                    ("mem", self.mem), ("cpus_per_task", self.cpus_per_task)) if value is not None]
        if self.gpus_per_job:
            options.append(f"--gres=gpu:{self.gpus_per_job}")
        options.append("--requeue" if self.requeue else "--no-requeue")
        return [*options, *self.extra_sbatch_args]


class DeploymentSettings(BaseModel):
    """Where and how steps run on this deployment (`$DAGSTER_HOME/spd_cluster.yaml`, environment overrides)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    executor: Literal["in_process", "multiprocess", "k8s", "slurm"] = "in_process"
    devices: list[str] | Literal["auto"] = "auto"
    cpu_slots: int | None = Field(None, ge=1, description="with devices: auto and no GPU: CPU slots (default: one per core)")
    device_lease_timeout_s: float = Field(24 * 3600, gt=0, description="how long a step waits for a free device")
    k8s: KubernetesSettings = Field(default_factory=KubernetesSettings)
    slurm: SlurmSettings = Field(default_factory=SlurmSettings)
    instance: Literal["sqlite", "postgres"] = Field(
        "sqlite", description="the Dagster instance's storage: sqlite (embedded, one host) or postgres (a server "
                              "every host reaches: the multi-host setup)")
    postgres_url: str | None = Field(None, description=f"with instance: postgres (else ${POSTGRES_URL_ENV})")
    checkpoint_interval_s: float = Field(60.0, gt=0, description="how often a running merge saves its checkpoint, "
                                                                 "from which a killed or requeued member resumes")

    @field_validator("devices")
    @classmethod
    def _valid_devices(cls, devices):
        if devices == "auto":
            return devices
        try:
            return validate_devices(devices)
        except DeviceError as error:
            raise ValueError(str(error)) from None

    @field_validator("postgres_url")
    @classmethod
    def _with_driver(cls, url):
        # SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3; dagster-postgres ships psycopg2.
        for bare in ("postgresql://", "postgres://"):
            if url and url.startswith(bare):
                return "postgresql+psycopg2://" + url[len(bare):]
        return url

    @model_validator(mode="after")
    def _postgres_has_url(self):
        if self.instance == "postgres" and not self.postgres_url:
            raise ValueError(f"instance: postgres needs postgres_url (or ${POSTGRES_URL_ENV}), e.g. "
                             "postgresql://user:password@host:5432/dagster")
        return self

    def device_names(self) -> list[str]:
        return visible_devices(self.cpu_slots) if self.devices == "auto" else list(self.devices)

    @property
    def remote_devices(self) -> bool:
        """Device steps run on other machines (SLURM nodes): this machine's devices are not leased for them."""
        return self.executor == "slurm"


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
    for setting, variable in SLURM_SETTING_ENVS.items():
        if os.environ.get(variable):
            values["slurm"] = {**(values.get("slurm") or {}), setting: os.environ[variable]}
    if os.environ.get(INSTANCE_ENV):
        values["instance"] = os.environ[INSTANCE_ENV]
    if os.environ.get(POSTGRES_URL_ENV):
        values["postgres_url"] = os.environ[POSTGRES_URL_ENV]
    try:
        return DeploymentSettings.model_validate(values)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg'].removeprefix('Value error, ')}" for e in error.errors())
        raise DeploymentError(f"deployment settings ({path} and ${EXECUTOR_ENV}/${DEVICES_ENV}/${INSTANCE_ENV}) are "
                              f"invalid: {problems}") from None


@contextmanager
def settings_overridden(*, executor: str | None = None, slurm: Mapping[str, str] | None = None) -> Iterator[None]:
    """The deployment's `executor` and `slurm:` settings (those in `SLURM_SETTING_ENVS`) overridden for a `with`
    block (None, or no `slurm` keys: as deployed).

    The overrides are this process's environment variables, as a person would set them: `load_settings` reads
    them here and in every process started meanwhile (the workers that execute Dagster runs load the code
    location, and so the settings, in processes of their own).
    """
    variables = {**({EXECUTOR_ENV: executor} if executor is not None else {}),
                 **{SLURM_SETTING_ENVS[setting]: value for setting, value in (slurm or {}).items()}}
    previous = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
