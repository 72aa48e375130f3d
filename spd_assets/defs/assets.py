"""The asset graph of one experiment, as thin Dagster wrappers around `steps`.

    component_activations ─┬─ component_stats                 (per member; model sources: on a leased device,
      │                                                        from token_batches, the member's model inputs)
      └─ merge_history ────┼─ merge_events, membership_spans  (per member, on a leased device)
           └─ normalized_ensemble ─ ensemble_members
                ├─ distance_matrices ─ distances
                └─ consensus_clusters ─ consensus_components    (also reads the histories and distances)
                     └─ cluster_explorer                     (an HTML page; also reads component_stats, and with
                                                              token batches every member's activations and tokens)
    experiments          the experiment's config
    materializations, lineage_edges   rebuilt from Dagster's event log

Each step is one multi-asset: the value (stored by the value IO manager) and the result tables
it feeds (Parquet through the table IO manager, with their column schema in the UI). Keys are
`[experiment, name]`, grouped by experiment, so experiments live side by side.
"""


import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import polars as pl
import torch
from dagster import (
    AssetCheckSpec,
    AssetExecutionContext,
    AssetIn,
    AssetKey,
    AssetOut,
    AssetsDefinition,
    DataVersion,
    MaterializeResult,
    MetadataValue,
    Output,
    PreviewWarning,
    RetryRequested,
    StaticPartitionsDefinition,
    TableColumn,
    TableSchema,
    asset,
    multi_asset,
)

from spd_assets.analysis.plots import markdown_image
from spd_assets.config import ExperimentConfig
from spd_assets.defs import checks, steps
from spd_assets.defs.io_managers import VALUE_TYPE_METADATA_KEY
from spd_assets.defs.lineage import (
    CONFIG_HASH_METADATA_KEY,
    CONSUMED_METADATA_KEY,
    consumed_inputs,
    materialization_records,
)
from spd_assets.defs.resources import ActivationSourceResource, DevicePoolResource, source_resource_key
from spd_assets.deployment.settings import DEVICE_POOL, SlurmSettings
from spd_assets.sources import SOURCES
from spd_assets.storage import original_export, tables
from spd_assets.storage.checkpoints import DEFAULT_INTERVAL_S, checkpoint_path
from spd_assets.storage.lineage import Consumed, fingerprint, lineage_tables
from spd_assets.storage.progress import PROGRESS_UNITS, ProgressReporter, progress_path
from spd_assets.storage.schemas import TABLE_SCHEMAS
from spd_assets.storage.values import (
    ConsensusClusters,
    EnsembleDistances,
    ExplorerPage,
    MemberEnsemble,
    TokenBatch,
    value_format,
)
from spd_math import MergeHistory, ProcessedActivations

STORAGE_KEY = "storage"
VALUE_IO_MANAGER_KEY = "spd_values"
TABLE_IO_MANAGER_KEY = "spd_tables"
DEVICE_POOL_KEY = "device_pool"
# Bump when a change to an asset's code changes its results (Dagster marks downstream stale).
CODE_VERSION = "1"
OUT_OF_MEMORY_RETRIES = 3
# Files the ensemble steps write for the original's tools and the SPD app, in the experiment's exports folder.
ORIGINAL_FOLDER = "original"
SPD_APP_MAPPING = "spd_app_cluster_mapping.json"
OUT_OF_MEMORY_WAIT_S = 30


def dagster_table_schema(table: str) -> TableSchema:
    """The Dagster column schema of a result table, from its one definition in `storage.schemas`."""
    return TableSchema(columns=[TableColumn(name, sql_type, description=description)
                                for name, (sql_type, description) in TABLE_SCHEMAS[table].columns.items()])


@contextmanager
def _retry_on_out_of_memory(device: str, doing: str) -> Iterator[None]:
    """CUDA running out of memory is transient (another process may hold it): ask Dagster to retry the step,
    whose next lease prefers the GPU with the most free memory."""
    try:
        yield
    except torch.cuda.OutOfMemoryError as error:
        raise RetryRequested(max_retries=OUT_OF_MEMORY_RETRIES, seconds_to_wait=OUT_OF_MEMORY_WAIT_S) from RuntimeError(
            f"CUDA out of memory on {device} {doing}: {error}"
        )


def _dagster_metadata(metadata: dict) -> dict:
    """Plain step metadata as Dagster metadata values (Markdown rendered, lists as JSON)."""
    def convert(value):
        if isinstance(value, steps.Markdown):
            return MetadataValue.md(str(value))
        if isinstance(value, steps.Image):
            return MetadataValue.md(markdown_image(value.png, value.title))
        if isinstance(value, Path):
            return MetadataValue.path(str(value))
        if isinstance(value, (list, dict)):
            return MetadataValue.json(value)
        return value

    return {name: convert(value) for name, value in metadata.items()}


@dataclass(frozen=True)
class ExperimentAssets:
    """The asset definitions of one experiment and the keys its jobs select."""

    assets: list[AssetsDefinition]
    member_keys: list[AssetKey]
    ensemble_keys: list[AssetKey]
    export_keys: list[AssetKey]  # the original-format folder (and the lineage tables it updates)


def experiment_assets(
    config: ExperimentConfig, members: list[str], *, device_op_tags: dict | None = None,
    slurm: SlurmSettings | None = None, checkpoint_interval_s: float = DEFAULT_INTERVAL_S,
) -> ExperimentAssets:
    """The assets (with their checks) of one experiment whose ensemble members are `members` (partition keys).

    Steps that compute on a device (the merge) lease one from the device pool and belong to the
    Dagster concurrency pool `DEVICE_POOL`; `device_op_tags` go on those steps (e.g. Kubernetes GPU limits).
    With `slurm`, the merge runs as a SLURM job instead (`spd_assets.defs.slurm`): no local device is
    leased and the step is in no pool, since its device is on a node that SLURM allocates. A merge saves a
    checkpoint every `checkpoint_interval_s` seconds, from which its next attempt resumes.
    """
    build = _ExperimentAssetBuilder(config, members, device_op_tags, slurm, checkpoint_interval_s)
    if build.has_histories:
        member_assets = [build.stored_history()]
    else:
        member_assets = [*([build.token_batches()] if build.has_token_batches else []),
                         build.component_activations(), build.merge_history()]
    ensemble_assets = [build.normalized_ensemble(), build.distance_matrices(), build.consensus_clusters(),
                       build.cluster_explorer(), build.experiments()]
    # Written when asked for (every partition of every member: iterations x components per member), not by every run.
    export_assets = [build.original_ensemble_folder()]
    # Every asset above is recorded: values with what they consumed, tables with their files.
    recorded = [key for asset in [*member_assets, *ensemble_assets, *export_assets] for key in asset.keys]
    lineage = build.lineage(recorded)
    return ExperimentAssets(
        assets=[*member_assets, *ensemble_assets, *export_assets, lineage],
        member_keys=[key for asset in member_assets for key in asset.keys],
        ensemble_keys=[key for asset in [*ensemble_assets, lineage] for key in asset.keys],
        export_keys=[key for asset in [*export_assets, lineage] for key in asset.keys],
    )


class _ExperimentAssetBuilder:
    """Builds each asset of one experiment: what they share (keys, partitions, outputs, lineage) and one method
    per step."""

    def __init__(self, config: ExperimentConfig, members: list[str], device_op_tags: dict | None,
                 slurm: SlurmSettings | None = None, checkpoint_interval_s: float = DEFAULT_INTERVAL_S) -> None:
        self.config = config
        self.slurm = slurm
        self.checkpoint_interval_s = checkpoint_interval_s
        self.name = config.name
        self.members = members
        self.partitions = StaticPartitionsDefinition(members)
        self.source_key = source_resource_key(config.name)
        source_class = SOURCES[config.source.kind]
        self.has_planted_truth = source_class.has_planted_truth
        self.has_token_batches = source_class.has_token_batches
        self.needs_device = source_class.needs_device
        self.has_histories = source_class.has_histories
        self.device_op_tags = device_op_tags

    def key(self, asset_name: str) -> AssetKey:
        return AssetKey([self.name, asset_name])

    def op_name(self, asset_name: str) -> str:
        return f"{self.name}__{asset_name}"  # also the step key of the asset's step

    def value_out(self, asset_name: str, value_type: type, description: str, kinds: set[str]) -> AssetOut:
        return AssetOut(key=self.key(asset_name), dagster_type=value_type, io_manager_key=VALUE_IO_MANAGER_KEY,
                        description=description, code_version=CODE_VERSION, group_name=self.name, kinds=kinds,
                        metadata={VALUE_TYPE_METADATA_KEY: value_type.__name__})

    def table_out(self, table: str) -> AssetOut:
        return AssetOut(key=self.key(table), dagster_type=pl.DataFrame, io_manager_key=TABLE_IO_MANAGER_KEY,
                        description=f"Result table: {TABLE_SCHEMAS[table].description}.", code_version=CODE_VERSION,
                        group_name=self.name, kinds={"parquet", "duckdb"},
                        metadata={"dagster/column_schema": dagster_table_schema(table)})

    def member_check(self, check: str, description: str) -> AssetCheckSpec:
        """A check of one member's history whose results carry the member (Dagster's partitioned checks)."""
        with warnings.catch_warnings():
            # Partitioned checks are a Dagster preview feature; they are what tells which member a result is of.
            warnings.simplefilter("ignore", PreviewWarning)
            return AssetCheckSpec(check, asset=self.key("merge_history"), partitions_def=self.partitions,
                                  description=description)

    def step(self, value: str, value_type: type, description: str, kinds: set[str], *, tables: Sequence[str] = (),
             ins: Mapping[str, str] | None = None, deps: Sequence[str] = (), checks: Sequence[AssetCheckSpec] = (),
             partitioned: bool = False, on_device: bool = False, resources: Sequence[str] = ()):
        """The multi-asset of one step: its value (stored by the value IO manager) computed from `ins` (argument ->
        upstream asset name) and `deps`, and each result table it feeds, which depends on the value.

        `partitioned`: one per member. `on_device`: the step leases a device, in the Dagster pool `DEVICE_POOL`,
        with the deployment's device op tags (e.g. Kubernetes GPU limits).
        """
        ins = dict(ins or {})
        upstream = {self.key(name) for name in [*ins.values(), *deps]}
        return multi_asset(
            name=self.op_name(value),
            outs={value: self.value_out(value, value_type, description, kinds),
                  **{table: self.table_out(table) for table in tables}},
            ins={argument: AssetIn(key=self.key(name)) for argument, name in ins.items()} or None,
            deps=[self.key(name) for name in deps] or None,
            internal_asset_deps={value: upstream, **{table: {self.key(value)} for table in tables}},
            partitions_def=self.partitions if partitioned else None,
            required_resource_keys={*resources, *([DEVICE_POOL_KEY] if on_device else [])},
            check_specs=list(checks) or None,
            pool=DEVICE_POOL if on_device else None,
            op_tags=self.device_op_tags if on_device else None,
        )

    def emit(self, value_name: str, result: steps.StepResult, consumed: list[Consumed]) -> Iterator[Output]:
        """The value with its content fingerprint as data version and its lineage, then its tables."""
        metadata = {
            **_dagster_metadata(result.metadata),
            CONFIG_HASH_METADATA_KEY: self.config.config_hash,
            CONSUMED_METADATA_KEY: MetadataValue.json([item.to_json() for item in [*result.consumed, *consumed]]),
        }
        yield Output(result.value, output_name=value_name, metadata=metadata,
                     data_version=DataVersion(fingerprint(result.value)))
        for table, frame in result.tables.items():
            yield Output(frame, output_name=table)

    def consumed(self, context: AssetExecutionContext, upstream: str, loaded: dict,
                 fingerprints: dict[str | None, str] | None = None) -> list[Consumed]:
        """The materializations of `upstream` whose values were loaded (partition -> value); `fingerprints` of
        those values where already computed."""
        known = fingerprints or {}
        versions = {partition: known.get(partition) or fingerprint(value) for partition, value in loaded.items()}
        return consumed_inputs(context.instance, self.key(upstream), versions)

    @contextmanager
    def progress(self, context: AssetExecutionContext, step: str) -> Iterator[ProgressReporter]:
        """A reporter of this member's `step` ("merge" or "activations"): its progress file, for whoever started the
        run, and a line in the run's log about every ten seconds."""
        store = getattr(context.resources, STORAGE_KEY).store
        member = context.partition_key
        reporter = ProgressReporter(progress_path(store, self.name, member), context.log.info, experiment=self.name,
                                    member=member, step=step, unit=PROGRESS_UNITS[step])
        try:
            yield reporter
        finally:
            reporter.close()

    @contextmanager
    def device(self, context: AssetExecutionContext, step_key: str) -> Iterator[tuple[str, torch.device]]:
        """A device leased from the pool when the source computes on one, else the CPU."""
        if not self.needs_device:
            yield "cpu", torch.device("cpu")
            return
        pool: DevicePoolResource = getattr(context.resources, DEVICE_POOL_KEY)
        with pool.lease(context, step_key=step_key) as lease:
            context.log.info(f"leased {lease.device} after waiting {lease.waited_s:.1f} s")
            yield lease.device, lease.torch_device

    def token_batches(self) -> AssetsDefinition:
        @self.step("token_batches", TokenBatch,
                   "One member's model inputs (token ids, or feature rows), drawn with its batch seed, and the text of "
                   "each token id that occurs.", {"numpy"},
                   partitioned=True, resources=[self.source_key])
        def token_batches(context: AssetExecutionContext) -> Iterator:
            resource: ActivationSourceResource = getattr(context.resources, self.source_key)
            result = steps.token_batches(resource.source, self.config, context.partition_key)
            yield from self.emit("token_batches", result, [])

        return token_batches

    def component_activations(self) -> AssetsDefinition:
        has_token_batches, needs_device = self.has_token_batches, self.needs_device

        @self.step("component_activations", ProcessedActivations,
                   "One member's causal importances, processed (seq mode, module filter, dead filter).", {"torch"},
                   tables=["component_stats"], ins={"batch": "token_batches"} if has_token_batches else None,
                   partitioned=True, on_device=needs_device, resources=[self.source_key, STORAGE_KEY])
        def component_activations(context: AssetExecutionContext, **batch: TokenBatch) -> Iterator:
            resource: ActivationSourceResource = getattr(context.resources, self.source_key)
            member = context.partition_key
            if not has_token_batches:
                with self.progress(context, "activations") as progress:
                    result = steps.component_activations(resource.source, self.config, member, progress)
                yield from self.emit("component_activations", result, [])
                return
            token_batch = batch["batch"]
            with self.device(context, self.op_name("component_activations")) as (device, torch_device):
                with (_retry_on_out_of_memory(device, f"running the model on {token_batch.n_sequences} sequences"),
                      self.progress(context, "activations") as progress):
                    result = steps.model_activations(resource.source, token_batch, self.config, member, torch_device,
                                                     progress)
            result.metadata["device"] = device
            context.log.info(f"{member}: activations of {result.metadata['samples']} samples x "
                             f"{result.metadata['components']} components in {result.metadata['forward_seconds']:.2f} s "
                             f"on {device}")
            yield from self.emit("component_activations", result,
                                 self.consumed(context, "token_batches", {member: token_batch}))

        return component_activations

    def merge_history(self) -> AssetsDefinition:
        history_checks = [
            self.member_check("partition_sizes", "the partition after iteration i has c - i - 1 groups"),
            *([self.member_check("planted_truth_recovered", "the planted groups are recovered at the planted k")]
              if self.has_planted_truth else []),
        ]

        @self.step("merge_history", MergeHistory,
                   "The greedy MDL merge of one member (spd_math.merge_iteration), stored in the original zip format.",
                   {"torch"}, tables=["merge_events", "membership_spans"], ins={"activations": "component_activations"},
                   checks=history_checks, partitioned=True,
                   # On SLURM the device is on the node the job gets: no local lease, no pool.
                   on_device=not self.slurm, resources=[self.source_key, STORAGE_KEY])
        def merge_history(context: AssetExecutionContext, activations: ProcessedActivations) -> Iterator:
            member = context.partition_key
            known: dict[str | None, str] = {}  # the activations' fingerprint, where the checkpoint key has it
            if self.slurm:
                result = self.merge_on_slurm(context, member)
                history = result.value
            else:
                pool: DevicePoolResource = getattr(context.resources, DEVICE_POOL_KEY)
                with pool.lease(context, step_key=self.op_name("merge_history")) as lease:
                    context.log.info(f"leased {lease.device} after waiting {lease.waited_s:.1f} s")
                    merging = f"merging {activations.n_samples} samples x {activations.n_components} components"
                    context.log.info(f"{member}: {merging} on {lease.device}")
                    store = getattr(context.resources, STORAGE_KEY).store
                    checkpoints = steps.member_checkpoints(store, activations, self.config, member,
                                                           self.checkpoint_interval_s, context.log.info,
                                                           context.log.warning)
                    known[member] = checkpoints.key.activations
                    with _retry_on_out_of_memory(lease.device, merging), self.progress(context, "merge") as progress:
                        result = steps.merge_history(activations, self.config, member, lease.torch_device, progress,
                                                     checkpoints)
                history = result.value
                context.log.info(f"merged {history.c_components} components over {history.n_iters} iterations "
                                 f"in {result.metadata['seconds']:.2f} s on {lease.device}")
                result.metadata.update(device=lease.device, device_wait_seconds=round(lease.waited_s, 3))
            yield from self.emit("merge_history", result,
                                 self.consumed(context, "component_activations", {member: activations}, known))
            # The history is stored (the IO manager ran on the output above): nothing left to resume.
            checkpoint_path(getattr(context.resources, STORAGE_KEY).store, self.name, member).unlink(missing_ok=True)
            yield checks.partition_sizes(history)
            if self.has_planted_truth:
                source = getattr(context.resources, self.source_key).source
                yield checks.planted_truth_recovered(history, source.planted_partition(history.labels))

        return merge_history

    def merge_on_slurm(self, context: AssetExecutionContext, member: str) -> steps.StepResult:
        """The member's merge as one SLURM job (`spd_assets.defs.slurm`): what it wrote, with the metadata it
        reported over Pipes and its job id."""
        from spd_assets.defs.remote_step import VALUE_FILE
        from spd_assets.defs.slurm import SlurmStepClient

        store = getattr(context.resources, STORAGE_KEY).store
        folder = store.root / "slurm_jobs" / context.run_id / "merge_history"
        extras = {"step": "merge_history", "member": member, "results_root": str(store.root),
                  "experiment_config_json": self.config.canonical_json,
                  "checkpoint_interval_s": self.checkpoint_interval_s}
        job = SlurmStepClient(self.slurm).run(context, name=f"{self.name}-{member}-merge", folder=folder, extras=extras)
        history_format = value_format(MergeHistory)
        history = history_format.load(folder / f"{VALUE_FILE}{history_format.suffix}")
        frames = {table: pl.read_parquet(folder / f"{table}.parquet") for table in ("merge_events", "membership_spans")}
        # The IO managers store them where they belong; the job's folder keeps its logs only.
        for staged in [folder / f"{VALUE_FILE}{history_format.suffix}", *(folder / f"{t}.parquet" for t in frames)]:
            staged.unlink()
        metadata = {}
        for reported in job.reported:
            if getattr(reported, "asset_key", None) == self.key("merge_history") and hasattr(reported, "metadata"):
                metadata.update(reported.metadata or {})
        metadata.update({"slurm_job_id": job.job_id, "slurm_seconds": round(job.seconds, 3),
                         "slurm_queued_seconds": round(job.queued_seconds, 3)})
        context.log.info(f"SLURM job {job.job_id}: merged {history.c_components} components over {history.n_iters} "
                         f"iterations; {job.seconds:.1f} s from submission to results")
        return steps.StepResult(history, frames, metadata)

    def stored_history(self) -> AssetsDefinition:
        """A member's merge history read from the source (past runs): no activations, no merge, no device."""

        @self.step("merge_history", MergeHistory,
                   "One member's merge history, read from the source's file (either original format) and stored in "
                   "the original zip format.", {"torch"}, tables=["merge_events", "membership_spans", "component_stats"],
                   checks=[self.member_check("partition_sizes", "the partition after iteration i has c - i - 1 groups")],
                   partitioned=True, resources=[self.source_key])
        def stored_history(context: AssetExecutionContext) -> Iterator:
            source = getattr(context.resources, self.source_key).source
            result = steps.stored_history(source, self.config, context.partition_key)
            history = result.value
            context.log.info(f"read {result.metadata['file']} ({result.metadata['format']} format): "
                             f"{history.c_components} components, {history.n_iters} iterations")
            yield from self.emit("merge_history", result, [])
            yield checks.partition_sizes(history)

        return stored_history

    def normalized_ensemble(self) -> AssetsDefinition:
        key = self.key

        @self.step("normalized_ensemble", MemberEnsemble,
                   "All member histories aligned on the union of labels (docs/math.md §8); missing members are "
                   "listed, not fatal.", {"torch"}, tables=["ensemble_members"], ins={"histories": "merge_history"},
                   checks=[AssetCheckSpec("every_component_assigned", asset=key("normalized_ensemble"),
                                          description="no -1 left in any member's partitions"),
                           AssetCheckSpec("all_members_present", asset=key("normalized_ensemble"),
                                          description="every configured member contributed a history")])
        def normalized_ensemble(context: AssetExecutionContext, histories: dict[str, MergeHistory]) -> Iterator:
            result = steps.normalized_ensemble(histories, self.members, self.config)
            ensemble: MemberEnsemble = result.value
            if ensemble.missing:
                context.log.warning(f"{len(ensemble.missing)} of {len(self.members)} members have no merge history "
                                    f"and are left out: {ensemble.missing}")
            loaded = {member: histories[member] for member in ensemble.members}
            yield from self.emit("normalized_ensemble", result, self.consumed(context, "merge_history", loaded))
            yield checks.every_component_assigned(ensemble)
            yield checks.all_members_present(ensemble)

        return normalized_ensemble

    def distance_matrices(self) -> AssetsDefinition:
        key = self.key

        @self.step("distance_matrices", EnsembleDistances,
                   "Distances between every pair of members' partitions at every iteration, one matrix per method.",
                   {"torch"}, tables=["distances"], ins={"ensemble": "normalized_ensemble"},
                   checks=[AssetCheckSpec("symmetric_with_zero_diagonal", asset=key("distance_matrices"),
                                          description="every distance matrix is symmetric with a zero diagonal")])
        def distance_matrices(context: AssetExecutionContext, ensemble: MemberEnsemble) -> Iterator:
            result = steps.distance_matrices(ensemble, self.config)
            yield from self.emit("distance_matrices", result,
                                 self.consumed(context, "normalized_ensemble", {None: ensemble}))
            yield checks.symmetric_with_zero_diagonal(result.value.by_method)

        return distance_matrices

    def consensus_clusters(self) -> AssetsDefinition:

        @self.step("consensus_clusters", ConsensusClusters,
                   "Consensus clusters at the iteration the configured rule chooses (consensus.iteration, "
                   "consensus.k, else the median of the members' MDL-loss minima), with each cluster's and "
                   "component's stability.", {"numpy"}, tables=["consensus_components"],
                   ins={"ensemble": "normalized_ensemble", "histories": "merge_history", "distances": "distance_matrices"},
                   checks=[AssetCheckSpec("mdl_minimum_inside_the_merge", asset=self.key("consensus_clusters"),
                                          description="the MDL-minimum rule found minima, not the merges' last "
                                                      "iterations (else raise merge_config.iters)")],
                   resources=[self.source_key, STORAGE_KEY])
        def consensus_clusters(context: AssetExecutionContext, ensemble: MemberEnsemble,
                               histories: dict[str, MergeHistory], distances: EnsembleDistances) -> Iterator:
            source = getattr(context.resources, self.source_key).source
            truth = source.planted_partition(ensemble.ensemble.labels) if self.has_planted_truth else None
            result = steps.consensus_clusters(ensemble, histories, distances, self.config, truth)
            mapping = steps.spd_app_mapping(result.value, self.config, source)
            if mapping is not None:  # the SPD app's JSON, for a source that names the wandb run the app loads
                store = getattr(context.resources, STORAGE_KEY).store
                path = original_export.write_json(store.exports_dir(self.name) / SPD_APP_MAPPING, mapping)
                result.metadata["spd_app_mapping"] = path
                context.log.info(f"SPD app cluster mapping for {mapping['spd_run']}: {path}")
            context.log.info(f"{result.metadata['clusters']} consensus clusters at iteration "
                             f"{result.value.iteration} ({result.value.rule})")
            consumed = [
                *self.consumed(context, "normalized_ensemble", {None: ensemble}),
                *self.consumed(context, "merge_history", {member: histories[member] for member in ensemble.members}),
                *self.consumed(context, "distance_matrices", {None: distances}),
            ]
            yield from self.emit("consensus_clusters", result, consumed)
            yield checks.mdl_minimum_inside_the_merge(result.metadata.get("minimum_at_last_iteration"))

        return consensus_clusters

    def cluster_explorer(self) -> AssetsDefinition:
        # Every member's activations and tokens, for the clusters' top-activating contexts (tokens are samples).
        context_inputs = ({"activations": "component_activations", "batches": "token_batches"}
                          if self.has_token_batches and self.config.seq_mode == "concat" else {})

        # The page shows the consensus components (built from the same value as that table). Declaring it also
        # ranks this step after the consensus step, so an asset backfill runs both in one tick.
        @self.step("cluster_explorer", ExplorerPage,
                   "The cluster explorer: one self-contained HTML page (opens from disk) of the consensus clusters.",
                   {"html"}, ins={"consensus": "consensus_clusters", "ensemble": "normalized_ensemble",
                                  "component_stats": "component_stats", **context_inputs},
                   deps=["consensus_components"], resources=[STORAGE_KEY])
        def cluster_explorer(context: AssetExecutionContext, consensus: ConsensusClusters, ensemble: MemberEnsemble,
                             component_stats: pl.DataFrame, **members_inputs: dict) -> Iterator:
            activations: dict[str, ProcessedActivations] | None = members_inputs.get("activations")
            batches: dict[str, TokenBatch] | None = members_inputs.get("batches")
            result = steps.cluster_explorer(consensus, ensemble, component_stats, self.config, activations, batches)
            page = getattr(context.resources, STORAGE_KEY).store.value_path(
                self.name, "cluster_explorer", None, value_format(ExplorerPage).suffix)
            result.metadata["open"] = MetadataValue.url(page.as_uri())
            consumed = [
                *self.consumed(context, "consensus_clusters", {None: consensus}),
                *self.consumed(context, "normalized_ensemble", {None: ensemble}),
            ]
            for upstream, loaded in (("component_activations", activations), ("token_batches", batches)):
                if loaded:
                    used = {member: loaded[member] for member in consensus.members if member in loaded}
                    consumed += self.consumed(context, upstream, used)
            yield from self.emit("cluster_explorer", result, consumed)

        return cluster_explorer

    def original_ensemble_folder(self) -> AssetsDefinition:
        key = self.key

        @asset(
            key=key("original_ensemble_folder"),
            ins={"ensemble": AssetIn(key=key("normalized_ensemble")), "histories": AssetIn(key=key("merge_history")),
                 "distances": AssetIn(key=key("distance_matrices"))},
            # The folder holds the distances the `distances` table is built from. Declaring that table also ranks this
            # step after the distances step, so an asset backfill runs both in one tick.
            deps=[key("distances"), key("ensemble_members")],
            group_name=self.name,
            kinds={"folder"},
            code_version=CODE_VERSION,
            required_resource_keys={self.source_key, STORAGE_KEY},
            description="The original pipeline's ensemble folder, run folders and registry rows (under "
                        f"spd_cluster/<experiment>/exports/{ORIGINAL_FOLDER}/, laid out as its SPD_OUT_DIR): what its "
                        "get_cluster_mapping and calc_distances read. Every partition of every member (iterations x "
                        "components each): materialized when asked for, not by the ensemble run.",
        )
        def original_ensemble_folder(context: AssetExecutionContext, ensemble: MemberEnsemble,
                                     histories: dict[str, MergeHistory], distances: EnsembleDistances) -> MaterializeResult:
            source = getattr(context.resources, self.source_key).source
            out = getattr(context.resources, STORAGE_KEY).store.exports_dir(self.name) / ORIGINAL_FOLDER
            result = steps.original_ensemble_folder(ensemble, histories, distances, self.config, source, out,
                                                    announce=context.log.info)
            context.log.info(f"the original's ensemble folder: {result.metadata['path']}")
            consumed = [
                *self.consumed(context, "normalized_ensemble", {None: ensemble}),
                *self.consumed(context, "merge_history", {member: histories[member] for member in ensemble.members}),
                *self.consumed(context, "distance_matrices", {None: distances}),
            ]
            metadata = {
                **_dagster_metadata(result.metadata),
                CONFIG_HASH_METADATA_KEY: self.config.config_hash,
                CONSUMED_METADATA_KEY: MetadataValue.json([item.to_json() for item in consumed]),
            }
            return MaterializeResult(metadata=metadata, data_version=DataVersion(fingerprint([ensemble, distances])))

        return original_ensemble_folder

    def experiments(self) -> AssetsDefinition:
        config = self.config

        @asset(
            key=self.key("experiments"),
            dagster_type=pl.DataFrame,
            io_manager_key=TABLE_IO_MANAGER_KEY,
            group_name=self.name,
            kinds={"parquet", "duckdb"},
            code_version=CODE_VERSION,
            description=f"Result table: {TABLE_SCHEMAS['experiments'].description}.",
            metadata={"dagster/column_schema": dagster_table_schema("experiments"), "config_hash": config.config_hash},
        )
        def experiments() -> pl.DataFrame:
            return tables.experiment_row(config, datetime.now(timezone.utc))

        return experiments

    def lineage(self, recorded: list[AssetKey]) -> AssetsDefinition:
        # It reads every recorded asset's materializations from the event log, but depends only on the last steps
        # of the graph: that orders it after all of them without an edge from every asset in the lineage view.
        last = {self.key("cluster_explorer"), self.key("original_ensemble_folder"), self.key("experiments")}

        @multi_asset(
            name=self.op_name("lineage"),
            outs={"materializations": self.table_out("materializations"),
                  "lineage_edges": self.table_out("lineage_edges")},
            deps=sorted(last, key=str),
            internal_asset_deps={"materializations": last, "lineage_edges": last},
        )
        def lineage(context: AssetExecutionContext) -> Iterator:
            """Rebuilt from Dagster's event log, which stays the source of truth."""
            records = materialization_records(context.instance, self.name, recorded, self.members)
            materializations, edges = lineage_tables(records)
            yield Output(materializations, output_name="materializations")
            yield Output(edges, output_name="lineage_edges")

        return lineage
