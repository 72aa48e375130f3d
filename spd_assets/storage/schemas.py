"""The result tables: their columns and types, in one place.

Tables are Parquet files read by the DuckDB views (`database`), written by the table IO
manager, and described to Dagster (column schema metadata in the UI) from these definitions.
A new table is one `TableSchema` here plus the function that builds its rows (`tables`).
Types are SQL type names as DuckDB shows them; Polars types follow from them. (No Polars
import at module level: the query path reads these without building frames.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import polars as pl

SQL_TYPES = ("VARCHAR", "INTEGER", "BIGINT", "DOUBLE", "BOOLEAN", "TIMESTAMP WITH TIME ZONE")


def polars_type(sql_type: str) -> pl.DataType:
    """The Polars type of a DuckDB SQL type used in the table schemas."""
    import polars as pl

    return {
        "VARCHAR": pl.String, "INTEGER": pl.Int32, "BIGINT": pl.Int64, "DOUBLE": pl.Float64,
        "BOOLEAN": pl.Boolean, "TIMESTAMP WITH TIME ZONE": pl.Datetime("us", "UTC"),
    }[sql_type]


@dataclass(frozen=True)
class TableSchema:
    """A table's name, what one row is, and its columns: name -> (SQL type, description)."""

    name: str
    description: str
    columns: dict[str, tuple[str, str]]

    def __post_init__(self) -> None:
        unknown = {column: sql for column, (sql, _) in self.columns.items() if sql not in SQL_TYPES}
        if unknown:
            raise ValueError(f"table {self.name}: unknown SQL types {unknown}; expected some of {SQL_TYPES}")

    @property
    def dtypes(self) -> dict[str, pl.DataType]:
        return {column: polars_type(sql) for column, (sql, _) in self.columns.items()}

    def empty(self) -> pl.DataFrame:
        import polars as pl

        return pl.DataFrame(schema=self.dtypes)

    def conform(self, frame: pl.DataFrame) -> pl.DataFrame:
        """`frame` with exactly this table's columns, in order and of its types (a missing column is an error)."""
        missing = [column for column in self.columns if column not in frame.columns]
        extra = [column for column in frame.columns if column not in self.columns]
        if missing or extra:
            raise ValueError(f"table {self.name}: expected columns {list(self.columns)}, missing {missing}, extra {extra}")
        import polars as pl

        return frame.select([pl.col(column).cast(dtype) for column, dtype in self.dtypes.items()])


_EXPERIMENT = ("VARCHAR", "experiment name")
_MEMBER = ("VARCHAR", "ensemble member (partition key)")
_UTC = "TIMESTAMP WITH TIME ZONE"

_TABLES = [
    TableSchema("experiments", "one row per registered experiment: its config", {
        "experiment": _EXPERIMENT,
        "config_hash": ("VARCHAR", "hash of the config with every default filled in"),
        "config_json": ("VARCHAR", "the config as JSON, every default filled in"),
        "source_kind": ("VARCHAR", "activation source kind"),
        "n_members": ("INTEGER", "configured ensemble size (null: every file)"),
        "alpha": ("DOUBLE", "merge_config.alpha"),
        "activation_threshold": ("DOUBLE", "merge_config.activation_threshold (null: continuous mode)"),
        "iters": ("INTEGER", "merge_config.iters (null: until three groups remain)"),
        "sampler": ("VARCHAR", "merge_config.merge_pair_sampling_method"),
        "base_seed": ("BIGINT", "seed the member seeds derive from"),
        "registered_at": (_UTC, "when the config was registered"),
    }),
    TableSchema("component_stats", "one row per component per member", {
        "experiment": _EXPERIMENT,
        "member": _MEMBER,
        "label": ("VARCHAR", "component label '<module>:<index>'"),
        "module": ("VARCHAR", "module name"),
        "component_index": ("INTEGER", "index within the module"),
        "activation_frequency": ("DOUBLE", "fraction of samples above the activation threshold"),
        "mean_activation": ("DOUBLE", "mean over samples"),
        "max_activation": ("DOUBLE", "maximum over samples"),
        "dead": ("BOOLEAN", "dropped by the dead-component filter"),
    }),
    TableSchema("merge_events", "one row per merge of a member", {
        "experiment": _EXPERIMENT,
        "member": _MEMBER,
        "iteration": ("INTEGER", "0-based merge number"),
        "group_a": ("INTEGER", "first group of the pair as sampled (pre-merge id)"),
        "group_b": ("INTEGER", "second group of the pair as sampled (pre-merge id)"),
        "merged_group": ("INTEGER", "id of the merged group (the smaller of the two)"),
        "k_groups": ("INTEGER", "groups after the merge"),
        "pair_cost": ("DOUBLE", "MDL cost of the chosen pair"),
        "mdl_loss": ("DOUBLE", "MDL loss after the merge"),
    }),
    TableSchema("membership_spans", "component label is in group_label for iterations first..last", {
        "experiment": _EXPERIMENT,
        "member": _MEMBER,
        "label": ("VARCHAR", "component label"),
        "group_label": ("VARCHAR", "label of the group's smallest member"),
        "first_iteration": ("INTEGER", "first iteration of the span"),
        "last_iteration": ("INTEGER", "last iteration of the span (inclusive)"),
    }),
    TableSchema("ensemble_members", "one row per configured member of an ensemble", {
        "experiment": _EXPERIMENT,
        "member": _MEMBER,
        "ensemble_index": ("INTEGER", "position in the ensemble (null when missing)"),
        "status": ("VARCHAR", "'used' or 'missing'"),
        "n_components": ("INTEGER", "components of the member's history"),
        "n_iters_completed": ("INTEGER", "iterations the member completed"),
        "union_coverage": ("DOUBLE", "share of the ensemble's label union the member has"),
    }),
    TableSchema("distances", "distance between two members' partitions at an iteration (both orders)", {
        "experiment": _EXPERIMENT,
        "method": ("VARCHAR", "distance method"),
        "iteration": ("INTEGER", "0-based iteration"),
        "member_a": _MEMBER,
        "member_b": _MEMBER,
        "distance": ("BIGINT", "the distance (an integer count)"),
    }),
    TableSchema("consensus_components", "one row per component of an ensemble: its consensus cluster", {
        "experiment": _EXPERIMENT,
        "iteration": ("INTEGER", "iteration of the consensus (chosen by the rule)"),
        "threshold": ("DOUBLE", "fraction of members two components must share a group in"),
        "rule": ("VARCHAR", "how the iteration was chosen"),
        "label": ("VARCHAR", "component label"),
        "module": ("VARCHAR", "module name"),
        "cluster": ("INTEGER", "consensus cluster (null: in none)"),
        "cluster_size": ("INTEGER", "components in the cluster (null: in none)"),
        "cluster_stability": ("DOUBLE", "mean co-association of the cluster's pairs"),
        "component_stability": ("DOUBLE", "mean co-association with the rest of its cluster"),
    }),
    TableSchema("materializations", "one row per materialization of an experiment's assets (values and tables)", {
        "experiment": _EXPERIMENT,
        "asset": ("VARCHAR", "asset name"),
        "partition": ("VARCHAR", "partition key (null when not partitioned)"),
        "run_id": ("VARCHAR", "Dagster run"),
        "step_key": ("VARCHAR", "Dagster step"),
        "materialized_at": (_UTC, "when Dagster recorded it"),
        "code_version": ("VARCHAR", "code version of the asset"),
        "data_version": ("VARCHAR", "fingerprint of a value's content (a table's: Dagster's data version)"),
        "config_hash": ("VARCHAR", "hash of the experiment config"),
        "storage_path": ("VARCHAR", "file holding the value or the table's rows"),
        "metadata_json": ("VARCHAR", "the materialization's metadata as JSON"),
    }),
    TableSchema("lineage_edges", "one row per input a materialization consumed", {
        "experiment": _EXPERIMENT,
        "asset": ("VARCHAR", "consuming asset"),
        "partition": ("VARCHAR", "its partition"),
        "run_id": ("VARCHAR", "its run"),
        "step_key": ("VARCHAR", "its step"),
        "data_version": ("VARCHAR", "its data version"),
        "upstream_asset": ("VARCHAR", "consumed asset (or 'source:<kind>')"),
        "upstream_partition": ("VARCHAR", "consumed partition"),
        "upstream_data_version": ("VARCHAR", "consumed data version"),
        "upstream_run_id": ("VARCHAR", "the run whose materialization was consumed (null for a source)"),
    }),
]

TABLE_SCHEMAS: dict[str, TableSchema] = {table.name: table for table in _TABLES}
