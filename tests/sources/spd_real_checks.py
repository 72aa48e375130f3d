"""Run inside an environment with the real `spd` package: the `spd` source against spd's own functions.

    python spd_real_checks.py RESID_MLP_RUN LM_RUN LM_TOKEN_IDS.npy

Prints one JSON object of findings, which `test_spd_source_real.py` asserts on. Each comparison
runs spd's own code (`spd.clustering.dataset.load_dataset`,
`spd.clustering.activations.component_activations` / `process_activations`) on the same batch
as the source and records whether the results are identical. spd is imported only when this runs
(the test collection imports every module of the test folder, where spd is not installed).
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch

from spd_assets.errors import SourceError
from spd_assets.sources import SpdSource, SpdSourceConfig
from spd_assets.sources.streaming import activations_from_chunks
from spd_math import MergeConfig

CPU = torch.device("cpu")
DEAD_THRESHOLD = 0.01  # spd's process_activations default


def same_importances(ours: dict, theirs: dict) -> bool:
    return list(ours) == list(theirs) and all(torch.equal(ours[name], theirs[name]) for name in ours)


def streamed_vs_spd(source: SpdSource, batch, seq_mode, importances) -> dict:
    """The source's processed activations (streamed in chunks) against spd's process_activations."""
    from spd.clustering.activations import process_activations

    def streamed(threshold):
        return activations_from_chunks(
            source.activation_chunks(batch, CPU), module_widths=source.module_widths(),
            activation_dims=batch.sample_dims, seq_mode=seq_mode, memory_budget_bytes=2**30,
            merge_config=MergeConfig(activation_threshold=threshold, filter_dead_threshold=DEAD_THRESHOLD))

    theirs = process_activations(importances, filter_dead_threshold=DEAD_THRESHOLD, seq_mode=seq_mode)
    dense, compact = streamed(None).processed, streamed(MergeConfig().activation_threshold).processed
    theirs_matrix = theirs.activations.numpy()
    above = theirs_matrix * (theirs_matrix > MergeConfig().activation_threshold)
    return {
        "labels_equal": dense.labels == compact.labels == list(theirs.labels),
        "dead_equal": dense.dead_labels == compact.dead_labels == list(theirs.dead_components_lst or []),
        "matrix_equal": bool(torch.equal(dense.activations, theirs.activations)),  # continuous mode: every value
        "compact_equal": compact.is_compact and bool(np.array_equal(compact.to_scipy_csr().toarray(), above)),
        "matrix_max_abs_difference": float((dense.activations - theirs.activations).abs().max()),
        "compact_max_abs_difference": float(np.abs(compact.to_scipy_csr().toarray() - above).max()),
        "shape": list(dense.activations.shape),
        "dead": len(dense.dead_labels),
    }


def error_of(action) -> str | None:
    try:
        action()
    except SourceError as error:
        return str(error)
    return None


def resid_mlp(run: str) -> dict:
    from spd.clustering.activations import component_activations
    from spd.clustering.dataset import load_dataset
    from spd.models.component_model import ComponentModel

    source = SpdSource(SpdSourceConfig(model_path=run, batch_size=32, n_members=3, dataset_seed=5))
    source.check()
    seeds = [source.batch_seed(member, member_seed=123) for member in source.member_keys()]
    state = torch.get_rng_state()
    batch = source.token_batch("member_001", seeds[1])
    rng_untouched = bool(torch.equal(state, torch.get_rng_state()))
    # spd's own loader, with torch's global generator seeded the same way
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seeds[1])
        spd_batch = load_dataset(source.checkpoint, "resid_mlp", 32, seeds[1])
    ours = next(source.activation_chunks(batch, CPU))
    theirs = component_activations(ComponentModel.from_pretrained(source.checkpoint), "cpu", torch.from_numpy(batch.inputs))
    chunked_source = SpdSource(source.config.model_copy(update={"chunk_size": 5}))
    chunked = list(chunked_source.activation_chunks(batch, CPU))
    together = {name: torch.cat([chunk[name] for chunk in chunked]) for name in chunked[0]}
    return {
        "checkpoint": source.checkpoint,
        "seeds": seeds,
        "batch_shape": list(batch.inputs.shape),
        "batch_dtype": str(batch.inputs.dtype),
        "batch_equals_spd_loader": bool(np.array_equal(batch.inputs, spd_batch.numpy())),
        "same_seed_same_batch": bool(np.array_equal(batch.inputs, source.token_batch("member_001", seeds[1]).inputs)),
        "other_seed_other_batch": not np.array_equal(batch.inputs, source.token_batch("member_002", seeds[2]).inputs),
        "global_rng_untouched": rng_untouched,
        "modules": list(ours),
        "importances_equal_spd": same_importances(ours, theirs),
        "chunked_max_abs_difference": max(float((together[n] - ours[n]).abs().max()) for n in ours),
        "value_range": [min(float(v.min()) for v in ours.values()), max(float(v.max()) for v in ours.values())],
        "processed": streamed_vs_spd(source, batch, None, theirs),
        "wrong_task_error": error_of(SpdSource(source.config.model_copy(update={"task_name": "lm"})).check),
    }


def lm(run: str, token_ids: str) -> dict:
    from spd.clustering.activations import component_activations
    from spd.models.component_model import ComponentModel

    source = SpdSource(SpdSourceConfig(model_path=run, batch_size=16, n_members=2, token_ids=token_ids, chunk_size=6))
    source.check()
    batch = source.token_batch("member_000", source.batch_seed("member_000", 0))
    whole = SpdSource(source.config.model_copy(update={"chunk_size": None}))
    ours = next(whole.activation_chunks(batch, CPU))
    theirs = component_activations(ComponentModel.from_pretrained(source.checkpoint), "cpu", torch.from_numpy(batch.inputs))
    # The source streams chunks of 6 sequences: spd's processing is compared on those same forward passes (a
    # transformer's float results may depend on the batch shape the CPU kernels get; that is measured apart).
    chunks = list(source.activation_chunks(batch, CPU))
    chunked = {name: torch.cat([chunk[name] for chunk in chunks]) for name in chunks[0]}
    too_long = np.zeros((4, 9), dtype=np.int64)
    return {
        "batch_shape": list(batch.inputs.shape),
        "modules": list(ours),
        "importances_equal_spd": same_importances(ours, theirs),
        "chunked_max_abs_difference": max(float((chunked[n] - ours[n]).abs().max()) for n in ours),
        "processed_concat": streamed_vs_spd(source, batch, "concat", chunked),
        "processed_seq_mean": streamed_vs_spd(source, batch, "seq_mean", chunked),
        "too_long_error": error_of(lambda: _with_ids(source, too_long)),
        "missing_run_error": error_of(SpdSource(SpdSourceConfig(model_path=run + "_gone")).check),
    }


def registry() -> dict:
    """experiment_key -> the canonical run in spd's registry (not loaded: canonical runs live on wandb)."""
    return {
        "resid_mlp1": SpdSource(SpdSourceConfig(experiment_key="resid_mlp1")).model_path,
        "unknown_error": error_of(lambda: SpdSource(SpdSourceConfig(experiment_key="no_such_preset")).model_path),
        "disagreeing_error": error_of(lambda: SpdSource(SpdSourceConfig(
            experiment_key="resid_mlp1", model_path="wandb:goodfire/spd/runs/other")).model_path),
    }


def _with_ids(source: SpdSource, ids: np.ndarray) -> None:
    path = source.config.token_ids.with_name("too_long.npy")
    np.save(path, ids)
    SpdSource(source.config.model_copy(update={"token_ids": path})).check()


if __name__ == "__main__":
    resid_run, lm_run, lm_ids = sys.argv[1:4]
    print(json.dumps({"resid_mlp": resid_mlp(resid_run), "lm": lm(lm_run, lm_ids), "registry": registry()}))
