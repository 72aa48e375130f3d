"""What must hold after any kill, once the killed command line is gone and `spd-cluster doctor` has run.

Each check returns a list of violations (empty when it holds), worded so a failing soak says what broke.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from spd_assets.config import ExperimentConfig
from spd_assets.defs.dead_runs import IN_FLIGHT, process_alive
from spd_assets.defs.lineage import materialization_records
from spd_assets.deployment.devices import holders
from spd_assets.deployment.settings import DEVICE_POOL
from spd_assets.sources import source_for
from spd_assets.storage.lineage import lineage_tables
from spd_assets.storage.store import ResultsStore
from spd_assets.storage.values import value_format
from tests.pipeline_helpers import VALUE_TYPES

LINEAGE_IDENTITY = {
    "materializations": ["asset", "partition", "run_id", "data_version"],
    "lineage_edges": ["asset", "partition", "run_id", "upstream_asset", "upstream_partition", "upstream_data_version",
                      "upstream_run_id"],
}


def children_of(pid: int) -> list[int]:
    """Every live descendant of `pid` (from /proc)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        for child, its_parent in parents.items():
            if its_parent == parent:
                found.append(child)
                frontier.append(child)
    return found


def no_runs_in_flight(instance) -> list[str]:
    """With no command line running, no run may be in flight (one would be a dead run nobody cleared)."""
    from dagster import RunsFilter

    return [f"run {run.run_id[:8]} ({run.tags.get('dagster/partition', run.job_name)}) is left {run.status.value}"
            for run in instance.get_runs(filters=RunsFilter(statuses=IN_FLIGHT))]


def no_pool_slots_held(instance) -> list[str]:
    info = instance.event_log_storage.get_concurrency_info(DEVICE_POOL)
    held = [f"pool slot of {DEVICE_POOL} held by run {slot.run_id[:8]} step {slot.step_key}"
            for slot in info.claimed_slots]
    waiting = [f"step {step.step_key} of run {step.run_id[:8]} still waits for a {DEVICE_POOL} slot"
               for step in info.pending_steps]
    return held + waiting


def no_leases_held(store: ResultsStore, devices: list[str]) -> list[str]:
    return [f"device {device} still leased by {holder}" for device, holder in holders(store.lease_dir, devices).items()
            if holder is not None]


def no_orphans(pids: list[int]) -> list[str]:
    return [f"process {pid} outlived the command line" for pid in pids if process_alive(pid)]


def no_partial_files(store: ResultsStore, experiment: str) -> list[str]:
    """Every result file reads whole; no temporary file of a writer is left."""
    problems = [f"temporary file left: {path}" for path in store.root.rglob("*.tmp")]
    for path in store.tables_dir.rglob("*.parquet"):
        try:
            pl.read_parquet(path)
        except Exception as error:  # any reader failure is a violation
            problems.append(f"unreadable table file {path}: {error}")
    formats = {asset: value_format(value_type) for asset, value_type in VALUE_TYPES.items()}
    for path, partition in store.value_files(experiment).items():
        asset = path.parent.name if partition is not None else path.stem
        value_format_ = formats.get(asset)
        if value_format_ is None:
            continue
        try:
            value_format_.load(path)
        except Exception as error:  # any reader failure is a violation
            problems.append(f"unreadable value file {path}: {error}")
    return problems


def lineage_matches_event_log(store: ResultsStore, instance, config: ExperimentConfig) -> list[str]:
    """The lineage tables hold exactly what Dagster's event log says (for the experiment's current members)."""
    members = source_for(config.source).member_keys()
    keys = [key for key in instance.get_asset_keys(prefix=[config.name])
            if key.path[-1] not in LINEAGE_IDENTITY]
    expected = dict(zip(LINEAGE_IDENTITY, lineage_tables(materialization_records(instance, config.name, keys, members))))
    problems = []
    for table, columns in LINEAGE_IDENTITY.items():
        path = store.table_file(table, config.name)
        stored = set(pl.read_parquet(path).select(columns).iter_rows()) if path.exists() else set()
        wanted = set(expected[table].select(columns).iter_rows())
        if stored != wanted:
            problems.append(f"{table}: {len(wanted - stored)} rows of the event log missing, "
                            f"{len(stored - wanted)} rows not in it")
    return problems


def check_all(store: ResultsStore, instance, config: ExperimentConfig, devices: list[str], pids: list[int]) -> list[str]:
    return [
        *no_runs_in_flight(instance),
        *no_pool_slots_held(instance),
        *no_leases_held(store, devices),
        *no_orphans(pids),
        *no_partial_files(store, config.name),
        *lineage_matches_event_log(store, instance, config),
    ]

