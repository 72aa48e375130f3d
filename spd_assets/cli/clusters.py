"""The component-label -> cluster mapping at an iteration, from stored results, as researchers exchange it."""

from __future__ import annotations

from spd_assets.errors import StorageError, UsageError
from spd_assets.storage.store import ResultsStore
from spd_assets.storage.values import VALUE_FORMATS, MemberEnsemble, load_ensemble, load_history
from spd_math import MergeHistory
from spd_math.consensus import Clusters, consensus_clusters, partition_clusters


def _check_iteration(iteration: int, n_iters: int, what: str) -> None:
    if not 0 <= iteration < n_iters:
        raise UsageError(f"--iteration: expected 0..{n_iters - 1} ({what} has {n_iters} iterations), got {iteration}")


def _as_mapping(labels: list[str], clusters: Clusters) -> dict[str, int | None]:
    return {label: (int(cluster) if cluster >= 0 else None) for label, cluster in zip(labels, clusters.cluster_of)}


def member_clusters(store: ResultsStore, experiment: str, member: str, iteration: int) -> dict:
    path = store.value_path(experiment, "merge_history", member, VALUE_FORMATS[MergeHistory].suffix)
    if not path.exists():
        stored = sorted(p.stem for p in path.parent.glob("*.zip")) if path.parent.is_dir() else []
        raise StorageError(f"no merge history of member {member!r} in experiment {experiment!r}; materialized members: {stored or 'none'}")
    history = load_history(path)
    _check_iteration(iteration, history.n_iters, f"member {member!r}")
    clusters = partition_clusters(history.group_idxs[iteration])
    return {
        "experiment": experiment,
        "iteration": iteration,
        "member": member,
        "consensus": False,
        "k_groups": int(history.k_groups[iteration]),
        "n_clusters": int(clusters.stability.size),
        "clusters": _as_mapping(history.labels, clusters),
    }


def ensemble_clusters(store: ResultsStore, experiment: str, iteration: int, threshold: float = 0.5) -> dict:
    path = store.value_path(experiment, "normalized_ensemble", None, VALUE_FORMATS[MemberEnsemble].suffix)
    if not path.exists():
        raise StorageError(f"experiment {experiment!r} has no normalized ensemble yet ({path}); materialize it first")
    stored = load_ensemble(path)
    _check_iteration(iteration, stored.ensemble.n_iters, "the ensemble")
    clusters = consensus_clusters(stored.ensemble.merges[:, iteration, :], threshold=threshold)
    return {
        "experiment": experiment,
        "iteration": iteration,
        "member": None,
        "consensus": True,
        "members": stored.members,
        "threshold": threshold,
        "n_clusters": int(clusters.stability.size),
        "clusters": _as_mapping(stored.ensemble.labels, clusters),
        "stability": {str(cluster): round(float(value), 6) for cluster, value in enumerate(clusters.stability)},
    }
