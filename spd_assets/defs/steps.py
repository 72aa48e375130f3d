"""What each asset computes, as plain functions of plain values: no Dagster here, so tests call them directly.

Each step returns a `StepResult`: the asset's value, the rows of the result tables it feeds,
metadata a researcher reads in the UI, and the inputs it consumed from outside the asset graph
(a source's batch). The Dagster assets (`assets`) are thin wrappers around these.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from spd_assets.analysis import explorer, plots
from spd_assets.analysis.consensus import boundary_warning, co_association, ensemble_consensus
from spd_assets.analysis.contexts import cluster_contexts
from spd_assets.config import ExperimentConfig
from spd_assets.config.sources import DEFAULT_MEMORY_BUDGET_GB
from spd_assets.errors import NoMembersError, SpdClusterError
from spd_assets.sources import ActivationSource, ModelSource
from spd_assets.sources.model_source import BYTES_PER_GB
from spd_assets.sources.streaming import activations_from_chunks, batch_activations
from spd_assets.storage import original_export, tables
from spd_assets.storage.checkpoints import CheckpointKey, MemberCheckpoints, checkpoint_path
from spd_assets.storage.lineage import Consumed, fingerprint
from spd_assets.storage.progress import ProgressReporter
from spd_assets.storage.schemas import TABLE_SCHEMAS
from spd_assets.storage.store import ResultsStore
from spd_assets.storage.values import ConsensusClusters, EnsembleDistances, ExplorerPage, MemberEnsemble, TokenBatch
from spd_math import (
    MergeHistory,
    ProcessedActivations,
    adjusted_rand_index,
    compute_distances,
    merge_iteration,
    normalize_ensemble,
)
from spd_math.merge import planned_merges

# Components listed in the "most active" metadata table.
MOST_ACTIVE_SHOWN = 10
# Clusters listed in the consensus metadata table.
LARGEST_CLUSTERS_SHOWN = 10
# At most this many components in the co-association picture (the largest clusters first): readable at UI size.
CO_ASSOCIATION_COMPONENTS_MAX = 300
# Sequences of a token batch shown as text in its metadata, and how much of each.
EXAMPLES_SHOWN = 3
EXAMPLE_CHARACTERS = 300


class Markdown(str):
    """Metadata text to render as Markdown in the UI."""


@dataclass(frozen=True)
class Image:
    """A PNG figure to show in the UI, with its title (its alt text)."""

    png: bytes
    title: str


@dataclass(frozen=True)
class StepResult:
    """An asset's value, the rows of the tables it feeds (table name -> frame), its metadata, and what it
    consumed from outside the asset graph."""

    value: Any
    tables: dict[str, pl.DataFrame] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    consumed: list[Consumed] = field(default_factory=list)


def _numpy(values) -> np.ndarray | None:
    return values.numpy() if values is not None else None


def markdown_table(header: list[str], rows: list[list[object]]) -> Markdown:
    """A Markdown table (shown rendered in the UI's metadata) of `rows` under `header`."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return Markdown("\n".join(lines))


def component_activations(source: ActivationSource, config: ExperimentConfig, member: str,
                          progress: ProgressReporter | None = None) -> StepResult:
    """One member's batch from the source, processed (seq mode, module filter, dead filter), with per-component
    statistics. A source that streams its batches, with an activation threshold, goes straight into compact form
    a few sequences at a time (`progress` is told how many are done); otherwise the batch is processed whole."""
    merge_config = config.merge_config
    seed = config.member_seed(member)
    if source.streams_batches and merge_config.activation_threshold is not None:
        return _streamed_activations(source, config, member, seed, progress)
    batch = source.load_batch(member, seed)
    every_component, processed = batch_activations(batch, merge_config, config.seq_mode)
    stats = tables.component_stats(
        config.name, member, every_component, dead_labels=processed.dead_labels,
        activation_threshold=merge_config.activation_threshold,
    )
    metadata = {**_activation_metadata(processed, stats, n_modules=len(batch)), "seed": seed}
    consumed = [Consumed(f"source:{source.kind}", member, fingerprint(dict(batch)))]
    return StepResult(processed, {"component_stats": stats}, metadata, consumed)


def _streamed_activations(source: ActivationSource, config: ExperimentConfig, member: str, seed: int,
                          progress: ProgressReporter | None) -> StepResult:
    """`component_activations` of a source that streams its batch: the same values, never whole in memory."""
    dims = source.activation_dims()
    streamed = activations_from_chunks(
        _counted(source.batch_chunks(member, seed), dims[0], progress), module_widths=source.module_widths(),
        activation_dims=dims, merge_config=config.merge_config, seq_mode=config.seq_mode,
        memory_budget_bytes=int(DEFAULT_MEMORY_BUDGET_GB * BYTES_PER_GB))
    processed, statistics = streamed.processed, streamed.statistics
    stats = tables.component_stats_table(
        config.name, member, streamed.labels, activation_frequency=statistics.activation_frequency,
        mean_activation=statistics.mean, max_activation=statistics.maxima, dead_labels=processed.dead_labels)
    metadata = {**_activation_metadata(processed, stats, n_modules=len(streamed.modules)), "seed": seed}
    consumed = [Consumed(f"source:{source.kind}", member, fingerprint(source.batch_identity(member, seed)))]
    return StepResult(processed, {"component_stats": stats}, metadata, consumed)


def _counted(chunks, total: int, progress: ProgressReporter | None):
    """The chunks as they come, telling `progress` how many of `total` sequences (or rows) are done."""
    done = 0
    for chunk in chunks:
        yield chunk
        done += len(next(iter(chunk.values())))
        if progress is not None:
            progress.update(done, total)


def _activation_metadata(processed: ProcessedActivations, stats: pl.DataFrame, *, n_modules: int) -> dict[str, Any]:
    live = stats.filter(~stats["dead"])
    top = live.sort("activation_frequency", descending=True).head(MOST_ACTIVE_SHOWN)
    return {
        "samples": processed.n_samples,
        "components": processed.n_components,
        "dead_components": len(processed.dead_labels),
        "modules": n_modules,
        "mean_activation_frequency": float(live["activation_frequency"].mean() or 0.0),
        "most_active": markdown_table(
            ["label", "frequency", "max"],
            [[r["label"], f"{r['activation_frequency']:.4f}", f"{r['max_activation']:.3f}"] for r in top.iter_rows(named=True)],
        ),
    }


def token_batches(source: ModelSource, config: ExperimentConfig, member: str) -> StepResult:
    """One member's model inputs, drawn by the source with the member's batch seed (after checking the source)."""
    source.check()
    seed = source.batch_seed(member, config.member_seed(member))
    batch = source.token_batch(member, seed)
    metadata: dict[str, Any] = {"sequences": batch.n_sequences, "tokens": batch.n_tokens, "seed": seed}
    if batch.is_tokens:
        metadata["distinct_tokens"] = len(np.unique(batch.inputs))
        metadata["examples"] = markdown_table(
            ["sequence", "text"],
            [[index, _table_cell(source.decode(batch.inputs[index]))] for index in range(min(EXAMPLES_SHOWN, batch.n_sequences))],
        )
    else:
        metadata["features"] = batch.inputs.shape[1]
    consumed = [Consumed(f"source:{source.kind}", member, fingerprint(batch))]
    return StepResult(batch, {}, metadata, consumed)


def _table_cell(text: str) -> str:
    text = " ".join(text.split())  # one line
    text = text if len(text) <= EXAMPLE_CHARACTERS else text[:EXAMPLE_CHARACTERS] + "..."
    return text.replace("|", "\\|")


def model_activations(
    source: ModelSource, batch: TokenBatch, config: ExperimentConfig, member: str, device: torch.device,
    progress: ProgressReporter | None = None,
) -> StepResult:
    """One member's activations from the model's forward pass on its token batch (on `device`, in chunks),
    processed and summarised as they stream (`progress` is told how many sequences are done); refused before the
    forward pass when over the memory budget."""
    merge_config = config.merge_config
    started = time.perf_counter()
    streamed = activations_from_chunks(
        _counted(source.activation_chunks(batch, device), batch.n_sequences, progress),
        module_widths=source.module_widths(),
        activation_dims=batch.sample_dims,
        merge_config=merge_config,
        seq_mode=config.seq_mode,
        memory_budget_bytes=source.memory_budget_bytes,
    )
    seconds = time.perf_counter() - started
    processed, statistics = streamed.processed, streamed.statistics
    stats = tables.component_stats_table(
        config.name, member, streamed.labels, activation_frequency=statistics.activation_frequency,
        mean_activation=statistics.mean, max_activation=statistics.maxima, dead_labels=processed.dead_labels,
    )
    rows = batch.n_tokens or batch.n_sequences
    metadata = {
        **_activation_metadata(processed, stats, n_modules=len(streamed.modules)),
        "forward_seconds": round(seconds, 3),
        ("tokens_per_second" if batch.is_tokens else "rows_per_second"): round(rows / max(seconds, 1e-9)),
    }
    return StepResult(processed, {"component_stats": stats}, metadata)


def member_checkpoints(store: ResultsStore, activations: ProcessedActivations, config: ExperimentConfig, member: str,
                       interval_s: float, log: Callable[[str], None],
                       warn: Callable[[str], None] | None = None) -> MemberCheckpoints:
    """The checkpoints of this member's merge (`spd_assets.storage.checkpoints`), saved every `interval_s` seconds."""
    key = CheckpointKey(config.config_hash, fingerprint(activations))
    total = planned_merges(activations.n_components, config.merge_config.iters)
    return MemberCheckpoints(checkpoint_path(store, config.name, member), key, total, interval_s=interval_s,
                             log=lambda line: log(f"{member}: {line}"),
                             warn=None if warn is None else lambda line: warn(f"{member}: {line}"))


def merge_history(activations: ProcessedActivations, config: ExperimentConfig, member: str, device,
                  progress: ProgressReporter | None = None, checkpoints: MemberCheckpoints | None = None) -> StepResult:
    """The greedy MDL merge of one member on `device`, with its merge events and membership spans; `progress` is
    told where the merge is after every merge; with `checkpoints`, the merge resumes from this member's checkpoint
    when it has one and saves new ones as it goes."""
    seed = config.member_seed(member)
    started = time.perf_counter()
    resume_from = checkpoints.resumable() if checkpoints is not None else None
    first_merge: list[float] = []

    def report(where) -> None:
        if not first_merge:
            first_merge.append(time.perf_counter() - started - where.seconds)
        if progress is not None:
            progress.update(where.done, where.total, k=where.k, mdl_loss=where.mdl_loss)

    history = merge_iteration(activations, config.merge_config, seed=seed, device=device, progress=report,
                              resume_from=resume_from, checkpoints=checkpoints)
    seconds = time.perf_counter() - started
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
        "seed": seed,
        **({"resumed_at_merge": resume_from.n_done} if resume_from is not None else {}),
        **({"setup_and_replay_seconds": round(first_merge[0], 3)} if resume_from is not None and first_merge else {}),
        "mdl_curve": Image(plots.mdl_curve(mdl, _numpy(history.pair_costs), history.k_groups.numpy(),
                                           f"{config.name} {member}: MDL loss per merge"), "MDL loss against iteration"),
    }
    member_tables = {
        "merge_events": tables.merge_events(config.name, member, history),
        "membership_spans": tables.membership_spans(config.name, member, history),
    }
    return StepResult(history, member_tables, metadata)


def stored_history(source: ActivationSource, config: ExperimentConfig, member: str) -> StepResult:
    """One member's merge history read from the source's file (a source with histories: no activations, no merge),
    with its merge events and membership spans; `component_stats` is empty, as there are no activations."""
    found = source.load_history(member)
    history = found.history
    mdl = history.mdl_losses.numpy() if history.mdl_losses is not None else None
    metadata: dict[str, Any] = {
        "file": str(source.history_file(member)),
        "format": found.format,
        "iterations": history.n_iters,
        "components": history.c_components,
        "final_k": int(history.k_groups[-1]) if history.n_iters else history.c_components,
        "has_mdl_losses": mdl is not None,
        **{key: value for key, value in found.extras.items() if value not in (None, {}, [])},
    }
    if mdl is not None and mdl.size:
        best = int(np.argmin(mdl))
        metadata.update(mdl_start=float(mdl[0]), mdl_end=float(mdl[-1]), mdl_min=float(mdl[best]),
                        k_at_mdl_min=int(history.k_groups[best]))
    member_tables = {
        "merge_events": tables.merge_events(config.name, member, history),
        "membership_spans": tables.membership_spans(config.name, member, history),
        "component_stats": TABLE_SCHEMAS["component_stats"].empty(),
    }
    consumed = [Consumed(f"source:{source.kind}", member, fingerprint(history))]
    return StepResult(history, member_tables, metadata, consumed)


def normalized_ensemble(histories: Mapping[str, MergeHistory], members: list[str], config: ExperimentConfig) -> StepResult:
    """Every member history that exists, aligned on the union of labels (docs/math.md §8); missing members are
    listed, not fatal."""
    used = [member for member in members if member in histories]
    missing = [member for member in members if member not in histories]
    if not used:
        raise NoMembersError(
            f"no merge_history partition of {config.name} is materialized; expected members {members}. "
            "Materialize merge_history first."
        )
    ensemble = normalize_ensemble([histories[member] for member in used])
    members_table = tables.ensemble_members(config.name, ensemble, used, members, histories)
    metadata = {
        "members": len(used),
        "missing_members": missing,
        "union_components": len(ensemble.labels),
        "iterations_used": ensemble.n_iters,
        "member_overlap": markdown_table(
            ["member", "components", "iterations", "share of union"],
            [[row["member"], row["n_components"], row["n_iters_completed"], f"{row['union_coverage']:.3f}"]
             for row in members_table.filter(pl.col("status") == "used").iter_rows(named=True)],
        ),
        "member_overlap_heatmap": Image(plots.member_overlap(used, ensemble.present.numpy()),
                                        "shared component labels between members"),
    }
    return StepResult(MemberEnsemble(ensemble, used, missing), {"ensemble_members": members_table}, metadata)


def distance_matrices(ensemble: MemberEnsemble, config: ExperimentConfig) -> StepResult:
    """Distances between every two members' partitions at every iteration, per configured method."""
    by_method, summary, frames = {}, {}, []
    for method in config.distance_methods:
        started = time.perf_counter()
        distances = compute_distances(ensemble.ensemble, method)
        summary[f"{method}_seconds"] = round(time.perf_counter() - started, 3)
        by_method[method] = distances
        frames.append(tables.distances_long(config.name, method, distances, ensemble.members))
        n_iters, n_ens, _ = distances.shape
        off_diagonal = ~np.eye(n_ens, dtype=bool)
        for where, iteration in (("first", 0), ("middle", n_iters // 2), ("last", n_iters - 1)):
            if n_iters and n_ens > 1:
                summary[f"{method}_mean_{where}"] = round(float(distances[iteration].numpy()[off_diagonal].mean()), 3)
    metadata = {"members": len(ensemble.members), "iterations": ensemble.ensemble.n_iters, **summary}
    if ensemble.ensemble.n_iters:
        metadata["distances_plot"] = Image(plots.distance_curves({m: d.numpy() for m, d in by_method.items()}),
                                           "distance between members against iteration")
    return StepResult(EnsembleDistances(by_method, ensemble.members), {"distances": pl.concat(frames)}, metadata)


def consensus_clusters(ensemble: MemberEnsemble, histories: Mapping[str, MergeHistory], distances: EnsembleDistances,
                       config: ExperimentConfig, truth: np.ndarray | None = None) -> StepResult:
    """The ensemble's consensus clusters at the iteration the configured rule chooses, with their stability;
    `truth` (a planted partition of the ensemble's labels), when known, is compared with them."""
    consensus = ensemble_consensus(ensemble, [histories[member] for member in ensemble.members], config.consensus)
    iteration = consensus.iteration
    frame = tables.consensus_components(config.name, consensus)
    clustered = consensus.cluster_of >= 0
    warning = boundary_warning(config.consensus, [histories[member] for member in ensemble.members], ensemble.members)
    metadata = {
        "iteration": iteration,
        "rule": consensus.rule,
        **({"minimum_at_last_iteration": warning} if warning else {}),
        "member_choices": dict(zip(consensus.members, consensus.member_iterations)),
        "threshold": consensus.threshold,
        "clusters": consensus.n_clusters,
        "clustered_components": int(clustered.sum()),
        "components": len(consensus.labels),
        "mean_cluster_stability": round(float(consensus.stability.mean()), 4) if consensus.n_clusters else None,
    }
    if truth is not None:
        singletons = consensus.n_clusters + np.arange(len(consensus.labels))
        found = np.where(clustered, consensus.cluster_of, singletons)
        metadata["planted_truth_adjusted_rand_index"] = round(float(adjusted_rand_index(found, truth)), 4)
    for method, values in distances.by_method.items():
        if len(distances.members) > 1:
            off_diagonal = ~np.eye(len(distances.members), dtype=bool)
            metadata[f"{method}_mean_at_iteration"] = round(float(values[iteration].numpy()[off_diagonal].mean()), 3)
    sizes = np.bincount(consensus.cluster_of[clustered], minlength=consensus.n_clusters)
    largest = np.argsort(-sizes, kind="stable")
    metadata["largest_clusters"] = markdown_table(
        ["cluster", "components", "stability", "modules"],
        [[int(c), int(sizes[c]), f"{consensus.stability[c]:.3f}", _modules_of(consensus, c)]
         for c in largest[:LARGEST_CLUSTERS_SHOWN]],
    )
    if consensus.n_clusters:
        metadata["co_association"] = Image(_co_association_plot(consensus, ensemble, sizes, largest),
                                           "co-association ordered by cluster")
    metadata["distances_at_iteration"] = Image(
        plots.distance_heatmaps({m: d.numpy() for m, d in distances.by_method.items()}, distances.members, iteration),
        f"distances between members at iteration {iteration}")
    return StepResult(consensus, {"consensus_components": frame}, metadata)


def _modules_of(consensus: ConsensusClusters, cluster: int) -> str:
    modules = sorted({tables.split_label(consensus.labels[x])[0] for x in np.flatnonzero(consensus.cluster_of == cluster)})
    return ", ".join(modules)


def _co_association_plot(consensus: ConsensusClusters, ensemble: MemberEnsemble, sizes: np.ndarray,
                         largest: np.ndarray) -> bytes:
    """The largest clusters whose components fit the picture, each ordered by component stability."""
    shown, order = [], []
    for cluster in largest:
        if order and len(order) + sizes[cluster] > CO_ASSOCIATION_COMPONENTS_MAX:
            break
        members = np.flatnonzero(consensus.cluster_of == cluster)
        order.extend(members[np.argsort(-consensus.component_stability[members], kind="stable")])
        shown.append(int(sizes[cluster]))
    partitions = ensemble.ensemble.partitions_at(consensus.iteration)
    matrix = co_association(partitions, np.array(order))
    return plots.co_association_heatmap(matrix, shown, consensus.iteration, len(consensus.members), consensus.n_clusters)


def cluster_explorer(consensus: ConsensusClusters, ensemble: MemberEnsemble, component_stats: pl.DataFrame,
                     config: ExperimentConfig, activations: Mapping[str, ProcessedActivations] | None = None,
                     batches: Mapping[str, TokenBatch] | None = None) -> StepResult:
    """The self-contained HTML cluster explorer of the consensus clusters; with the members' activations and token
    batches (a source with token batches), each cluster's top-activating token contexts too (seq_mode concat)."""
    partitions = ensemble.ensemble.partitions_at(consensus.iteration)
    found = (cluster_contexts(consensus, activations, batches, config.seq_mode)
             if activations is not None and batches is not None else None)
    data = explorer.explorer_data(config.name, consensus, partitions, component_stats, contexts=found)
    page = ExplorerPage(explorer.explorer_html(data))
    metadata = {"clusters": len(data["clusters"]), "page_bytes": len(page.encode())}
    if found is not None:
        metadata["contexts"] = sum(len(shown) for shown in found.values())
    return StepResult(page, {}, metadata)


def source_model_path(config: ExperimentConfig, source: ActivationSource | None) -> str | None:
    """The experiment's SPD model: the source config's `model_path`, else what the source resolves (an `spd`
    source's experiment_key, a `histories` source's recorded run config), else None."""
    found = getattr(config.source, "model_path", None)
    if found is None and source is not None:
        try:
            found = getattr(source, "model_path", None)
        except (SpdClusterError, ImportError):
            found = None
    return None if found is None else str(found)


def ensemble_export(config: ExperimentConfig, members: list[str], histories: Mapping[str, MergeHistory],
                    distances: Mapping[str, torch.Tensor], source: ActivationSource | None, *,
                    model_path: str | None = None) -> original_export.EnsembleExport:
    """What the original's ensemble folder of an experiment holds: members in ensemble order, their histories and
    batch seeds (the `spd` source's: dataset_seed + index, the original's rule), the distances, and as model_path
    `model_path`, else the source's own (`spd`), else a note that there is no SPD run."""
    if model_path is None:
        model_path = source_model_path(config, source)
    if model_path is None:
        model_path = f"(spd-cluster {config.source.kind} source: no SPD run)"
    try:
        seeds = [int(source.batch_seed(member, config.member_seed(member))) for member in members]
    except (SpdClusterError, OSError, AttributeError, ValueError):
        seeds = [int(histories[member].seed or 0) for member in members]
    ensemble_id, run_ids = export_ids(config, members, source)
    return original_export.EnsembleExport(
        experiment=config.name, ensemble_id=ensemble_id, members=list(members),
        histories=[histories[member] for member in members], distances=dict(distances),
        merge_config=config.merge_config, model_path=str(model_path),
        batch_size=getattr(config.source, "batch_size", None), dataset_seeds=seeds, run_ids=run_ids)


def export_ids(config: ExperimentConfig, members: list[str],
               source: ActivationSource | None) -> tuple[str, list[str]]:
    """The ensemble id and the members' clustering run ids an export of `members` (ensemble order) is written under:
    the original's, where the source's histories came from it (a `histories` source: `original_ids`), else ids
    stable for the experiment and its config (so exporting again replaces the same folders)."""
    original_ensemble, original_runs = None, {}
    if source is not None and hasattr(source, "original_ids"):
        try:
            original_ensemble, original_runs = source.original_ids(list(members))
        except (SpdClusterError, OSError):  # the histories' folder is gone: the stored copies get ids of their own
            pass
    ensemble_id = original_ensemble or original_export.ensemble_id_for(config.name, config.config_hash)
    return ensemble_id, [original_runs.get(member) or original_export.run_id_for(ensemble_id, member)
                         for member in members]


def original_ensemble_folder(ensemble: MemberEnsemble, histories: Mapping[str, MergeHistory],
                             distances: EnsembleDistances, config: ExperimentConfig, source: ActivationSource | None,
                             out: Path, announce=lambda line: None) -> StepResult:
    """The original pipeline's ensemble folder, run folders and registry rows of the experiment, under `out` (laid
    out as the original's SPD_OUT_DIR); its size is announced before anything is written."""
    export = ensemble_export(config, ensemble.members, histories, distances.by_method, source)
    if original_export.spd_run_of(export.model_path) is None:
        reason = original_export.no_spd_run_reason(config.source.kind, source_model_path(config, source))
        announce(f"warning: the run configs' model_path will be {export.model_path!r}, not a wandb run (experiment "
                 f"{config.name!r} names no wandb SPD run: {reason}); the original's scripts will refuse this folder "
                 "(its ClusteringRunConfig: \"model_path must start with 'wandb:'\", so get_cluster_mapping fails "
                 "too); `spd-cluster export original --spd-run wandb:<entity>/<project>/<run>` names the SPD run")
    sizes = original_export.original_folder_bytes(export.histories)
    announce(f"writing every partition of {len(export.histories)} members in the original's format under {out}: "
             f"run histories {sizes['runs'] / 1e6:,.1f} MB, ensemble array {sizes['ensemble'] / 1e6:,.1f} MB "
             "before compression")
    folder = original_export.write_original_ensemble(export, out)
    command = (f"SPD_OUT_DIR={folder.root} python -m spd.clustering.scripts.get_cluster_mapping "
               f"{folder.ensemble_dir} --n_iterations N --run_idx R")
    metadata = {"path": folder.ensemble_dir, "ensemble_id": export.ensemble_id, "runs": len(folder.run_dirs),
                "dense_bytes": sizes["runs"] + sizes["ensemble"],
                "registry": folder.registry, "model_path": export.model_path,
                "distance_methods": list(export.distances), "get_cluster_mapping": Markdown(f"`{command}`")}
    return StepResult(folder, {}, metadata)


def spd_app_mapping(consensus: ConsensusClusters, config: ExperimentConfig,
                    source: ActivationSource | None) -> dict[str, Any] | None:
    """The SPD app's cluster mapping of the consensus, for a source that names a wandb SPD run (else None)."""
    spd_run = original_export.spd_run_of(source_model_path(config, source))
    if spd_run is None:
        return None
    return original_export.consensus_mapping_file(
        experiment=config.name, config_hash=config.config_hash, spd_run=spd_run, iteration=consensus.iteration,
        rule=consensus.rule, threshold=consensus.threshold, n_members=len(consensus.members), labels=consensus.labels,
        cluster_of=consensus.cluster_of, ensemble_id=export_ids(config, list(consensus.members), source)[0])
