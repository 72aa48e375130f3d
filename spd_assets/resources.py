"""Activation sources as Dagster resources: each gives one member's module -> causal-importance mapping."""

from __future__ import annotations

import contextlib
import json
from functools import lru_cache

import numpy as np
import torch
from dagster import ConfigurableResource

from spd_assets.config import ExperimentConfig, FilesSource, SyntheticSource
from spd_assets.deployment import DEVICE_POOL
from spd_assets.devices import Lease, lease_device
from spd_assets.sources import files, synthetic
from spd_assets.storage import results_root

PARTITION_KEY_FORBIDDEN = set("|,[]")


@lru_cache(maxsize=8)
def _synthetic_model(params_json: str) -> synthetic.SyntheticModel:
    return synthetic.build_model(synthetic.SyntheticParams(**json.loads(params_json)))


class ActivationSource(ConfigurableResource):
    """What every source offers the assets."""

    def member_keys(self) -> list[str]:
        raise NotImplementedError

    def load_batch(self, member: str, seed: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def planted_partition(self, labels: list[str]) -> np.ndarray | None:
        """The known truth for these labels, where the source has one (synthetic data)."""
        return None


class SyntheticActivationSource(ActivationSource):
    """SPD-like causal importances with planted co-firing groups; deterministic per (model, seed)."""

    params_json: str = "{}"
    batch_size: int = 32
    n_members: int = 6

    @property
    def model(self) -> synthetic.SyntheticModel:
        return _synthetic_model(self.params_json)

    def member_keys(self) -> list[str]:
        width = max(3, len(str(self.n_members - 1)))
        return [f"member_{index:0{width}d}" for index in range(self.n_members)]

    def load_batch(self, member: str, seed: int) -> dict[str, torch.Tensor]:
        return synthetic.generate_batch(self.model, seed=seed, batch_size=self.batch_size)

    def planted_partition(self, labels: list[str]) -> np.ndarray:
        return self.model.planted_partition(labels)


class FilesActivationSource(ActivationSource):
    """One activation file per member in a directory; the members are the files (named by their stems)."""

    directory: str
    value_min: float = 0.0
    value_max: float = 1.0
    n_members: int | None = None

    def member_keys(self) -> list[str]:
        found = files.discover_batch_files(self.directory)
        # Dagster partition keys cannot contain these; say which file to rename rather than fail inside Dagster.
        unusable = {key: path.name for key, path in found.items() if set(key) & PARTITION_KEY_FORBIDDEN}
        if unusable:
            raise files.BatchFileError(
                f"{self.directory}: file names become partition keys, which cannot contain any of "
                f"{''.join(sorted(PARTITION_KEY_FORBIDDEN))}; rename {sorted(unusable.values())}"
            )
        keys = list(found)
        return keys[: self.n_members] if self.n_members is not None else keys

    def load_batch(self, member: str, seed: int) -> dict[str, torch.Tensor]:
        return files.load_batch(self.directory, member, value_range=(self.value_min, self.value_max))


def source_for(config: ExperimentConfig) -> ActivationSource:
    """The resource the experiment's config asks for."""
    source = config.source
    if isinstance(source, SyntheticSource):
        return SyntheticActivationSource(
            params_json=json.dumps(source.params), batch_size=source.batch_size, n_members=source.n_members
        )
    if isinstance(source, FilesSource):
        low, high = source.value_range
        return FilesActivationSource(directory=str(source.directory), value_min=low, value_max=high, n_members=source.n_members)
    raise TypeError(f"unknown activation source {type(source).__name__}")


class DevicePool(ConfigurableResource):
    """The devices steps lease exclusively (GPUs, or CPU slots); see `spd_assets.devices`."""

    devices: list[str]
    lease_timeout_s: float = 24 * 3600

    def lease(self, context) -> "contextlib.AbstractContextManager[Lease]":
        """Hold one device for the duration of a `with` block in a step; waiting is logged."""
        holder = {"run_id": context.run.run_id, "step_key": context.get_step_execution_context().step.key,
                  "partition": context.partition_key if context.has_partition_key else None}
        return lease_device(
            self.devices, results_root() / "device_leases", holder=holder, timeout_s=self.lease_timeout_s,
            limit=pool_limit(context.instance), report=context.log.info,
        )


def pool_limit(instance) -> int | None:
    """The instance's limit on device steps at once (Dagster pool `DEVICE_POOL`), or None without one."""
    if not instance.event_log_storage.supports_global_concurrency_limits:
        return None
    return instance.event_log_storage.get_concurrency_info(DEVICE_POOL).limit
