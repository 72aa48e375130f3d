"""Model sources through the whole asset graph: a real pretrained model on real text, and a random causal LM."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import yaml
from dagster import AssetKey, DagsterInstance

from spd_assets.config import load_config
from spd_assets.defs.jobs import members_job_name
from spd_assets.service.runs import first_failure_message
from spd_assets.sources import source_for
from spd_assets.storage.database import connect_read_only
from spd_assets.storage.lineage import fingerprint
from spd_assets.storage.values import TokenBatch, value_format
from tests.browser import open_page
from tests.model_helpers import GPT2_VOCAB, minilm_directory, save_random_gpt2, write_corpus, write_token_ids
from tests.pipeline_helpers import asset_path, definitions_for, instance_at, make_home, materialize_experiment, store_at

# Two of MiniLM's six MLP layers: 3,072 components, a few seconds per member on a CPU.
MINILM_LAYERS = ["encoder.layer.0.intermediate.dense", "encoder.layer.5.intermediate.dense"]
SEQ_LEN = 32
BATCH = 4


def write_config(folder, values) -> object:
    path = folder / "experiment.yaml"
    path.write_text(yaml.safe_dump(values))
    return load_config(path)


def token_batch_at(home, experiment, member) -> TokenBatch:
    return value_format(TokenBatch).load(store_at(home).value_path(experiment, "token_batches", member, ".npz"))


@pytest.fixture(scope="module")
def minilm_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("minilm")
    write_corpus(folder / "corpus")
    config = write_config(folder, {
        "name": "minilm",
        "source": {"kind": "torch", "model": str(minilm_directory()), "modules": MINILM_LAYERS,
                   "text": "./corpus", "seq_len": SEQ_LEN, "batch_size": BATCH, "n_members": 2},
        "merge_config": {"activation_threshold": 0.5, "iters": 15},
    })
    home = make_home(folder / "home")
    members = source_for(config.source).member_keys()
    with instance_at(home) as instance:
        member_results, ensemble_result = materialize_experiment(definitions_for(config), instance, config, members)
        failures = {m: first_failure_message(r) for m, r in member_results.items() if not r.success}
        assert not failures and ensemble_result.success, (failures, first_failure_message(ensemble_result))
        events = {name: instance.get_latest_materialization_event(AssetKey(["minilm", name]))
                  for name in ("token_batches", "component_activations", "cluster_explorer")}
    return config, home, members, events


def explorer_data_at(home, experiment) -> dict:
    """The data inlined in the experiment's cluster explorer page."""
    html = asset_path(experiment, "cluster_explorer", None, home).read_text(encoding="utf-8")
    inlined = re.search(r'<script type="application/json" id="explorer-data">(.*?)</script>', html, re.S).group(1)
    return json.loads(inlined)


def test_minilm_mlp_units_cluster_through_the_graph_and_duckdb(minilm_run):
    config, home, members, events = minilm_run
    assert config.source.text.is_absolute() and config.source.text.name == "corpus"  # relative to the config file

    batch = token_batch_at(home, "minilm", "member_001")
    assert batch.inputs.shape == (BATCH, SEQ_LEN) and batch.is_tokens and len(batch.vocab_strings) > 20
    token_metadata = events["token_batches"].asset_materialization.metadata
    assert token_metadata["sequences"].value == BATCH and token_metadata["tokens"].value == BATCH * SEQ_LEN
    examples = token_metadata["examples"].value
    assert examples.startswith("| sequence | text |") and " the " in examples  # decoded English
    activation_metadata = events["component_activations"].asset_materialization.metadata
    assert activation_metadata["samples"].value == BATCH * SEQ_LEN
    assert activation_metadata["components"].value + activation_metadata["dead_components"].value == 3072
    assert activation_metadata["device"].value.startswith("cpu:")
    assert activation_metadata["tokens_per_second"].value > 0

    with connect_read_only(store_at(home)) as connection:
        per_member = connection.execute(
            "SELECT member, count(*), count(DISTINCT module), max(component_index) FROM component_stats "
            "WHERE experiment = 'minilm' GROUP BY member ORDER BY member").fetchall()
        assert per_member == [(member, 3072, 2, 1535) for member in members]
        assert connection.execute(
            "SELECT label FROM component_stats WHERE experiment = 'minilm' ORDER BY member, module, component_index "
            "LIMIT 1").fetchone()[0] == "encoder.layer.0.intermediate.dense:0"
        merges = connection.execute(
            "SELECT member, count(*) FROM merge_events WHERE experiment = 'minilm' GROUP BY member ORDER BY member"
        ).fetchall()
        assert merges == [(member, 15) for member in members]
        assert connection.execute("SELECT count(*) FROM distances WHERE experiment = 'minilm'").fetchone()[0] > 0
        # component_activations consumed exactly the token batch stored for its member
        edges = connection.execute(
            "SELECT partition, upstream_data_version FROM lineage_edges WHERE experiment = 'minilm' "
            "AND asset = 'component_activations' AND upstream_asset = 'token_batches' ORDER BY partition").fetchall()
    assert [partition for partition, _ in edges] == members
    assert edges[1][1] == fingerprint(batch)


def test_explorer_shows_each_clusters_top_contexts_from_the_corpus(minilm_run, browser):
    config, home, members, events = minilm_run
    data = explorer_data_at(home, "minilm")
    assert data["has_contexts"] is True
    with_contexts = [cluster for cluster in data["clusters"] if cluster["contexts"]]
    assert with_contexts and all(len(cluster["contexts"]) <= 5 for cluster in data["clusters"])
    corpus = " ".join(path.read_text(encoding="utf-8") for path in sorted(config.source.text.glob("*.txt"))).lower()
    batches = {member: token_batch_at(home, "minilm", member) for member in members}
    for cluster in with_contexts:
        tops = [max(context["activations"]) for context in cluster["contexts"]]
        assert tops == sorted(tops, reverse=True) and tops[-1] > 0
        for context in cluster["contexts"]:
            # The window is a stretch of one of the member's sequences, at most 8 + 1 + 4 tokens long ...
            tokens = context["tokens"]
            assert 1 <= len(tokens) == len(context["activations"]) <= 13
            sequences = [batches[context["member"]].tokens(s) for s in range(BATCH)]
            assert any(sequence[i:i + len(tokens)] == tokens for sequence in sequences for i in range(SEQ_LEN))
            # ... of the corpus's text (MiniLM lowercases; "##" marks a word's continuation).
            words = [t.removeprefix("##") for t in tokens if t.removeprefix("##").isalpha()]
            assert words and all(word in corpus for word in words)
    explorer_metadata = events["cluster_explorer"].asset_materialization.metadata
    assert sum(len(c["contexts"]) for c in with_contexts) == explorer_metadata["contexts"].value

    # The explorer consumed every member's activations and token batch, as recorded lineage.
    with connect_read_only(store_at(home)) as connection:
        edges = connection.execute(
            "SELECT upstream_asset, upstream_partition FROM lineage_edges WHERE experiment = 'minilm' "
            "AND asset = 'cluster_explorer' AND upstream_asset IN ('component_activations', 'token_batches') "
            "ORDER BY 1, 2").fetchall()
    assert edges == [(upstream, m) for upstream in ("component_activations", "token_batches") for m in members]

    # In a real browser: an opened cluster shows its contexts with the top tokens highlighted.
    cluster = max(with_contexts, key=lambda c: len(c["contexts"]))
    page, problems = open_page(browser, asset_path("minilm", "cluster_explorer", None, home))
    page.locator(f'#cluster-list li[data-cluster="{cluster["id"]}"]').click()
    shown = page.locator("#contexts .context")
    assert shown.count() == len(cluster["contexts"])
    first = shown.first
    assert first.locator(".member").inner_text() == cluster["contexts"][0]["member"]
    assert first.locator(".tok").all_inner_texts() == cluster["contexts"][0]["tokens"]
    highlighted = first.locator(".tok").evaluate_all("spans => spans.map(s => s.style.background !== '')")
    assert highlighted == [a is not None and a > 0 for a in cluster["contexts"][0]["activations"]] and any(highlighted)
    assert problems == []


def test_same_seed_same_batches_and_histories_other_member_other_batch(minilm_run, tmp_path):
    config, home, members, _ = minilm_run
    first, second = (token_batch_at(home, "minilm", member) for member in members)
    assert not np.array_equal(first.inputs, second.inputs)

    again = make_home(tmp_path / "again")
    with instance_at(again) as instance:
        result = definitions_for(config).resolve_job_def(members_job_name("minilm")).execute_in_process(
            instance=instance, partition_key=members[0], raise_on_error=False)
        assert result.success, first_failure_message(result)
    assert np.array_equal(token_batch_at(again, "minilm", members[0]).inputs, first.inputs)
    history_format = value_format("MergeHistory")
    histories = [history_format.load(asset_path("minilm", "merge_history", members[0], where)) for where in (home, again)]
    assert fingerprint(histories[0]) == fingerprint(histories[1])


def test_random_causal_lm_with_token_ids_and_sequence_means(tmp_path, monkeypatch):
    model_dir = save_random_gpt2(tmp_path / "gpt2")
    write_token_ids(tmp_path / "ids.npy", sequences=30, seq_len=16, vocab=GPT2_VOCAB)
    config = write_config(tmp_path, {
        "name": "gpt2",
        "source": {"kind": "torch", "model": "./gpt2", "modules": ["transformer.h.*.mlp.c_fc"], "text": "ids.npy",
                   "seq_len": 16, "batch_size": 10, "n_members": 2, "chunk_size": 4},
        "seq_mode": "seq_mean",
        "merge_config": {"activation_threshold": None, "iters": 10},
    })
    assert config.source.model == str(model_dir.resolve())
    home = make_home(tmp_path / "home")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    with DagsterInstance.get() as instance:
        member_results, ensemble_result = materialize_experiment(
            definitions_for(config), instance, config, ["member_000", "member_001"])
        assert all(r.success for r in member_results.values()) and ensemble_result.success
    batch = token_batch_at(home, "gpt2", "member_000")
    assert batch.inputs.shape == (10, 16) and batch.vocab_strings == ()
    with connect_read_only(store_at(home)) as connection:
        assert connection.execute(
            "SELECT count(*), count(DISTINCT label) FROM component_stats WHERE experiment = 'gpt2'"
        ).fetchone() == (2 * 256, 256)
    activations = value_format("ProcessedActivations").load(asset_path("gpt2", "component_activations", "member_000", home))
    assert activations.n_samples == 10  # sequences are the samples under seq_mean
    assert explorer_data_at(home, "gpt2")["has_contexts"] is False  # so no token contexts
