"""The jobs of an experiment: one run per member (a partition), then one for the whole ensemble."""

from __future__ import annotations

from dagster import AssetSelection, define_asset_job

from spd_assets.defs.assets import ExperimentAssets


def members_job_name(experiment: str) -> str:
    """The job that materializes one member (a partition) of `experiment`."""
    return f"{experiment}__members"


def ensemble_job_name(experiment: str) -> str:
    """The job that materializes the ensemble of `experiment` and everything after it."""
    return f"{experiment}__ensemble"


def original_folder_job_name(experiment: str) -> str:
    """The job that writes the original-format folder of `experiment` (and updates its lineage tables)."""
    return f"{experiment}__original_folder"


def experiment_jobs(experiment: str, assets: ExperimentAssets) -> list:
    """The member job, the ensemble job and the original-format folder's job of one experiment."""
    return [
        define_asset_job(
            members_job_name(experiment),
            selection=AssetSelection.assets(*assets.member_keys),
            description=f"{experiment}: activations and merge history of one ensemble member",
        ),
        define_asset_job(
            ensemble_job_name(experiment),
            selection=AssetSelection.assets(*assets.ensemble_keys),
            description=f"{experiment}: normalized ensemble, distance matrices, settings and lineage tables",
        ),
        define_asset_job(
            original_folder_job_name(experiment),
            selection=AssetSelection.assets(*assets.export_keys),
            description=f"{experiment}: the original pipeline's folder (every partition of every member), on request",
        ),
    ]
