"""Each consensus cluster's top-activating token contexts, from dense and compact member activations."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse

from spd_assets.analysis.contexts import cluster_contexts
from spd_assets.errors import ContextsError
from spd_assets.storage.values import ConsensusClusters, TokenBatch
from spd_math import CompactActivationsBuilder, ProcessedActivations

SEQ_LEN = 6
WORDS = [f"w{i}" for i in range(40)]


def consensus_of(labels: list[str], cluster_of: list[int], members: list[str]) -> ConsensusClusters:
    n_clusters = max(cluster_of) + 1
    return ConsensusClusters(iteration=0, rule="test", threshold=0.5, members=members, member_iterations=[],
                             labels=labels, cluster_of=np.array(cluster_of), stability=np.ones(n_clusters),
                             component_stability=np.ones(len(labels)))


def batch_of(token_ids: np.ndarray) -> TokenBatch:
    """Token ids with the text `w<id>` for each id that occurs."""
    vocab = np.unique(token_ids)
    return TokenBatch(token_ids, vocab, tuple(WORDS[i] for i in vocab))


def tokens_of(batch: TokenBatch, sequence: int, start: int, stop: int) -> list[str]:
    return batch.tokens(sequence)[start:stop]


def rows(n_samples: int, labels: list[str], entries: dict[tuple[int, str], float]) -> ProcessedActivations:
    dense = np.zeros((n_samples, len(labels)), dtype=np.float32)
    for (sample, label), value in entries.items():
        dense[sample, labels.index(label)] = value
    return ProcessedActivations(dense, labels)


# Two clusters: {a:0, a:1} and {a:2, b:0}; b:1 is in none.
LABELS = ["a:0", "a:1", "a:2", "b:0", "b:1"]
CONSENSUS = consensus_of(LABELS, [0, 0, 1, 1, -1], ["m0", "m1"])


def test_hand_checked_sums_windows_and_order_across_members():
    batches = {"m0": batch_of(np.arange(12).reshape(2, SEQ_LEN)), "m1": batch_of(np.arange(20, 32).reshape(2, SEQ_LEN))}
    activations = {
        # m0: cluster 0 is 0.5 + 0.25 at token (0, 3), 0.2 at (0, 4); its sequence 1 tops at 0.25 at (1, 2).
        "m0": rows(12, LABELS, {(3, "a:0"): 0.5, (3, "a:1"): 0.25, (4, "a:1"): 0.2, (8, "a:0"): 0.25,
                                (9, "b:1"): 5.0}),  # b:1 is in no cluster: it never shows
        # m1: cluster 0 tops at 0.875 at (1, 1); cluster 1 (a:2 + b:0) at (0, 5).
        "m1": rows(12, LABELS, {(7, "a:1"): 0.875, (5, "a:2"): 0.125, (5, "b:0"): 0.125}),
    }
    contexts = cluster_contexts(CONSENSUS, activations, batches, "concat", top=5, before=2, after=1)
    assert sorted(contexts) == [0, 1]
    first, second, third = contexts[0]
    assert (first.member, first.tokens, first.activations) == ("m1", ["w26", "w27", "w28"], [0.0, 0.875, 0.0])
    assert (second.member, second.tokens, second.activations) == (
        "m0", ["w1", "w2", "w3", "w4"], [0.0, 0.0, 0.75, pytest.approx(0.2)])
    assert (third.member, third.tokens, third.activations) == ("m0", ["w6", "w7", "w8", "w9"], [0.0, 0.0, 0.25, 0.0])
    [only] = contexts[1]
    assert (only.member, only.tokens, only.activations) == ("m1", ["w23", "w24", "w25"], [0.0, 0.0, 0.25])


def test_top_limits_each_cluster_and_a_sequence_counts_once():
    batches = {"m0": batch_of(np.arange(12).reshape(2, SEQ_LEN))}
    activations = {"m0": rows(12, LABELS, {(1, "a:0"): 0.3, (2, "a:0"): 0.9, (4, "a:0"): 0.1, (10, "a:1"): 0.5})}
    consensus = consensus_of(LABELS, [0, 0, 1, 1, -1], ["m0"])
    contexts = cluster_contexts(consensus, activations, batches, "concat", top=5, before=1, after=1)
    # sequence 0 once (at its top token 2), then sequence 1; cluster 1 never active
    assert [c.activations for c in contexts[0]] == [[pytest.approx(0.3), pytest.approx(0.9), 0.0], [0.0, 0.5, 0.0]]
    assert contexts[1] == []
    top_one = cluster_contexts(consensus, activations, batches, "concat", top=1, before=1, after=1)
    assert [c.tokens for c in top_one[0]] == [["w1", "w2", "w3"]]


def test_windows_stop_at_the_start_and_end_of_their_sequence():
    batches = {"m0": batch_of(np.arange(18).reshape(3, SEQ_LEN))}
    # Cluster 0 tops at the first token of sequence 1; cluster 1 at the last token of sequence 1. Their
    # neighbours in sequences 0 and 2 are active but belong to other sequences.
    activations = {"m0": rows(18, LABELS, {(5, "a:0"): 0.4, (6, "a:0"): 0.8, (7, "a:1"): 0.1,
                                           (11, "a:2"): 0.7, (12, "b:0"): 0.1, (10, "b:0"): 0.3})}
    consensus = consensus_of(LABELS, [0, 0, 1, 1, -1], ["m0"])
    contexts = cluster_contexts(consensus, activations, batches, "concat", top=1, before=8, after=4)
    [start] = contexts[0]
    assert start.tokens == tokens_of(batches["m0"], 1, 0, 5) == ["w6", "w7", "w8", "w9", "w10"]
    assert start.activations == [pytest.approx(0.8), pytest.approx(0.1), 0.0, 0.0, 0.0]
    [end] = contexts[1]
    assert end.tokens == tokens_of(batches["m0"], 1, 0, 6)  # 8 before reaches past the start: the whole sequence
    assert end.activations == [0.0, 0.0, 0.0, 0.0, pytest.approx(0.3), pytest.approx(0.7)]


def test_components_missing_from_a_member_add_nothing():
    batches = {"m0": batch_of(np.arange(6).reshape(1, SEQ_LEN)), "m1": batch_of(np.arange(6, 12).reshape(1, SEQ_LEN))}
    activations = {
        "m0": rows(6, LABELS, {(2, "a:0"): 0.5, (2, "a:1"): 0.5}),
        # a:1 was dropped as dead in m1, which also has a component the consensus does not know
        "m1": rows(6, ["a:0", "a:2", "b:0", "x:0"], {(4, "a:0"): 0.6, (4, "x:0"): 9.0, (1, "a:2"): 0.2}),
    }
    contexts = cluster_contexts(CONSENSUS, activations, batches, "concat", before=0, after=0)
    assert [(c.member, c.tokens, c.activations) for c in contexts[0]] == [
        ("m0", ["w2"], [1.0]), ("m1", ["w10"], [pytest.approx(0.6)])]
    assert [(c.member, c.tokens) for c in contexts[1]] == [("m1", ["w7"])]


def test_dense_and_compact_activations_give_the_same_contexts():
    generator = np.random.default_rng(0)
    labels = [f"layer.{m}:{i}" for m in range(3) for i in range(20)]
    consensus = consensus_of(labels, list(generator.integers(-1, 8, size=len(labels))), ["m0", "m1", "m2"])
    batches, dense, sparse, built = {}, {}, {}, {}
    for m, member in enumerate(consensus.members):
        n_sequences = 7
        batches[member] = batch_of(generator.integers(0, len(WORDS), size=(n_sequences, SEQ_LEN)))
        values = generator.random((n_sequences * SEQ_LEN, len(labels)), dtype=np.float32)
        values[values < 0.8] = 0.0  # active entries are above the builder's threshold, the rest exactly 0
        kept = labels[m:]  # each member lacks some components
        values = values[:, m:]
        dense[member] = ProcessedActivations(values, kept)
        sparse[member] = ProcessedActivations(scipy.sparse.csr_array(values), kept)
        builder = CompactActivationsBuilder(kept, activation_threshold=0.5)
        for chunk in np.array_split(values, 3):
            builder.add(chunk)
        built[member] = builder.build()
    assert sparse["m0"].is_compact and built["m0"].is_compact and not dense["m0"].is_compact
    expected = cluster_contexts(consensus, dense, batches, "concat")
    assert sum(len(shown) for shown in expected.values()) == 5 * consensus.n_clusters
    for compact in (sparse, built):
        got = cluster_contexts(consensus, compact, batches, "concat")
        assert got.keys() == expected.keys()
        for cluster, shown in expected.items():
            assert [(c.member, c.tokens) for c in got[cluster]] == [(c.member, c.tokens) for c in shown]
            for a, b in zip(got[cluster], shown):
                assert a.activations == pytest.approx(b.activations)
    # the top context of each cluster is its highest-summed token over every member
    for cluster, shown in expected.items():
        columns = np.flatnonzero(consensus.cluster_of == cluster)
        best = max(float(dense[m].activations.numpy()[:, [dense[m].labels.index(labels[x]) for x in columns
                                                           if labels[x] in dense[m].labels]].sum(axis=1).max())
                   for m in consensus.members)
        assert max(shown[0].activations) == pytest.approx(best)


def test_no_contexts_where_tokens_are_not_the_samples():
    tokens = {"m0": batch_of(np.arange(12).reshape(2, SEQ_LEN))}
    activations = {"m0": rows(12, LABELS, {(3, "a:0"): 0.5})}
    assert cluster_contexts(CONSENSUS, activations, tokens, "seq_mean") is None
    assert cluster_contexts(CONSENSUS, activations, tokens, None) is None
    features = {"m0": TokenBatch(np.zeros((12, 4), dtype=np.float32))}
    assert cluster_contexts(CONSENSUS, activations, features, "concat") is None


def test_ids_without_text_are_shown_as_ids_and_a_mismatched_batch_is_refused():
    ids_only = {"m0": TokenBatch(np.arange(100, 112).reshape(2, SEQ_LEN))}
    activations = {"m0": rows(12, LABELS, {(3, "a:0"): 0.5})}
    [context] = cluster_contexts(CONSENSUS, activations, ids_only, "concat", before=1, after=0)[0]
    assert context.tokens == ["[102]", "[103]"]
    other = {"m0": batch_of(np.arange(18).reshape(3, SEQ_LEN))}
    with pytest.raises(ContextsError, match="member m0: its activations have 12 samples but its token batch has 18"):
        cluster_contexts(CONSENSUS, activations, other, "concat")
