"""Asset checks: what must hold of each value, evaluated right after it is computed."""

from __future__ import annotations

import numpy as np
import torch
from dagster import AssetCheckResult, AssetCheckSeverity, MetadataValue

from spd_assets.storage.values import MemberEnsemble
from spd_math import MergeHistory, adjusted_rand_index

# ARI at the planted number of groups below which the planted-truth check fails.
PLANTED_ARI_MINIMUM = 0.9


def partition_sizes(history: MergeHistory) -> AssetCheckResult:
    """The partition after iteration i has c - i - 1 groups.

    A history kept as merges has them when every merge joins two different groups of those before it (what
    replaying it checks); partitions given as they are are counted."""
    c = history.c_components
    expected = c - 1 - np.arange(history.n_iters)
    if history.is_merge_sequence:
        history.merge_representatives()  # raises for a merge that is not two different groups
        counts = expected
    else:
        counts = np.array([len(np.unique(row)) for row in history.partitions_between()], dtype=np.int64)
    wrong = np.flatnonzero(counts != expected)
    return AssetCheckResult(
        check_name="partition_sizes",
        passed=wrong.size == 0,
        metadata={"first_wrong_iteration": int(wrong[0]) if wrong.size else -1, "iterations": history.n_iters},
        description="the partition after iteration i has c - i - 1 groups",
    )


def planted_truth_recovered(history: MergeHistory, truth: np.ndarray) -> AssetCheckResult:
    """At the planted number of groups, the partition matches the planted truth (adjusted Rand index)."""
    planted_k = len(np.unique(truth))
    reached = np.flatnonzero(history.k_groups.numpy() == planted_k)
    if reached.size == 0:
        return AssetCheckResult(
            check_name="planted_truth_recovered",
            passed=False,
            severity=AssetCheckSeverity.WARN,
            description=f"the merge stopped at k={int(history.k_groups[-1])} before the planted k={planted_k}; "
            "raise merge_config.iters (or set it to null) to check recovery",
        )
    iteration = int(reached[0])
    ari = adjusted_rand_index(history.partition_at(iteration), truth)
    return AssetCheckResult(
        check_name="planted_truth_recovered",
        passed=ari >= PLANTED_ARI_MINIMUM,
        severity=AssetCheckSeverity.WARN,
        metadata={"adjusted_rand_index": float(ari), "planted_k": planted_k, "iteration": iteration},
        description=f"adjusted Rand index of the partition at the planted k against the planted truth (>= {PLANTED_ARI_MINIMUM})",
    )


def mdl_minimum_inside_the_merge(warning: str | None) -> AssetCheckResult:
    """The consensus iteration chosen by the MDL-minimum rule is a minimum, not where the members stopped merging."""
    return AssetCheckResult(
        check_name="mdl_minimum_inside_the_merge",
        passed=warning is None,
        severity=AssetCheckSeverity.WARN,
        description=warning or "the members' MDL minima lie inside their merges (or another rule chose the iteration)",
    )


def every_component_assigned(ensemble: MemberEnsemble) -> AssetCheckResult:
    """Every component of every member has a group at every iteration (no -1)."""
    aligned = ensemble.ensemble
    if aligned.is_compact:  # each member's own components on distinct labels; its missing labels get singletons
        unassigned = sum(aligned.n_iters * (columns.size - np.unique(columns).size) for columns in aligned.member_columns)
    else:
        unassigned = int((aligned.merges < 0).sum())
    return AssetCheckResult(check_name="every_component_assigned", passed=unassigned == 0,
                            metadata={"unassigned_entries": unassigned},
                            description=f"{unassigned:,} (member, iteration, component) entries have no group"
                            if unassigned else None)


def all_members_present(ensemble: MemberEnsemble) -> AssetCheckResult:
    """Every configured member contributed a history (WARN: the ensemble is built without the missing)."""
    return AssetCheckResult(
        check_name="all_members_present",
        passed=not ensemble.missing,
        severity=AssetCheckSeverity.WARN,
        metadata={"missing_members": MetadataValue.json(ensemble.missing)},
        description=f"the ensemble was built without {', '.join(ensemble.missing)} (no merge history stored)"
        if ensemble.missing else None,
    )


def symmetric_with_zero_diagonal(by_method: dict[str, torch.Tensor]) -> AssetCheckResult:
    """Each method's distance matrices are symmetric with a zero diagonal."""
    problems = []
    for method, values in by_method.items():
        if not bool((values == values.transpose(1, 2)).all()):
            problems.append(f"{method}: not symmetric")
        if bool(values.diagonal(dim1=1, dim2=2).any()):
            problems.append(f"{method}: nonzero diagonal")
    return AssetCheckResult(check_name="symmetric_with_zero_diagonal", passed=not problems,
                            metadata={"problems": MetadataValue.json(problems)}, description="; ".join(problems) or None)
