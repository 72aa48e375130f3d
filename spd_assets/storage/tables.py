"""Result tables built from spd_math value objects, as Polars DataFrames (one function per table).

Every table carries `experiment` (and `member` where it is per member) so results of many
experiments live side by side in one set of Parquet files and DuckDB views. Column names and
types come from `schemas.TABLE_SCHEMAS`: each builder's frame is conformed to its schema.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime

import numpy as np
import polars as pl
import torch

from spd_assets.config import ExperimentConfig
from spd_assets.storage.schemas import TABLE_SCHEMAS
from spd_assets.storage.values import ConsensusClusters
from spd_math import MergeHistory, NormalizedEnsemble, ProcessedActivations, replay

# Columns of activations summarised at once: bounds temporaries for large batches.
STATS_CHUNK_ROWS = 16_384


def _conformed(table: str, columns: dict) -> pl.DataFrame:
    return TABLE_SCHEMAS[table].conform(pl.DataFrame(columns))


def split_label(label: str) -> tuple[str, int]:
    """`"layers.0.mlp.up:17"` -> `("layers.0.mlp.up", 17)`."""
    module, _, index = label.rpartition(":")
    return module, int(index)


def component_stats(
    experiment: str,
    member: str,
    activations: ProcessedActivations,
    *,
    dead_labels: Sequence[str],
    activation_threshold: float | None,
) -> pl.DataFrame:
    """Per component: how often it is active, its mean and max, and whether it was dropped as dead."""
    values = activations.activations
    n, c = values.shape
    active = torch.zeros(c, dtype=torch.int64)
    sums = torch.zeros(c, dtype=torch.float64)
    maxima = torch.full((c,), float("-inf"), dtype=torch.float64)
    cutoff = 0.0 if activation_threshold is None else activation_threshold
    for rows in values.split(STATS_CHUNK_ROWS):
        active += (rows > cutoff).sum(dim=0)
        sums += rows.sum(dim=0, dtype=torch.float64)
        maxima = torch.maximum(maxima, rows.amax(dim=0).double())
    return component_stats_table(
        experiment, member, activations.labels, activation_frequency=(active.double() / max(n, 1)).numpy(),
        mean_activation=(sums / max(n, 1)).numpy(), max_activation=maxima.numpy(), dead_labels=dead_labels,
    )


def component_stats_table(
    experiment: str,
    member: str,
    labels: Sequence[str],
    *,
    activation_frequency: np.ndarray,
    mean_activation: np.ndarray,
    max_activation: np.ndarray,
    dead_labels: Sequence[str],
) -> pl.DataFrame:
    """The `component_stats` rows of statistics already computed (e.g. while streaming a model's activations)."""
    modules, indices = zip(*(split_label(label) for label in labels)) if len(labels) else ((), ())
    dead = set(dead_labels)
    return _conformed("component_stats", {
            "experiment": experiment,
            "member": member,
            "label": list(labels),
            "module": list(modules),
            "component_index": list(indices),
            "activation_frequency": np.asarray(activation_frequency, dtype=np.float64),
            "mean_activation": np.asarray(mean_activation, dtype=np.float64),
            "max_activation": np.asarray(max_activation, dtype=np.float64),
            "dead": [label in dead for label in labels],
    })


def _optional(values: torch.Tensor | None, n: int, dtype: type) -> np.ndarray | list[None]:
    return values.numpy().astype(dtype) if values is not None else [None] * n


def merge_events(experiment: str, member: str, history: MergeHistory) -> pl.DataFrame:
    """One row per merge: the pair as sampled (pre-merge group ids), the group it became, k, cost and MDL after."""
    n = history.n_iters
    pairs = history.selected_pairs
    return _conformed("merge_events", {
            "experiment": experiment,
            "member": member,
            "iteration": np.arange(n, dtype=np.int32),
            "group_a": _optional(pairs[:, 0] if pairs is not None else None, n, np.int32),
            "group_b": _optional(pairs[:, 1] if pairs is not None else None, n, np.int32),
            "merged_group": _optional(pairs.min(dim=1).values if pairs is not None else None, n, np.int32),
            "k_groups": history.k_groups.numpy().astype(np.int32),
            "pair_cost": _optional(history.pair_costs, n, np.float64),
            "mdl_loss": _optional(history.mdl_losses, n, np.float64),
    })


def group_representatives(group_idxs: np.ndarray) -> np.ndarray:
    """`[n_iters, c]`: for each component, the index of the smallest member of its group at each iteration."""
    representatives = np.empty_like(group_idxs)
    for iteration, partition in enumerate(group_idxs):
        _, first_member = np.unique(partition, return_index=True)
        lookup = np.zeros(int(partition.max()) + 1, dtype=group_idxs.dtype) if partition.size else np.zeros(0, dtype=group_idxs.dtype)
        lookup[partition[first_member]] = first_member
        representatives[iteration] = lookup[partition]
    return representatives


def membership_spans(experiment: str, member: str, history: MergeHistory) -> pl.DataFrame:
    """Memberships, compactly: component `label` is in the group represented by `group_label` (its smallest
    member) for every iteration from `first_iteration` to `last_iteration` inclusive.

    A group keeps its representative until it merges with a group holding a smaller member, so a
    component has few spans and the table stays small; `memberships_at(...)` in DuckDB expands it.
    """
    labels = np.array(history.labels, dtype=object)
    if history.n_iters == 0:
        return TABLE_SCHEMAS["membership_spans"].empty()
    if history.is_merge_sequence:  # replayed: work in proportion to the rows
        components, representative, first, last = replay.representative_spans(
            history.merge_representatives(), history.c_components, history.n_iters)
        return _conformed("membership_spans", {
                "experiment": experiment,
                "member": member,
                "label": labels[components].tolist(),
                "group_label": labels[representative].tolist(),
                "first_iteration": first.astype(np.int32),
                "last_iteration": last.astype(np.int32),
        })
    group_idxs = history.group_idxs.numpy()
    representatives = group_representatives(group_idxs)
    starts = np.ones_like(representatives, dtype=bool)
    starts[1:] = representatives[1:] != representatives[:-1]
    ends = np.ones_like(starts)
    ends[:-1] = starts[1:]
    components, first = np.nonzero(starts.T)  # ordered by component, then iteration
    _, last = np.nonzero(ends.T)
    return _conformed("membership_spans", {
            "experiment": experiment,
            "member": member,
            "label": labels[components].tolist(),
            "group_label": labels[representatives[first, components]].tolist(),
            "first_iteration": first.astype(np.int32),
            "last_iteration": last.astype(np.int32),
    })


def ensemble_members(
    experiment: str,
    ensemble: NormalizedEnsemble,
    used: Sequence[str],
    expected: Sequence[str],
    histories: Mapping[str, MergeHistory],
) -> pl.DataFrame:
    """One row per expected member: whether it was used (and where), its size, and how much of the label union it covers."""
    coverage = ensemble.present.double().mean(dim=1).numpy()
    index_of = {member: position for position, member in enumerate(used)}
    rows = []
    for member in expected:
        position = index_of.get(member)
        history = histories.get(member)
        rows.append(
            {
                "experiment": experiment,
                "member": member,
                "ensemble_index": position,
                "status": "used" if position is not None else "missing",
                "n_components": history.c_components if history else None,
                "n_iters_completed": history.n_iters if history else None,
                "union_coverage": float(coverage[position]) if position is not None else None,
            }
        )
    return TABLE_SCHEMAS["ensemble_members"].conform(pl.DataFrame(rows, schema=TABLE_SCHEMAS["ensemble_members"].dtypes))


def distances_long(experiment: str, method: str, distances: torch.Tensor, members: Sequence[str]) -> pl.DataFrame:
    """`[n_iters, n_ens, n_ens]` as rows (iteration, member_a, member_b, distance), both orders, no diagonal."""
    values = distances.numpy()
    n_iters, n_ens, _ = values.shape
    iteration, a, b = np.nonzero(~np.eye(n_ens, dtype=bool)[None].repeat(n_iters, axis=0))
    names = np.array(members, dtype=object)
    return _conformed("distances", {
            "experiment": experiment,
            "method": method,
            "iteration": iteration.astype(np.int32),
            "member_a": names[a].tolist(),
            "member_b": names[b].tolist(),
            "distance": values[iteration, a, b].astype(np.int64),
    })


def consensus_components(experiment: str, consensus: ConsensusClusters) -> pl.DataFrame:
    """One row per component: its consensus cluster (null when in none) and the stabilities."""
    cluster_of = consensus.cluster_of
    clustered = cluster_of >= 0
    sizes = np.bincount(cluster_of[clustered], minlength=consensus.n_clusters)
    index = np.maximum(cluster_of, 0)
    n = len(consensus.labels)
    return _conformed("consensus_components", {
        "experiment": [experiment] * n,
        "iteration": [consensus.iteration] * n,
        "threshold": [consensus.threshold] * n,
        "rule": [consensus.rule] * n,
        "label": consensus.labels,
        "module": [split_label(label)[0] for label in consensus.labels],
        "cluster": [int(c) if c >= 0 else None for c in cluster_of],
        "cluster_size": [int(sizes[c]) if c >= 0 else None for c in cluster_of],
        "cluster_stability": [float(consensus.stability[i]) if ok else None for i, ok in zip(index, clustered)],
        "component_stability": [float(v) if ok else None for v, ok in zip(consensus.component_stability, clustered)],
    })


def experiment_row(config: ExperimentConfig, registered_at: datetime) -> pl.DataFrame:
    """The experiment's row of the `experiments` table: its config with every default filled in."""
    return _conformed("experiments", {
        "experiment": [config.name],
        "config_hash": [config.config_hash],
        "config_json": [config.canonical_json],
        "source_kind": [config.source.kind],
        "n_members": [config.source.n_members],
        "alpha": [config.merge_config.alpha],
        "activation_threshold": [config.merge_config.activation_threshold],
        "iters": [config.merge_config.iters],
        "sampler": [config.merge_config.merge_pair_sampling_method],
        "base_seed": [config.base_seed],
        "registered_at": [registered_at],
    })
