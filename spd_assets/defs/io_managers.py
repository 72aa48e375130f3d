"""IO managers: value objects to their files, result tables to Parquet, both under the results folder.

Asset keys are `[experiment, asset]`; partitioned assets get one file per partition. A
downstream asset that reads every partition of an upstream one (the ensemble reading all member
histories) receives a dict of the partitions that exist: which members are missing is for the
asset to report, not a reason to fail loading the others.
"""

from __future__ import annotations

from typing import Any

import polars as pl
from dagster import ConfigurableIOManager, InputContext, MetadataValue, OutputContext

from spd_assets.defs.lineage import plain_value
from spd_assets.defs.resources import StorageResource
from spd_assets.errors import StorageError
from spd_assets.storage.schemas import TABLE_SCHEMAS
from spd_assets.storage.values import value_format


def _names(asset_key) -> tuple[str, str]:
    return asset_key.path[0], asset_key.path[-1]


def _partition(context: OutputContext) -> str | None:
    return context.partition_key if context.has_partition_key else None


# Metadata key of a value asset naming the type of its value (and so its file format).
VALUE_TYPE_METADATA_KEY = "value_type"


class ValueIOManager(ConfigurableIOManager):
    """Stores each value object in its own format (`spd_assets.storage.values`), chosen by the asset's value type
    (the `value_type` in its definition metadata)."""

    storage: StorageResource

    def _format(self, value_type: type | str, asset_key):
        try:
            return value_format(value_type)
        except StorageError as error:
            raise StorageError(f"asset {asset_key.to_user_string()}: {error}") from None

    def handle_output(self, context: OutputContext, obj: Any) -> None:
        experiment, asset = _names(context.asset_key)
        value_format_ = self._format(type(obj), context.asset_key)
        path = self.storage.store.value_path(experiment, asset, _partition(context), value_format_.suffix)
        value_format_.replace(path, obj)
        context.add_output_metadata({"path": MetadataValue.path(str(path)), "bytes": path.stat().st_size})

    def load_input(self, context: InputContext) -> Any:
        experiment, asset = _names(context.asset_key)
        value_type = context.upstream_output.definition_metadata.get(VALUE_TYPE_METADATA_KEY)
        if value_type is None:
            raise StorageError(f"asset {context.asset_key.to_user_string()}: no {VALUE_TYPE_METADATA_KEY!r} in its "
                               "definition metadata, so the format of its stored value is unknown")
        value_format_ = self._format(plain_value(value_type), context.asset_key)

        def path_of(partition: str | None):
            # A file of the previous layout is read as it is, where the value has not been written since.
            return value_format_.stored_path(self.storage.store.value_path(experiment, asset, partition,
                                                                          value_format_.suffix))

        if not context.has_asset_partitions:
            return value_format_.load(path_of(None))
        keys = context.asset_partition_keys
        if context.has_partition_key and len(keys) == 1:
            return value_format_.load(path_of(keys[0]))
        paths = {key: path_of(key) for key in keys}
        return {key: value_format_.load(path) for key, path in paths.items() if path.exists()}


class TableIOManager(ConfigurableIOManager):
    """Writes a result table's rows (a Polars DataFrame) as the Parquet file of its experiment and partition,
    which the DuckDB views read; the row count goes to the materialization's metadata."""

    storage: StorageResource

    def handle_output(self, context: OutputContext, obj: pl.DataFrame) -> None:
        experiment, table = _names(context.asset_key)
        frame = TABLE_SCHEMAS[table].conform(obj)
        path = self.storage.store.write_table(frame, table, experiment, _partition(context))
        context.add_output_metadata({"dagster/row_count": frame.height, "path": MetadataValue.path(str(path))})

    def load_input(self, context: InputContext) -> pl.DataFrame:
        experiment, table = _names(context.asset_key)
        store = self.storage.store
        keys = context.asset_partition_keys if context.has_asset_partitions else [None]
        paths = [store.table_file(table, experiment, key) for key in keys]
        frames = [pl.read_parquet(path) for path in paths if path.exists()]
        return pl.concat(frames) if frames else TABLE_SCHEMAS[table].empty()
