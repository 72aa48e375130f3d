"""The original research code's config files, read unchanged: recognised by their keys, translated to an experiment.

Three shapes, each translated into the values of an `ExperimentConfig` with an `spd` source:

- **clustering run config** (JSON or YAML): `merge_config`, `model_path` or `experiment_key`,
  `batch_size`, `dataset_seed`, ... One clustering run, so one member.
- **pipeline config** (YAML): `clustering_run_config_path` (a run config, looked for from this
  file's folder and then each parent folder, as the original resolves it from its repository
  root), `n_runs` (the ensemble size) and `distances_methods`.
- **older flat run config**: the merge keys at top level, `n_batches` (the ensemble size),
  `task_name`, `pop_component_prob`, `rank_cost_fn_name`, ...

Keys for wandb, logging intervals, SLURM and git snapshots are accepted and listed as not used.
`pop_component_prob` must be 0 and `rank_cost_fn_name` `const_1` (the math implemented here);
`matching_dist_vec` is `matching_dist` (the same distances, computed another way). Member `i`
draws its batch with seed `dataset_seed + i`, as the original's ensemble runs do, and `seq_mode`
is `concat` for language models and none otherwise, as the original sets it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from spd_assets.config.sources import local_task_name
from spd_assets.errors import ExperimentConfigError

SHAPE_EXPERIMENT = "spd-cluster experiment config"
SHAPE_RUN = "original clustering run config"
SHAPE_PIPELINE = "original pipeline config"
SHAPE_FLAT = "original flat run config (older)"

MERGE_KEYS = (
    "activation_threshold", "alpha", "iters", "merge_pair_sampling_method", "merge_pair_sampling_kwargs",
    "filter_dead_threshold", "module_name_filter",
)
# Original keys that configure wandb, logging, SLURM or git: accepted, with no meaning here.
NOT_USED_KEYS = frozenset({
    "ensemble_id", "logging_intervals", "wandb_project", "wandb_entity", "wandb_enabled", "intervals",
    "slurm_job_name_prefix", "slurm_partition", "create_git_snapshot",
})
RUN_KEYS = frozenset({
    "model_path", "experiment_key", "batch_size", "dataset_seed", "ensemble_id", "merge_config",
    "logging_intervals", "wandb_project", "wandb_entity", "dataset_streaming",
})
PIPELINE_KEYS = frozenset({
    "clustering_run_config_path", "n_runs", "distances_methods", "slurm_job_name_prefix", "slurm_partition",
    "wandb_project", "wandb_entity", "create_git_snapshot",
})
FLAT_KEYS = frozenset({
    *MERGE_KEYS, "pop_component_prob", "rank_cost_fn_name", "model_path", "task_name", "experiment_key",
    "n_batches", "batch_size", "wandb_enabled", "wandb_project", "intervals",
})
# Values of the original's options that this implementation covers.
SUPPORTED_POP_COMPONENT_PROB = 0
SUPPORTED_RANK_COST = "const_1"
DISTANCE_ALIASES = {"matching_dist_vec": "matching_dist"}
EXPERIMENT_NAME_LENGTH = 63


@dataclass(frozen=True)
class Translation:
    """An original config as experiment config values, with what was read and what has no meaning here."""

    values: dict[str, Any]
    shape: str
    base: Path  # the folder the source's relative paths are relative to
    files: list[Path]
    not_used: list[str]
    notes: list[str]


def read_values(path: Path) -> Any:
    """A config file's contents: JSON for `.json`, else YAML."""
    try:
        text = path.read_text()
    except OSError as error:
        raise ExperimentConfigError(f"cannot read config file {path}: {error.strerror}") from None
    try:
        return json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        kind = "JSON" if path.suffix == ".json" else "YAML"
        raise ExperimentConfigError(f"{path} is not valid {kind}: {error}") from None


def shape_of(values: Any) -> str:
    """Which kind of config a file's top-level mapping is, by its keys."""
    if not isinstance(values, dict):
        return SHAPE_EXPERIMENT
    if "clustering_run_config_path" in values:
        return SHAPE_PIPELINE
    if "merge_config" in values and ({"model_path", "experiment_key", "batch_size"} & set(values)):
        return SHAPE_RUN
    if "source" not in values and ({"pop_component_prob", "rank_cost_fn_name", "n_batches", "task_name"}
                                   | set(MERGE_KEYS)) & set(values):
        return SHAPE_FLAT
    return SHAPE_EXPERIMENT


def is_original(values: Any) -> bool:
    """Whether `values` are an original research config (any of its three shapes)."""
    return shape_of(values) != SHAPE_EXPERIMENT


def translate(values: dict[str, Any], path: Path) -> Translation:
    """The experiment config values of an original config file at `path` (whose folder relative paths start from)."""
    shape = shape_of(values)
    if shape == SHAPE_PIPELINE:
        return _pipeline(values, path)
    if shape == SHAPE_RUN:
        return _run(values, path)
    if shape == SHAPE_FLAT:
        return _flat(values, path)
    raise ExperimentConfigError(f"{path}: not an original config (expected merge_config with model_path or "
                                "experiment_key, clustering_run_config_path, or top-level merge keys)")


def experiment_name(path: Path) -> str:
    """An experiment name from a file name: `pipeline-dev.yaml` -> `pipeline_dev`."""
    name = re.sub(r"[^A-Za-z0-9_]", "_", path.stem)
    if not name[:1].isalpha():
        name = f"run_{name}"
    return name[:EXPERIMENT_NAME_LENGTH]


def _check_keys(values: dict[str, Any], known: frozenset[str], shape: str, path: Path) -> list[str]:
    unknown = sorted(set(values) - known)
    if unknown:
        raise ExperimentConfigError(f"{path} ({shape}): unknown key(s) {unknown}; expected some of {sorted(known)}")
    return sorted(set(values) & NOT_USED_KEYS)


def _model_keys(values: dict[str, Any], path: Path) -> dict[str, Any]:
    if "model_path" not in values and "experiment_key" not in values:
        raise ExperimentConfigError(f"{path}: expected model_path (a run directory, checkpoint or wandb: path) "
                                    "or experiment_key")
    return {key: values[key] for key in ("model_path", "experiment_key") if values.get(key) is not None}


def _seq_mode(task_name: str | None, notes: list[str]) -> str | None:
    """The original's rule: tokens are samples for language models, toy models have no sequence."""
    if task_name == "lm":
        return "concat"
    if task_name is not None:
        return None
    notes.append("seq_mode: concat (the task is known only once the run loads; for toy models, whose "
                 "activations have no sequence axis, concat and none are the same)")
    return "concat"


def _merge_config(merge: Any, path: Path, where: str) -> dict[str, Any]:
    if not isinstance(merge, dict):
        raise ExperimentConfigError(f"{path}: {where}: expected a mapping of merge settings, got {merge!r}")
    module_filter = merge.get("module_name_filter")
    if module_filter is not None and not isinstance(module_filter, str):
        raise ExperimentConfigError(
            f"{path}: {where}.module_name_filter: {module_filter!r} is a set of module names, which is not "
            "supported here; expected a module name prefix (string) or null"
        )
    return dict(merge)


def _run(values: dict[str, Any], path: Path, *, n_members: int = 1) -> Translation:
    not_used = _check_keys(values, RUN_KEYS, SHAPE_RUN, path)
    if "merge_config" not in values or "batch_size" not in values:
        missing = [key for key in ("merge_config", "batch_size") if key not in values]
        raise ExperimentConfigError(f"{path} ({SHAPE_RUN}): missing {missing}")
    notes: list[str] = []
    model = _model_keys(values, path)
    task = local_task_name(_local_path(model.get("model_path"), path.parent))
    source = {
        "kind": "spd", **model, "batch_size": values["batch_size"], "n_members": n_members,
        "dataset_seed": values.get("dataset_seed", 0), "dataset_streaming": values.get("dataset_streaming", False),
    }
    experiment = {
        "name": experiment_name(path),
        "source": source,
        "seq_mode": _seq_mode(task, notes),
        "merge_config": _merge_config(values["merge_config"], path, "merge_config"),
    }
    return Translation(experiment, SHAPE_RUN, path.parent, [path], not_used, notes)


def _local_path(model_path: str | None, base: Path) -> str | None:
    if model_path is None or model_path.startswith("wandb:"):
        return model_path
    return str(base / Path(model_path).expanduser())


def find_upwards(relative: str, start: Path) -> Path | None:
    """`relative` under `start` or the nearest parent folder that has it (the original's repository root)."""
    candidate = Path(relative).expanduser()
    if candidate.is_absolute():
        return candidate if candidate.exists() else None
    for folder in (start, *start.parents):
        if (folder / candidate).is_file():
            return (folder / candidate).resolve()
    return None


def _pipeline(values: dict[str, Any], path: Path) -> Translation:
    not_used = _check_keys(values, PIPELINE_KEYS, SHAPE_PIPELINE, path)
    missing = [key for key in ("clustering_run_config_path", "n_runs", "distances_methods") if key not in values]
    if missing:
        raise ExperimentConfigError(f"{path} ({SHAPE_PIPELINE}): missing {missing}")
    run_path = find_upwards(str(values["clustering_run_config_path"]), path.parent.resolve())
    if run_path is None:
        raise ExperimentConfigError(
            f"{path}: clustering_run_config_path {values['clustering_run_config_path']!r} was found neither in "
            f"{path.parent.resolve()} nor in any folder above it; expected a clustering run config there"
        )
    run_values = read_values(run_path)
    if shape_of(run_values) != SHAPE_RUN:
        raise ExperimentConfigError(f"{run_path} (named by {path}'s clustering_run_config_path): expected a "
                                    "clustering run config (merge_config, model_path or experiment_key, batch_size)")
    run = _run(run_values, run_path, n_members=values["n_runs"])
    methods = values["distances_methods"]
    if isinstance(methods, str) or not isinstance(methods, list):
        raise ExperimentConfigError(f"{path}: distances_methods: expected a list of method names, got {methods!r}")
    translated = list(dict.fromkeys(DISTANCE_ALIASES.get(method, method) for method in methods))
    notes = [*run.notes, *(f"distances_methods: {alias} is computed as {DISTANCE_ALIASES[alias]}"
                            for alias in methods if alias in DISTANCE_ALIASES)]
    experiment = {**run.values, "name": experiment_name(path), "distance_methods": translated}
    return Translation(experiment, SHAPE_PIPELINE, run.base, [path, run_path],
                       [*not_used, *(f"{run_path.name}: {key}" for key in run.not_used)], notes)


def _flat(values: dict[str, Any], path: Path) -> Translation:
    not_used = _check_keys(values, FLAT_KEYS, SHAPE_FLAT, path)
    pop = values.get("pop_component_prob", SUPPORTED_POP_COMPONENT_PROB)
    if pop != SUPPORTED_POP_COMPONENT_PROB:
        raise ExperimentConfigError(
            f"{path}: pop_component_prob: {pop!r}; only 0 (no random popping of components) is implemented here"
        )
    rank_cost = values.get("rank_cost_fn_name", SUPPORTED_RANK_COST)
    if rank_cost != SUPPORTED_RANK_COST:
        raise ExperimentConfigError(
            f"{path}: rank_cost_fn_name: {rank_cost!r}; only {SUPPORTED_RANK_COST!r} (every component costs the "
            "same, the MDL cost implemented here) is supported"
        )
    if "batch_size" not in values:
        raise ExperimentConfigError(f"{path} ({SHAPE_FLAT}): missing ['batch_size']")
    notes: list[str] = []
    model = _model_keys(values, path)
    task = values.get("task_name") or local_task_name(_local_path(model.get("model_path"), path.parent))
    source = {"kind": "spd", **model, "batch_size": values["batch_size"], "n_members": values.get("n_batches", 1)}
    if values.get("task_name") is not None:
        source["task_name"] = values["task_name"]
    merge = {key: values[key] for key in MERGE_KEYS if key in values}
    experiment = {
        "name": experiment_name(path),
        "source": source,
        "seq_mode": _seq_mode(task, notes),
        "merge_config": _merge_config(merge, path, "(top-level merge keys)"),
    }
    return Translation(experiment, SHAPE_FLAT, path.parent, [path], not_used, notes)
