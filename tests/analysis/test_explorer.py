"""The cluster explorer page in a real browser (Debian's Chromium driven by Playwright), opened from disk."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from spd_assets.analysis.explorer import TokenContext, explorer_data, explorer_html
from tests.analysis.small_ensemble import small_ensemble
from tests.browser import open_page


@pytest.fixture(scope="module")
def data():
    config, _, _, ensemble, stats, consensus = small_ensemble()
    partitions = ensemble.ensemble.merges[:, consensus.iteration, :].numpy()
    return explorer_data(config.name, consensus, partitions, stats), consensus, stats


def test_data_describes_every_cluster(data):
    explored, consensus, stats = data
    assert [c["id"] for c in explored["clusters"]] == list(range(consensus.n_clusters))
    assert sum(c["size"] for c in explored["clusters"]) + explored["n_unclustered"] == len(consensus.labels)
    for cluster in explored["clusters"]:
        labels = [c["label"] for m in cluster["modules"] for c in m["components"]]
        assert sorted(labels) == sorted(np.array(consensus.labels)[consensus.cluster_of == cluster["id"]])
        assert all(c["label"].startswith(m["module"] + ":") for m in cluster["modules"] for c in m["components"])
        assert len(cluster["member_agreement"]) == len(consensus.members)
        assert all(0 <= a <= 1 for a in cluster["member_agreement"])
        assert cluster["stability"] == pytest.approx(consensus.stability[cluster["id"]], abs=1e-4)
        assert "contexts" not in cluster
    some = explored["clusters"][0]["modules"][0]["components"][0]
    live = stats.filter((stats["label"] == some["label"]) & ~stats["dead"])
    assert some["activation_frequency"] == pytest.approx(live["activation_frequency"].mean(), abs=1e-4)
    assert explored["has_contexts"] is False
    # Every component of the experiment is named once: in a cluster, merged but in no cluster, or dead everywhere.
    clustered = [c["label"] for cluster in explored["clusters"] for m in cluster["modules"] for c in m["components"]]
    assert explored["unclustered"] == sorted(np.array(consensus.labels)[consensus.cluster_of < 0])
    assert len(explored["unclustered"]) == explored["n_unclustered"] > 0
    dead_everywhere = set(stats["label"]) - set(stats.filter(~stats["dead"])["label"])
    assert explored["dead"] == sorted(dead_everywhere) and explored["dead"]
    assert sorted(clustered + explored["unclustered"] + explored["dead"]) == sorted(stats["label"].unique())


def write_page(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "explorer.html"
    path.write_text(explorer_html(data), encoding="utf-8")
    return path


def test_page_loads_searches_and_opens_a_cluster(browser, data, tmp_path):
    explored, consensus, _ = data
    page, problems = open_page(browser, write_page(tmp_path, explored))
    n = len(explored["clusters"])
    assert page.title() == f"Clusters of {explored['experiment']}"
    assert page.locator("#cluster-list li").count() == n
    assert page.locator("#count").inner_text() == f"{n} of {n} clusters"

    # Search by component label: only clusters with a matching component stay.
    wanted = explored["clusters"][-1]["modules"][0]["components"][0]["label"]
    page.fill("#search", wanted)
    holding = [c["id"] for c in explored["clusters"]
               if any(wanted in comp["label"] for m in c["modules"] for comp in m["components"])]
    items = page.locator("#cluster-list li")
    assert items.count() == len(holding) >= 1
    assert sorted(int(items.nth(i).get_attribute("data-cluster")) for i in range(items.count())) == sorted(holding)
    assert page.locator("#search-status").inner_text() == f"{wanted} is in cluster {explored['clusters'][-1]['id']}."
    page.fill("#search", "no-such-component")
    assert page.locator("#cluster-list li").count() == 0
    assert page.locator("#search-status").inner_text() == "No component no-such-component in this experiment."

    # A component in no cluster, or dead in every member, says so; one the experiment lacks says that instead,
    # with the labels a typo away to choose from.
    status = page.locator("#search-status")
    alone, dead = explored["unclustered"][0], explored["dead"][0]
    page.fill("#search", alone)
    needed = int(np.ceil(consensus.threshold * len(consensus.members)))
    assert status.inner_text() == (
        f"{alone} is in no cluster at this threshold: at iteration {consensus.iteration} it shares a group with no other "
        f"component in at least {needed} of the {len(consensus.members)} members ({100 * consensus.threshold:.1f}%).")
    page.fill("#search", dead.upper())
    assert status.inner_text().startswith(f"{dead} is in no cluster: it is dead in every member")
    typo = wanted.replace("layers", "layars")
    page.fill("#search", typo)
    assert status.inner_text().startswith(f"No component {typo} in this experiment. Did you mean {wanted}")
    assert page.locator("#cluster-list li").count() == 0
    status.locator("button", has_text=wanted).first.click()
    assert page.input_value("#search") == wanted and page.locator("#cluster-list li").count() == len(holding)
    page.fill("#search", "")
    assert status.is_hidden()

    # Sorting by stability puts the most stable first.
    page.select_option("#sort", "stability")
    first = int(page.locator("#cluster-list li").first.get_attribute("data-cluster"))
    assert consensus.stability[first] == pytest.approx(consensus.stability.max())

    # A cluster opens with its components by module and one agreement bar per member.
    page.select_option("#sort", "size")
    page.locator("#cluster-list li").first.click()
    largest = max(explored["clusters"], key=lambda c: (c["size"], -c["id"]))
    assert page.locator("#detail h2").inner_text() == f"Cluster {largest['id']}"
    assert page.locator("#components tbody tr:not(.module-row)").count() == largest["size"]
    assert page.locator("#components tr.module-row").count() == len(largest["modules"])
    assert page.locator("#agreement .agree .bar").count() == len(consensus.members)
    assert page.locator("#contexts").count() == 0, "no token batches: no contexts section"
    assert page.url.endswith(f"#cluster-{largest['id']}")
    assert problems == []


def test_a_cluster_the_search_removes_leaves_the_detail_too(browser, data, tmp_path):
    explored, _, _ = data
    page, problems = open_page(browser, write_page(tmp_path, explored))
    opened, other = explored["clusters"][0], explored["clusters"][-1]
    page.locator(f"#cluster-list li[data-cluster='{opened['id']}']").click()
    assert page.locator("#detail h2").inner_text() == f"Cluster {opened['id']}"

    # A search only the other cluster matches: the opened one leaves the list and the detail alike.
    wanted = other["modules"][0]["components"][0]["label"]
    assert not any(wanted in c["label"] for m in opened["modules"] for c in m["components"])
    page.fill("#search", wanted)
    listed = [int(page.locator("#cluster-list li").nth(i).get_attribute("data-cluster"))
              for i in range(page.locator("#cluster-list li").count())]
    assert opened["id"] not in listed and other["id"] in listed
    assert page.locator("#detail h2").count() == 0 and page.locator("#components").count() == 0
    assert f"Cluster {opened['id']} has no component matching" in page.locator("#detail .empty").inner_text()

    # A search it matches brings it back, as does clearing the search.
    own = opened["modules"][0]["components"][0]["label"]
    page.fill("#search", own)
    assert page.locator("#detail h2").inner_text() == f"Cluster {opened['id']}"
    page.fill("#search", "no-such-component")
    assert page.locator("#detail h2").count() == 0
    page.fill("#search", "")
    assert page.locator("#detail h2").inner_text() == f"Cluster {opened['id']}"
    assert page.locator("#cluster-list li.selected").get_attribute("data-cluster") == str(opened["id"])

    # Another cluster chosen from the filtered list opens as usual.
    page.fill("#search", wanted)
    page.locator(f"#cluster-list li[data-cluster='{other['id']}']").click()
    assert page.locator("#detail h2").inner_text() == f"Cluster {other['id']}"
    assert problems == []


def test_contexts_are_shown_with_tokens_highlighted_and_text_kept_as_text(browser, data, tmp_path):
    explored, consensus, _ = data
    partitions = np.zeros((len(consensus.members), len(consensus.labels)), dtype=np.int64)
    tokens = ["The", " cat", " <b>sat</b>", " on", " the", " mat"]
    contexts = {0: [TokenContext("member_000", tokens, [0.0, 0.9, 0.3, 0.0, 0.0, 0.05])]}
    with_contexts = explorer_data("ctx", consensus, partitions, data[2], contexts=contexts)
    assert json.dumps(with_contexts)  # JSON-able
    page, problems = open_page(browser, write_page(tmp_path, with_contexts))
    page.goto(page.url + "#cluster-0")
    context = page.locator("#contexts .context").first
    assert context.locator(".tok").count() == len(tokens)
    assert "".join(context.locator(".tok").all_inner_texts()) == "".join(tokens)
    assert context.locator("b").count() == 0, "token text must not be parsed as HTML"
    backgrounds = [context.locator(".tok").nth(i).evaluate("node => node.style.background") for i in range(len(tokens))]
    alphas = [float(re.search(r"rgba\(255, 140, 0, ([\d.]+)\)", b).group(1)) if b else 0.0 for b in backgrounds]
    assert alphas[1] == max(alphas) and alphas[0] == alphas[3] == 0.0 and 0 < alphas[5] < alphas[2] < alphas[1]
    assert problems == []


def test_page_is_one_file_with_nothing_to_fetch(data, tmp_path):
    html = explorer_html(data[0])
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)
    copy = tmp_path / "elsewhere" / "page.html"
    copy.parent.mkdir()
    shutil.copy(write_page(tmp_path, data[0]), copy)  # still complete away from where it was written
    assert copy.read_text() == html
