"""The component-label -> cluster mapping at an iteration, from stored results, as researchers exchange it.

Answers come from the result tables through DuckDB (no torch, no Dagster), on the same read-only
connection as `spd-cluster sql` (`storage.database.connect_read_only`): a member's clusters
from its `membership_spans` file, the consensus from the `consensus_components` table the
`consensus_clusters` asset wrote. Only a consensus at another iteration or threshold than the
stored one is computed here, from the stored normalized ensemble.
"""

from __future__ import annotations

import math

import duckdb

from spd_assets.errors import StorageError, UsageError
from spd_assets.storage.database import connect_read_only, quoted_path
from spd_assets.storage.store import ResultsStore, require_experiment


def _check_iteration(iteration: int, n_iters: int, what: str) -> None:
    if not 0 <= iteration < n_iters:
        raise UsageError(f"--iteration: expected 0..{n_iters - 1} ({what} has {n_iters} iterations), got {iteration}")


def _stored_parts(store: ResultsStore, table: str, experiment: str) -> list[str]:
    prefix = f"{experiment}__"
    directory = store.table_dir(table)
    return sorted(p.stem.removeprefix(prefix) for p in directory.glob(f"{prefix}*.parquet")) if directory.is_dir() else []


def _rows(connection: duckdb.DuckDBPyConnection, query: str, parameters: list | None = None) -> list[tuple]:
    return connection.execute(query, parameters or []).fetchall()


def member_clusters(store: ResultsStore, experiment: str, member: str, iteration: int) -> dict:
    """One member's groups at `iteration`; groups of one component are no cluster (null), the others are numbered
    0, 1, ... in order of their first component (the history's component order)."""
    require_experiment(store, experiment)
    path = store.table_file("membership_spans", experiment, member)
    if not path.exists():
        stored = _stored_parts(store, "membership_spans", experiment)
        raise StorageError(f"no merge history of member {member!r} in experiment {experiment!r}; "
                           f"materialized members: {stored or 'none'}")
    source = f"read_parquet('{quoted_path(path)}', file_row_number = true)"
    with connect_read_only(store) as connection:
        n_iters = _rows(connection, f"SELECT coalesce(max(last_iteration) + 1, 0) FROM {source}")[0][0]
        _check_iteration(iteration, n_iters, f"member {member!r}")
        # The spans are written in component order, so row order at one iteration is the history's label order.
        rows = _rows(connection, f"SELECT label, group_label FROM {source} "
                                 "WHERE first_iteration <= $1 AND $1 <= last_iteration ORDER BY file_row_number",
                     [iteration])
    sizes: dict[str, int] = {}
    for _, group in rows:
        sizes[group] = sizes.get(group, 0) + 1
    numbers: dict[str, int] = {}
    clusters = {}
    for label, group in rows:
        if sizes[group] > 1 and group not in numbers:
            numbers[group] = len(numbers)
        clusters[label] = numbers.get(group)
    return {
        "experiment": experiment,
        "iteration": iteration,
        "member": member,
        "consensus": False,
        "k_groups": len(sizes),
        "n_clusters": len(numbers),
        "clusters": clusters,
    }


def _ensemble_members(connection: duckdb.DuckDBPyConnection, store: ResultsStore, experiment: str) -> list[str]:
    path = store.table_file("ensemble_members", experiment)
    if not path.exists():
        return []
    return [row[0] for row in _rows(connection, f"SELECT member FROM read_parquet('{quoted_path(path)}') WHERE status = 'used' "
                                    "ORDER BY ensemble_index")]


def _finite(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else round(float(value), 6)


def ensemble_clusters(store: ResultsStore, experiment: str, iteration: int | None = None,
                      threshold: float | None = None) -> dict:
    """The consensus clusters: as stored by the `consensus_clusters` asset, or, at another iteration or threshold,
    computed from the stored normalized ensemble (at the stored iteration when only the threshold is given)."""
    require_experiment(store, experiment)
    path = store.table_file("consensus_components", experiment)
    if path.exists():
        with connect_read_only(store) as connection:
            stored = _rows(connection, f"SELECT iteration, threshold, rule FROM read_parquet('{quoted_path(path)}') LIMIT 1")
            if stored and iteration in (None, stored[0][0]) and threshold in (None, stored[0][1]):
                stored_iteration, stored_threshold, rule = stored[0]
                rows = _rows(connection, "SELECT label, cluster, cluster_stability, component_stability "
                                         f"FROM read_parquet('{quoted_path(path)}') ORDER BY label")
                labels = [row[0] for row in rows]
                cluster_stability = {row[1]: row[2] for row in rows if row[1] is not None}
                return _report(experiment, stored_iteration, stored_threshold, rule,
                               _ensemble_members(connection, store, experiment), labels, [row[1] for row in rows],
                               [cluster_stability[c] for c in sorted(cluster_stability)], [row[3] for row in rows],
                               stored=True)
            if stored and iteration is None:
                # Another threshold alone: the stored consensus's iteration, chosen by its rule.
                iteration, stored_rule = stored[0][0], stored[0][2]
                return _computed(store, experiment, iteration, threshold, stored_rule)
    if iteration is None:
        raise StorageError(f"experiment {experiment!r} has no stored consensus clusters ({path}); materialize "
                           "consensus_clusters, or give --iteration to compute them from the normalized ensemble")
    return _computed(store, experiment, iteration, 0.5 if threshold is None else threshold, f"--iteration {iteration}")


def _computed(store: ResultsStore, experiment: str, iteration: int, threshold: float, rule: str) -> dict:
    # Only here are the stored ensemble and the math needed (and with them torch).
    from spd_assets.analysis.consensus import component_stability
    from spd_assets.storage.values import VALUE_FORMATS, MemberEnsemble, load_ensemble
    from spd_math.consensus import consensus_clusters

    path = store.value_path(experiment, "normalized_ensemble", None, VALUE_FORMATS[MemberEnsemble].suffix)
    if not path.exists():
        raise StorageError(f"experiment {experiment!r} has no normalized ensemble yet ({path}); materialize it first")
    stored = load_ensemble(path)
    _check_iteration(iteration, stored.ensemble.n_iters, "the ensemble")
    partitions = stored.ensemble.partitions_at(iteration)
    clusters = consensus_clusters(partitions, threshold=threshold)
    by_component = component_stability(partitions, clusters.cluster_of)
    return _report(experiment, iteration, threshold, rule, stored.members, stored.ensemble.labels,
                   [int(c) if c >= 0 else None for c in clusters.cluster_of], clusters.stability.tolist(),
                   by_component.tolist(), stored=False)


def _report(experiment: str, iteration: int, threshold: float, rule: str, members: list[str], labels: list[str],
            cluster_of: list[int | None], stability: list[float], component_stability: list[float | None],
            *, stored: bool) -> dict:
    return {
        "experiment": experiment,
        "iteration": iteration,
        "member": None,
        "consensus": True,
        "stored": stored,
        "rule": rule,
        "members": members,
        "threshold": threshold,
        "n_clusters": len(stability),
        "clusters": dict(zip(labels, cluster_of)),
        "stability": {str(cluster): _finite(value) for cluster, value in enumerate(stability)},
        "component_stability": {label: _finite(value) for label, value in zip(labels, component_stability)
                                if value is not None and math.isfinite(value)},
    }
