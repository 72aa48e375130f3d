"""The experiment config: one YAML file, validated before any work starts; defaults are the embedded default."""

from __future__ import annotations

import difflib
import hashlib
import json
import re
import zlib
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from spd_assets.config import original as original_configs
from spd_assets.config.sources import SOURCE_CONFIGS, SyntheticSourceConfig
from spd_assets.errors import ExperimentConfigError
from spd_math import ConfigError, MergeConfig
from spd_math.distances import DISTANCE_METHODS

EXPERIMENT_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,62}$")
# Folders of the results root that are not experiments (so no experiment may take their names).
RESERVED_NAMES = frozenset({"experiments", "tables", "device_leases", "logs"})
# A line of a block's error that names one of its keys: `alpha: expected a number, got 'high'`.
KEY_AT_FAULT = re.compile(r"^[a-z_]+: ")


def _parse_merge_config(values: Any) -> MergeConfig:
    """A `merge_config` block (the original research keys; missing keys take their defaults) as a MergeConfig."""
    if isinstance(values, MergeConfig):
        return values
    try:
        return MergeConfig.from_dict({} if values is None else values)
    except (ConfigError, TypeError) as error:
        raise ValueError(str(error)) from None


# Parsed once when the config is validated; written back with the original keys (`MergeConfig.to_dict`).
MergeConfigBlock = Annotated[
    MergeConfig,
    PlainValidator(_parse_merge_config),
    PlainSerializer(MergeConfig.to_dict, return_type=dict),
    WithJsonSchema({"type": "object", "description": "the original research merge_config keys"}),
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ConsensusConfig(_Strict):
    """Where the ensemble's consensus clusters are taken, and how many members must agree.

    The iteration is `iteration` when set, else the iteration at which the members have `k` groups
    (the median over members), else the median over members of the iteration of each member's
    MDL-loss minimum.
    """

    iteration: int | None = Field(None, ge=0, description="take the consensus after this merge (0-based)")
    k: int | None = Field(None, ge=1, description="take it where the members have this many groups")
    threshold: float = Field(0.5, gt=0, le=1, description="fraction of members two components must share a group in")

    @model_validator(mode="after")
    def _one_rule(self) -> ConsensusConfig:
        if self.iteration is not None and self.k is not None:
            raise ValueError(f"set at most one of iteration ({self.iteration}) and k ({self.k})")
        return self


# The `source:` block: one of the registered sources' configs, chosen by its `kind`.
SourceBlock = Annotated[Union[tuple(SOURCE_CONFIGS.values())], Field(discriminator="kind")]


class ExperimentConfig(_Strict):
    """Everything that determines an experiment's results: one YAML file's keys, validated, defaults filled in.

    Parameters
    ----------
    name : str, default "default"
        The experiment's name: the prefix of its asset keys, its group in the UI, the `experiment` column.
    source : SourceConfig, default the synthetic source
        Where the activations come from: one of `spd_assets.config.SOURCE_CONFIGS`, chosen by its `kind`.
    seq_mode : {"concat", "seq_mean", None}, default "concat"
        Tokens (`concat`) or sequences (`seq_mean`) are the samples; None for `[samples, C]` activations.
    merge_config : spd_math.MergeConfig
        The merge, given with the original research keys; parsed once, written back with the same keys.
    distance_methods : tuple of str, default both
        Names in `spd_math.DISTANCE_METHODS`.
    base_seed : int, default 0
        Each member's seed derives from it and the member's partition key (`member_seed`).
    consensus : ConsensusConfig
        Where the consensus clusters are taken and how many members must agree.

    Examples
    --------
    >>> from spd_assets.config import parse_config
    >>> config = parse_config({"name": "alpha_half", "merge_config": {"alpha": 0.5, "iters": 200}})
    >>> config.merge_config.alpha, config.merge_config.activation_threshold, config.source.kind
    (0.5, 0.01, 'synthetic')
    >>> config.config_hash == parse_config({"name": "alpha_half", "merge_config": {"iters": 200, "alpha": 0.5}}).config_hash
    True
    """

    name: str = Field("default", description="experiment name: asset key prefix and `experiment` column")
    source: SourceBlock = Field(default_factory=SyntheticSourceConfig)
    seq_mode: Literal["concat", "seq_mean"] | None = "concat"
    merge_config: MergeConfigBlock = Field(
        default_factory=lambda: MergeConfig(iters=None),
        description="original research merge_config keys; missing keys take MergeConfig defaults",
    )
    distance_methods: tuple[str, ...] = Field(tuple(DISTANCE_METHODS), description="distance methods of spd_math")
    base_seed: int = Field(0, ge=0, description="member seeds derive from it and the member's partition key")
    consensus: ConsensusConfig = Field(default_factory=ConsensusConfig)

    @field_validator("name")
    @classmethod
    def _valid_name(cls, name: str) -> str:
        if not EXPERIMENT_NAME.match(name):
            raise ValueError(f"expected a letter then letters, digits or '_' (at most 63), got {name!r}")
        if name in RESERVED_NAMES:
            raise ValueError(f"{name!r} names a folder of the results store; expected another name")
        return name

    @field_validator("distance_methods")
    @classmethod
    def _known_methods(cls, methods: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [method for method in methods if method not in DISTANCE_METHODS]
        if unknown or not methods:
            raise ValueError(f"expected at least one of {', '.join(DISTANCE_METHODS)}; got {list(methods)}")
        return methods

    @cached_property
    def canonical_json(self) -> str:
        """The config with every default filled in, as stable JSON (what the hash is of)."""
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))

    @cached_property
    def config_hash(self) -> str:
        """The first 16 hex digits of the SHA-256 of `canonical_json`: equal configs, equal hashes."""
        return hashlib.sha256(self.canonical_json.encode()).hexdigest()[:16]

    def model_copy(self, *, update: dict[str, Any] | None = None, deep: bool = False) -> ExperimentConfig:
        """A copy with `update` applied and validated, so its hash is its own (never the original's, cached)."""
        fields = {name: getattr(self, name) for name in type(self).model_fields}
        return type(self).model_validate({**fields, **(update or {})})

    def member_seed(self, partition_key: str) -> int:
        """A member's seed: a function of the base seed and its partition key only, so it can be recomputed alone."""
        return (self.base_seed * 1_000_003 + zlib.crc32(partition_key.encode())) % 2**63


def _model_at(loc: list[str]) -> type[BaseModel] | None:
    """The config model whose keys sit at `loc` (an error's location, the source's kind included), or None."""
    model: type[BaseModel] | None = ExperimentConfig
    parts = list(loc)
    while parts and model is not None:
        part = parts.pop(0)
        if model is ExperimentConfig and part == "source":
            model = SOURCE_CONFIGS.get(parts.pop(0)) if parts else None
            continue
        field = model.model_fields.get(part)
        annotation = field.annotation if field is not None else None
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return model


def _describe(error: ValidationError) -> str:
    """Each problem on a line: the key as written in the file (`source.n_members`), what was wrong, and for an
    unknown key the known keys it may have meant."""
    lines = []
    for problem in error.errors():
        loc = [str(part) for part in problem["loc"]]
        # The discriminated union adds the source's kind to the path (source.synthetic.n_members): not a key.
        written = [part for index, part in enumerate(loc) if not (index == 1 and loc[0] == "source" and part in SOURCE_CONFIGS)]
        where = ".".join(written) or "(top level)"
        message = problem["msg"].removeprefix("Value error, ")
        value = problem.get("input")
        shown = "" if isinstance(value, dict) or problem["type"] == "missing" else f" (got {_as_yaml(value)})"
        if problem["type"] == "extra_forbidden":
            model = _model_at(loc[:-1])
            known = sorted(model.model_fields) if model is not None else []
            close = difflib.get_close_matches(loc[-1], known, n=1)
            message = f"unknown key {loc[-1]!r}" + (f"; did you mean {close[0]!r}?" if close else "")
            if known:
                message += f" (keys here: {', '.join(known)})"
            shown = ""
        if problem["type"] == "value_error" and all(KEY_AT_FAULT.match(line) for line in message.splitlines()):
            # A block validated as a whole (merge_config) names each of its keys at fault on a line: `key: why`.
            lines += [f"  {where}.{line}" for line in message.splitlines()]
            continue
        lines.append(f"  {where}: {message}{shown}")
    return "\n".join(lines)


def _as_yaml(value: Any) -> str:
    """A value as the config file writes it: `null`, `true`, `'high'`, `-5`."""
    return json.dumps(value) if value is None or isinstance(value, bool) else repr(value)


def parse_config(values: Any, *, origin: str = "config") -> ExperimentConfig:
    """Validate a mapping (e.g. loaded YAML) into an ExperimentConfig, with every problem named.

    Parameters
    ----------
    values : mapping or None
        The config's keys, as in a YAML file; None is the embedded default.
    origin : str
        What the values came from, named in the error message.

    Returns
    -------
    ExperimentConfig

    Raises
    ------
    ExperimentConfigError
        Every key at fault on a line of its own, with what was expected (and the key meant, for a misspelling).

    Examples
    --------
    >>> from spd_assets.config import parse_config
    >>> parse_config({"source": {"kind": "synthetic", "n_members": 3}}).source.n_members
    3
    >>> parse_config({"source": {"kind": "synthetic", "n_member": 3}}, origin="my.yaml")
    Traceback (most recent call last):
    ...
    spd_assets.errors.ExperimentConfigError: my.yaml is invalid:
      source.n_member: unknown key 'n_member'; did you mean 'n_members'? (keys here: batch_size, kind, n_members, params)
    """
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ExperimentConfigError(f"{origin}: expected a mapping of settings, got {type(values).__name__}")
    try:
        return ExperimentConfig.model_validate(values)
    except ValidationError as error:
        raise ExperimentConfigError(f"{origin} is invalid:\n{_describe(error)}") from None


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`["merge_config.alpha=0.5", "name=alpha_half"]` set into a copy of `values`; values are read as YAML.

    Setting `source.kind` to another kind starts the source afresh: only the `source.*` keys set here are kept,
    not the other kind's settings.
    """
    values = json.loads(json.dumps(values, default=str))
    kind_before = values.get("source", {}).get("kind") if isinstance(values.get("source"), dict) else None
    source_keys_set = {}
    for override in overrides:
        key, separator, raw = override.partition("=")
        if not separator or not key.strip():
            raise ExperimentConfigError(f"--set {override!r}: expected KEY=VALUE, e.g. merge_config.alpha=0.5")
        *parents, leaf = key.strip().split(".")
        target = values
        for part in parents:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ExperimentConfigError(f"--set {override!r}: {part!r} is not a section of the config")
        try:
            target[leaf] = yaml.safe_load(raw)
        except yaml.YAMLError as error:
            raise ExperimentConfigError(f"--set {override!r}: the value is not valid YAML: {error}") from None
        if parents and parents[0] == "source":
            source_keys_set[tuple([*parents[1:], leaf])] = target[leaf]
    source = values.get("source")
    if isinstance(source, dict) and source.get("kind") != kind_before:
        values["source"] = {}
        for path, value in source_keys_set.items():
            section = values["source"]
            for part in path[:-1]:
                section = section.setdefault(part, {})
            section[path[-1]] = value
    return values


@dataclass(frozen=True)
class LoadedConfig:
    """A config file read into an experiment config: which shape it had, the files read, and what was not used."""

    config: ExperimentConfig
    shape: str
    files: list[Path]
    not_used: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    slurm: dict[str, str] = field(default_factory=dict)  # deployment `slurm:` settings (an original pipeline's)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> ExperimentConfig:
    """Read a YAML experiment config, or an original research config (None: the embedded default), and apply
    `--set` overrides.

    Parameters
    ----------
    path : path or None
        An experiment config (YAML), or an original clustering run, pipeline or flat config (YAML or JSON);
        relative paths in it are relative to its folder. None: the embedded default.
    overrides : list of str
        `KEY=VALUE` settings applied on top, values read as YAML (`["merge_config.alpha=0.5"]`).

    Returns
    -------
    ExperimentConfig

    Raises
    ------
    ExperimentConfigError
        The file is missing or unreadable, or its values are invalid (every key at fault named).

    Examples
    --------
    >>> from spd_assets.config import load_config
    >>> config = load_config(None, ["name=alpha_half", "merge_config.alpha=0.5"])
    >>> config.name, config.merge_config.alpha
    ('alpha_half', 0.5)
    """
    return load_config_file(path, overrides).config


def load_config_file(path: str | Path | None, overrides: list[str] = ()) -> LoadedConfig:
    """`load_config`, with what the file was (see `spd_assets.original_configs`) and its keys without meaning here."""
    if path is None:
        embedded_default = json.loads(ExperimentConfig().canonical_json)
        config = parse_config(apply_overrides(embedded_default, list(overrides)), origin="--set")
        return LoadedConfig(config, "embedded default", [])
    path = Path(path)
    values = original_configs.read_values(path)
    translation = original_configs.translate(values, path) if original_configs.is_original(values) else None
    if translation is not None:
        values = translation.values
    if overrides and isinstance(values, dict):
        values = apply_overrides(values, list(overrides))
    config = parse_config(values, origin=str(path))
    # Relative paths are relative to the config file, not to wherever the command runs.
    base = translation.base if translation is not None else path.parent
    config = config.model_copy(update={"source": config.source.resolved(base.resolve())})
    if translation is None:
        return LoadedConfig(config, original_configs.SHAPE_EXPERIMENT, [path])
    return LoadedConfig(config, translation.shape, translation.files, translation.not_used, translation.notes,
                        translation.slurm)


def dump_config(config: ExperimentConfig) -> str:
    """YAML text that `load_config` reads back into an equal config."""
    values = json.loads(config.canonical_json)
    return yaml.safe_dump(values, sort_keys=False)
