"""Resuming a merge from a checkpoint (spd_math.checkpoint): bit-identical to the run never stopped, on every
state (dense, scalable, switching), boolean and continuous, both samplers, dense and compact activations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spd_math import MergeConfig, MergeError, ProcessedActivations, merge_iteration
from spd_math._engine.state import DENSE_MAX_COMPONENTS
from spd_math.activations import CompactActivationsBuilder
from spd_math.checkpoint import MergeCheckpoint


class EveryNth:
    """Due after every n-th merge; keeps every checkpoint."""

    def __init__(self, n: int) -> None:
        self.n, self.asked, self.saved = n, 0, []

    def due(self) -> bool:
        self.asked += 1
        return self.asked % self.n == 0

    def save(self, checkpoint: MergeCheckpoint) -> None:
        self.saved.append(checkpoint)


def heterogeneous(n: int, c: int, seed: int = 0) -> torch.Tensor:
    """Rates spread over an order of magnitude, a few co-firing pairs: the regime real activations are in."""
    rng = np.random.default_rng(seed)
    rates = np.exp(rng.uniform(np.log(0.01), np.log(0.2), c))
    active = rng.random((n, c)) < rates
    active[:, 1::7] |= active[:, 0::7][:, : active[:, 1::7].shape[1]]
    return torch.from_numpy((active * rng.uniform(0.2, 1.0, (n, c))).astype(np.float32))


def same_history(first, second) -> bool:
    return all(torch.equal(getattr(first, name), getattr(second, name))
               for name in ("selected_pairs", "pair_costs", "mdl_losses", "k_groups")) and first.seed == second.seed


def resumes_exactly(activations: ProcessedActivations, config: MergeConfig, every: int) -> list[int]:
    sink = EveryNth(every)
    clean = merge_iteration(activations, config, seed=7, checkpoints=sink)
    assert sink.saved, "no checkpoint was taken"
    for checkpoint in sink.saved:
        assert checkpoint.n_done < clean.n_iters
        resumed = merge_iteration(activations, config, seed=7, resume_from=checkpoint)
        assert same_history(clean, resumed), f"resumed at {checkpoint.n_done} differs"
    return [checkpoint.n_done for checkpoint in sink.saved]


@pytest.mark.parametrize("threshold, method", [(0.1, "range"), (0.1, "mcmc"), (None, "range")])
def test_resumed_dense_state_runs_equal_the_clean_run(threshold, method):
    values = heterogeneous(600, 120)
    kwargs = {"temperature": 0.5} if method == "mcmc" else {"threshold": 0.05}
    config = MergeConfig(activation_threshold=threshold, merge_pair_sampling_method=method,
                         merge_pair_sampling_kwargs=kwargs, iters=None)
    done = resumes_exactly(ProcessedActivations(values, [f"m:{i}" for i in range(120)]), config, every=17)
    assert done[0] == 17 and done[-1] > 100


def test_resumed_scalable_runs_equal_the_clean_run_on_compact_activations():
    c = DENSE_MAX_COMPONENTS + 200  # the scalable state (which may move to the dense one mid-run)
    values = heterogeneous(800, c, seed=1)
    labels = [f"m:{i}" for i in range(c)]
    builder = CompactActivationsBuilder(labels, activation_threshold=0.1)
    builder.add(values)
    compact = builder.build()
    # Early checkpoints replay with costs, late ones without (bounds rebuilt in one pass): both exactly.
    done = resumes_exactly(compact, MergeConfig(activation_threshold=0.1, iters=1000), every=333)
    assert done == [333, 666, 999]


def test_a_resumed_run_that_was_nearly_done_stops_where_the_clean_run_stops():
    values = heterogeneous(300, 12)
    config = MergeConfig(activation_threshold=0.1, iters=None)
    done = resumes_exactly(ProcessedActivations(values, [f"m:{i}" for i in range(12)]), config, every=1)
    assert done == list(range(1, 9))  # every merge but the last (after which 3 groups are left)


def test_a_checkpoint_of_another_run_is_refused_with_what_differs():
    values = heterogeneous(300, 30)
    activations = ProcessedActivations(values, [f"m:{i}" for i in range(30)])
    config = MergeConfig(activation_threshold=0.1, iters=20)
    sink = EveryNth(5)
    merge_iteration(activations, config, seed=1, checkpoints=sink)
    checkpoint = sink.saved[0]
    with pytest.raises(MergeError, match="with seed 1 cannot resume a run over 30 components with seed 2"):
        merge_iteration(activations, config, seed=2, resume_from=checkpoint)
    fewer = ProcessedActivations(values[:, :29], activations.labels[:29])
    with pytest.raises(MergeError, match="over 30 components .* cannot resume a run over 29"):
        merge_iteration(fewer, config, seed=1, resume_from=checkpoint)
    with pytest.raises(MergeError, match="holds 5 merges, more than the 3 this run makes"):
        merge_iteration(activations, MergeConfig(activation_threshold=0.1, iters=3), seed=1, resume_from=checkpoint)
    broken = MergeCheckpoint(1, 30, np.array([[0, 0]] + [[0, 1]] * 4), checkpoint.pair_costs, checkpoint.mdl_losses,
                             checkpoint.generator_state)
    with pytest.raises(MergeError, match="not two different groups"):
        merge_iteration(activations, config, seed=1, resume_from=broken)
    with pytest.raises(TypeError, match="resume_from: expected a MergeCheckpoint"):
        merge_iteration(activations, config, seed=1, resume_from={"pairs": []})


def test_without_a_seed_a_resumed_run_takes_the_checkpoints():
    values = heterogeneous(300, 30)
    activations = ProcessedActivations(values, [f"m:{i}" for i in range(30)])
    config = MergeConfig(activation_threshold=0.1, iters=None)
    sink = EveryNth(10)
    clean = merge_iteration(activations, config, checkpoints=sink)
    resumed = merge_iteration(activations, config, resume_from=sink.saved[0])
    assert same_history(clean, resumed)
