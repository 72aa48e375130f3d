"""The scaled engine against the pre-scale engine (`reference_engine`): identical histories, bit for bit.

Same seed, same sampler: the same pairs, partitions, pair costs and MDL losses, on random
problems covering boolean and continuous mode, both samplers, ties (threshold 0), the whole
range (threshold 1), never-active components, the kinds of activations the benchmarks use
(uniform rates, heterogeneous power-law rates with a few dense components, planted groups),
and the engine's internal regimes (several row blocks, the candidate pool overflowing into
row counting, pairs counted by their cost ceilings, 16-bit counts with wide groups, the
torch primitives other devices use).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spd_math import MergeConfig, ProcessedActivations, merge_iteration
from spd_math._engine import backend, pool_policy, state, store
from tests.math.reference_engine import reference_merge


@pytest.fixture(autouse=True, params=["scalable", "dense", "switching"])
def engine(request, monkeypatch):
    """Every test runs on both states (the scalable one, and the dense one used for small problems) and on a run
    that moves from the first to the second as soon as its candidate pool holds 2% of all pairs."""
    for limit in ("DENSE_MAX_COMPONENTS", "DENSE_MAX_COMPONENTS_CONTINUOUS"):
        monkeypatch.setattr(state, limit, 1 << 20 if request.param == "dense" else 0)
    if request.param == "scalable":
        monkeypatch.setattr(state, "DENSE_MEMORY_SHARE", 0.0)  # the dense state never fits: no move
    if request.param == "switching":
        monkeypatch.setattr(state, "DENSE_SWITCH_SHARE", 0.02)
    return request.param


DATA_KINDS = ("uniform", "zipf", "planted")


def component_rates(rng, c: int, density: float, data: str) -> np.ndarray:
    """Per-component firing rates: all `density` (uniform), or a power law with mean `density` and a few
    components active on up to half the samples (zipf)."""
    if data != "zipf":
        return np.full(c, density)
    shape = np.arange(1, c + 1) ** -1.1
    return np.minimum(0.5, density * c * shape / shape.sum())[rng.permutation(c)]


def random_problem(seed: int, n: int, c: int, density: float, threshold, alpha: float, iters, method: str, kwargs,
                   data: str = "uniform"):
    rng = np.random.default_rng(seed)
    active = rng.random((n, c)) < component_rates(rng, c, density, data)
    if data == "planted":  # groups of 4 that also fire together on a shared feature
        features = rng.random((n, c // 4 + 1)) < density
        active |= np.repeat(features, 4, axis=1)[:, :c]
    values = rng.random((n, c)) * active
    values[:, rng.random(c) < 0.15] = 0.0  # never-active components
    if c >= 4 and rng.random() < 0.5:  # duplicated columns: exact cost ties
        values[:, 1] = values[:, 0]
    config = MergeConfig(
        activation_threshold=threshold,
        alpha=alpha,
        iters=iters,
        merge_pair_sampling_method=method,
        merge_pair_sampling_kwargs=kwargs,
        filter_dead_threshold=0.0,
    )
    labels = [f"m:{x}" for x in range(c)]
    return ProcessedActivations(activations=torch.from_numpy(values.astype(np.float32)), labels=labels), config


def assert_same_history(activations, config, seed: int) -> None:
    expected = reference_merge(activations, config, seed)
    history = merge_iteration(activations, config, seed=seed)
    np.testing.assert_array_equal(history.selected_pairs.numpy(), expected["pairs"])
    np.testing.assert_array_equal(history.group_idxs.numpy(), expected["group_idxs"])
    np.testing.assert_array_equal(history.pair_costs.numpy(), expected["pair_costs"])
    np.testing.assert_array_equal(history.mdl_losses.numpy(), expected["mdl_losses"])


SAMPLERS = st.sampled_from(
    [
        ("range", {"threshold": 0.05}),
        ("range", {"threshold": 0.0}),
        ("range", {"threshold": 0.3}),
        ("range", {"threshold": 1.0}),
        ("mcmc", {"temperature": 1.0}),
        ("mcmc", {"temperature": 0.001}),
    ]
)


@st.composite
def problems(draw, max_n: int = 300, max_c: int = 40):
    method, kwargs = draw(SAMPLERS)
    return random_problem(
        seed=draw(st.integers(0, 2**32 - 1)),
        n=draw(st.integers(1, max_n)),
        c=draw(st.integers(2, max_c)),
        density=draw(st.sampled_from([0.02, 0.1, 0.4])),
        threshold=draw(st.sampled_from([None, 0.0, 0.1, 0.5])),
        alpha=draw(st.sampled_from([0.0, 0.3, 1.0, 5.0])),
        iters=draw(st.sampled_from([None, 1, 5, 60])),
        method=method,
        kwargs=kwargs,
        data=draw(st.sampled_from(DATA_KINDS)),
    ), draw(st.integers(0, 2**31))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(problems())
def test_identical_histories_to_the_reference_engine(problem):
    (activations, config), seed = problem
    assert_same_history(activations, config, seed)


@pytest.mark.parametrize("data", DATA_KINDS)
@pytest.mark.parametrize("seed", range(4))
def test_identical_histories_where_ceilings_count_most_candidates(engine, monkeypatch, data, seed):
    """Heterogeneous rates: once the strongest pairs are merged nearly every pair is in the range sampler's
    window, and the scalable state counts most of them by their ceilings."""
    counted = []
    original = state.GroupState._ceiling_counts

    def recorded(self, cutoff):
        counts = original(self, cutoff)
        counted.append(int(counts.sum()))
        return counts

    monkeypatch.setattr(state.GroupState, "_ceiling_counts", recorded)
    activations, config = random_problem(seed, n=600, c=80, density=0.04, threshold=0.1, alpha=1.0, iters=70,
                                         method="range", kwargs={"threshold": 0.05}, data=data)
    assert_same_history(activations, config, seed)
    if engine == "scalable" and data == "zipf":
        assert max(counted) > 80 * 79 // 2  # more than half of all pairs counted without their costs


@pytest.fixture
def small_blocks(monkeypatch):
    """Row blocks of a few rows, a tiny pool and a lazy batch of 2: every regime on small problems."""
    monkeypatch.setattr(state, "BLOCK_ENTRIES", 64)
    monkeypatch.setattr(pool_policy, "DEFAULT_SETTINGS", pool_policy.PoolSettings(limit=6))
    monkeypatch.setattr(state, "LAZY_BATCH_ENTRIES", 2)


@pytest.mark.parametrize("seed", range(12))
def test_identical_histories_with_small_blocks_and_pool(small_blocks, seed):
    rng = np.random.default_rng(seed)
    method, kwargs = [("range", {"threshold": 0.05}), ("range", {"threshold": 0.0}), ("range", {"threshold": 0.5}),
                      ("mcmc", {"temperature": 0.5})][seed % 4]
    activations, config = random_problem(seed, n=int(rng.integers(50, 400)), c=int(rng.integers(20, 60)), density=0.1,
                                         threshold=[0.1, None][seed % 2 if method == "range" else 0], alpha=1.0,
                                         iters=None, method=method, kwargs=kwargs, data=DATA_KINDS[seed % 3])
    assert_same_history(activations, config, seed)


@pytest.mark.parametrize("seed", range(6))
def test_identical_histories_with_wide_groups(monkeypatch, seed):
    """16-bit counts with a tiny limit: groups active on more samples keep their mutual counts apart."""
    monkeypatch.setattr(store, "NARROW_MAX", 40)
    monkeypatch.setattr(store, "WIDE_SHARE", 1.0)
    activations, config = random_problem(seed, n=300, c=30, density=0.3, threshold=0.2, alpha=1.0, iters=None,
                                         method="range", kwargs={"threshold": 0.1})
    assert_same_history(activations, config, seed)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(problems(max_n=200, max_c=25))
def test_torch_primitives_give_identical_histories(problem):
    """What runs on a GPU (dense float32 counting, torch bit counts), here on the CPU."""
    (activations, config), seed = problem
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(backend, "numpy_fast_path", lambda tensor: False)
        assert_same_history(activations, config, seed)


@pytest.mark.parametrize("share", [0.0, 0.05])
@pytest.mark.parametrize("seed", range(4))
def test_identical_histories_when_the_run_moves_to_the_dense_state(engine, monkeypatch, share, seed):
    """The move happens (at the first merge, or once the pool holds a share of the pairs) and changes nothing."""
    if engine != "switching":
        pytest.skip("the move is a property of the switching run")
    monkeypatch.setattr(state, "DENSE_SWITCH_SHARE", share)
    moves = []
    original = state.DenseGroupState.from_scalable.__func__

    def recorded(cls, scalable):
        moves.append(scalable.k)
        return original(cls, scalable)

    monkeypatch.setattr(state.DenseGroupState, "from_scalable", classmethod(recorded))
    method, kwargs = [("range", {"threshold": 0.05}), ("range", {"threshold": 0.3}), ("mcmc", {"temperature": 0.5}),
                      ("range", {"threshold": 0.05})][seed]
    activations, config = random_problem(seed, n=300, c=40, density=0.1, threshold=[0.1, 0.1, 0.1, None][seed],
                                         alpha=1.0, iters=None, method=method, kwargs=kwargs)
    assert_same_history(activations, config, seed)
    assert len(moves) == 1 and moves[0] < 40


@pytest.mark.parametrize("seed", range(4))
def test_identical_under_a_pair_sampler(seed):
    activations, config = random_problem(seed, n=200, c=25, density=0.1, threshold=0.1, alpha=1.0, iters=None,
                                         method="range", kwargs={"threshold": 0.05})
    rng = np.random.default_rng(seed)
    pairs = []

    def choose(costs):
        k = costs.shape[0]
        i, j = rng.choice(k, 2, replace=False)
        pairs.append((int(i), int(j)))
        return int(i), int(j)

    history = merge_iteration(activations, config, pair_sampler=choose)
    replay = iter(pairs)
    expected = reference_merge(activations, config, 0, pair_sampler=lambda costs: next(replay))
    np.testing.assert_array_equal(history.group_idxs.numpy(), expected["group_idxs"])
    np.testing.assert_array_equal(history.pair_costs.numpy(), expected["pair_costs"])


@pytest.mark.parametrize("threshold, alpha", [(None, 0.3), (None, 1.7), (0.1, 0.3), (0.0, 1.0)])
def test_cost_matrices_are_bit_identical(threshold, alpha):
    """Every cost the engine evaluates is the float the original engine computed (same operations, same order)."""
    activations, config = random_problem(7, n=150, c=30, density=0.3, threshold=threshold, alpha=alpha, iters=None,
                                         method="range", kwargs={"threshold": 0.05})
    seen = {"new": [], "old": []}

    def chooser(name):
        rng = np.random.default_rng(0)

        def choose(costs):
            seen[name].append(costs.clone())
            i, j = rng.choice(costs.shape[0], 2, replace=False)
            return int(i), int(j)

        return choose

    merge_iteration(activations, config, pair_sampler=chooser("new"))
    reference_merge(activations, config, 0, pair_sampler=chooser("old"))
    assert len(seen["new"]) == len(seen["old"]) == 27
    for new, old in zip(seen["new"], seen["old"]):
        np.testing.assert_array_equal(new.numpy(), old.numpy())


def test_every_state_offers_what_the_samplers_and_the_loop_read():
    from spd_math._engine.cost_view import Candidates, CostView, DenseCostView, MergeState

    activations, _ = random_problem(0, n=200, c=30, density=0.2, threshold=0.1, alpha=1.0, iters=None,
                                    method="range", kwargs={"threshold": 0.05})
    args = (activations.activations, activations.labels, 0.1, 1.0, torch.device("cpu"))
    scalable = state.GroupState(*args)
    for merge_state in (scalable, state.DenseGroupState(*args), state.SwitchingState(state.GroupState(*args), 1 << 30)):
        assert isinstance(merge_state, MergeState)
        assert isinstance(merge_state.candidates_at_most(merge_state.offdiagonal_max(), 0.0), Candidates)
    assert isinstance(DenseCostView(torch.zeros((3, 3))), CostView)
    assert not isinstance(DenseCostView(torch.zeros((3, 3))), MergeState)
