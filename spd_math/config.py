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


def _checked_iters(iters: Any) -> int | None:
    if iters is not None and (isinstance(iters, bool) or not isinstance(iters, int) or iters < 1):
        raise ConfigError(f"iters: expected a positive integer or None (null in YAML), got {iters!r}")
    return iters


def _checked_module_name_filter(prefix: Any) -> str | None:
    if prefix is not None and not isinstance(prefix, str):
        raise ConfigError(f"module_name_filter: expected a module name prefix (string) or None (null in YAML), got {prefix!r}")
    return prefix


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
        # Every value at fault is named at once (one per line), so a config is fixed in one pass.
        problems: list[str] = []

        def check(name: str, validated) -> None:
            try:
                object.__setattr__(self, name, validated(getattr(self, name)))
            except ConfigError as error:
                problems.append(str(error))

        check("activation_threshold", lambda value: None if value is None else _finite_number("activation_threshold", value))
        check("alpha", lambda value: _finite_number("alpha", value, minimum=0.0))
        check("iters", _checked_iters)
        check("merge_pair_sampling_kwargs", lambda _: self._validated_sampler_kwargs())  # the method's name too
        check("filter_dead_threshold", lambda value: _finite_number("filter_dead_threshold", value, minimum=0.0))
        check("module_name_filter", _checked_module_name_filter)
        if problems:
            raise ConfigError("\n".join(problems))

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
        problems = []
        for key in unknown:  # one line per key, as `MergeConfig` names its values at fault
            close = difflib.get_close_matches(str(key), known, n=1)
            meant = f"; did you mean {close[0]!r}?" if close else ""
            problems.append(f"{key}: unknown key {key!r}{meant} (keys here: {', '.join(sorted(known))})")
        try:  # the known keys' values are checked too, so every problem is named at once
            config = cls(**{key: value for key, value in values.items() if key in known})
        except ConfigError as error:
            problems += str(error).splitlines()
        if problems:
            raise ConfigError("\n".join(problems))
        return config

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict with the original keys."""
        values = asdict(self)
        values["merge_pair_sampling_kwargs"] = dict(self.merge_pair_sampling_kwargs)
        return values
