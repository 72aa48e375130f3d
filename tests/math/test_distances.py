"""Distances between ensemble members (docs/math.md §9): golden vectors, textbook equality, metric laws, errors."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment

import spd_math
from spd_math import distances
from spd_math.distances import (
    DISTANCE_METHODS,
    DistanceError,
    compute_distances,
    matching_dist_matrix,
    perm_invariant_hamming_matrix,
)
from spd_math.ensemble import normalize_ensemble
from tests.conftest import golden_files, load_golden

# --- textbook definitions -------------------------------------------------------------------


def textbook_hamming(a: np.ndarray, b: np.ndarray) -> int:
    """n − the Hungarian assignment on the full dense contingency table."""
    _, a_group = np.unique(a, return_inverse=True)
    _, b_group = np.unique(b, return_inverse=True)
    table = np.zeros((a_group.max() + 1, b_group.max() + 1), dtype=np.int64)
    np.add.at(table, (a_group, b_group), 1)
    rows, cols = linear_sum_assignment(table, maximize=True)
    return len(a) - int(table[rows, cols].sum())


def textbook_matching(a: np.ndarray, b: np.ndarray) -> int:
    """Unordered item pairs on which "same group" differs."""
    return sum((a[x] == a[y]) != (b[x] == b[y]) for x, y in itertools.combinations(range(len(a)), 2))


TEXTBOOK = {"perm_invariant_hamming": textbook_hamming, "matching_dist": textbook_matching}


def textbook_matrix(labels: np.ndarray, method: str) -> np.ndarray:
    n_ens = labels.shape[0]
    out = np.zeros((n_ens, n_ens), dtype=np.int64)
    for i, j in itertools.combinations(range(n_ens), 2):
        out[i, j] = out[j, i] = TEXTBOOK[method](labels[i], labels[j])
    return out


def assert_metric(matrix: np.ndarray) -> None:
    assert (matrix == matrix.T).all()
    assert (np.diag(matrix) == 0).all()
    assert (matrix >= 0).all()
    # d(i, k) <= d(i, j) + d(j, k) for every triple.
    assert (matrix[:, None, :] <= matrix[:, :, None] + matrix[None, :, :]).all()


# --- golden vectors ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", golden_files("hamming_*.npz"), ids=lambda p: p.name)
def test_golden_hamming(path: Path) -> None:
    golden = load_golden(path)
    result = perm_invariant_hamming_matrix(golden["labels"])
    assert result.dtype == torch.int64
    expected = golden["expected"]
    lower = np.tril_indices(expected.shape[0], -1)
    np.testing.assert_array_equal(result.numpy()[lower], expected[lower])
    assert_metric(result.numpy())


@pytest.mark.parametrize("path", golden_files("ensemble_*.npz"), ids=lambda p: p.name)
def test_golden_ensemble(path: Path) -> None:
    golden = load_golden(path)
    members = [
        spd_math.MergeHistory(
            labels=[str(x) for x in golden[f"member{m}::labels"]],
            group_idxs=torch.from_numpy(golden[f"member{m}::group_idxs"]),
        )
        for m in range(int(golden["n_members"]))
    ]
    ensemble = normalize_ensemble(members)
    for method, key in (("perm_invariant_hamming", "expected_perm_invariant_hamming"), ("matching_dist", "expected_matching_dist")):
        result = compute_distances(ensemble, method)
        expected = golden[key]
        assert result.dtype == torch.int64 and result.shape == expected.shape
        defined = ~np.isnan(expected)
        np.testing.assert_array_equal(result.numpy()[defined], expected[defined], err_msg=method)
        for matrix in result.numpy():
            assert_metric(matrix)


# --- properties -------------------------------------------------------------------------------

# Group ids the labelings draw from: small, negative and near the int64 limits.
ID_VALUES = st.one_of(st.integers(-3, 12), st.integers(-(2**63), 2**63 - 1))


@st.composite
def labelings(draw, max_members: int = 5, max_items: int = 24) -> np.ndarray:
    """`[n_ens, n]` labelings with adversarial structure: few groups, many, all-same, all-distinct."""
    n_ens = draw(st.integers(1, max_members))
    n = draw(st.integers(1, max_items))
    ids = np.array(draw(st.lists(ID_VALUES, min_size=n, max_size=n, unique=True)), dtype=np.int64)
    rows = []
    for _ in range(n_ens):
        shape = draw(st.sampled_from(["random", "few", "all_same", "all_distinct"]))
        if shape == "all_same":
            row = np.full(n, ids[0])
        elif shape == "all_distinct":
            row = ids[np.array(draw(st.permutations(range(n))))]
        else:
            n_groups = draw(st.integers(1, min(n, 3) if shape == "few" else n))
            row = ids[np.array(draw(st.lists(st.integers(0, n_groups - 1), min_size=n, max_size=n)))]
        rows.append(row)
    return np.stack(rows)


@st.composite
def histories(draw) -> np.ndarray:
    """`[n_ens, n_iters, n]`: per member, a start labeling followed by merges, splits, relabellings and repeats."""
    start = draw(labelings(max_members=4, max_items=16))
    n_iters = draw(st.integers(1, 6))
    members = []
    for row in start:
        steps = [row]
        for _ in range(n_iters - 1):
            row = row.copy()
            step = draw(st.sampled_from(["merge", "split", "relabel", "repeat"]))
            groups = np.unique(row)
            if step == "merge" and groups.size >= 2:
                keep, gone = draw(st.lists(st.sampled_from(list(groups)), min_size=2, max_size=2, unique=True))
                row[row == gone] = keep
            elif step == "split":
                moved = np.array(draw(st.lists(st.booleans(), min_size=row.size, max_size=row.size)))
                row[moved] = np.setdiff1d(np.arange(row.size + 1), row)[0]  # a fresh id
            elif step == "relabel":
                row = -3 * row + 5  # same partition, other ids (wraps near the int64 limits, still one-to-one)
            steps.append(row)
        members.append(np.stack(steps))
    return np.stack(members)


@settings(max_examples=150, deadline=None)
@given(labels=labelings())
def test_matrices_equal_textbook(labels: np.ndarray) -> None:
    for method, function in (("perm_invariant_hamming", perm_invariant_hamming_matrix), ("matching_dist", matching_dist_matrix)):
        result = function(labels)
        assert result.dtype == torch.int64
        np.testing.assert_array_equal(result.numpy(), textbook_matrix(labels, method), err_msg=method)
        assert_metric(result.numpy())


@settings(max_examples=100, deadline=None)
@given(merges=histories())
def test_compute_distances_equals_textbook_every_iteration(merges: np.ndarray) -> None:
    for method in DISTANCE_METHODS:
        result = compute_distances(torch.from_numpy(merges), method)
        assert result.dtype == torch.int64 and result.shape == (merges.shape[1], merges.shape[0], merges.shape[0])
        for t in range(merges.shape[1]):
            np.testing.assert_array_equal(result[t].numpy(), textbook_matrix(merges[:, t], method), err_msg=f"{method}, iteration {t}")


def merge_history(rng: np.random.Generator, n_iters: int, n: int) -> np.ndarray:
    """A merge run: start from singletons, merge two random groups per iteration, groups numbered by smallest member."""
    row = np.arange(n)
    rows = []
    for _ in range(n_iters):
        keep, gone = np.sort(rng.choice(np.unique(row), size=2, replace=False))
        row = np.where(row == gone, keep, row)
        rows.append(np.unique(row, return_inverse=True)[1])
    return np.stack(rows)


@pytest.mark.parametrize(
    "setting",
    [
        {},
        {"MAX_TRACKED_ITEMS": 1},  # one member pair at a time (matching_dist's cell tracking)
    ],
    ids=lambda setting: ",".join(f"{k}={v}" for k, v in setting.items()) or "defaults",
)
def test_merge_runs_equal_textbook(setting: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in setting.items():
        monkeypatch.setattr(distances, name, value)
    rng = np.random.default_rng(7)
    n = 60
    merges = np.stack([merge_history(rng, n_iters=n - 2, n=n) for _ in range(4)])
    expected_at = range(0, n - 2, 5)
    for method in DISTANCE_METHODS:
        result = compute_distances(merges, method).numpy()
        for t in expected_at:
            np.testing.assert_array_equal(result[t], textbook_matrix(merges[:, t], method), err_msg=f"{method}, iteration {t}")


def test_single_member_and_empty_items() -> None:
    assert perm_invariant_hamming_matrix([[4, 4, 7]]).tolist() == [[0]]
    assert matching_dist_matrix(np.zeros((3, 0), dtype=np.int64)).tolist() == [[0] * 3] * 3
    assert compute_distances(np.zeros((2, 0, 5), dtype=np.int64), "matching_dist").shape == (0, 2, 2)


def test_integral_floats_are_group_ids() -> None:
    labels = np.array([[0, 0, 1, 2], [5, 5, 5, 1]])
    for function in (perm_invariant_hamming_matrix, matching_dist_matrix):
        assert function(labels.astype(np.float32)).tolist() == function(labels).tolist()


# --- errors -----------------------------------------------------------------------------------


def test_unknown_method() -> None:
    with pytest.raises(DistanceError, match=r"method: expected one of .*'hamming'"):
        compute_distances(np.zeros((2, 1, 3), dtype=np.int64), "hamming")


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: compute_distances(np.zeros((2, 3), dtype=np.int64), "matching_dist"), r"ensemble_or_merges_array: expected a 3-D .* got shape \(2, 3\)"),
        (lambda: perm_invariant_hamming_matrix(np.zeros((2, 3, 4), dtype=np.int64)), r"labels_2d: expected a 2-D .* got shape \(2, 3, 4\)"),
        (lambda: matching_dist_matrix(np.array([[0.0, np.nan], [1.0, 1.0]])), r"labels_2d: .*NaN"),
        (lambda: matching_dist_matrix(np.array([[0.5, 1.0], [1.0, 1.0]])), r"labels_2d: .*non-integer"),
        (lambda: matching_dist_matrix(np.array([["a", "b"]])), r"labels_2d: expected integer group ids, got dtype <U1"),
        (lambda: compute_distances(np.zeros((0, 2, 3), dtype=np.int64), "matching_dist"), r"at least one ensemble member"),
    ],
    ids=["ndim-3d", "ndim-2d", "nan", "fraction", "strings", "no-members"],
)
def test_bad_input(call, message: str) -> None:
    with pytest.raises(DistanceError, match=message):
        call()
