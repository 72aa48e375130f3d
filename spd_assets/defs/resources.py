"""The Dagster resources: the results folder, each experiment's activation source, and the device pool."""

from __future__ import annotations

import contextlib
import json
from functools import cached_property
from pathlib import Path

from dagster import ConfigurableResource, InitResourceContext
from pydantic import PrivateAttr

from spd_assets.config import ExperimentConfig
from spd_assets.deployment.devices import Lease, lease_device
from spd_assets.deployment.settings import DEVICE_POOL
from spd_assets.errors import StorageError
from spd_assets.sources import ActivationSource, source_for
from spd_assets.storage.store import ResultsStore, default_results_root


class StorageResource(ConfigurableResource):
    """The results folder every value, table and lease goes to.

    `root` defaults to `<DAGSTER_HOME>/spd_cluster` of the Dagster instance that runs the step,
    so each instance (a test's temporary one included) keeps its own results.
    """

    root: str | None = None
    _store: ResultsStore | None = PrivateAttr(default=None)

    def setup_for_execution(self, context: InitResourceContext) -> None:
        if self.root:
            self._store = ResultsStore(Path(self.root))
        elif context.instance is not None and context.instance.root_directory:
            self._store = ResultsStore(default_results_root(context.instance.root_directory))

    @property
    def store(self) -> ResultsStore:
        if self._store is None:
            if not self.root:
                raise StorageError("StorageResource: no results folder: set root, or run under a Dagster instance")
            self._store = ResultsStore(Path(self.root))
        return self._store


class ActivationSourceResource(ConfigurableResource):
    """One experiment's activation source (its `source:` block), shown with its config in the UI."""

    experiment_config_json: str

    @cached_property
    def config(self) -> ExperimentConfig:
        return ExperimentConfig.model_validate(json.loads(self.experiment_config_json))

    @cached_property
    def source(self) -> ActivationSource:
        return source_for(self.config.source)

    @classmethod
    def for_experiment(cls, config: ExperimentConfig) -> ActivationSourceResource:
        return cls(experiment_config_json=config.canonical_json)


def source_resource_key(experiment: str) -> str:
    """The resource key of `experiment`'s activation source."""
    return f"activation_source__{experiment}"


class DevicePoolResource(ConfigurableResource):
    """The devices steps lease exclusively (GPUs, or CPU slots); see `spd_assets.deployment.devices`."""

    storage: StorageResource
    devices: list[str]
    lease_timeout_s: float = 24 * 3600

    def lease(self, context, *, step_key: str) -> contextlib.AbstractContextManager[Lease]:
        """Hold one device for the duration of a `with` block in a step; waiting is logged."""
        holder = {"run_id": context.run.run_id, "step_key": step_key,
                  "partition": context.partition_key if context.has_partition_key else None}
        return lease_device(
            self.devices, self.storage.store.lease_dir, holder=holder, timeout_s=self.lease_timeout_s,
            limit=pool_limit(context.instance), report=context.log.info,
        )


def pool_limit(instance) -> int | None:
    """The instance's limit on device steps at once (Dagster pool `DEVICE_POOL`), or None without one."""
    if not instance.event_log_storage.supports_global_concurrency_limits:
        return None
    return instance.event_log_storage.get_concurrency_info(DEVICE_POOL).limit
