"""The cluster explorer: one self-contained HTML page per experiment, its data inlined, no network.

`explorer_data` gathers what the page shows into plain JSON-able values; `explorer_html` puts
them into the page (`explorer.html`, plain HTML, CSS and JavaScript, no external resources), so
the file opens from disk in any browser. The page lists the consensus clusters (sorted by size,
stability or activation frequency), filters them by component label (saying when a label is a
component in no cluster, or no component of the experiment at all), and opens one to show its
components grouped by module, how much each member agrees with it, and, when the experiment's
source has token batches, the top-activating token contexts with the tokens highlighted
(`analysis.contexts`).

Data model (`explorer_data`'s return value)::

    experiment, iteration, rule, threshold, members, n_components, n_unclustered, has_contexts
    unclustered: [label]   components merged but in no cluster (sorted), n_unclustered of them
    dead: [label]          components dead in every member: never merged, so in no cluster (sorted)
    clusters: [{id, size, stability, activation_frequency,
                member_agreement: [fraction of the cluster's pairs sharing a group, per member],
                modules: [{module, components: [{label, index, stability, activation_frequency, members_present}]}],
                contexts: [{member, tokens: [str], activations: [float]}]   (only with token batches)}]
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources

import numpy as np
import polars as pl

from spd_assets.storage.values import ConsensusClusters

TEMPLATE = "explorer.html"
# Where the template takes the data and the title (JSON inside a <script type="application/json"> element).
DATA_PLACEHOLDER = "__EXPLORER_DATA__"
TITLE_PLACEHOLDER = "__EXPLORER_TITLE__"
DIGITS = 4


@dataclass(frozen=True)
class TokenContext:
    """A stretch of tokens around where a cluster is active: the tokens as text and the cluster's activation
    (the sum of its components' activations, `analysis.contexts`) at each, from one member's batch."""

    member: str
    tokens: Sequence[str]
    activations: Sequence[float]

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.activations):
            raise ValueError(f"TokenContext: expected one activation per token, got {len(self.tokens)} tokens and "
                             f"{len(self.activations)} activations")


def _rounded(value: float) -> float | None:
    return None if value is None or not np.isfinite(value) else round(float(value), DIGITS)


def _member_agreement(partitions: np.ndarray, items: np.ndarray) -> list[float]:
    """Per member: the fraction of the items' pairs that share a group in that member."""
    pairs = len(items) * (len(items) - 1) / 2
    agreement = []
    for groups in partitions[:, items]:
        _, counts = np.unique(groups, return_counts=True)
        agreement.append(_rounded((counts * (counts - 1) / 2).sum() / pairs))
    return agreement


def _dead_everywhere(component_stats: pl.DataFrame, merged: Sequence[str]) -> list[str]:
    """Labels of `component_stats` dead in every member that has them and absent from the merged labels: the dead
    filter dropped them before merging, so they are components of the experiment in no cluster."""
    dead = component_stats.group_by("label").agg(pl.col("dead").all()).filter(pl.col("dead"))["label"].to_list()
    return sorted(set(dead) - set(merged))


def explorer_data(experiment: str, consensus: ConsensusClusters, partitions: np.ndarray, component_stats: pl.DataFrame,
                  contexts: Mapping[int, Sequence[TokenContext]] | None = None) -> dict:
    """What the explorer shows, as JSON-able values (see the module's docstring).

    `partitions` is `[n_members, c]`: each member's groups at the consensus iteration, columns in
    `consensus.labels` order; `component_stats` has rows of the `component_stats` table (any
    members); `contexts` maps a cluster id to its top-activating token contexts, when known.
    """
    stats = (component_stats.filter(~pl.col("dead"))
             .group_by("label")
             .agg(pl.col("activation_frequency").mean(), pl.col("member").n_unique().alias("members_present")))
    frequency = dict(zip(stats["label"].to_list(), stats["activation_frequency"].to_list()))
    present = dict(zip(stats["label"].to_list(), stats["members_present"].to_list()))
    clusters = []
    for cluster in range(consensus.n_clusters):
        items = np.flatnonzero(consensus.cluster_of == cluster)
        by_module: dict[str, list[dict]] = {}
        for x in items:
            label = consensus.labels[x]
            module, _, index = label.rpartition(":")
            by_module.setdefault(module, []).append({
                "label": label,
                "index": int(index) if index.isdigit() else index,
                "stability": _rounded(consensus.component_stability[x]),
                "activation_frequency": _rounded(frequency.get(label, float("nan"))),
                "members_present": int(present.get(label, 0)),
            })
        frequencies = [frequency[consensus.labels[x]] for x in items if consensus.labels[x] in frequency]
        entry = {
            "id": cluster,
            "size": int(items.size),
            "stability": _rounded(consensus.stability[cluster]),
            "activation_frequency": _rounded(np.mean(frequencies)) if frequencies else None,
            "member_agreement": _member_agreement(partitions, items),
            "modules": [{"module": module, "components": sorted(components, key=lambda c: str(c["index"]).zfill(9))}
                        for module, components in sorted(by_module.items())],
        }
        if contexts is not None:
            entry["contexts"] = [{"member": context.member, "tokens": list(context.tokens),
                                  "activations": [_rounded(a) for a in context.activations]}
                                 for context in contexts.get(cluster, [])]
        clusters.append(entry)
    return {
        "experiment": experiment,
        "iteration": consensus.iteration,
        "rule": consensus.rule,
        "threshold": consensus.threshold,
        "members": list(consensus.members),
        "n_components": len(consensus.labels),
        "n_unclustered": int((consensus.cluster_of < 0).sum()),
        "unclustered": sorted(np.asarray(consensus.labels, dtype=object)[consensus.cluster_of < 0].tolist()),
        "dead": _dead_everywhere(component_stats, consensus.labels),
        "has_contexts": contexts is not None,
        "clusters": clusters,
    }


def explorer_html(data: dict) -> str:
    """The page with `data` inlined; safe for any label or token text (nothing is parsed as HTML)."""
    template = resources.files(__package__).joinpath(TEMPLATE).read_text(encoding="utf-8")
    # Inside <script>, "</" could end the element early; "\u003c" is the same character to JSON.
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":")).replace("<", "\\u003c")
    title = f"Clusters of {data['experiment']}".replace("&", "&amp;").replace("<", "&lt;")
    return template.replace(TITLE_PLACEHOLDER, title).replace(DATA_PLACEHOLDER, payload)
