"""Consensus clusters of an ensemble at one iteration, with each cluster's and each component's stability.

Which iteration: `ConsensusConfig.iteration` when set; else where the members have `k` groups
(each member's iteration for k, the median over members); else the median over members of the
iteration at which each member's MDL loss is lowest. A median of an even number of members is
the lower middle value, so the chosen iteration is always one some member chose.

Clusters come from `spd_math.consensus_clusters` (components together in at least `threshold`
of the members, connected components of that graph). A component's stability is its mean
co-association with the other components of its cluster: the fraction of members in which it
shares a group with each of them, averaged. The mean of a cluster's component stabilities is
the cluster's stability.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import scipy.sparse

from spd_assets.config import ConsensusConfig
from spd_assets.errors import ConsensusError
from spd_assets.storage.values import ConsensusClusters, MemberEnsemble
from spd_math import MergeHistory, co_association_counts, consensus_clusters

# A minimum this close to a member's last iteration (a fraction of its iterations, at least this many) is where the
# merge stopped rather than a minimum.
BOUNDARY_FRACTION = 0.01
BOUNDARY_MIN_ITERATIONS = 2


def lower_median(values: Sequence[int]) -> int:
    """The median of integers; of an even count, the lower of the two middle values."""
    ordered = sorted(values)
    return int(ordered[(len(ordered) - 1) // 2])


def member_choices(config: ConsensusConfig, histories: Sequence[MergeHistory], members: Sequence[str]) -> tuple[str, list[int]]:
    """The rule in words and the iteration each member would choose by it (empty for a fixed iteration)."""
    if config.iteration is not None:
        return f"configured iteration {config.iteration}", []
    if config.k is not None:
        return f"median over members of the iteration with k={config.k} groups", [
            history.c_components - config.k - 1 for history in histories]
    without = [member for member, history in zip(members, histories) if history.mdl_losses is None]
    if without:
        raise ConsensusError(
            f"members {without} have no MDL losses in their merge histories (read from files without them), so the "
            "MDL-minimum rule cannot choose the consensus iteration; set consensus.iteration or consensus.k")
    return "median over members of each member's MDL-loss minimum", [
        int(np.argmin(history.mdl_losses.numpy())) for history in histories]


def minima_at_last_iteration(histories: Sequence[MergeHistory], members: Sequence[str]) -> list[str]:
    """Members whose MDL loss is lowest at (or within `BOUNDARY_FRACTION` of) their last iteration although they
    could have merged further (more than three groups left): their curve was still falling when `merge_config.iters`
    stopped them, so their "minimum" is only where they stopped (the last steps of a falling curve are noisy)."""
    stopped = []
    for member, history in zip(members, histories):
        if history.mdl_losses is None or history.n_iters == 0 or int(history.k_groups[-1]) <= 3:
            continue
        window = max(BOUNDARY_MIN_ITERATIONS, math.ceil(BOUNDARY_FRACTION * history.n_iters))
        if int(np.argmin(history.mdl_losses.numpy())) >= history.n_iters - window:
            stopped.append(member)
    return stopped


def boundary_warning(config: ConsensusConfig, histories: Sequence[MergeHistory], members: Sequence[str]) -> str | None:
    """Why the MDL-minimum rule's iteration cannot be trusted, and what to change; None when it can (or another rule
    chose the iteration). It cannot when at least half the members' minima are only where they stopped merging:
    the median then lies at that boundary."""
    if config.iteration is not None or config.k is not None:
        return None
    stopped = minima_at_last_iteration(histories, members)
    if not stopped or 2 * len(stopped) < len(members):
        return None
    return (f"the MDL loss of {len(stopped)} of {len(members)} members is lowest at or just before their last iteration "
            f"({', '.join(stopped[:4])}{', ...' if len(stopped) > 4 else ''}), so the consensus iteration is where the "
            "merge stopped, not a minimum: raise merge_config.iters (or set it to null to merge until 3 groups), "
            "or choose the iteration with consensus.k or consensus.iteration")


def choose_iteration(config: ConsensusConfig, histories: Sequence[MergeHistory], members: Sequence[str],
                     n_iters: int) -> tuple[int, str, list[int]]:
    """The consensus iteration, the rule that chose it (in words) and each member's choice."""
    if n_iters == 0:
        raise ConsensusError("the ensemble has no iterations (a member completed none), so there is nothing to take "
                             "a consensus of")
    rule, choices = member_choices(config, histories, members)
    wanted = config.iteration if config.iteration is not None else lower_median(choices)
    if not 0 <= wanted < n_iters:
        raise ConsensusError(f"consensus: the {rule} is iteration {wanted}, but the ensemble has iterations 0.."
                             f"{n_iters - 1}; set consensus.iteration or consensus.k within that range")
    return wanted, rule, choices


def component_stability(partitions: np.ndarray, cluster_of: np.ndarray) -> np.ndarray:
    """Per item: mean co-association with the other items of its cluster (NaN for items in no cluster)."""
    n_members = partitions.shape[0]
    upper = scipy.sparse.triu(co_association_counts(partitions), k=1).tocoo()
    rows, cols, together = upper.row, upper.col, upper.data.astype(np.float64)
    inside = (cluster_of[rows] == cluster_of[cols]) & (cluster_of[rows] >= 0)
    c = cluster_of.size
    summed = (np.bincount(rows[inside], weights=together[inside], minlength=c)
              + np.bincount(cols[inside], weights=together[inside], minlength=c))
    sizes = np.bincount(cluster_of[cluster_of >= 0], minlength=int(cluster_of.max(initial=-1)) + 2)
    others = np.where(cluster_of >= 0, sizes[np.maximum(cluster_of, 0)] - 1, 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(cluster_of >= 0, summed / (np.maximum(others, 1) * n_members), np.nan)


def co_association(partitions: np.ndarray, items: np.ndarray) -> np.ndarray:
    """`[len(items), len(items)]` dense: the fraction of members in which two of `items` share a group."""
    chosen = partitions[:, items]
    return (chosen[:, :, None] == chosen[:, None, :]).mean(axis=0)


def ensemble_consensus(stored: MemberEnsemble, histories: Sequence[MergeHistory], config: ConsensusConfig) -> ConsensusClusters:
    """The consensus clusters of `stored` at the iteration `config` chooses (`histories` in ensemble order)."""
    ensemble = stored.ensemble
    iteration, rule, choices = choose_iteration(config, histories, stored.members, ensemble.n_iters)
    partitions = ensemble.partitions_at(iteration)
    clusters = consensus_clusters(partitions, threshold=config.threshold)
    return ConsensusClusters(
        iteration=iteration,
        rule=rule,
        threshold=config.threshold,
        members=list(stored.members),
        member_iterations=choices,
        labels=list(ensemble.labels),
        cluster_of=clusters.cluster_of.astype(np.int64),
        stability=clusters.stability.astype(np.float64),
        component_stability=component_stability(partitions, clusters.cluster_of),
    )
