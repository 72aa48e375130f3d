"""The `source:` block of an experiment config: one config class per activation source kind.

The configs live in the config layer, below the sources that read them, so an experiment config
is validated (and its hash computed) without importing any source. A new source kind adds its
config class here (a `SourceConfig` subclass with `kind: Literal["..."]`) and its entry in
`SOURCE_CONFIGS`; its `ActivationSource` in `spd_assets.sources` names the class as `config_type`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# files: causal importances are gates in [0, 1].
DEFAULT_VALUE_RANGE = (0.0, 1.0)
# Model sources: generous for one member on a workstation, small enough never to exhaust a shared machine.
DEFAULT_MEMORY_BUDGET_GB = 4.0
# torch: a model given as `package.module:factory` rather than a path.
FACTORY_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
# spd: a run on wandb, and the config file beside a local run's checkpoints.
WANDB_PREFIX = "wandb:"
RUN_CONFIG_FILE = "final_config.yaml"


def is_factory_spec(value: str) -> bool:
    """`"package.module:factory"` rather than a path."""
    return bool(FACTORY_SPEC.match(value))

class SourceConfig(BaseModel):
    """The `source:` block of an experiment config; each source kind subclasses it with `kind: Literal[...]`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str
    n_members: int | None = None

    def resolved(self, base: Path) -> SourceConfig:
        """This config with every relative path field made relative to `base` (the config file's folder)."""
        update = self.relative_paths_resolved(base)
        return self.model_copy(update=update) if update else self

    def relative_paths_resolved(self, base: Path) -> dict[str, Any]:
        """Field name -> value made absolute against `base`, for each relative path field.

        `Path` fields are found by type; a source whose field may hold a path or something else
        (a model given as a directory or as `package.module:factory`) adds that field here.
        """
        return {
            name: (base / value).resolve()
            for name, value in self
            if isinstance(value, Path) and not value.is_absolute()
        }





# --- synthetic ---------------------------------------------------------------------------------

def check_int(name: str, value: object, minimum: int) -> None:
    """Raise ValueError unless `value` is an integer (not a bool) >= `minimum`."""
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
    check_int(f"{name}[0]", value[0], minimum)
    check_int(f"{name}[1]", value[1], value[0])


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
        check_int("n_layers", self.n_layers, 1)
        if not (isinstance(self.modules, tuple) and self.modules):
            raise ValueError(f"modules: expected a non-empty tuple of module names, got {self.modules!r}")
        if not all(isinstance(name, str) and name for name in self.modules) or len(set(self.modules)) != len(self.modules):
            raise ValueError(f"modules: expected distinct non-empty strings, got {self.modules!r}")
        _check_int_range("components_per_module", self.components_per_module, 1)
        check_int("n_planted_groups", self.n_planted_groups, 0)
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
        check_int("model_seed", self.model_seed, 0)
        check_int("seq_len", self.seq_len, 1)
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


def n_dead_components(n_components: int, dead_fraction: float) -> int:
    """How many of a synthetic model's components are dead."""
    return round(dead_fraction * n_components)


def _n_live(n_components: int, dead_fraction: float) -> int:
    return n_components - n_dead_components(n_components, dead_fraction)


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





# --- files -------------------------------------------------------------------------------------

class FilesSourceConfig(SourceConfig):
    """A directory with one activation file per ensemble member (`.safetensors`, `.npz` or `.pt`)."""

    kind: Literal["files"] = "files"
    directory: Path
    value_range: tuple[float, float] = Field(DEFAULT_VALUE_RANGE, description="values outside are an error")
    n_members: int | None = Field(None, ge=1, description="use only the first n files (sorted by name)")
    layout: dict[str, int] | None = Field(
        None, description="module name -> number of components every file must have; default: what most files share")

    @field_validator("value_range")
    @classmethod
    def _ordered(cls, value: tuple[float, float]) -> tuple[float, float]:
        if value[0] > value[1]:
            raise ValueError(f"expected [low, high] with low <= high, got {list(value)}")
        return value

    @field_validator("layout")
    @classmethod
    def _sizes(cls, layout: dict[str, int] | None) -> dict[str, int] | None:
        if layout is not None and (not layout or any(c < 1 for c in layout.values())):
            raise ValueError(f"expected module name -> a positive number of components, got {layout}")
        return layout





# --- model sources: torch and spd ------------------------------------------------------------

class ModelSourceConfig(SourceConfig):
    """The keys every model source has: ensemble size, batch size, forward chunks and a memory budget."""

    batch_size: int = Field(16, ge=1, description="sequences (or rows) per ensemble member")
    n_members: int = Field(4, ge=1, le=10_000, description="ensemble size: one batch per member")
    chunk_size: int | None = Field(32, ge=1, description="sequences per forward pass; null: the whole batch at once")
    memory_budget_gb: float = Field(
        DEFAULT_MEMORY_BUDGET_GB, gt=0,
        description="the most one member's activations may take: the entries above activation_threshold "
                    "(stopped once over), or in continuous mode the dense matrix (refused before the forward pass)",
    )




class TorchSourceConfig(ModelSourceConfig):
    """Outputs of chosen modules of a torch model on text (see the module docstring)."""

    kind: Literal["torch"] = "torch"
    model: str = Field(description="a local Hugging Face model directory, or 'package.module:factory'")
    modules: tuple[str, ...] = Field(min_length=1, description="glob patterns over the model's named modules")
    text: Path = Field(description="a .txt, .jsonl or .npy file, or a directory of them")
    seq_len: int = Field(64, ge=1, description="tokens per sequence")

    @field_validator("modules")
    @classmethod
    def _patterns(cls, patterns: tuple[str, ...]) -> tuple[str, ...]:
        if not all(pattern.strip() for pattern in patterns):
            raise ValueError(f"expected non-empty glob patterns, got {list(patterns)}")
        return patterns

    def relative_paths_resolved(self, base: Path) -> dict[str, Any]:
        update = super().relative_paths_resolved(base)
        model = Path(self.model).expanduser()
        # A factory spec stays as it is, unless a file or folder of that name exists beside the config.
        if not model.is_absolute() and (not is_factory_spec(self.model) or (base / model).exists()):
            update["model"] = str((base / model).resolve())
        return update




class SpdSourceConfig(ModelSourceConfig):
    """The causal importances of an SPD run (see the module docstring)."""

    kind: Literal["spd"] = "spd"
    model_path: str | None = Field(None, description="run directory, model_<step>.pth, or wandb:<entity>/<project>/runs/<id>")
    experiment_key: str | None = Field(None, description="a preset of spd's registry; its canonical run is the model")
    task_name: Literal["lm", "resid_mlp"] | None = Field(None, description="checked against the run's task when given")
    dataset_seed: int = Field(0, description="member i draws its batch with seed dataset_seed + i (the original's rule)")
    dataset_streaming: bool = Field(False, description="lm: stream the run's Hugging Face dataset")
    token_ids: Path | None = Field(None, description="lm: draw sequences from these .npy token ids, not the run's dataset")
    chunk_size: int | None = Field(None, ge=1, description="rows per forward pass; null: the whole batch, as the original")

    @model_validator(mode="after")
    def _one_model(self) -> SpdSourceConfig:
        if self.model_path is None and self.experiment_key is None:
            raise ValueError("expected model_path (a run directory, checkpoint or wandb: path) or experiment_key")
        return self

    def relative_paths_resolved(self, base: Path) -> dict[str, Any]:
        update = super().relative_paths_resolved(base)
        path = self.model_path
        if path is not None and not path.startswith(WANDB_PREFIX) and not Path(path).expanduser().is_absolute():
            update["model_path"] = str((base / Path(path).expanduser()).resolve())
        return update




# --- histories ---------------------------------------------------------------------------------

class HistoriesSourceConfig(SourceConfig):
    """Past runs' merge histories, one member each (see `spd_assets.sources.histories`)."""

    kind: Literal["histories"] = "histories"
    directory: Path = Field(description="an original ensemble folder, clustering/ folder, or a folder of histories")
    ensemble_id: str | None = Field(None, description="which ensemble of a registry (default: the folder's, or the only one)")
    n_members: int | None = Field(None, ge=1, description="use only the first n histories")




def local_task_name(model_path: str | None) -> str | None:
    """The task of a local run, read from its `final_config.yaml` without spd (None when unknown)."""
    if model_path is None or model_path.startswith(WANDB_PREFIX):
        return None
    path = Path(model_path).expanduser()
    config_file = (path if path.is_dir() else path.parent) / RUN_CONFIG_FILE
    try:
        values = yaml.safe_load(config_file.read_text())
        return values["task_config"]["task_name"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return None


SOURCE_CONFIGS: dict[str, type[SourceConfig]] = {
    config.model_fields["kind"].default: config
    for config in (SyntheticSourceConfig, FilesSourceConfig, TorchSourceConfig, SpdSourceConfig, HistoriesSourceConfig)
}
