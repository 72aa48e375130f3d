"""Small PNG figures of plain values, for asset metadata: NumPy arrays in, PNG bytes out.

Figures are drawn with Matplotlib's object API on the non-interactive Agg canvas (no pyplot,
no global state), sized to be read at the width of Dagster's metadata panel, and kept to tens
of kilobytes: one of each is drawn at every materialization. They are rendered by
`storage.figures.png_bytes` (shared with the exports); `markdown_image` puts a PNG into Markdown,
as Dagster's and Pipes' metadata show it.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from spd_assets.storage.figures import png_bytes

# Inches at DPI: about 640 pixels wide, what the UI shows without scaling down much.
WIDTH_IN = 6.4
DPI = 100
# Percentiles of the spread band around the median distance.
SPREAD_PERCENTILES = (10, 90)
# Above this many members, heatmap cells carry no numbers (they would not fit).
ANNOTATED_MEMBERS_MAX = 10
HEATMAP_COLORS = "viridis"
# A curve whose maximum exceeds its median this many times is drawn on a (symmetric) log axis.
LOG_SCALE_RATIO = 20
# The MDL curve's zoom on its minimum: this fraction of the iterations either side of it (at least the minimum
# count), and this fraction of the shown range added above and below.
ZOOM_HALF_WIDTH_FRACTION = 0.1
ZOOM_HALF_WIDTH_MIN = 5
ZOOM_MARGIN = 0.08
# A zoom on this few iterations marks each one.
ZOOM_DOTS_MAX = 60
# The zoom panel's Matplotlib label, by which it can be found among the figure's axes.
ZOOM_LABEL = "mdl_zoom"


def _figure(height_in: float) -> Figure:
    figure = Figure(figsize=(WIDTH_IN, height_in), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def markdown_image(png: bytes, title: str) -> str:
    """A PNG as a Markdown image with its data inline (what Dagster's metadata panel shows), `title` its alt text."""
    return f"![{title}](data:image/png;base64,{base64.b64encode(png).decode()})"


def _annotate(axes, image, values: np.ndarray, fmt: str) -> None:
    """Each cell's value, in black on light cells and white on dark ones (skipped when the cells are too small)."""
    if values.shape[0] > ANNOTATED_MEMBERS_MAX:
        return
    for (row, col), value in np.ndenumerate(values):
        if not np.isfinite(value):
            continue
        red, green, blue, _ = image.cmap(image.norm(value))
        text = format(value, fmt)
        axes.text(col, row, text, ha="center", va="center", fontsize=7 if len(text) <= 4 else 5.5,
                  color="black" if 0.299 * red + 0.587 * green + 0.114 * blue > 0.5 else "white")


def _wide_range(values: np.ndarray) -> bool:
    """Whether a curve spans so many orders of magnitude that a linear axis flattens most of it."""
    finite = values[np.isfinite(values)]
    return finite.size > 0 and finite.max() > LOG_SCALE_RATIO * max(float(np.median(finite)), 1.0)


def _member_ticks(axes, members: Sequence[str]) -> None:
    short = [member.removeprefix("member_") for member in members]
    axes.set_xticks(range(len(members)), short, rotation=90 if len(members) > 8 else 0, fontsize=7)
    axes.set_yticks(range(len(members)), short, fontsize=7)


def zoom_window(mdl_losses: np.ndarray) -> tuple[int, int, float, float]:
    """The minimum's neighbourhood: first and last iteration, lowest and highest loss shown (margins included).

    It spans `ZOOM_HALF_WIDTH_FRACTION` of the iterations either side of the minimum. Its height is that of the
    descent into the minimum within it, so the rise at the end of the merge, which reaches many times the
    minimum, does not flatten it: after the minimum it ends where the curve leaves that height. A minimum at the
    first iteration has no descent; the rise after it sets the height then.
    """
    best = int(np.nanargmin(mdl_losses))
    half_width = max(ZOOM_HALF_WIDTH_MIN, int(np.ceil(ZOOM_HALF_WIDTH_FRACTION * mdl_losses.size)))
    first, last = max(0, best - half_width), min(mdl_losses.size - 1, best + half_width)
    descent = mdl_losses[first:best + 1] if best > first else mdl_losses[first:last + 1]
    low, high = float(mdl_losses[best]), float(np.nanmax(descent))
    risen = np.flatnonzero(mdl_losses[best:last + 1] > high)
    if risen.size:
        last = best + int(risen[0])
    margin = ZOOM_MARGIN * (high - low) if high > low else max(abs(low), 1.0) * ZOOM_MARGIN
    return first, last, low - margin, high + margin


def mdl_figure(mdl_losses: np.ndarray, pair_costs: np.ndarray | None, k_groups: np.ndarray, title: str) -> Figure:
    """MDL loss against iteration with its minimum marked; below it the minimum's neighbourhood (`zoom_window`),
    which the whole curve's scale, set by the rise at the end of the merge, flattens; then the chosen pair's cost."""
    mdl_losses = np.asarray(mdl_losses, dtype=np.float64)
    iterations = np.arange(mdl_losses.size)
    has_minimum = bool(np.isfinite(mdl_losses).any())
    panels = 1 + has_minimum + (pair_costs is not None)
    figure = _figure(2.0 + 1.4 * panels)
    axes = list(figure.subplots(panels, 1, squeeze=False)[:, 0])
    whole = axes.pop(0)
    zoom = axes.pop(0) if has_minimum else None
    costs = axes.pop(0) if pair_costs is not None else None
    whole.plot(iterations, mdl_losses, color="tab:blue", linewidth=1.2)
    whole.set_ylabel("MDL loss (bits)")
    whole.set_title(title, fontsize=10)
    if zoom is not None:
        best = int(np.nanargmin(mdl_losses))
        where = f"minimum at iteration {best} (k={int(k_groups[best])})"
        whole.plot(best, mdl_losses[best], "o", color="tab:red", markersize=6)
        whole.annotate(where, (best, mdl_losses[best]), xytext=(0.5, 0.85), textcoords="axes fraction", ha="center",
                       fontsize=8, color="tab:red", arrowprops={"arrowstyle": "->", "color": "tab:red", "linewidth": 0.8})
        first, last, low, high = zoom_window(mdl_losses)
        whole.axvspan(first, last, color="tab:red", alpha=0.08, linewidth=0)
        zoom.set_label(ZOOM_LABEL)
        shown = slice(first, last + 1)
        dots = "." if last - first <= ZOOM_DOTS_MAX else None
        zoom.plot(iterations[shown], mdl_losses[shown], color="tab:blue", linewidth=1.2, marker=dots, markersize=3)
        zoom.plot(best, mdl_losses[best], "o", color="tab:red", markersize=6)
        zoom.axvline(best, color="tab:red", linewidth=0.8, alpha=0.5)
        zoom.set_xlim(first - 0.5, last + 0.5)
        zoom.set_ylim(low, high)
        zoom.set_ylabel("MDL loss (bits),\nnear the minimum", fontsize=8)
        zoom.set_title(f"{where}: {mdl_losses[best]:,.6g} bits (the shaded iterations above)", fontsize=8, color="tab:red")
    if costs is not None:
        costs.sharex(whole)
        costs.plot(iterations, pair_costs, color="tab:gray", linewidth=0.8)
        costs.set_ylabel("chosen pair's\ncost (bits)")
    (costs if costs is not None else whole).set_xlabel("iteration (merges so far; k = components - iteration - 1)")
    for ax in figure.axes:
        ax.grid(alpha=0.3)
    return figure


def mdl_curve(mdl_losses: np.ndarray, pair_costs: np.ndarray | None, k_groups: np.ndarray, title: str) -> bytes:
    """PNG of `mdl_figure`."""
    return png_bytes(mdl_figure(mdl_losses, pair_costs, k_groups, title))


def member_overlap(members: Sequence[str], present: np.ndarray) -> bytes:
    """Heatmap of how much two members' component labels overlap (labels in both / labels in either)."""
    present = present.astype(bool)
    both = present.astype(np.int64) @ present.T.astype(np.int64)
    either = present.sum(axis=1)[:, None] + present.sum(axis=1)[None, :] - both
    overlap = np.where(either > 0, both / np.maximum(either, 1), 1.0)
    figure = _figure(4.2)
    axes = figure.subplots()
    image = axes.imshow(overlap, cmap=HEATMAP_COLORS, vmin=min(0.5, float(overlap.min())), vmax=1.0)
    _annotate(axes, image, overlap, ".2f")
    _member_ticks(axes, members)
    axes.set_xlabel("member")
    axes.set_ylabel("member")
    axes.set_title(f"Shared component labels (Jaccard) of {len(members)} members, union {present.shape[1]}", fontsize=10)
    figure.colorbar(image, ax=axes, label="labels in both / labels in either")
    return png_bytes(figure)


def distance_curves(by_method: Mapping[str, np.ndarray]) -> bytes:
    """Per method, the distance between members against iteration: median over member pairs and a spread band."""
    methods = list(by_method)
    figure = _figure(1.2 + 1.9 * len(methods))
    axes = figure.subplots(len(methods), 1, sharex=True, squeeze=False)[:, 0]
    low_pct, high_pct = SPREAD_PERCENTILES
    for ax, method in zip(axes, methods):
        values = np.asarray(by_method[method], dtype=np.float64)
        n_iters, n_members, _ = values.shape
        iterations = np.arange(n_iters)
        if n_members > 1:
            upper = np.triu_indices(n_members, k=1)
            pairs = values[:, upper[0], upper[1]]
            low, median, high = np.percentile(pairs, [low_pct, 50, high_pct], axis=1)
            ax.fill_between(iterations, low, high, color="tab:blue", alpha=0.25, linewidth=0,
                            label=f"{low_pct}th-{high_pct}th percentile")
            ax.plot(iterations, median, color="tab:blue", linewidth=1.2, label=f"median of {pairs.shape[1]} pairs")
            if _wide_range(median):
                ax.set_yscale("symlog", linthresh=1.0)
        scale = ", log scale" if ax.get_yscale() == "symlog" else ""
        ax.set_ylabel(f"{method}\n(count{scale})", fontsize=8)
        ax.grid(alpha=0.3)
        if n_members > 1:
            ax.legend(fontsize=7, loc="upper left")
        else:
            ax.text(0.5, 0.5, "one member: no pairs to compare", transform=ax.transAxes, ha="center", color="gray")
    axes[0].set_title("Distance between members' partitions", fontsize=10)
    axes[-1].set_xlabel("iteration (merges so far)")
    return png_bytes(figure)


def distance_heatmaps(by_method: Mapping[str, np.ndarray], members: Sequence[str], iteration: int) -> bytes:
    """Member x member distance at one iteration, one heatmap per method."""
    methods = list(by_method)
    figure = _figure(3.6)
    axes = figure.subplots(1, len(methods), squeeze=False)[0]
    for ax, method in zip(axes, methods):
        values = np.asarray(by_method[method][iteration], dtype=np.float64)
        # The zero diagonal (a member against itself) would set the colour scale; it is left blank.
        values[np.diag_indices_from(values)] = np.nan
        image = ax.imshow(values, cmap=HEATMAP_COLORS)
        _annotate(ax, image, values, ".0f")
        _member_ticks(ax, members)
        ax.set_xlabel("member")
        ax.set_title(method, fontsize=9)
        figure.colorbar(image, ax=ax, shrink=0.8, label="distance (count)")
    axes[0].set_ylabel("member")
    figure.suptitle(f"Distances between members at iteration {iteration} (diagonal blank)", fontsize=10)
    return png_bytes(figure)


def co_association_heatmap(matrix: np.ndarray, cluster_sizes: Sequence[int], iteration: int, n_members: int,
                           shown_of: int) -> bytes:
    """The co-association of clustered components ordered by cluster, with the clusters outlined."""
    figure = _figure(5.4)
    axes = figure.subplots()
    image = axes.imshow(matrix, cmap="magma", vmin=0.0, vmax=1.0, interpolation="nearest")
    start = 0
    for size in cluster_sizes:
        axes.add_patch(_square(start - 0.5, size))
        start += size
    axes.set_xlabel("component (ordered by cluster)")
    axes.set_ylabel("component (ordered by cluster)")
    shown = f"the {len(cluster_sizes)} largest clusters, " if len(cluster_sizes) < shown_of else ""
    axes.set_title(f"Co-association at iteration {iteration}: {shown}{matrix.shape[0]} components", fontsize=10)
    figure.colorbar(image, ax=axes, label=f"fraction of {n_members} members sharing a group")
    return png_bytes(figure)


def _square(corner: float, size: int):
    from matplotlib.patches import Rectangle

    return Rectangle((corner, corner), size, size, fill=False, edgecolor="tab:cyan", linewidth=0.6)
