"""Lineage from Dagster's event log: which materialization each step consumed, and the lineage tables.

A step names what it consumed in its materialization's metadata (`consumed`): for each input
partition the data version it loaded and the run whose materialization that is. Because the
metadata is part of the materialization event, Dagster's event log holds the whole lineage;
the `materializations` and `lineage_edges` tables are rebuilt from it, so they can never
disagree with what Dagster recorded.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable, Iterator, Sequence
from datetime import datetime, timezone

from dagster import AssetKey, AssetRecordsFilter, DagsterInstance, EventLogRecord

from spd_assets.storage.lineage import Consumed, MaterializationRecord

CONSUMED_METADATA_KEY = "consumed"
CONFIG_HASH_METADATA_KEY = "config_hash"
DATA_VERSION_TAG = "dagster/data_version"
CODE_VERSION_TAG = "dagster/code_version"
PAGE_SIZE = 1000

EMBEDDED_IMAGE = "](data:image/"  # Markdown metadata that carries a picture inline
EMBEDDED_IMAGE_PLACEHOLDER = "(plot: see the asset in the Dagster UI)"


def recorded_materializations(instance: DagsterInstance, records_filter: AssetRecordsFilter) -> Iterator[EventLogRecord]:
    """Every materialization record matching the filter, newest first."""
    cursor = None
    while True:
        result = instance.fetch_materializations(records_filter, limit=PAGE_SIZE, cursor=cursor)
        yield from result.records
        if not result.has_more:
            return
        cursor = result.cursor


def consumed_inputs(
    instance: DagsterInstance, key: AssetKey, loaded_versions: dict[str | None, str]
) -> list[Consumed]:
    """The materializations a step loaded: for each partition (None when unpartitioned) and the data version
    of what was loaded, the latest materialization of that partition with that version."""
    partitions = [p for p in loaded_versions if p is not None]
    records_filter = AssetRecordsFilter(asset_key=key, asset_partitions=partitions or None)
    found: dict[str | None, str] = {}
    for record in recorded_materializations(instance, records_filter):
        partition = record.partition_key
        materialization = record.asset_materialization
        if partition in loaded_versions and partition not in found and materialization is not None:
            if materialization.tags.get(DATA_VERSION_TAG) == loaded_versions[partition]:
                found[partition] = record.run_id
        if len(found) == len(loaded_versions):
            break
    asset = key.path[-1]
    return [Consumed(asset, partition, version, found.get(partition)) for partition, version in loaded_versions.items()]


def plain_value(value):
    """A Dagster MetadataValue -> its plain value (anything else as it is)."""
    return getattr(value, "value", value)


def _without_pictures(value):
    """A plain metadata value as the lineage tables keep it: an embedded plot -> a placeholder (the picture stays
    in Dagster's event log; the lineage tables stay small enough to query)."""
    if isinstance(value, str) and EMBEDDED_IMAGE in value:
        return EMBEDDED_IMAGE_PLACEHOLDER
    return value


def materialization_records(
    instance: DagsterInstance, experiment: str, keys: Sequence[AssetKey], members: Collection[str]
) -> Iterable[MaterializationRecord]:
    """Every recorded materialization of `keys`, oldest first, of the whole experiment or of one of its current
    `members` (a member that left the experiment is not part of its results)."""
    records = []
    for key in keys:
        for record in recorded_materializations(instance, AssetRecordsFilter(asset_key=key)):
            materialization = record.asset_materialization
            if materialization is None or (record.partition_key is not None and record.partition_key not in members):
                continue
            metadata = {name: _without_pictures(plain_value(value)) for name, value in materialization.metadata.items()}
            consumed = metadata.pop(CONSUMED_METADATA_KEY, None) or []
            if isinstance(consumed, str):
                consumed = json.loads(consumed)
            records.append(MaterializationRecord(
                experiment=experiment,
                asset=key.path[-1],
                partition=record.partition_key,
                run_id=record.run_id,
                step_key=record.event_log_entry.step_key,
                materialized_at=datetime.fromtimestamp(record.timestamp, tz=timezone.utc),
                code_version=materialization.tags.get(CODE_VERSION_TAG),
                data_version=materialization.tags.get(DATA_VERSION_TAG),
                config_hash=metadata.get(CONFIG_HASH_METADATA_KEY),
                storage_path=metadata.get("path"),
                metadata=metadata,
                consumed=[Consumed.from_json(item) for item in consumed],
            ))
    return sorted(records, key=lambda record: record.materialized_at)
