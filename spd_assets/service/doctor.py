"""What disagrees between Dagster's record, the result files and the processes alive, and the repairs that need
no recomputing: the work of `spd-cluster doctor` (`examine`), as `Finding` values the command line prints.

Dagster's event log is the source of truth; the doctor brings the rest in line with it:

1. a `run --replace` cut short: finished (its journal says what was being removed);
2. runs in flight whose process is gone: marked failed, their pool slots freed, as are slots
   still held by finished runs; with SLURM, runs in flight whose job is gone are marked failed too,
   and jobs working for runs that are over are canceled;
3. temporary files of writers that were killed: removed;
4. per experiment (once no run is in flight, since a live step may have written a file Dagster has not
   recorded yet), each asset's latest materialization against its file:
   - recorded, but the file is missing or unreadable: reported with the command that recomputes it;
   - a value whose content is not the recorded data version, or a table whose row count is not
     the recorded one (a step killed between writing its file and Dagster recording it): the
     file is removed and reported for recomputing;
   - a file Dagster never recorded, or of a member no longer in the experiment: removed;
   - a value that consumed an input Dagster has no record of: reported for recomputing;
5. the lineage tables against the event log: rebuilt (the lineage asset re-materialized) when they differ.

With `repair` False (`--dry-run`), the same is reported without changing anything.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import polars as pl
from dagster import AssetKey, AssetRecordsFilter, DagsterInstance, EventLogRecord, RunsFilter

from spd_assets.config import ExperimentConfig
from spd_assets.defs.assets import experiment_assets
from spd_assets.defs.dead_runs import (
    FINISHED,
    IN_FLIGHT,
    examine_slurm_jobs,
    find_dead_runs,
    free_pool_slots,
    process_alive,
    reap_dead_runs,
)
from spd_assets.defs.io_managers import VALUE_TYPE_METADATA_KEY
from spd_assets.defs.lineage import (
    CONSUMED_METADATA_KEY,
    DATA_VERSION_TAG,
    materialization_records,
    plain_value,
    recorded_materializations,
)
from spd_assets.deployment.settings import load_settings
from spd_assets.errors import SpdClusterError
from spd_assets.service.lineage import rebuild_lineage
from spd_assets.service.registration import carry_out
from spd_assets.service.runs import RUN_TAG_EXPERIMENT, run_config_for
from spd_assets.sources import source_for
from spd_assets.storage.atomic import leftover_temporaries
from spd_assets.storage.checkpoints import CheckpointKey, read_checkpoint, stored_checkpoints
from spd_assets.storage.experiments import pending_replacements, registered_experiments
from spd_assets.storage.lineage import LINEAGE_TABLES, fingerprint, lineage_tables
from spd_assets.storage.previous_layout import is_previous_layout, previous_fingerprint
from spd_assets.storage.schemas import TABLE_SCHEMAS
from spd_assets.storage.store import ResultsStore
from spd_assets.storage.values import value_format

# Columns that identify a row of each lineage table (the rest follow from them).
LINEAGE_IDENTITY = {
    "materializations": ["asset", "partition", "run_id", "data_version"],
    "lineage_edges": ["asset", "partition", "run_id", "upstream_asset", "upstream_partition",
                      "upstream_data_version", "upstream_run_id"],
}
RUN_TAG_DOCTOR = "spd_cluster/doctor"
# The doctor's own run logs only problems to the terminal (its events are in Dagster as usual).
QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


@dataclass(frozen=True)
class Finding:
    """One problem: what it is, what was (or, in a dry run, would be) done about it, and what to recompute."""

    problem: str
    repair: str | None = None  # None: nothing the doctor can do without recomputing
    experiment: str | None = None
    recompute: str | None = None  # the member to recompute; "" for the experiment's ensemble
    note: bool = False  # something to know, not a problem (nothing to repair)


def _latest_by_partition(instance: DagsterInstance, key: AssetKey) -> dict[str | None, EventLogRecord]:
    latest: dict[str | None, EventLogRecord] = {}
    for record in recorded_materializations(instance, AssetRecordsFilter(asset_key=key)):
        latest.setdefault(record.partition_key, record)
    return latest


def _remove(path: Path, repair: bool) -> str:
    if repair:
        path.unlink(missing_ok=True)
    return "removed it" if repair else "would remove it"


def _label(experiment: str, asset: str, partition: str | None) -> str:
    return f"{experiment}/{asset}" + (f"[{partition}]" if partition is not None else "")


def _check_value(path: Path, value_type: str, record: EventLogRecord) -> str | None:
    """Why the value file does not hold the recorded materialization, or None when it does."""
    recorded = record.asset_materialization.tags.get(DATA_VERSION_TAG)
    try:
        value = value_format(value_type).load(path)
        content = previous_fingerprint(value) if is_previous_layout(path) else fingerprint(value)
    except Exception as error:  # any reader failure on a damaged file
        return f"is unreadable ({type(error).__name__}: {error})"
    if recorded is not None and content != recorded:
        return (f"holds data version {content}, not the recorded {recorded} (a step was killed between writing it "
                "and Dagster recording it)")
    return None


def _check_table(path: Path, record: EventLogRecord) -> str | None:
    """Why the table file does not hold the recorded materialization, or None when it does."""
    recorded = plain_value(record.asset_materialization.metadata.get("dagster/row_count"))
    try:
        rows = pl.scan_parquet(path).select(pl.len()).collect().item()
    except Exception as error:  # any reader failure on a damaged file
        return f"is unreadable ({type(error).__name__}: {error})"
    if recorded is not None and rows != int(recorded):
        return (f"has {rows} rows, not the recorded {recorded} (a step was killed between writing it and Dagster "
                "recording it)")
    return None


def _unrecorded_inputs(record: EventLogRecord) -> list[str]:
    consumed = plain_value(record.asset_materialization.metadata.get(CONSUMED_METADATA_KEY)) or []
    return [f"{item['asset']}[{item['partition']}]" if item.get("partition") else item["asset"]
            for item in consumed if not str(item.get("asset", "")).startswith("source:") and not item.get("run_id")]


def examine_experiment(store: ResultsStore, instance: DagsterInstance, config: ExperimentConfig,
                       members: list[str], *, repair: bool) -> list[Finding]:
    """Each asset's latest materialization against its file, then the lineage tables against the event log."""
    name = config.name
    findings = []
    specs = [spec for assets_def in experiment_assets(config, members).assets for spec in assets_def.specs]
    lineage_keys = [AssetKey([name, table]) for table in LINEAGE_TABLES]
    for spec in specs:
        asset = spec.key.path[-1]
        value_type = plain_value(spec.metadata.get(VALUE_TYPE_METADATA_KEY))
        if (value_type is None and asset not in TABLE_SCHEMAS) or spec.key in lineage_keys:
            continue  # stored by other means (not the doctor's to judge), or the lineage tables (checked below)
        partitioned = spec.partitions_def is not None
        latest = _latest_by_partition(instance, spec.key)

        def path_of(partition: str | None) -> Path:
            if value_type is not None:
                stored = value_format(value_type)
                return stored.stored_path(store.value_path(name, asset, partition, stored.suffix))
            return store.table_file(asset, name, partition)

        for partition in members if partitioned else [None]:
            path, record = path_of(partition), latest.get(partition)
            label = _label(name, asset, partition)
            recompute = partition if partitioned else ""
            if record is None:
                if path.exists():
                    findings.append(Finding(f"{label}: {path} was never recorded by Dagster",
                                            _remove(path, repair), name))
                continue
            run = record.run_id[:8]
            if not path.exists():
                findings.append(Finding(f"{label}: materialized by run {run}, but its file {path} is missing",
                                        None, name, recompute))
                continue
            why = _check_value(path, value_type, record) if value_type is not None else _check_table(path, record)
            if why is not None:
                findings.append(Finding(f"{label}: {path} {why}", _remove(path, repair), name, recompute))
            elif value_type is not None and (unrecorded := _unrecorded_inputs(record)):
                findings.append(Finding(f"{label}: run {run} consumed {', '.join(unrecorded)} at a version Dagster "
                                        "has no record of", None, name, recompute))
        if partitioned:  # files of members that left the experiment
            stale = {p for p in (store.value_files(name) | store.table_files(name)).values()} - set(members) - {None}
            for partition in sorted(stale):
                path = path_of(partition)
                if path.exists():
                    findings.append(Finding(f"{_label(name, asset, partition)}: {partition} is no longer a member of "
                                            f"{name!r} (members: {', '.join(members)})", _remove(path, repair), name))
    previous = [path for path in store.value_files(name) if is_previous_layout(path)]
    if previous:
        size = sum(path.stat().st_size for path in previous)
        findings.append(Finding(f"{name}: {len(previous)} result file(s) ({size / 1e6:,.1f} MB) are in the previous "
                                "layout, with every partition stored (the member histories in the original zip format, "
                                "the normalized ensemble as one array); they are read as they are, and the next "
                                "`spd-cluster run` of the experiment writes its results as merges", None, name,
                                note=True))
    findings += _examine_lineage(store, instance, name, [s.key for s in specs if s.key not in lineage_keys],
                                 members, repair=repair)
    return findings


def _identities(frame: pl.DataFrame, table: str) -> set[tuple]:
    return set(frame.select(LINEAGE_IDENTITY[table]).iter_rows())


def _examine_lineage(store: ResultsStore, instance: DagsterInstance, name: str, recorded_keys: list[AssetKey],
                     members: list[str], *, repair: bool) -> list[Finding]:
    records = list(materialization_records(instance, name, recorded_keys, members))
    expected = dict(zip(LINEAGE_TABLES, lineage_tables(records)))
    differences = []
    for table in LINEAGE_TABLES:
        path = store.table_file(table, name)
        try:
            stored = _identities(pl.read_parquet(path), table) if path.exists() else set()
        except Exception:  # damaged: rebuilt below like a stale one
            stored = set()
        wanted = _identities(expected[table], table)
        if stored != wanted:
            differences.append(f"{table}: {len(wanted - stored)} rows missing, {len(stored - wanted)} not in the log")
    if not differences:
        return []
    problem = f"{name}: the lineage tables disagree with Dagster's event log ({'; '.join(differences)})"
    if not repair:
        return [Finding(problem, "would rebuild them from the event log", name)]
    outcome = rebuild_lineage(name, {RUN_TAG_EXPERIMENT: name, RUN_TAG_DOCTOR: "lineage"},
                              {**(run_config_for(load_settings()) or {}), **QUIET})
    error = None if outcome.success else (outcome.error or f"run {outcome.run_id} failed")
    if error is not None:
        return [Finding(problem, None, name, ""), Finding(f"{name}: rebuilding the lineage tables failed: {error}")]
    return [Finding(problem, f"rebuilt them from the event log (run {outcome.run_id[:8]})", name)]


def examine(store: ResultsStore, instance: DagsterInstance, *, repair: bool,
            only: list[str] | None = None) -> list[Finding]:
    """Every problem found, repaired where possible when `repair`."""
    findings = []
    for replacement in pending_replacements(store):
        if repair:
            carry_out(store, instance, replacement)
        findings.append(Finding(f"the removal of {replacement.describe()} was cut short",
                                "finished it" if repair else "would finish it", replacement.experiment))
    dead_runs = reap_dead_runs(instance, reaper="spd-cluster doctor") if repair else find_dead_runs(instance)
    for dead in dead_runs:
        findings.append(Finding(f"run {dead.run_id[:8]} is {dead.status.value} but its {dead.how_known} "
                                f"(pid {dead.pid}) is gone",
                                "marked it failed and freed its pool slots" if repair else "would mark it failed"))
    slurm_problems = examine_slurm_jobs(instance, repair=repair) if load_settings().executor == "slurm" else []
    for slurm_problem in slurm_problems:
        findings.append(Finding(slurm_problem.problem, slurm_problem.repair))
    storage = instance.event_log_storage
    if storage.supports_global_concurrency_limits and (holders := storage.get_concurrency_run_ids()):
        for run in instance.get_runs(filters=RunsFilter(run_ids=list(holders), statuses=FINISHED)):
            if repair:
                free_pool_slots(instance, run.run_id)
            findings.append(Finding(f"run {run.run_id[:8]} ended ({run.status.value}) but still holds pool slots",
                                    "freed them" if repair else "would free them"))
    for path in leftover_temporaries(store.root, process_alive):
        findings.append(Finding(f"{path} is a partial file of a killed writer", _remove(path, repair)))
    dead_ids = {dead.run_id for dead in dead_runs}
    live = [run for run in instance.get_runs(filters=RunsFilter(statuses=IN_FLIGHT)) if run.run_id not in dead_ids]
    if live:
        # A live step may have written a file that Dagster has not recorded yet: nothing to judge while runs write.
        return [*findings, Finding(f"{len(live)} run(s) in flight ({', '.join(r.run_id[:8] for r in live)}): result "
                                   "files and lineage tables are checked once no run is in flight; run doctor again then")]
    registered = registered_experiments(store)
    findings += [Finding(problem) for problem in registered.problems]
    for config in registered.configs:
        if only and config.name not in only:
            continue
        try:
            members = source_for(config.source).member_keys()
        except SpdClusterError as error:
            findings.append(Finding(f"{config.name}: cannot list its members: {error}", None, config.name))
            continue
        findings += examine_experiment(store, instance, config, members, repair=repair)
    findings += examine_checkpoints(store, instance, {config.name: config for config in registered.configs},
                                    repair=repair, only=only)
    return findings


def examine_checkpoints(store: ResultsStore, instance: DagsterInstance, configs: dict[str, ExperimentConfig], *,
                        repair: bool, only: list[str] | None = None) -> list[Finding]:
    """Merge checkpoints (no run in flight): those no run can resume (another config, activations or code, a member
    whose history was stored since, an experiment or member gone, unreadable) are removed; the others are listed."""
    findings = []
    members_of: dict[str, list[str]] = {}  # per experiment, and each asset's latest records: asked once, not per file
    latest: dict[tuple[str, str], dict[str | None, EventLogRecord]] = {}

    def latest_of(experiment: str, asset: str, member: str) -> EventLogRecord | None:
        if (experiment, asset) not in latest:
            latest[experiment, asset] = _latest_by_partition(instance, AssetKey([experiment, asset]))
        return latest[experiment, asset].get(member)

    for (experiment, member), path in stored_checkpoints(store).items():
        if only and experiment not in only:
            continue
        label = f"{experiment}/merge_history[{member}]"
        config = configs.get(experiment)
        why, stored = None, None
        try:
            stored = read_checkpoint(path)
        except (OSError, ValueError, KeyError) as error:
            why = f"cannot be read ({type(error).__name__})"
        if why is None and config is None:
            why = f"is of an experiment no longer registered ({experiment!r})"
        if why is None and experiment not in members_of:
            members_of[experiment] = source_for(config.source).member_keys()
        if why is None and member not in members_of[experiment]:
            why = f"is of {member}, no longer a member of {experiment!r}"
        if why is None:
            activations = latest_of(experiment, "component_activations", member)
            current = CheckpointKey(config.config_hash,
                                    activations.asset_materialization.tags.get(DATA_VERSION_TAG, "") if activations
                                    else stored.key.activations)
            why = stored.key.mismatch(current)
        if why is None:
            history = latest_of(experiment, "merge_history", member)
            if history is not None and history.timestamp > stored.saved:
                why = f"is older than the member's history, stored by run {history.run_id[:8]}"
        if why is not None:
            findings.append(Finding(f"{label}: the merge checkpoint {path} {why}; no run can resume from it",
                                    _remove(path, repair), experiment))
        else:
            done = stored.checkpoint.n_done
            findings.append(Finding(f"{label}: a merge checkpoint of {done:,} of {stored.total:,} merges (saved "
                                    f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(stored.saved))}); the member's "
                                    "next run resumes from it", None, experiment, note=True))
    return findings
