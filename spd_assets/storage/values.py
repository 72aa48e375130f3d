"""The value objects assets pass along, and how each is stored in a file of its own.

One `ValueFormat` per value type: its file suffix, a writer and a reader. The IO manager picks
the format by the type an asset declares, so a new asset of an existing type needs nothing
here, and a new type is one class plus one `VALUE_FORMATS` entry.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse
import torch

from spd_assets.errors import StorageError
from spd_assets.storage.atomic import atomic_path
from spd_assets.storage.history_format import read_history_zip
from spd_math import ColumnStats, MergeConfig, MergeHistory, NormalizedEnsemble, ProcessedActivations

# The previous layout stored merge histories in the original zip format.
HISTORY_ZIP_SUFFIX = ".zip"


@dataclass(frozen=True)
class MemberEnsemble:
    """A normalized ensemble with the partition key of each member (in ensemble order) and those missing."""

    ensemble: NormalizedEnsemble
    members: list[str]
    missing: list[str]

    def __post_init__(self) -> None:
        # Only the alignment is stored, and the value read back must fingerprint as the one written: a
        # NormalizedHistories (what normalize_ensemble returns) keeps its alignment and leaves its metadata, which
        # is derived from the member histories.
        if type(self.ensemble) is not NormalizedEnsemble:
            ensemble = self.ensemble
            if ensemble.is_compact:
                plain = NormalizedEnsemble(labels=ensemble.labels, present=ensemble.present,
                                           member_columns=ensemble.member_columns, member_merges=ensemble.member_merges)
            else:
                plain = NormalizedEnsemble(ensemble.merges, ensemble.labels, ensemble.present)
            object.__setattr__(self, "ensemble", plain)


@dataclass(frozen=True, eq=False)
class TokenBatch:
    """The model inputs of one ensemble member, kept so the member can be recomputed and its contexts shown.

    `inputs` is exactly what the model was given: token ids `[sequences, seq_len]` (int64) for
    language models, or feature rows `[samples, features]` (float32) for toy models. With a
    tokenizer, `vocab_ids` are the distinct ids that occur (sorted) and `vocab_strings` the text
    of each (`tokenizer.decode([id])`), so contexts are shown without the tokenizer. Under
    seq_mode `concat`, activation sample `s` is token `inputs[s // seq_len, s % seq_len]`.
    """

    inputs: np.ndarray
    vocab_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    vocab_strings: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.inputs.ndim != 2:
            raise StorageError(f"TokenBatch.inputs: expected a 2-D array, got shape {self.inputs.shape}")
        if len(self.vocab_ids) != len(self.vocab_strings):
            raise StorageError(f"TokenBatch: {len(self.vocab_ids)} vocab ids but {len(self.vocab_strings)} strings")

    @property
    def is_tokens(self) -> bool:
        """Token ids (sequences x positions), rather than feature rows."""
        return bool(np.issubdtype(self.inputs.dtype, np.integer))

    @property
    def n_sequences(self) -> int:
        return self.inputs.shape[0]

    @property
    def n_tokens(self) -> int:
        """Tokens in the batch (0 for feature rows)."""
        return self.inputs.size if self.is_tokens else 0

    @property
    def sample_dims(self) -> tuple[int, ...]:
        """Leading dimensions of the activations it gives: `(sequences, seq_len)` for token ids, `(rows,)` else."""
        return tuple(self.inputs.shape) if self.is_tokens else (self.inputs.shape[0],)

    def tokens(self, sequence: int) -> list[str]:
        """The text of each token of one sequence (empty strings for ids without a stored string)."""
        text = dict(zip(self.vocab_ids.tolist(), self.vocab_strings))
        return [text.get(token_id, "") for token_id in self.inputs[sequence].tolist()]


@dataclass(frozen=True)
class EnsembleDistances:
    """`[n_iters, n_ens, n_ens]` distances per method, members in ensemble order."""

    by_method: dict[str, torch.Tensor]
    members: list[str]


@dataclass(frozen=True)
class ConsensusClusters:
    """The ensemble's consensus at one iteration (`spd_assets.analysis.consensus`).

    `cluster_of[x]`: cluster of `labels[x]`, or -1 when it is in none; `stability[i]`: mean
    co-association of cluster i's pairs; `component_stability[x]`: mean co-association of x with
    the rest of its cluster (NaN when in none). `rule` says in words how `iteration` was chosen,
    `member_iterations` what each member (in `members` order) chose by it (empty for a fixed one).
    """

    iteration: int
    rule: str
    threshold: float
    members: list[str]
    member_iterations: list[int]
    labels: list[str]
    cluster_of: np.ndarray
    stability: np.ndarray
    component_stability: np.ndarray

    @property
    def n_clusters(self) -> int:
        return int(self.stability.size)

    def __repr__(self) -> str:
        clustered = int((self.cluster_of >= 0).sum())
        return (f"ConsensusClusters(iteration={self.iteration}, {self.n_clusters} clusters of {clustered} of "
                f"{len(self.labels)} components, threshold={self.threshold}, members={len(self.members)})")


class ExplorerPage(str):
    """A self-contained HTML page (the cluster explorer), stored as an `.html` file that opens from disk."""


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    with atomic_path(path) as temporary, open(temporary, "wb") as handle:
        np.savez(handle, **arrays)


def load_npz(path: Path) -> dict[str, np.ndarray]:
    """Every array of an `.npz` file, or a StorageError naming the file."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except FileNotFoundError:
        raise StorageError(f"{path} does not exist (was the upstream asset materialized?)") from None
    except (OSError, ValueError) as error:
        raise StorageError(f"{path} is unreadable: {error}") from None


def save_activations(path: Path, activations: ProcessedActivations) -> None:
    """Sparse (CSR): causal importances are mostly exactly zero. Compact activations (only the entries
    above a threshold) stay compact, with the threshold and the statistics taken before anything was dropped."""
    extra = {}
    if activations.is_compact:
        csr = activations.to_scipy_csr()
        indptr, indices, values = csr.indptr.astype(np.int64, copy=False), csr.indices, csr.data
        extra["compact"] = np.array(True)
        if activations.dropped_at_or_below is not None:
            extra["dropped_at_or_below"] = np.array(activations.dropped_at_or_below, dtype=np.float64)
    else:
        dense = activations.activations.detach().cpu().numpy()
        rows, indices = np.nonzero(dense)
        indptr = np.zeros(dense.shape[0] + 1, dtype=np.int64)
        np.cumsum(np.bincount(rows, minlength=dense.shape[0]), out=indptr[1:])
        values = dense[rows, indices].astype(np.float32)
    stats = activations.stats
    if stats is not None:
        extra.update(stats_n_samples=np.array(stats.n_samples), stats_active_counts=stats.active_counts,
                     stats_sums=stats.sums, stats_maxima=stats.maxima, stats_threshold=np.array(stats.threshold))
    _save_npz(
        path,
        shape=np.array(activations.activations.shape, dtype=np.int64),
        indptr=indptr,
        indices=indices.astype(np.int32, copy=False),
        values=values,
        labels=np.array(activations.labels, dtype=str),
        dead_labels=np.array(activations.dead_labels, dtype=str),
        **extra,
    )


def load_activations(path: Path) -> ProcessedActivations:
    """Processed activations saved by `save_activations` (dense or compact)."""
    data = load_npz(path)
    n, c = (int(v) for v in data["shape"])
    stats = None
    if "stats_maxima" in data:
        stats = ColumnStats(int(data["stats_n_samples"]), data["stats_active_counts"], data["stats_sums"],
                            data["stats_maxima"], float(data["stats_threshold"]))
    if "compact" in data:
        activations = scipy.sparse.csr_array((data["values"], data["indices"], data["indptr"]), shape=(n, c))
        dropped = float(data["dropped_at_or_below"]) if "dropped_at_or_below" in data else None
    else:
        activations = np.zeros((n, c), dtype=np.float32)
        rows = np.repeat(np.arange(n), np.diff(data["indptr"]))
        activations[rows, data["indices"]] = data["values"]
        activations, dropped = torch.from_numpy(activations), None
    return ProcessedActivations(activations=activations, labels=data["labels"].tolist(),
                                dead_labels=data["dead_labels"].tolist(), dropped_at_or_below=dropped, stats=stats)


def save_ensemble(path: Path, value: MemberEnsemble) -> None:
    """Write a member ensemble: the alignment (labels, which member has which) and each member's merges,
    O(members x (c + iters)); an ensemble made from an array of partitions keeps its array."""
    ensemble = value.ensemble
    if ensemble.is_compact:
        columns = ensemble.member_columns
        arrays = {"member_columns": np.concatenate(columns) if columns else np.zeros(0, dtype=np.int64),
                  "member_sizes": np.array([column.size for column in columns], dtype=np.int64),
                  "member_merges": _narrow_ids(ensemble.member_merges.numpy(), len(ensemble.labels))}
    else:
        arrays = {"merges": ensemble.merges.numpy()}
    _save_npz(path, labels=_text_array(ensemble.labels), present=ensemble.present.numpy(),
              members=np.array(value.members, dtype=str), missing=np.array(value.missing, dtype=str), **arrays)


def load_ensemble(path: Path) -> MemberEnsemble:
    """A member ensemble written by `save_ensemble` (or, as it is, one of the previous layout: the whole
    `[members, iterations, components]` array)."""
    data = load_npz(path)
    labels = _text_list(data["labels"])
    present = torch.from_numpy(data["present"])
    if "merges" in data:
        ensemble = NormalizedEnsemble(torch.from_numpy(data["merges"]), labels, present)
    else:
        columns = np.split(data["member_columns"].astype(np.int64), np.cumsum(data["member_sizes"])[:-1])
        ensemble = NormalizedEnsemble(labels=labels, present=present, member_columns=columns,
                                      member_merges=torch.from_numpy(data["member_merges"].astype(np.int64)))
    return MemberEnsemble(ensemble=ensemble, members=data["members"].tolist(), missing=data["missing"].tolist())


def _narrow_ids(values: np.ndarray, bound: int) -> np.ndarray:
    """Ids below `bound` in 32 bits where they fit (they always do but for more than 2**31 components)."""
    return values.astype(np.int32) if bound <= np.iinfo(np.int32).max else values


def _text_array(texts: list[str]) -> np.ndarray:
    """Labels as UTF-8 bytes joined by newlines: a quarter of NumPy's fixed-width UTF-32 strings."""
    multiline = [text for text in texts if "\n" in text]
    if multiline:
        raise StorageError(f"labels cannot contain newlines: {multiline[:3]}")
    return np.frombuffer("\n".join(texts).encode("utf-8"), dtype=np.uint8)


def _text_list(array: np.ndarray) -> list[str]:
    """Labels stored by `_text_array`, or as NumPy strings (the previous layout)."""
    if array.dtype == np.uint8:
        text = array.tobytes().decode("utf-8")
        return text.split("\n") if text else []
    return array.tolist()


# Marks a merge history stored as its merges (`save_history`).
HISTORY_LAYOUT = "spd-cluster merge sequence 1"


def save_history(path: Path, history: MergeHistory) -> None:
    """Write a merge history as what it is: labels, merges and per-merge diagnostics, O(c + iters). (The original
    research format, with every partition, is what `export` and the original-format folder write.)"""
    c = history.c_components
    arrays: dict[str, np.ndarray] = {"layout": np.array(HISTORY_LAYOUT), "labels": _text_array(history.labels),
                                     "k_groups": _narrow_ids(history.k_groups.numpy(), c)}
    if history.selected_pairs is not None:
        arrays["selected_pairs"] = _narrow_ids(history.selected_pairs.numpy(), c)
    if history.is_merge_sequence:
        sampled = history.selected_pairs
        if sampled is None or not torch.equal(torch.sort(sampled, dim=1).values, history.merge_pairs):
            arrays["merge_pairs"] = _narrow_ids(history.merge_pairs.numpy(), c)
    else:
        arrays["partitions"] = history.partitions.numpy()
    for name in ("pair_costs", "mdl_losses"):
        values = getattr(history, name)
        if values is not None:
            arrays[name] = values.numpy().astype(np.float64)
    if history.config is not None:
        arrays["config"] = np.array(json.dumps(history.config.to_dict()))
    if history.seed is not None:
        arrays["seed"] = np.array(int(history.seed), dtype=np.uint64)
    _save_npz(path, **arrays)


def load_history(path: Path) -> MergeHistory:
    """A merge history written by `save_history`, or (read as it is) one in the original zip format, which the
    previous layout stored."""
    if path.suffix == HISTORY_ZIP_SUFFIX:
        try:
            return read_history_zip(path)
        except FileNotFoundError:
            raise StorageError(f"{path} does not exist (was the upstream asset materialized?)") from None
    data = load_npz(path)
    if str(data.get("layout", "")) != HISTORY_LAYOUT:
        raise StorageError(f"{path} is not a merge history of this version (layout {str(data.get('layout'))!r}, "
                           f"expected {HISTORY_LAYOUT!r})")

    def tensor(name: str, dtype) -> torch.Tensor | None:
        return torch.from_numpy(data[name].astype(dtype)) if name in data else None

    config = MergeConfig.from_dict(json.loads(str(data["config"]))) if "config" in data else None
    return MergeHistory(
        labels=_text_list(data["labels"]),
        group_idxs=tensor("partitions", np.int64),
        selected_pairs=tensor("selected_pairs", np.int64),
        merge_pairs=tensor("merge_pairs", np.int64),
        k_groups=tensor("k_groups", np.int64),
        pair_costs=tensor("pair_costs", np.float64),
        mdl_losses=tensor("mdl_losses", np.float64),
        config=config,
        seed=int(data["seed"]) if "seed" in data else None,
    )


def save_distances(path: Path, value: EnsembleDistances) -> None:
    """Write every method's distance matrices and the members they are between."""
    arrays = {f"method__{method}": distances.numpy() for method, distances in value.by_method.items()}
    _save_npz(path, members=np.array(value.members, dtype=str), **arrays)


def load_distances(path: Path) -> EnsembleDistances:
    """Distances written by `save_distances`."""
    data = load_npz(path)
    by_method = {key.removeprefix("method__"): torch.from_numpy(v) for key, v in data.items() if key.startswith("method__")}
    return EnsembleDistances(by_method=by_method, members=data["members"].tolist())


def save_consensus(path: Path, value: ConsensusClusters) -> None:
    """Write consensus clusters with their iteration, rule and stabilities."""
    _save_npz(
        path,
        iteration=np.array(value.iteration, dtype=np.int64),
        rule=np.array(value.rule, dtype=str),
        threshold=np.array(value.threshold, dtype=np.float64),
        members=np.array(value.members, dtype=str),
        member_iterations=np.array(value.member_iterations, dtype=np.int64),
        labels=np.array(value.labels, dtype=str),
        cluster_of=value.cluster_of,
        stability=value.stability,
        component_stability=value.component_stability,
    )


def load_consensus(path: Path) -> ConsensusClusters:
    """Consensus clusters written by `save_consensus`."""
    data = load_npz(path)
    return ConsensusClusters(
        iteration=int(data["iteration"]),
        rule=str(data["rule"]),
        threshold=float(data["threshold"]),
        members=data["members"].tolist(),
        member_iterations=data["member_iterations"].tolist(),
        labels=data["labels"].tolist(),
        cluster_of=data["cluster_of"],
        stability=data["stability"],
        component_stability=data["component_stability"],
    )


def save_page(path: Path, page: ExplorerPage) -> None:
    """Write the explorer's HTML page."""
    with atomic_path(path) as temporary:
        temporary.write_text(page, encoding="utf-8")


def load_page(path: Path) -> ExplorerPage:
    """The explorer page written by `save_page`."""
    try:
        return ExplorerPage(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StorageError(f"{path} does not exist (was the upstream asset materialized?)") from None


def save_token_batch(path: Path, batch: TokenBatch) -> None:
    """Write a member's token batch (inputs and the text of each token id that occurs)."""
    _save_npz(path, inputs=batch.inputs, vocab_ids=batch.vocab_ids.astype(np.int64),
              vocab_strings=np.array(batch.vocab_strings, dtype=str))


def load_token_batch(path: Path) -> TokenBatch:
    """A token batch written by `save_token_batch`."""
    data = load_npz(path)
    return TokenBatch(inputs=data["inputs"], vocab_ids=data["vocab_ids"], vocab_strings=tuple(data["vocab_strings"].tolist()))


@dataclass(frozen=True)
class ValueFormat:
    """How one kind of value is stored: its file suffix, writer and reader, and the suffixes of the files of the
    previous layout that the reader also reads (a value written now replaces such a file)."""

    suffix: str
    save: Callable[[Path, Any], None]
    load: Callable[[Path], Any]
    previous_suffixes: tuple[str, ...] = ()

    def stored_path(self, path: Path) -> Path:
        """`path` (the value's file, with `suffix`), or the file of the previous layout that holds the value
        instead when only that exists."""
        if not path.exists():
            for suffix in self.previous_suffixes:
                previous = path.with_suffix(suffix)
                if previous.exists():
                    return previous
        return path

    def replace(self, path: Path, value: Any) -> None:
        """Write `value` to `path` and remove a file of the previous layout that held the value before."""
        self.save(path, value)
        for suffix in self.previous_suffixes:
            path.with_suffix(suffix).unlink(missing_ok=True)


VALUE_FORMATS: dict[type, ValueFormat] = {
    ProcessedActivations: ValueFormat(".npz", save_activations, load_activations),
    MergeHistory: ValueFormat(".npz", save_history, load_history, previous_suffixes=(HISTORY_ZIP_SUFFIX,)),
    MemberEnsemble: ValueFormat(".npz", save_ensemble, load_ensemble),
    EnsembleDistances: ValueFormat(".npz", save_distances, load_distances),
    ConsensusClusters: ValueFormat(".npz", save_consensus, load_consensus),
    ExplorerPage: ValueFormat(".html", save_page, load_page),
    TokenBatch: ValueFormat(".npz", save_token_batch, load_token_batch),
}


def value_format(value_type: type | str) -> ValueFormat:
    """The format of `value_type` (a class or its name), or of its nearest registered base class."""
    if isinstance(value_type, str):
        by_name = {cls.__name__: value_format for cls, value_format in VALUE_FORMATS.items()}
        if value_type in by_name:
            return by_name[value_type]
    else:
        for cls in value_type.__mro__:
            if cls in VALUE_FORMATS:
                return VALUE_FORMATS[cls]
    name = value_type if isinstance(value_type, str) else value_type.__name__
    raise StorageError(f"no storage format for values of type {name!r}; "
                       f"expected one of {[cls.__name__ for cls in VALUE_FORMATS]}")
