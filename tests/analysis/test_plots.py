"""The figures are real, small PNGs of the size the UI shows, also for the smallest inputs."""

from __future__ import annotations

import io

import numpy as np
import pytest
from matplotlib.image import imread

from spd_assets.analysis import plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_BYTES = 100_000


def check_png(data: bytes) -> np.ndarray:
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) < MAX_BYTES, f"{len(data)} bytes: too large for metadata"
    pixels = imread(io.BytesIO(data))
    assert pixels.shape[1] == round(plots.WIDTH_IN * plots.DPI)
    # Not blank: a plot has many colours.
    assert np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0).shape[0] > 20
    return pixels


def test_mdl_curve():
    mdl = np.concatenate([np.linspace(100, 40, 60), np.linspace(40, 200, 20)])
    check_png(plots.mdl_curve(mdl, np.diff(mdl, prepend=mdl[0]), np.arange(80, 0, -1), "m: MDL"))
    check_png(plots.mdl_curve(mdl, None, np.arange(80, 0, -1), "without pair costs"))


@pytest.mark.parametrize("n_members", [1, 14])
def test_ensemble_and_distance_figures(n_members):
    rng = np.random.default_rng(0)
    members = [f"member_{m:03d}" for m in range(n_members)]
    present = rng.random((n_members, 50)) < 0.9
    check_png(plots.member_overlap(members, present))
    distances = rng.integers(0, 1000, size=(30, n_members, n_members)).astype(float)
    distances = (distances + distances.transpose(0, 2, 1)) / 2
    distances[:, np.arange(n_members), np.arange(n_members)] = 0
    by_method = {"perm_invariant_hamming": distances, "matching_dist": distances ** 2}
    check_png(plots.distance_curves(by_method))
    check_png(plots.distance_heatmaps(by_method, members, 12))


def test_co_association_heatmap():
    matrix = np.kron(np.eye(4), np.ones((5, 5))) * 0.8 + 0.1
    check_png(plots.co_association_heatmap(matrix, [5, 5, 5, 5], 42, 6, shown_of=9))


def test_equal_inputs_give_equal_bytes():
    mdl = np.linspace(10, 1, 20)
    assert plots.mdl_curve(mdl, None, np.arange(20), "t") == plots.mdl_curve(mdl, None, np.arange(20), "t")
