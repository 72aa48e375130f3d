"""The figures are real, small PNGs of the size the UI shows, also for the smallest inputs."""

from __future__ import annotations

import base64
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


def test_mdl_curve_zooms_on_the_minimum_below_the_whole_curve():
    # A real curve's shape: a long descent, a shallow minimum, then a spike at the end of the merge that sets
    # the whole curve's scale (here 1000 times the minimum's depth below its surroundings).
    iterations = np.arange(500)
    mdl = 1000 + 0.01 * (iterations - 400) ** 2 + 1e6 * np.exp((iterations - 499) / 5.0)
    best = int(np.argmin(mdl))
    figure = plots.mdl_figure(mdl, np.gradient(mdl), 502 - iterations, "m: MDL")
    whole, zoom, costs = figure.axes
    assert zoom.get_label() == plots.ZOOM_LABEL and len(figure.axes) == 3
    # The whole curve is still drawn, spike included.
    assert whole.get_ylim()[1] > mdl.max() and whole.get_xlim()[1] >= iterations[-1]
    # The zoom: iterations around the minimum, the loss of its neighbourhood bracketed, the spike well outside.
    x_low, x_high = zoom.get_xlim()
    assert x_low < best - 10 and best + 10 < x_high < 499 - 10
    y_low, y_high = zoom.get_ylim()
    neighbourhood = mdl[best - 10:best + 11]
    assert y_low < mdl[best] and neighbourhood.max() < y_high < mdl[best] + 0.1 * (mdl.max() - mdl[best])
    assert y_high < mdl[-20:].max()
    # The minimum is marked in it.
    marked = [line for line in zoom.get_lines() if line.get_marker() == "o"]
    assert [(line.get_xdata()[0], line.get_ydata()[0]) for line in marked] == [(best, mdl[best])]

    # Without pair costs: the whole curve and the zoom. A minimum at the first iteration: the rise sets the height.
    rising = np.linspace(10, 50, 30)
    whole, zoom = plots.mdl_figure(rising, None, 31 - np.arange(30), "rising").axes
    assert zoom.get_ylim()[0] < 10 < zoom.get_ylim()[1] and zoom.get_xlim()[0] < 0 < zoom.get_xlim()[1]


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


def test_markdown_image_inlines_the_png():
    png = PNG_SIGNATURE + bytes(range(256))
    markdown = plots.markdown_image(png, "an MDL curve")
    assert markdown.startswith("![an MDL curve](data:image/png;base64,") and markdown.endswith(")")
    assert base64.b64decode(markdown.split(",", 1)[1][:-1]) == png
