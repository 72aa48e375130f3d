"""A small real ensemble (synthetic batches, the real merge), without Dagster: for the analysis tests."""

from __future__ import annotations

import polars as pl

from spd_assets.analysis.consensus import ensemble_consensus
from spd_assets.config import ConsensusConfig
from spd_assets.sources import source_for
from spd_assets.storage import tables
from spd_assets.storage.values import MemberEnsemble
from spd_math import drop_dead, merge_iteration, normalize_ensemble, process_activations
from tests.pipeline_helpers import small_config


def small_ensemble(consensus: ConsensusConfig | None = None):
    """Histories, the stored-form ensemble, component stats and the consensus of the small synthetic experiment."""
    config = small_config()
    source = source_for(config.source)
    members = source.member_keys()
    histories, stats = {}, []
    for member in members:
        seed = config.member_seed(member)
        every = process_activations(source.load_batch(member, seed), filter_dead_threshold=0.0, seq_mode=config.seq_mode)
        processed = drop_dead(every, config.merge_config.filter_dead_threshold)
        stats.append(tables.component_stats(config.name, member, every, dead_labels=processed.dead_labels,
                                            activation_threshold=config.merge_config.activation_threshold))
        histories[member] = merge_iteration(processed, config.merge_config, seed=seed)
    ensemble = MemberEnsemble(normalize_ensemble([histories[m] for m in members]), members, [])
    result = ensemble_consensus(ensemble, [histories[m] for m in members], consensus or config.consensus)
    return config, source, histories, ensemble, pl.concat(stats), result
