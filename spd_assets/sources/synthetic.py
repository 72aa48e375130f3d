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

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, field_validator

from spd_assets.sources.base import ActivationSource, SourceConfig, numbered_members
from spd_math.partitions import canonical_labels

# CI of a firing component: well above any activation threshold a user would pick.
ACTIVE_RANGE = (0.3, 1.0)
# Fraction of silent entries that carry a faint floor instead of an exact 0.
FLOOR_RATE = 0.02
# Ceilings of that floor: below the usual activation threshold (0.01) for live components,
# and below the usual dead-filter threshold (0.001) for dead ones.
LIVE_FLOOR_CEILING = 0.005
DEAD_FLOOR_CEILING = 0.0009
# First words of the seed sequences, so the model and the batches draw independent streams.
MODEL_STREAM = 0
BATCH_STREAM = 1


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")


def _check_fraction(name: str, value: object, *, allow_zero: bool = True, allow_one: bool = True) -> None:
    low = "[0" if allow_zero else "(0"
    high = "1]" if allow_one else "1)"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}: expected a number in {low}, {high}, got {value!r}")
    if value < 0 or value > 1 or (value == 0 and not allow_zero) or (value == 1 and not allow_one):
        raise ValueError(f"{name}: expected a number in {low}, {high}, got {value!r}")


def _check_int_range(name: str, value: object, minimum: int) -> None:
    if not (isinstance(value, tuple) and len(value) == 2):
        raise ValueError(f"{name}: expected an inclusive range (low, high) of integers, got {value!r}")
    _check_int(f"{name}[0]", value[0], minimum)
    _check_int(f"{name}[1]", value[1], value[0])


@dataclass(frozen=True)
class SyntheticParams:
    """What the synthetic model looks like; the defaults are the embedded default of the product.

    Ranges are inclusive `(low, high)`. Feature rates are drawn log-uniformly from
    `feature_rate`, so rare and common features both occur, as in real models.

    The defaults give about 600 components (some 10% dead), about 3% of entries active, and
    3072 tokens in a batch of 32 sequences: enough that the greedy MDL merge (range sampler,
    threshold 0.05) recovers the planted partition at adjusted Rand index 0.97-1.0, yet not
    so easily that every ensemble member agrees exactly.
    """

    n_layers: int = 4
    modules: tuple[str, ...] = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.up", "mlp.down")
    components_per_module: tuple[int, int] = (20, 32)
    n_planted_groups: int = 50
    group_size: tuple[int, int] = (3, 8)
    feature_rate: tuple[float, float] = (0.02, 0.15)
    member_reliability: float = 0.85
    noise_rate: float = 0.004
    dead_fraction: float = 0.1
    model_seed: int = 0
    seq_len: int = 96

    def __post_init__(self) -> None:
        # Config files (YAML, JSON) give lists; tuples keep the params hashable.
        for name in ("modules", "components_per_module", "group_size", "feature_rate"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        _check_int("n_layers", self.n_layers, 1)
        if not (isinstance(self.modules, tuple) and self.modules):
            raise ValueError(f"modules: expected a non-empty tuple of module names, got {self.modules!r}")
        if not all(isinstance(name, str) and name for name in self.modules) or len(set(self.modules)) != len(self.modules):
            raise ValueError(f"modules: expected distinct non-empty strings, got {self.modules!r}")
        _check_int_range("components_per_module", self.components_per_module, 1)
        _check_int("n_planted_groups", self.n_planted_groups, 0)
        # A planted group of one component would be indistinguishable from an ungrouped one.
        _check_int_range("group_size", self.group_size, 2)
        rates = self.feature_rate
        if not (isinstance(rates, tuple) and len(rates) == 2):
            raise ValueError(f"feature_rate: expected an inclusive range (low, high) of probabilities, got {rates!r}")
        # Log-uniform draws need a positive lower end.
        _check_fraction("feature_rate[0]", rates[0], allow_zero=False)
        _check_fraction("feature_rate[1]", rates[1], allow_zero=False)
        if rates[1] < rates[0]:
            raise ValueError(f"feature_rate: expected low <= high, got {rates!r}")
        _check_fraction("member_reliability", self.member_reliability, allow_zero=False)
        _check_fraction("noise_rate", self.noise_rate)
        _check_fraction("dead_fraction", self.dead_fraction, allow_one=False)
        _check_int("model_seed", self.model_seed, 0)
        _check_int("seq_len", self.seq_len, 1)
        # Checked against the smallest model these params can draw, so build_model never fails.
        max_members = self.n_planted_groups * self.group_size[1]
        min_live = _n_live(self.n_layers * len(self.modules) * self.components_per_module[0], self.dead_fraction)
        if max_members > min_live:
            raise ValueError(
                f"n_planted_groups: {self.n_planted_groups} groups of up to group_size[1]={self.group_size[1]} members "
                f"need up to {max_members} live components, but the smallest model these params allow has {min_live} "
                f"(components_per_module[0]={self.components_per_module[0]}, dead_fraction={self.dead_fraction}); "
                f"expected at most {min_live} planted members"
            )


def _n_dead(n_components: int, dead_fraction: float) -> int:
    return round(dead_fraction * n_components)


def _n_live(n_components: int, dead_fraction: float) -> int:
    return n_components - _n_dead(n_components, dead_fraction)


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
    dead[rng.choice(n_components, size=_n_dead(n_components, params.dead_fraction), replace=False)] = True

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
    if not isinstance(model, SyntheticModel):
        raise TypeError(f"model: expected SyntheticModel, got {type(model).__name__}")
    _check_int("seed", seed, 0)
    _check_int("batch_size", batch_size, 1)
    params = model.params
    rng = np.random.default_rng([BATCH_STREAM, params.model_seed, seed])
    n_tokens = batch_size * params.seq_len
    n_components = model.n_components

    feature_on = rng.random((n_tokens, model.n_planted_groups)) < model.feature_rates
    noise_rates = np.where(model.dead, 0.0, params.noise_rate).astype(np.float32)
    fires = rng.random((n_tokens, n_components), dtype=np.float32) < noise_rates
    members = np.flatnonzero(model.planted_group >= 0)
    reliable = rng.random((n_tokens, members.size), dtype=np.float32) < params.member_reliability
    fires[:, members] |= feature_on[:, model.planted_group[members]] & reliable

    # One draw decides the floor and its value: below FLOOR_RATE it is uniform on [0, FLOOR_RATE).
    floor_draw = rng.random((n_tokens, n_components), dtype=np.float32)
    floor_ceiling = np.where(model.dead, DEAD_FLOOR_CEILING, LIVE_FLOOR_CEILING).astype(np.float32)
    values = np.where(floor_draw < FLOOR_RATE, floor_draw * (floor_ceiling / FLOOR_RATE), np.float32(0))
    values[fires] = rng.uniform(*ACTIVE_RANGE, size=int(fires.sum())).astype(np.float32)

    batch: dict[str, torch.Tensor] = {}
    start = 0
    for name, size in model.module_sizes.items():
        module_values = np.ascontiguousarray(values[:, start : start + size])
        batch[name] = torch.from_numpy(module_values).reshape(batch_size, params.seq_len, size)
        start += size
    return batch


class SyntheticSourceConfig(SourceConfig):
    """SPD-like causal importances with planted co-firing groups (see `SyntheticParams`)."""

    kind: Literal["synthetic"] = "synthetic"
    params: dict[str, Any] = Field(default_factory=dict, description="overrides of SyntheticParams fields")
    batch_size: int = Field(32, ge=1, description="sequences per ensemble member")
    n_members: int = Field(6, ge=1, le=10_000, description="ensemble size: one batch per member")

    @field_validator("params")
    @classmethod
    def _known_params(cls, params: dict[str, Any]) -> dict[str, Any]:
        known = set(SyntheticParams.__dataclass_fields__)
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(f"unknown synthetic parameter(s) {unknown}; expected some of {sorted(known)}")
        SyntheticParams(**params)
        return params


@lru_cache(maxsize=8)
def _model(params: tuple[tuple[str, Any], ...]) -> SyntheticModel:
    return build_model(SyntheticParams(**dict(params)))


class SyntheticSource(ActivationSource[SyntheticSourceConfig]):
    """The embedded default: a synthetic model, one batch per member, and the planted truth to check against."""

    kind = "synthetic"
    config_type = SyntheticSourceConfig
    has_planted_truth = True

    @property
    def model(self) -> SyntheticModel:
        # Lists from YAML become tuples, so the cache key is hashable.
        key = tuple(sorted((name, tuple(v) if isinstance(v, list) else v) for name, v in self.config.params.items()))
        return _model(key)

    def member_keys(self) -> list[str]:
        return numbered_members(self.config.n_members)

    def load_batch(self, member: str, seed: int) -> dict[str, torch.Tensor]:
        return generate_batch(self.model, seed=seed, batch_size=self.config.batch_size)

    def planted_partition(self, labels: list[str]) -> np.ndarray:
        return self.model.planted_partition(labels)
