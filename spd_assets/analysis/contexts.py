"""The top-activating token contexts of each consensus cluster, over every member's token batch.

A cluster's activation at a token is the SUM of its components' activations (causal
importances, as processed for the merge) at that token's sample. Each sequence of a member's
batch counts once per cluster, at its token with the cluster's highest activation; the
sequences with the highest such tokens over all members are the cluster's top contexts, each
shown as a window of tokens around that token (within its sequence) with the cluster's
activation at every token of the window, so the explorer can highlight them.

Only where tokens are samples (seq_mode `concat` on token ids): sample `s` of a member is
token `inputs[s // seq_len, s % seq_len]` of its `TokenBatch`.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import scipy.sparse

from spd_assets.analysis.explorer import TokenContext
from spd_assets.errors import ContextsError
from spd_assets.storage.values import ConsensusClusters, TokenBatch
from spd_math import ProcessedActivations

TOP_CONTEXTS = 5
TOKENS_BEFORE = 8
TOKENS_AFTER = 4


def cluster_contexts(
    consensus: ConsensusClusters,
    activations: Mapping[str, ProcessedActivations],
    batches: Mapping[str, TokenBatch],
    seq_mode: str | None,
    *,
    top: int = TOP_CONTEXTS,
    before: int = TOKENS_BEFORE,
    after: int = TOKENS_AFTER,
) -> dict[int, list[TokenContext]] | None:
    """Each consensus cluster's top-activating token contexts over all members.

    The cluster's activation at a sample is the sum of the activations of its components at
    that sample; components of the cluster that a member lacks (dropped there as dead) add
    nothing. Only positive activations count. Per member, each sequence is a candidate once
    per cluster, at its token with the highest cluster activation (the first such token on a
    tie); the `top` candidates with the highest activation over all members (ties: members in
    `consensus.members` order, then earlier sequences) are the cluster's contexts, highest
    first. A context is the tokens from `before` tokens before its top token to `after` tokens
    after it, cut at the start and end of the sequence, with the cluster's activation at each.

    Activations may be dense or compact (sparse CSR); they are read through
    `ProcessedActivations.to_scipy_csr`, never densified. Compact activations keep only entries
    above the merge's activation threshold, so their sums count only those.

    Parameters
    ----------
    consensus : ConsensusClusters
        The clusters: `cluster_of[x]` is the cluster of `labels[x]` (-1: in none).
    activations : Mapping[str, ProcessedActivations]
        Each member's processed activations (`[samples, components]`, labelled columns).
    batches : Mapping[str, TokenBatch]
        Each member's model inputs, whose tokens are the samples of its activations.
    seq_mode : str or None
        The experiment's seq_mode; only "concat" makes tokens the samples.
    top : int
        Contexts per cluster, at most.
    before, after : int
        Tokens shown before and after each context's top token.

    Returns
    -------
    dict of int to list of TokenContext, or None
        Every cluster id -> its contexts (empty when the cluster is never active), or None when
        tokens are not the samples: seq_mode other than "concat", or a batch of feature rows
        rather than token ids. Tokens are the batch's text of each id, or `[id]` for an id
        without text (a batch given as token ids, without a tokenizer).

    Raises
    ------
    ContextsError
        A member's activations have a different number of samples than its batch has tokens.

    Examples
    --------
    >>> import numpy as np
    >>> from spd_assets.storage.values import ConsensusClusters, TokenBatch
    >>> from spd_math import ProcessedActivations
    >>> consensus = ConsensusClusters(iteration=0, rule="", threshold=0.5, members=["m"], member_iterations=[],
    ...     labels=["a:0", "a:1"], cluster_of=np.array([0, 0]), stability=np.ones(1), component_stability=np.ones(2))
    >>> batch = TokenBatch(np.array([[1, 2, 3]]), np.array([1, 2, 3]), ("The", " cat", " sat"))
    >>> acts = ProcessedActivations(np.array([[0, 0], [0.5, 0.25], [0, 0.5]], dtype=np.float32), ["a:0", "a:1"])
    >>> context = cluster_contexts(consensus, {"m": acts}, {"m": batch}, "concat")[0][0]
    >>> context.tokens, context.activations
    (['The', ' cat', ' sat'], [0.0, 0.75, 0.5])
    """
    if top < 1 or before < 0 or after < 0:
        raise ValueError(f"expected top >= 1 and before, after >= 0; got top={top}, before={before}, after={after}")
    if seq_mode != "concat" or not all(batch.is_tokens for batch in batches.values()):
        return None
    members = [member for member in consensus.members if member in activations and member in batches]
    column_of = {label: x for x, label in enumerate(consensus.labels)}
    by_member: dict[str, scipy.sparse.csc_array] = {}
    candidates = []
    for m, member in enumerate(members):
        batch, processed = batches[member], activations[member]
        if processed.n_samples != batch.n_tokens:
            raise ContextsError(
                f"member {member}: its activations have {processed.n_samples} samples but its token batch has "
                f"{batch.n_tokens} tokens ({batch.n_sequences} sequences of {batch.inputs.shape[1]}); expected one "
                "sample per token (seq_mode concat). Rematerialize its component_activations from its token_batches.")
        per_cluster = _cluster_activations(processed, consensus, column_of)
        by_member[member] = per_cluster.tocsc()
        by_member[member].sort_indices()
        candidates.append(_sequence_tops(per_cluster.tocoo(), batch.inputs.shape[1], m))
    contexts: dict[int, list[TokenContext]] = {cluster: [] for cluster in range(consensus.n_clusters)}
    if not candidates:
        return contexts
    cluster, value, member_index, sequence, position = (np.concatenate(field) for field in zip(*candidates))
    # Per cluster, highest activation first; ties by member order, then sequence.
    order = np.lexsort((sequence, member_index, -value, cluster))
    rank = np.arange(order.size) - np.searchsorted(cluster[order], cluster[order], side="left")
    texts = {member: _token_texts(batches[member]) for member in members}
    for i in order[rank < top]:
        member = members[member_index[i]]
        contexts[int(cluster[i])].append(_context(
            member, batches[member].inputs, texts[member], by_member[member], int(cluster[i]), int(sequence[i]),
            int(position[i]), before, after))
    return contexts


def _cluster_activations(processed: ProcessedActivations, consensus: ConsensusClusters,
                         column_of: Mapping[str, int]) -> scipy.sparse.csr_array:
    """`[samples, clusters]`: per sample, the sum of each cluster's components' activations (sparse)."""
    stored = processed.to_scipy_csr()
    stored = scipy.sparse.csr_array((stored.data.astype(np.float64), stored.indices, stored.indptr), shape=stored.shape)
    cluster_of_column = np.array([consensus.cluster_of[column_of[label]] if label in column_of else -1
                                  for label in processed.labels], dtype=np.int64)
    inside = np.flatnonzero(cluster_of_column >= 0)
    assignment = scipy.sparse.csr_array((np.ones(inside.size), (inside, cluster_of_column[inside])),
                                        shape=(processed.n_components, consensus.n_clusters))
    return scipy.sparse.csr_array(stored @ assignment)


def _sequence_tops(per_cluster: scipy.sparse.coo_array, seq_len: int, member_index: int) -> tuple[np.ndarray, ...]:
    """Per cluster and sequence with a positive activation, its top token (the first on a tie): the clusters,
    activations, member index, sequences and positions."""
    positive = per_cluster.data > 0
    samples, clusters = per_cluster.row[positive].astype(np.int64), per_cluster.col[positive].astype(np.int64)
    values = per_cluster.data[positive]
    sequences = samples // seq_len
    order = np.lexsort((samples, -values, sequences, clusters))
    first = np.ones(order.size, dtype=bool)
    first[1:] = (clusters[order][1:] != clusters[order][:-1]) | (sequences[order][1:] != sequences[order][:-1])
    chosen = order[first]
    return (clusters[chosen], values[chosen], np.full(chosen.size, member_index), sequences[chosen],
            samples[chosen] % seq_len)


def _token_texts(batch: TokenBatch) -> dict[int, str]:
    return dict(zip(batch.vocab_ids.tolist(), batch.vocab_strings))


def _context(member: str, inputs: np.ndarray, texts: Mapping[int, str], per_cluster: scipy.sparse.csc_array,
             cluster: int, sequence: int, position: int, before: int, after: int) -> TokenContext:
    """The window around one top token, with the cluster's activation at each of its tokens."""
    seq_len = inputs.shape[1]
    start, stop = max(0, position - before), min(seq_len, position + after + 1)
    samples = sequence * seq_len + np.arange(start, stop)
    low, high = per_cluster.indptr[cluster], per_cluster.indptr[cluster + 1]
    stored_samples, stored_values = per_cluster.indices[low:high], per_cluster.data[low:high]
    # The cluster has a stored entry here (its top token), so `at` is a valid index.
    at = np.minimum(np.searchsorted(stored_samples, samples), stored_samples.size - 1)
    values = np.where(stored_samples[at] == samples, stored_values[at], 0.0)
    ids = inputs[sequence, start:stop].tolist()
    return TokenContext(member, [texts.get(token_id, f"[{token_id}]") for token_id in ids], values.tolist())
