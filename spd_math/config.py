"""The merge configuration, with the same keys and defaults as the original research configs."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from spd_math.errors import ConfigError
from spd_math.samplers import SAMPLERS
from spd_math.validation import finite_number

# Sampler name -> the keyword arguments it accepts and their defaults (docs/math.md §5).
SAMPLER_KWARG_DEFAULTS: dict[str, dict[str, float]] = {name: dict(spec.kwarg_defaults) for name, spec in SAMPLERS.items()}

__all__ = ["SAMPLER_KWARG_DEFAULTS", "ConfigError", "MergeConfig"]


def _finite_number(name: str, value: Any, **bounds: Any) -> float:
    return finite_number(name, value, ConfigError, **bounds)


@dataclass(frozen=True)
class MergeConfig:
    """How one merge run works (docs/math.md §2-§7), with the keys and defaults of the original research configs.

    Parameters
    ----------
    activation_threshold : float or None, default 0.01
        Boolean mode: a component is active where its activation is `> activation_threshold`.
        None: continuous mode (group activations are sums, not ORs).
    alpha : float, default 1.0
        Weight of the group-size term of the MDL cost (>= 0).
    iters : int or None, default 100
        Number of merges; None merges until three groups remain.
    merge_pair_sampling_method : str, default "range"
        A name in `spd_math.SAMPLERS` (docs/math.md §5).
    merge_pair_sampling_kwargs : mapping, default {"threshold": 0.05}
        The sampler's keyword arguments; missing ones take the sampler's defaults.
    filter_dead_threshold : float, default 0.001
        Components whose maximum activation is below this are dropped as dead (docs/math.md §1).
    module_name_filter : str or None
        Keep only modules whose name starts with this prefix.

    Raises
    ------
    ConfigError
        A value of the wrong type or out of range, or an unknown sampler or sampler kwarg.

    Examples
    --------
    >>> from spd_math import MergeConfig
    >>> config = MergeConfig(iters=10, merge_pair_sampling_method="mcmc", merge_pair_sampling_kwargs={})
    >>> config.merge_pair_sampling_kwargs
    {'temperature': 1.0}
    >>> MergeConfig.from_dict(config.to_dict()) == config
    True
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
        SAMPLERS.lookup(self.merge_pair_sampling_method, ConfigError)
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
        sampler = SAMPLERS.lookup(self.merge_pair_sampling_method, ConfigError)
        unknown = sorted(set(kwargs) - set(sampler.kwarg_defaults))
        if unknown:
            raise ConfigError(
                f"merge_pair_sampling_kwargs: unknown key(s) {unknown} for sampler "
                f"{self.merge_pair_sampling_method!r}; expected only {sorted(sampler.kwarg_defaults)}"
            )
        return sampler.check_kwargs({**sampler.kwarg_defaults, **kwargs})

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> MergeConfig:
        """Build from a mapping (e.g. a `merge_config` block of a research config), rejecting unknown keys."""
        if not isinstance(values, Mapping):
            raise ConfigError(f"merge config: expected a mapping, got {type(values).__name__}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            close = [match for key in unknown for match in difflib.get_close_matches(key, known, n=1)]
            meant = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
            raise ConfigError(f"merge config: unknown key(s) {unknown}{meant}; expected only {sorted(known)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict with the original keys."""
        values = asdict(self)
        values["merge_pair_sampling_kwargs"] = dict(self.merge_pair_sampling_kwargs)
        return values
