"""Synthetic causal importances with a planted truth: the embedded default activation source.

A synthetic "model" has modules `layers.{l}.{module}`, each with some rank-one components.
Planted groups of components, drawn across modules and layers, fire together whenever their
group's latent feature fires (each member with probability `member_reliability`); every
live component also fires spontaneously at `noise_rate`, and dead components never fire. A
firing component gets a CI in ACTIVE_RANGE; a silent one is mostly exactly 0, with a faint
floor on some entries, as real (continuous) CIs have. The clustering should find the
planted groups: `SyntheticModel.planted_partition` is the truth to compare against.

Everything is deterministic in its arguments: the model in `SyntheticParams`, a batch in
(model, seed, batch_size). No global random state is used.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from spd_assets.config.sources import SyntheticParams, SyntheticSourceConfig, check_int, n_dead_components
from spd_assets.sources.base import ActivationSource, numbered_members
from spd_math.partitions import canonical_labels

# CI of a firing component: well above any activation threshold a user would pick.
ACTIVE_RANGE = (0.3, 1.0)
# Fraction of silent entries that carry a faint floor instead of an exact 0.
FLOOR_RATE = 0.02
# Ceilings of that floor: below the usual activation threshold (0.01) for live components,
# and below the usual dead-filter threshold (0.001) for dead ones.
LIVE_FLOOR_CEILING = 0.005
DEAD_FLOOR_CEILING = 0.0009
# Values generated at once when a batch streams (`batch_chunks`): 64 MB of float32 and its masks.
CHUNK_VALUES = 1 << 24
# First words of the seed sequences, so the model and the batches draw independent streams.
MODEL_STREAM = 0
BATCH_STREAM = 1


def _read_only(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)
    return array


@dataclass(frozen=True, eq=False)
class SyntheticModel:
    """One drawn synthetic model: its modules, planted groups, dead components and feature rates.

    Component arrays are indexed like `labels` (layer-major, then modules in the given order).
    """

    params: SyntheticParams
    module_sizes: dict[str, int]
    labels: list[str]
    planted_group: np.ndarray  # [n_components] int64: planted group id, -1 for no group
    dead: np.ndarray  # [n_components] bool
    feature_rates: np.ndarray  # [n_planted_groups] float64: per-token firing probability of each group's feature

    @property
    def n_components(self) -> int:
        return len(self.labels)

    @property
    def n_planted_groups(self) -> int:
        return self.params.n_planted_groups

    def planted_partition(self, labels: Sequence[str]) -> np.ndarray:
        """Truth for the given labels (e.g. the live labels after dead filtering): canonical group
        ids, components in no group each in a singleton group of their own."""
        position = {label: index for index, label in enumerate(self.labels)}
        unknown = [label for label in labels if label not in position]
        if unknown:
            raise ValueError(f"labels: expected labels of this synthetic model, got unknown label(s) {unknown[:5]}")
        indices = np.fromiter((position[label] for label in labels), dtype=np.int64, count=len(labels))
        groups = self.planted_group[indices]
        # Ids past the last planted group give every ungrouped component a group of its own.
        ids = np.where(groups >= 0, groups, self.n_planted_groups + indices)
        return canonical_labels(ids)


def build_model(params: SyntheticParams) -> SyntheticModel:
    """Draw the model that `params` describe; the same params give the same model."""
    if not isinstance(params, SyntheticParams):
        raise TypeError(f"params: expected SyntheticParams, got {type(params).__name__}")
    rng = np.random.default_rng([MODEL_STREAM, params.model_seed])
    module_names = [f"layers.{layer}.{module}" for layer in range(params.n_layers) for module in params.modules]
    low, high = params.components_per_module
    sizes = rng.integers(low, high + 1, size=len(module_names))
    module_sizes = {name: int(size) for name, size in zip(module_names, sizes)}
    labels = [f"{name}:{index}" for name, size in module_sizes.items() for index in range(size)]
    n_components = len(labels)

    dead = np.zeros(n_components, dtype=bool)
    dead[rng.choice(n_components, size=n_dead_components(n_components, params.dead_fraction), replace=False)] = True

    group_sizes = rng.integers(params.group_size[0], params.group_size[1] + 1, size=params.n_planted_groups)
    # Members are any live components, so a group spans modules and layers.
    members = rng.choice(np.flatnonzero(~dead), size=int(group_sizes.sum()), replace=False)
    planted_group = np.full(n_components, -1, dtype=np.int64)
    planted_group[members] = np.repeat(np.arange(params.n_planted_groups), group_sizes)

    log_low, log_high = np.log(params.feature_rate)
    feature_rates = np.exp(rng.uniform(log_low, log_high, size=params.n_planted_groups))
    return SyntheticModel(
        params=params,
        module_sizes=module_sizes,
        labels=labels,
        planted_group=_read_only(planted_group),
        dead=_read_only(dead),
        feature_rates=_read_only(feature_rates),
    )


def generate_batch(model: SyntheticModel, *, seed: int, batch_size: int) -> dict[str, torch.Tensor]:
    """module name -> float32 [batch_size, seq_len, C] in [0, 1]; deterministic in (model, seed, batch_size)."""
    values = generate_rows(model, seed=seed, batch_size=batch_size)
    return _per_module(model, values, batch_size)


def _per_module(model: SyntheticModel, values: np.ndarray, sequences: int) -> dict[str, torch.Tensor]:
    """`[sequences * seq_len, all components]` rows as module name -> `[sequences, seq_len, C]` tensors."""
    batch: dict[str, torch.Tensor] = {}
    start = 0
    for name, size in model.module_sizes.items():
        module_values = np.ascontiguousarray(values[:, start : start + size])
        batch[name] = torch.from_numpy(module_values).reshape(sequences, model.params.seq_len, size)
        start += size
    return batch


def generate_rows(model: SyntheticModel, *, seed: int, batch_size: int) -> np.ndarray:
    """The values of `generate_batch` as one float32 `[batch_size * seq_len, all components]` array (modules
    side by side in `module_sizes` order), for consumers that want the rows whole rather than per module."""
    stream = _RowStream(model, seed=seed, batch_size=batch_size)
    return stream.next_rows(stream.n_tokens)


def generate_chunks(model: SyntheticModel, *, seed: int, batch_size: int,
                    chunk_sequences: int) -> Iterator[dict[str, torch.Tensor]]:
    """`generate_batch`'s values, `chunk_sequences` sequences at a time (the same numbers: each draw of the batch
    comes from where it lies in the batch's random stream), so a batch of any size is never whole in memory."""
    check_int("chunk_sequences", chunk_sequences, 1)
    stream = _RowStream(model, seed=seed, batch_size=batch_size)
    for first in range(0, batch_size, chunk_sequences):
        sequences = min(chunk_sequences, batch_size - first)
        yield _per_module(model, stream.next_rows(sequences * model.params.seq_len), sequences)


def _positioned(seed_words: list[int], outputs: int, buffered: bool) -> np.random.Generator:
    """A generator `outputs` 64-bit outputs into the stream of `seed_words`; `buffered`: holding the upper half of
    the last one, as a generator does after an odd number of 32-bit draws (float32 values use 32 bits each)."""
    rng = np.random.default_rng(seed_words)
    bits = rng.bit_generator
    if buffered:
        bits.advance(outputs - 1)
        last = int(bits.random_raw())
        state = bits.state
        state["has_uint32"], state["uinteger"] = 1, last >> 32
        bits.state = state
    else:
        bits.advance(outputs)
    return rng


def _after_uint32(outputs: int, buffered: bool, count: int) -> tuple[int, bool]:
    """Where the stream is after `count` 32-bit draws from (`outputs`, `buffered`)."""
    if count and buffered:
        count, buffered = count - 1, False
    if count:
        outputs, buffered = outputs + (count + 1) // 2, count % 2 == 1
    return outputs, buffered


class _RowStream:
    """The batch's rows in order, chunk by chunk. The batch is drawn from one random stream in five parts, each
    over every token: feature firings (float64), spontaneous firings, member reliability, floors (float32 each),
    then the values of the firing entries (float64). Each part gets a generator placed where it starts in the
    stream, so the next rows of every part can be drawn in turn."""

    def __init__(self, model: SyntheticModel, *, seed: int, batch_size: int) -> None:
        if not isinstance(model, SyntheticModel):
            raise TypeError(f"model: expected SyntheticModel, got {type(model).__name__}")
        check_int("seed", seed, 0)
        check_int("batch_size", batch_size, 1)
        params = model.params
        self.model = model
        self.n_tokens = batch_size * params.seq_len
        self.members = np.flatnonzero(model.planted_group >= 0)
        words = [BATCH_STREAM, params.model_seed, seed]
        n, groups, components = self.n_tokens, model.n_planted_groups, model.n_components
        features_end = n * groups  # float64 draws: one output each
        fires_end = _after_uint32(features_end, False, n * components)
        reliable_end = _after_uint32(*fires_end, n * self.members.size)
        floors_end = _after_uint32(*reliable_end, n * components)
        self.features = _positioned(words, 0, False)
        self.fires = _positioned(words, features_end, False)
        self.reliable = _positioned(words, *fires_end)
        self.floors = _positioned(words, *reliable_end)
        self.active_values = _positioned(words, floors_end[0], False)  # float64 draws: the buffered half is unused
        self.noise_rates = np.where(model.dead, 0.0, params.noise_rate).astype(np.float32)
        self.floor_scale = (np.where(model.dead, DEAD_FLOOR_CEILING, LIVE_FLOOR_CEILING).astype(np.float32)
                            / FLOOR_RATE)

    def next_rows(self, n_tokens: int) -> np.ndarray:
        """The next `n_tokens` rows, float32 `[n_tokens, components]`."""
        model, params = self.model, self.model.params
        feature_on = self.features.random((n_tokens, model.n_planted_groups)) < model.feature_rates
        fires = self.fires.random((n_tokens, model.n_components), dtype=np.float32) < self.noise_rates
        reliable = self.reliable.random((n_tokens, self.members.size), dtype=np.float32) < params.member_reliability
        fires[:, self.members] |= feature_on[:, model.planted_group[self.members]] & reliable

        # One draw decides the floor and its value: below FLOOR_RATE it is uniform on [0, FLOOR_RATE).
        values = self.floors.random((n_tokens, model.n_components), dtype=np.float32)
        floored = values < FLOOR_RATE
        # The draw becomes the values in place: `where(floored, draw * ceiling / FLOOR_RATE, 0)` exactly (the
        # products are >= 0: times 1 or 0), without that expression's full-size temporaries (most of the time).
        np.multiply(values, self.floor_scale, out=values)
        np.multiply(values, floored, out=values)
        values[fires] = self.active_values.uniform(*ACTIVE_RANGE, size=int(fires.sum())).astype(np.float32)
        return values


@lru_cache(maxsize=8)
def _model(params: tuple[tuple[str, Any], ...]) -> SyntheticModel:
    return build_model(SyntheticParams(**dict(params)))


class SyntheticSource(ActivationSource[SyntheticSourceConfig]):
    """The embedded default: a synthetic model, one batch per member, and the planted truth to check against.

    Parameters
    ----------
    config : SyntheticSourceConfig
        `params` (overrides of `SyntheticParams`), `batch_size` (sequences per member), `n_members`.

    Examples
    --------
    >>> from spd_assets.config.sources import SyntheticSourceConfig
    >>> from spd_assets.sources import SyntheticSource
    >>> source = SyntheticSource(SyntheticSourceConfig(n_members=2, batch_size=4, params={"n_layers": 1, "n_planted_groups": 10}))
    >>> source.member_keys()
    ['member_000', 'member_001']
    >>> batch = source.load_batch("member_000", seed=0)
    >>> list(batch)[:2], tuple(batch["layers.0.attn.q"].shape)
    (['layers.0.attn.q', 'layers.0.attn.k'], (4, 96, 31))
    """

    kind = "synthetic"
    config_type = SyntheticSourceConfig
    has_planted_truth = True
    streams_batches = True

    @property
    def model(self) -> SyntheticModel:
        # Lists from YAML become tuples, so the cache key is hashable.
        key = tuple(sorted((name, tuple(v) if isinstance(v, list) else v) for name, v in self.config.params.items()))
        return _model(key)

    def member_keys(self) -> list[str]:
        return numbered_members(self.config.n_members)

    def load_batch(self, member: str, seed: int) -> dict[str, torch.Tensor]:
        return generate_batch(self.model, seed=seed, batch_size=self.config.batch_size)

    def batch_chunks(self, member: str, seed: int) -> Iterator[dict[str, torch.Tensor]]:
        model = self.model
        sequences = max(1, CHUNK_VALUES // (model.params.seq_len * model.n_components))
        return generate_chunks(model, seed=seed, batch_size=self.config.batch_size, chunk_sequences=sequences)

    def batch_identity(self, member: str, seed: int) -> dict[str, Any]:
        return {"params": dataclasses.asdict(self.model.params), "seed": seed, "batch_size": self.config.batch_size}

    def module_widths(self) -> dict[str, int]:
        return dict(self.model.module_sizes)

    def activation_dims(self) -> tuple[int, int]:
        return (self.config.batch_size, self.model.params.seq_len)

    def planted_partition(self, labels: list[str]) -> np.ndarray:
        return self.model.planted_partition(labels)
