"""The asset graph of one experiment: activations -> merge histories -> normalized ensemble -> distances.

Assets are built per experiment by `experiment_assets`, keyed `[experiment, asset]` and
grouped by experiment, so several experiments (an alpha sweep, say) live side by side in
one Dagster instance. Bodies are thin: the math is `spd_math`, the tables are `tables`,
data versions and lineage rows are `lineage`.
"""

import time
from collections.abc import Iterator

import numpy as np
import polars as pl
import torch
from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetIn,
    AssetKey,
    AssetsDefinition,
    DataVersion,
    Failure,
    MetadataValue,
    Output,
    RetryRequested,
    StaticPartitionsDefinition,
    asset,
)

from spd_assets import tables
from spd_assets.config import ExperimentConfig
from spd_assets.database import ensure_database
from spd_assets.deployment import DEVICE_POOL
from spd_assets.io_manager import asset_path
from spd_assets.lineage import Consumed, fingerprint, record_materialization
from spd_assets.resources import ActivationSource, DevicePool
from spd_assets.storage import EnsembleDistances, MemberEnsemble, write_table
from spd_math import (
    MergeHistory,
    ProcessedActivations,
    adjusted_rand_index,
    compute_distances,
    drop_dead,
    merge_iteration,
    normalize_ensemble,
    process_activations,
)

IO_MANAGER_KEY = "spd_results"
DEVICE_POOL_KEY = "device_pool"
# Bump when a change to an asset's code changes its results (Dagster marks downstream stale).
CODE_VERSION = "1"
OUT_OF_MEMORY_RETRIES = 3
OUT_OF_MEMORY_WAIT_S = 30
# ARI at the planted number of groups below which the planted-truth check fails.
PLANTED_ARI_MINIMUM = 0.9


def source_resource_key(experiment: str) -> str:
    return f"activation_source__{experiment}"


def _markdown_table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _partition_sizes_check(history: MergeHistory) -> AssetCheckResult:
    c = history.c_components
    counts = np.array([len(np.unique(row)) for row in history.group_idxs.numpy()])
    expected = c - 1 - np.arange(history.n_iters)
    wrong = np.flatnonzero(counts != expected)
    return AssetCheckResult(
        check_name="partition_sizes",
        passed=wrong.size == 0,
        metadata={"first_wrong_iteration": int(wrong[0]) if wrong.size else -1, "iterations": history.n_iters},
        description="the partition after iteration i has c - i - 1 groups",
    )


def _planted_truth_check(history: MergeHistory, truth: np.ndarray) -> AssetCheckResult:
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
    ari = adjusted_rand_index(history.group_idxs[iteration].numpy(), truth)
    return AssetCheckResult(
        check_name="planted_truth_recovered",
        passed=ari >= PLANTED_ARI_MINIMUM,
        severity=AssetCheckSeverity.WARN,
        metadata={"adjusted_rand_index": float(ari), "planted_k": planted_k, "iteration": iteration},
        description=f"adjusted Rand index of the partition at the planted k against the planted truth (>= {PLANTED_ARI_MINIMUM})",
    )


def _symmetry_check(by_method: dict) -> AssetCheckResult:
    problems = []
    for method, values in by_method.items():
        if not bool((values == values.transpose(1, 2)).all()):
            problems.append(f"{method}: not symmetric")
        if bool(values.diagonal(dim1=1, dim2=2).any()):
            problems.append(f"{method}: nonzero diagonal")
    return AssetCheckResult(check_name="symmetric_with_zero_diagonal", passed=not problems, metadata={"problems": MetadataValue.json(problems)})


def experiment_assets(
    config: ExperimentConfig, members: list[str], *, device_op_tags: dict | None = None
) -> list[AssetsDefinition]:
    """The assets (with their checks) of one experiment whose ensemble members are `members` (partition keys).

    Steps that compute on a device (the merge) lease one from the device pool and belong to the
    Dagster concurrency pool `DEVICE_POOL`; `device_op_tags` go on those steps (e.g. Kubernetes GPU limits).
    """
    name = config.name
    merge_config = config.merge
    partitions = StaticPartitionsDefinition(members)
    source_key = source_resource_key(name)
    activations_key = AssetKey([name, "component_activations"])
    history_key = AssetKey([name, "merge_history"])
    ensemble_key = AssetKey([name, "normalized_ensemble"])
    distances_key = AssetKey([name, "distance_matrices"])
    common = {"group_name": name, "io_manager_key": IO_MANAGER_KEY, "code_version": CODE_VERSION}
    seed_of = config.member_seed

    def materialize(context: AssetExecutionContext, asset_name: str, value, metadata: dict, consumed: list[Consumed]) -> Iterator:
        """Yield the output with its content fingerprint as data version, then record its lineage rows."""
        partition = context.partition_key if context.has_partition_key else None
        version = fingerprint(value)
        yield Output(value, metadata=metadata, data_version=DataVersion(version))
        # Only now: the IO manager has stored the value and Dagster has logged the materialization.
        ensure_database()  # views over the tables, for instances whose first run did not come from the CLI
        record_materialization(
            experiment=name, asset=asset_name, partition=partition, run_id=context.run.run_id,
            step_key=context.get_step_execution_context().step.key, code_version=CODE_VERSION, data_version=version,
            config_hash=config.config_hash, storage_path=str(asset_path(name, asset_name, partition)),
            metadata=metadata, consumed=consumed,
        )

    @asset(
        key=activations_key,
        partitions_def=partitions,
        required_resource_keys={source_key},
        kinds={"torch"},
        description="One member's causal importances, processed (seq mode, module filter, dead filter); "
        "per-component stats go to the component_stats table.",
        **common,
    )
    def component_activations(context: AssetExecutionContext) -> Iterator:
        source: ActivationSource = getattr(context.resources, source_key)
        member = context.partition_key
        seed = seed_of(member)
        mapping = source.load_batch(member, seed)
        every_component = process_activations(
            mapping, filter_dead_threshold=0.0, seq_mode=config.seq_mode, module_filter=merge_config.module_name_filter
        )
        processed = drop_dead(every_component, merge_config.filter_dead_threshold)
        stats = tables.component_stats(
            name, member, every_component, dead_labels=processed.dead_labels,
            activation_threshold=merge_config.activation_threshold,
        )
        table_path = write_table(stats, "component_stats", name, member)
        live = stats.filter(~stats["dead"])
        top = live.sort("activation_frequency", descending=True).head(10)
        metadata = {
            "samples": processed.n_samples,
            "components": processed.n_components,
            "dead_components": len(processed.dead_labels),
            "modules": len(mapping),
            "mean_activation_frequency": float(live["activation_frequency"].mean() or 0.0),
            "seed": seed,
            "stats_table": MetadataValue.path(str(table_path)),
            "most_active": MetadataValue.md(
                _markdown_table(["label", "frequency", "max"],
                                [[r["label"], f"{r['activation_frequency']:.4f}", f"{r['max_activation']:.3f}"] for r in top.iter_rows(named=True)])
            ),
        }
        batch = Consumed(f"source:{config.source.kind}", member, fingerprint(dict(mapping)))
        yield from materialize(context, "component_activations", processed, metadata, [batch])

    history_checks = [AssetCheckSpec("partition_sizes", asset=history_key)]
    synthetic = config.source.kind == "synthetic"
    if synthetic:
        history_checks.append(AssetCheckSpec("planted_truth_recovered", asset=history_key))

    @asset(
        key=history_key,
        partitions_def=partitions,
        ins={"activations": AssetIn(key=activations_key)},
        required_resource_keys={source_key, DEVICE_POOL_KEY},
        check_specs=history_checks,
        pool=DEVICE_POOL,
        op_tags=device_op_tags,
        kinds={"torch"},
        description="The greedy MDL merge of one member (spd_math.merge_iteration), stored in the original zip format; "
        "merge events and memberships go to the merge_events and membership_spans tables.",
        **common,
    )
    def merge_history(context: AssetExecutionContext, activations: ProcessedActivations) -> Iterator:
        member = context.partition_key
        seed = seed_of(member)
        pool: DevicePool = getattr(context.resources, DEVICE_POOL_KEY)
        with pool.lease(context) as lease:
            context.log.info(f"leased {lease.device} after waiting {lease.waited_s:.1f} s")
            started = time.perf_counter()
            try:
                history = merge_iteration(activations, merge_config, seed=seed, device=lease.torch_device)
            except torch.cuda.OutOfMemoryError as error:
                # Transient: another process may hold the memory. Retry; the next lease prefers the freest GPU.
                raise RetryRequested(max_retries=OUT_OF_MEMORY_RETRIES, seconds_to_wait=OUT_OF_MEMORY_WAIT_S) from RuntimeError(
                    f"CUDA out of memory on {lease.device} merging {activations.n_samples} samples x "
                    f"{activations.n_components} components: {error}"
                )
            seconds = time.perf_counter() - started
        context.log.info(f"merged {history.c_components} components over {history.n_iters} iterations "
                         f"in {seconds:.2f} s on {lease.device}")
        write_table(tables.merge_events(name, member, history), "merge_events", name, member)
        write_table(tables.membership_spans(name, member, history), "membership_spans", name, member)
        mdl = history.mdl_losses.numpy()
        best = int(np.argmin(mdl)) if mdl.size else -1
        metadata = {
            "iterations": history.n_iters,
            "components": history.c_components,
            "final_k": int(history.k_groups[-1]) if history.n_iters else history.c_components,
            "mdl_start": float(mdl[0]) if mdl.size else float("nan"),
            "mdl_end": float(mdl[-1]) if mdl.size else float("nan"),
            "mdl_min": float(mdl[best]) if mdl.size else float("nan"),
            "k_at_mdl_min": int(history.k_groups[best]) if mdl.size else -1,
            "seconds": round(seconds, 3),
            "device": lease.device,
            "device_wait_seconds": round(lease.waited_s, 3),
            "seed": seed,
        }
        consumed = [Consumed("component_activations", member, fingerprint(activations))]
        yield from materialize(context, "merge_history", history, metadata, consumed)
        yield _partition_sizes_check(history)
        if synthetic:
            source: ActivationSource = getattr(context.resources, source_key)
            yield _planted_truth_check(history, source.planted_partition(history.labels))

    @asset(
        key=ensemble_key,
        ins={"histories": AssetIn(key=history_key)},
        check_specs=[
            AssetCheckSpec("every_component_assigned", asset=ensemble_key, description="no -1 left in any member's partitions"),
            AssetCheckSpec("all_members_present", asset=ensemble_key, description="every configured member contributed a history"),
        ],
        kinds={"torch"},
        description="All member histories aligned on the union of labels (MATH.md §8); members whose history is "
        "missing are listed, not fatal.",
        **common,
    )
    def normalized_ensemble(context: AssetExecutionContext, histories: dict[str, MergeHistory]) -> Iterator:
        used = [member for member in members if member in histories]
        missing = [member for member in members if member not in histories]
        if not used:
            raise Failure(
                description=f"no merge_history partition of {name} is materialized; expected members {members}. "
                "Materialize merge_history first."
            )
        if missing:
            context.log.warning(f"{len(missing)} of {len(members)} members have no merge history and are left out: {missing}")
        ensemble = normalize_ensemble([histories[member] for member in used])
        members_table = tables.ensemble_members(name, ensemble, used, members, histories)
        write_table(members_table, "ensemble_members", name)
        metadata = {
            "members": len(used),
            "missing_members": MetadataValue.json(missing),
            "union_components": len(ensemble.labels),
            "iterations_used": ensemble.n_iters,
            "member_overlap": MetadataValue.md(
                _markdown_table(
                    ["member", "components", "iterations", "share of union"],
                    [[row["member"], row["n_components"], row["n_iters_completed"], f"{row['union_coverage']:.3f}"]
                     for row in members_table.filter(pl.col("status") == "used").iter_rows(named=True)],
                )
            ),
        }
        consumed = [Consumed("merge_history", member, fingerprint(histories[member])) for member in used]
        yield from materialize(context, "normalized_ensemble", MemberEnsemble(ensemble, used, missing), metadata, consumed)
        unassigned = int((ensemble.merges < 0).sum())
        yield AssetCheckResult(check_name="every_component_assigned", passed=unassigned == 0, metadata={"unassigned_entries": unassigned})
        yield AssetCheckResult(
            check_name="all_members_present",
            passed=not missing,
            severity=AssetCheckSeverity.WARN,
            metadata={"missing_members": MetadataValue.json(missing)},
        )

    @asset(
        key=distances_key,
        ins={"ensemble": AssetIn(key=ensemble_key)},
        check_specs=[
            AssetCheckSpec("symmetric_with_zero_diagonal", asset=distances_key, description="every distance matrix is symmetric with a zero diagonal"),
        ],
        kinds={"torch"},
        description="Distances between every pair of members' partitions at every iteration, one matrix per "
        "configured method; long form in the distances table.",
        **common,
    )
    def distance_matrices(context: AssetExecutionContext, ensemble: MemberEnsemble) -> Iterator:
        by_method = {}
        summary = {}
        frames = []
        for method in config.distance_methods:
            started = time.perf_counter()
            distances = compute_distances(ensemble.ensemble, method)
            context.log.info(f"{method}: {distances.shape[0]} iterations in {time.perf_counter() - started:.2f} s")
            by_method[method] = distances
            frames.append(tables.distances_long(name, method, distances, ensemble.members))
            n_iters, n_ens, _ = distances.shape
            off_diagonal = ~np.eye(n_ens, dtype=bool)
            for where, iteration in (("first", 0), ("middle", n_iters // 2), ("last", n_iters - 1)):
                if n_iters and n_ens > 1:
                    summary[f"{method}_mean_{where}"] = round(float(distances[iteration].numpy()[off_diagonal].mean()), 3)
        write_table(pl.concat(frames), "distances", name)
        metadata = {"members": len(ensemble.members), "iterations": ensemble.ensemble.n_iters, **summary}
        consumed = [Consumed("normalized_ensemble", None, fingerprint(ensemble))]
        yield from materialize(context, "distance_matrices", EnsembleDistances(by_method, ensemble.members), metadata, consumed)
        yield _symmetry_check(by_method)

    return [component_activations, merge_history, normalized_ensemble, distance_matrices]
