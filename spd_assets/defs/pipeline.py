"""`cluster_analysis_pipeline(config)`: materialize an experiment through Dagster in this process, for notebooks.

The same assets, jobs and instance as `spd-cluster run` and the UI: each member's run, then the
ensemble's, recorded in the Dagster instance at `home` (so the UI shows them), results in its
results folder; the answer is read back as a `ClusteringResults`.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dagster import DagsterInstance

from spd_assets.cli.registration import register
from spd_assets.cli.runs import RUN_TAG_EXPERIMENT, first_failure_message
from spd_assets.config import ExperimentConfig, load_config, parse_config
from spd_assets.defs.definitions import build_definitions
from spd_assets.defs.deployment import load_settings
from spd_assets.defs.home import TEMPLATE_HOME, dagster_home, results_store
from spd_assets.defs.jobs import ensemble_job_name, members_job_name
from spd_assets.errors import SpdClusterError
from spd_assets.results import ClusteringResults
from spd_assets.sources import source_for
from spd_assets.storage.database import ensure_database

RUN_TAG_ORIGIN = "spd_cluster/origin"


class PipelineError(SpdClusterError, RuntimeError):
    """The ensemble could not be materialized; the message gives the first failure."""


def _as_config(config: ExperimentConfig | Mapping[str, Any] | str | os.PathLike[str] | None) -> ExperimentConfig:
    if isinstance(config, ExperimentConfig):
        return config
    if config is None or isinstance(config, (str, os.PathLike)):
        return load_config(config)
    return parse_config(dict(config), origin="config")


def _instance_at(home: Path) -> DagsterInstance:
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "dagster.yaml").exists() and (TEMPLATE_HOME / "dagster.yaml").exists():
        shutil.copy(TEMPLATE_HOME / "dagster.yaml", home / "dagster.yaml")
    return DagsterInstance.from_config(str(home))


def cluster_analysis_pipeline(
    config: ExperimentConfig | Mapping[str, Any] | str | os.PathLike[str] | None = None,
    *,
    home: str | os.PathLike[str] | None = None,
    replace: bool = False,
) -> ClusteringResults:
    """Cluster an experiment's components and return its results.

    Parameters
    ----------
    config
        An `ExperimentConfig`, a mapping of its keys (as in a YAML file), the path of a YAML config,
        or None for the embedded default.
    home
        The Dagster instance (DAGSTER_HOME) to materialize into; default: `$DAGSTER_HOME`, else the
        project's `dagster_home/`. `dagster dev` on the same folder shows the runs.
    replace
        The experiment's name has results of another config (or of members no longer in it):
        remove them first, as `spd-cluster run --replace` does; otherwise that is an error.

    Returns
    -------
    ClusteringResults
        Histories, normalized ensemble, distances, consensus clusters and result tables.

    Raises
    ------
    ExperimentConfigError
        The config is invalid (nothing is run).
    ExperimentChangedError
        The name has results of another config or of departed members and `replace` is False
        (nothing is run; the message names what changed).
    SourceError
        The source cannot give any member's batch: a missing model or text, a pattern matching no module
        (nothing is run).
    PipelineError
        The ensemble could not be built (e.g. every member failed); the message gives the first failure.
    """
    config = _as_config(config)
    home = Path(home).resolve() if home is not None else dagster_home()
    store = results_store(home)
    source = source_for(config.source)
    source.check()  # what would fail every member fails here, before any member runs
    members = source.member_keys()
    with _instance_at(home) as instance:
        register(store, instance, config, members, replace=replace)
        ensure_database(store)
        defs = build_definitions([config], settings=load_settings(home))
        tags = {RUN_TAG_EXPERIMENT: config.name, RUN_TAG_ORIGIN: "cluster_analysis_pipeline"}
        member_job = defs.resolve_job_def(members_job_name(config.name))
        for member in members:
            # A failed member is left out of the ensemble (and listed there), as in every other way of running.
            member_job.execute_in_process(instance=instance, partition_key=member, tags=tags, raise_on_error=False)
        result = defs.resolve_job_def(ensemble_job_name(config.name)).execute_in_process(
            instance=instance, tags=tags, raise_on_error=False)
        if not result.success:
            raise PipelineError(f"the ensemble of {config.name!r} failed: {first_failure_message(result)}")
    return ClusteringResults.load(config.name, home=home)
