"""An experiment's results as Python values, for notebooks: `ClusteringResults.load(experiment, home=...)`.

Reads what the pipeline stored in a results folder (made by `spd-cluster run`, the UI or
`cluster_analysis_pipeline`): the member histories, the normalized ensemble, the distances,
the consensus clusters and every result table. Nothing here runs Dagster.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from types import MappingProxyType

import numpy as np
import polars as pl
import torch

from spd_assets.config import ExperimentConfig
from spd_assets.deployment.home import dagster_home, results_store
from spd_assets.errors import StorageError
from spd_assets.storage.experiments import registered_config
from spd_assets.storage.schemas import TABLE_SCHEMAS
from spd_assets.storage.store import ResultsStore, require_experiment
from spd_assets.storage.values import (
    VALUE_FORMATS,
    ConsensusClusters,
    EnsembleDistances,
    ExplorerPage,
    MemberEnsemble,
    load_consensus,
    load_distances,
    load_ensemble,
    load_history,
)
from spd_math import MergeHistory, NormalizedHistories


def _value_path(store: ResultsStore, experiment: str, asset: str, value_type: type, partition: str | None = None) -> Path:
    value_format = VALUE_FORMATS[value_type]
    path = value_format.stored_path(store.value_path(experiment, asset, partition, value_format.suffix))
    if not path.exists():
        raise StorageError(f"experiment {experiment!r} has no {asset} in {store.root} ({path} is missing); "
                           "materialize the experiment first (spd-cluster run, the UI, or cluster_analysis_pipeline)")
    return path


def _experiment_rows(store: ResultsStore, table: str, experiment: str) -> pl.DataFrame:
    """Every row of `table` for `experiment` (all its partitions' files)."""
    files = sorted(store.table_dir(table).glob(f"{experiment}__*.parquet")) if store.table_dir(table).is_dir() else []
    if not files:
        return TABLE_SCHEMAS[table].empty()
    # A file name prefix can also match a longer experiment name: the column decides.
    return pl.read_parquet(files).filter(pl.col("experiment") == experiment)


@dataclass(frozen=True)
class ClusteringResults:
    """One experiment's results: histories by member, the aligned ensemble, distances by method, the consensus
    clusters and the result tables (table name -> Polars DataFrame, this experiment's rows).

    Returned by `cluster_analysis_pipeline`, or read back later with `ClusteringResults.load`; frozen.

    Attributes
    ----------
    experiment : str
    config : ExperimentConfig
        The registered config the results are of.
    home : Path
        The Dagster instance (DAGSTER_HOME) they live in.
    histories : mapping of str to spd_math.MergeHistory
        Each member's merge history, in ensemble order: its merges (partitions are replayed from them;
        `partition(member, iteration)` gives one).
    ensemble : MemberEnsemble
        The histories aligned on the union of labels (`ensemble.ensemble`), the members used and missing.
    normalized : spd_math.NormalizedHistories
        The same alignment under the original research code's names (`merges_array`, `component_labels`,
        `metadata`), with the metadata of the member histories.
    distances : mapping of str to torch.Tensor
        Method -> `[iterations, members, members]` distances.
    consensus : ConsensusClusters
        The consensus clusters, the iteration and the rule that chose it.
    tables : mapping of str to polars.DataFrame
        Every result table's rows of this experiment.

    Examples
    --------
    >>> from spd_assets import ClusteringResults
    >>> results = ClusteringResults.load("default")                        # doctest: +SKIP
    >>> results.consensus.iteration, results.consensus.rule                 # doctest: +SKIP
    (472, "median over members of each member's MDL-loss minimum")
    >>> results.tables["consensus_clusters"].sort("size", descending=True)  # doctest: +SKIP
    >>> results.normalized.merges_array.shape, results.config.merge_config.iters  # doctest: +SKIP
    """

    experiment: str
    config: ExperimentConfig
    home: Path
    histories: Mapping[str, MergeHistory]
    ensemble: MemberEnsemble
    distances: Mapping[str, torch.Tensor]
    consensus: ConsensusClusters
    tables: Mapping[str, pl.DataFrame]

    @classmethod
    def load(cls, experiment: str = "default", *, home: str | os.PathLike[str] | None = None) -> ClusteringResults:
        """The stored results of `experiment` in the Dagster instance at `home` (default: `$DAGSTER_HOME`, else
        the project's `dagster_home/`)."""
        home = Path(home).resolve() if home is not None else dagster_home()
        store = results_store(home)
        require_experiment(store, experiment)
        config = registered_config(store, experiment)
        ensemble = load_ensemble(_value_path(store, experiment, "normalized_ensemble", MemberEnsemble))
        histories = {member: load_history(_value_path(store, experiment, "merge_history", MergeHistory, member))
                     for member in ensemble.members}
        distances: EnsembleDistances = load_distances(_value_path(store, experiment, "distance_matrices", EnsembleDistances))
        consensus = load_consensus(_value_path(store, experiment, "consensus_clusters", ConsensusClusters))
        tables = {table: _experiment_rows(store, table, experiment) for table in TABLE_SCHEMAS}
        # The per-cluster view the database offers, as a frame too.
        tables["consensus_clusters"] = _cluster_rows(tables["consensus_components"])
        return cls(
            experiment=experiment, config=config, home=home,
            histories=MappingProxyType(histories), ensemble=ensemble,
            distances=MappingProxyType(dict(distances.by_method)), consensus=consensus,
            tables=MappingProxyType(tables),
        )

    @cached_property
    def normalized(self) -> NormalizedHistories:
        """The stored aligned ensemble with the metadata of its members' histories (nothing is aligned again)."""
        return NormalizedHistories.from_ensemble(self.ensemble.ensemble,
                                                 [self.histories[member] for member in self.ensemble.members])

    def partition(self, member: str, iteration: int) -> np.ndarray:
        """One member's group ids after merge `iteration`, for `histories[member].labels` (groups numbered by their
        smallest member): replayed from that member's merges alone, nothing else made.

        Raises
        ------
        StorageError
            `member` is not a member of the ensemble.
        HistoryError
            `iteration` is outside the member's merges.

        Examples
        --------
        >>> results = ClusteringResults.load("default")                   # doctest: +SKIP
        >>> groups = results.partition("member_000", 400)                 # doctest: +SKIP
        >>> dict(zip(results.histories["member_000"].labels, groups))     # doctest: +SKIP
        """
        if member not in self.histories:
            raise StorageError(f"member {member!r} is not in the ensemble of {self.experiment!r}; expected one of "
                               f"{list(self.histories)}")
        return self.histories[member].partition_at(iteration)

    @property
    def explorer_path(self) -> Path:
        """The cluster explorer page (open it in a browser)."""
        return results_store(self.home).value_path(self.experiment, "cluster_explorer", None,
                                                   VALUE_FORMATS[ExplorerPage].suffix)

    def __repr__(self) -> str:
        ensemble = self.ensemble.ensemble
        tables = ", ".join(f"{name} ({frame.height})" for name, frame in self.tables.items() if frame.height)
        return (f"ClusteringResults({self.experiment!r}: {len(self.histories)} members, {ensemble.n_iters} iterations, "
                f"{len(ensemble.labels)} components; distances {list(self.distances)}; {self.consensus!r}; "
                f"tables with rows: {tables}; home={str(self.home)!r})")


def _cluster_rows(components: pl.DataFrame) -> pl.DataFrame:
    """One row per consensus cluster, as the `consensus_clusters` view in DuckDB."""
    return (components.filter(pl.col("cluster").is_not_null())
            .group_by("experiment", "iteration", "threshold", "cluster", maintain_order=True)
            .agg(pl.len().alias("size"), pl.col("cluster_stability").first().alias("stability"),
                 pl.col("module").unique().sort().str.join(", ").alias("modules"))
            .sort("cluster"))
