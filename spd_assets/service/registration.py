"""Registering an experiment from the command line: a changed config or member set is refused unless replaced.

An experiment's results are only ever those of its current config and members. Registering a
name again with another config (fewer members, another alpha), or running it after members
left it (a file removed from a `files` directory), would otherwise leave old rows beside the
new ones. `spd-cluster run` refuses then, naming what changed; with `--replace` it first removes
the old results: their value and table files, and, for a changed config, Dagster's record of the
experiment's materializations (so the UI and the lineage tables show current results only).
The removal is journaled (`storage.experiments.Replacement`): if it is cut short, the next `run`
or `doctor` finishes it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

from dagster import AssetKey, DagsterInstance

from spd_assets.config import ExperimentConfig, dump_config
from spd_assets.errors import ExperimentChangedError, ExperimentConfigError
from spd_assets.storage.experiments import (
    Replacement,
    begin_replacement,
    end_replacement,
    pending_replacements,
    register_experiment,
    registered_config,
    remove_result_files,
)
from spd_assets.storage.store import WHOLE_EXPERIMENT, ResultsStore


def _flatten(values: dict, prefix: str = "") -> Iterator[tuple[str, object]]:
    for key, value in values.items():
        if isinstance(value, dict) and value:
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def config_changes(old: ExperimentConfig, new: ExperimentConfig) -> list[str]:
    """Each setting that differs, as `key: old -> new` (every default filled in)."""
    before = dict(_flatten(json.loads(old.canonical_json)))
    after = dict(_flatten(json.loads(new.canonical_json)))
    unset = "(unset)"
    return [f"{key}: {json.dumps(before.get(key, unset))} -> {json.dumps(after.get(key, unset))}"
            for key in sorted(set(before) | set(after)) if before.get(key, unset) != after.get(key, unset)]


def stored_members(store: ResultsStore, experiment: str) -> set[str]:
    """Members (partitions) of which `experiment` has value or table files."""
    parts = {*store.value_files(experiment).values(), *store.table_files(experiment).values()}
    return {part for part in parts if part is not None and part != WHOLE_EXPERIMENT}


def _recorded_keys(instance: DagsterInstance, experiment: str) -> list[AssetKey]:
    """The experiment's asset keys with a materialization Dagster still shows."""
    return [key for key in instance.get_asset_keys(prefix=[experiment])
            if instance.get_latest_materialization_event(key) is not None]


def carry_out(store: ResultsStore, instance: DagsterInstance, replacement: Replacement) -> None:
    """Remove what `replacement` names and register its config; safe to repeat after an interruption."""
    begin_replacement(store, replacement)
    remove_result_files(store, replacement.experiment, replacement.members)
    if replacement.members is None:
        # Partitions cannot be wiped one by one in Dagster's SQL storage; members that left an experiment are
        # outside its partitions, and the lineage asset records current members only.
        instance.wipe_assets(instance.get_asset_keys(prefix=[replacement.experiment]))
    end_replacement(store, replacement)


def finish_pending_replacements(store: ResultsStore, instance: DagsterInstance) -> list[str]:
    """Finish replacements an earlier invocation began and did not end; a line for each."""
    lines = []
    for replacement in pending_replacements(store):
        carry_out(store, instance, replacement)
        lines.append(f"  (finished removing {replacement.describe()}, begun by an interrupted invocation)")
    return lines


def register(store: ResultsStore, instance: DagsterInstance, config: ExperimentConfig, members: list[str], *,
             replace: bool) -> list[str]:
    """Register `config` with its current `members`; refused (ExperimentChangedError) when that would mix in old
    results, unless `replace`, which removes them first. Lines saying what was done."""
    lines = finish_pending_replacements(store, instance)
    name = config.name
    has_results = bool(store.value_files(name) or store.table_files(name) or _recorded_keys(instance, name))
    try:
        previous = registered_config(store, name)
        changes = config_changes(previous, config) if previous is not None else []
    except ExperimentConfigError as error:
        changes = [f"the registered config no longer loads ({error})"]
    stale = sorted(stored_members(store, name) - set(members))
    if has_results and changes:
        if not replace:
            raise ExperimentChangedError(
                f"experiment {name!r} has results of another config; changed: {'; '.join(changes)}. "
                f"Run with --replace to remove its results and register the new config, "
                f"or give the new config another name (--set name=...)"
            )
        replacement = Replacement(name, dump_config(config))
    elif stale:
        if not replace:
            raise ExperimentChangedError(
                f"experiment {name!r} has results of members that are no longer in it: {', '.join(stale)} "
                f"(its members now: {', '.join(members)}). Run with --replace to remove their results"
            )
        replacement = Replacement(name, dump_config(config), stale)
    else:
        register_experiment(store, config)
        return lines
    carry_out(store, instance, replacement)
    return [*lines, f"  (removed {replacement.describe()}; registered the new config)"]
