"""Run inside an environment with the real `spd` package: `extract_and_process_activations` on a real SPD
`ComponentModel` against the `spd` source's pipeline step on the same batch.

    python spd_real_api_checks.py RESID_MLP_RUN LM_RUN LM_TOKEN_IDS.npy

Prints one JSON object of findings, which `test_extract_activations_spd_real.py` asserts on. spd is imported
only when this runs (the test collection imports every module of the test folder, where spd is not installed).
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch

from spd_assets import extract_and_process_activations
from spd_assets.config import parse_config
from spd_assets.defs import steps
from spd_assets.sources import source_for
from spd_math import ProcessedActivations

CPU = torch.device("cpu")


def same_processed(ours: ProcessedActivations, theirs: ProcessedActivations) -> bool:
    if ours.labels != theirs.labels or ours.dead_labels != theirs.dead_labels or ours.is_compact != theirs.is_compact:
        return False
    if not ours.is_compact:
        return bool(torch.equal(ours.activations, theirs.activations))
    left, right = ours.to_scipy_csr(), theirs.to_scipy_csr()
    return bool(left.shape == right.shape and np.array_equal(left.indptr, right.indptr)
                and np.array_equal(left.indices, right.indices) and np.array_equal(left.data, right.data))


def compare(source_values: dict, merge_config: dict, seq_mode: str) -> dict:
    """The source's step and the plain function on one member's batch, with the source's own loaded model."""
    config = parse_config({"source": source_values, "merge_config": merge_config, "seq_mode": seq_mode})
    source = source_for(config.source)
    source.check()
    member = source.member_keys()[1]
    batch = source.token_batch(member, source.batch_seed(member, config.member_seed(member)))
    theirs = steps.model_activations(source, batch, config, member, CPU).value
    ours = extract_and_process_activations(source.model, torch.from_numpy(batch.inputs), config)
    return {
        "equal": same_processed(ours, theirs),
        "compact": ours.is_compact,
        "samples": ours.n_samples,
        "components": ours.n_components + len(ours.dead_labels),
        "is_component_model": type(source.model).__name__ == "ComponentModel",
    }


if __name__ == "__main__":
    resid_run, lm_run, lm_ids = sys.argv[1:4]
    resid = {"kind": "spd", "model_path": resid_run, "batch_size": 32, "n_members": 2, "dataset_seed": 5}
    lm = {"kind": "spd", "model_path": lm_run, "batch_size": 16, "n_members": 2, "token_ids": lm_ids, "chunk_size": 6}
    print(json.dumps({
        "resid_mlp_compact": compare(resid, {}, "concat"),
        "resid_mlp_continuous": compare(resid, {"activation_threshold": None, "filter_dead_threshold": 0.01}, "concat"),
        "lm_concat": compare(lm, {}, "concat"),
        "lm_seq_mean": compare(lm, {"activation_threshold": None}, "seq_mean"),
    }))
