"""The merge configuration, with the same keys and defaults as the original research configs."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

# Sampler name -> the keyword arguments it accepts and their defaults (MATH.md §5).
SAMPLER_KWARG_DEFAULTS: dict[str, dict[str, float]] = {
    "range": {"threshold": 0.05},
    "mcmc": {"temperature": 1.0},
}


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field, the value and what was expected."""


def _finite_number(name: str, value: Any, *, minimum: float | None = None, strictly_positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name}: expected a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ConfigError(f"{name}: expected a finite number, got {value!r}")
    if strictly_positive and value <= 0:
        raise ConfigError(f"{name}: expected a number > 0, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name}: expected a number >= {minimum}, got {value!r}")
    return value


@dataclass(frozen=True)
class MergeConfig:
    """How one merge run works (MATH.md §2-§7).

    `activation_threshold=None` means continuous mode (group activations are sums, not ORs).
    `iters=None` merges until three groups remain.
    """

    activation_threshold: float | None = 0.01
    alpha: float = 1.0
    iters: int | None = 100
    merge_pair_sampling_method: str = "range"
    merge_pair_sampling_kwargs: Mapping[str, float] = field(default_factory=lambda: {"threshold": 0.05})
    filter_dead_threshold: float = 0.001
    module_name_filter: str | None = None

    def __post_init__(self) -> None:
        if self.activation_threshold is not None:
            object.__setattr__(
                self, "activation_threshold", _finite_number("activation_threshold", self.activation_threshold)
            )
        object.__setattr__(self, "alpha", _finite_number("alpha", self.alpha, minimum=0.0))
        if self.iters is not None:
            if isinstance(self.iters, bool) or not isinstance(self.iters, int) or self.iters < 1:
                raise ConfigError(f"iters: expected a positive integer or None, got {self.iters!r}")
        method = self.merge_pair_sampling_method
        if method not in SAMPLER_KWARG_DEFAULTS:
            raise ConfigError(
                f"merge_pair_sampling_method: expected one of {sorted(SAMPLER_KWARG_DEFAULTS)}, got {method!r}"
            )
        object.__setattr__(self, "merge_pair_sampling_kwargs", self._validated_sampler_kwargs())
        object.__setattr__(
            self, "filter_dead_threshold", _finite_number("filter_dead_threshold", self.filter_dead_threshold, minimum=0.0)
        )
        if self.module_name_filter is not None and not isinstance(self.module_name_filter, str):
            raise ConfigError(
                f"module_name_filter: expected a module name prefix (string) or None, got {self.module_name_filter!r}"
            )

    def _validated_sampler_kwargs(self) -> dict[str, float]:
        kwargs = self.merge_pair_sampling_kwargs
        if kwargs is None:
            kwargs = {}
        if not isinstance(kwargs, Mapping):
            raise ConfigError(f"merge_pair_sampling_kwargs: expected a mapping, got {kwargs!r}")
        allowed = SAMPLER_KWARG_DEFAULTS[self.merge_pair_sampling_method]
        unknown = sorted(set(kwargs) - set(allowed))
        if unknown:
            raise ConfigError(
                f"merge_pair_sampling_kwargs: unknown key(s) {unknown} for sampler "
                f"{self.merge_pair_sampling_method!r}; expected only {sorted(allowed)}"
            )
        merged = {**allowed, **kwargs}
        name = f"merge_pair_sampling_kwargs.{next(iter(allowed))}"
        if self.merge_pair_sampling_method == "range":
            value = _finite_number(name, merged["threshold"], minimum=0.0)
            if value > 1:
                raise ConfigError(f"{name}: expected a fraction in [0, 1], got {value!r}")
            return {"threshold": value}
        return {"temperature": _finite_number(name, merged["temperature"], strictly_positive=True)}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> MergeConfig:
        """Build from a mapping (e.g. a `merge_config` block of a research config), rejecting unknown keys."""
        if not isinstance(values, Mapping):
            raise ConfigError(f"merge config: expected a mapping, got {type(values).__name__}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"merge config: unknown key(s) {unknown}; expected only {sorted(known)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict with the original keys."""
        values = asdict(self)
        values["merge_pair_sampling_kwargs"] = dict(self.merge_pair_sampling_kwargs)
        return values
