"""`spd-cluster validate`: parse and check a config without running anything; say what would run and what it needs."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

from spd_assets.config import LoadedConfig, load_config_file
from spd_assets.errors import SpdClusterError

if TYPE_CHECKING:
    from spd_assets.service.preflight import Preflight

MEMBERS_LISTED = 4


def validate(path: Path, overrides: list[str]) -> int:
    """Print what `spd-cluster run --config path` would run; 0 when valid, 2 (with the problems) when not."""
    try:
        loaded = load_config_file(path, overrides)
        # Imported once the config has read: a mistake in it is said before the service (and Dagster) loads.
        from spd_assets.service.preflight import preflight

        checked = preflight(loaded.config, check_all=False)
    except SpdClusterError as error:
        print(f"spd-cluster validate: {path}: invalid\n{error}", file=sys.stderr)
        return 2
    print("\n".join(report(loaded, checked)))
    return 0


def describe_loaded(loaded: LoadedConfig) -> list[str]:
    """What a config file was and which of its keys have no meaning here, as lines to print."""
    lines = [f"config: {loaded.files[0]} ({loaded.shape})" if loaded.files else f"config: {loaded.shape}"]
    lines += [f"  reads {path}" for path in loaded.files[1:]]
    if loaded.not_used:
        lines.append(f"  not used here (wandb, logging, git): {', '.join(loaded.not_used)}")
    if loaded.slurm:
        lines.append("  SLURM jobs (when members run on SLURM): "
                     + ", ".join(f"{key}={value}" for key, value in loaded.slurm.items()))
    lines += [f"  note: {note}" for note in loaded.notes]
    return lines


def report(loaded: LoadedConfig, checked: Preflight) -> list[str]:
    """What `validate` prints of a valid config: the experiment, source, members, merge, consensus, size."""
    config = loaded.config
    merge = config.merge_config
    source_settings = ", ".join(f"{key}={value}" for key, value in config.source.model_dump(mode="json").items()
                                if key != "kind" and value is not None)
    members = checked.members
    # The first few and the last; an ellipsis only where members are left out.
    if len(members) <= MEMBERS_LISTED + 1:
        shown = ", ".join(members)
    else:
        shown = ", ".join(members[:MEMBERS_LISTED]) + f", ... {members[-1]}"
    sampler = f"{merge.merge_pair_sampling_method} {dict(merge.merge_pair_sampling_kwargs)}"
    lines = [
        *describe_loaded(loaded),
        f"experiment   {config.name} (config {config.config_hash})",
        f"source       {config.source.kind}: {source_settings}",
        f"ensemble     {len(members)} member{'s' if len(members) != 1 else ''}: {shown}",
        ("merge        none here: each member's history is read from its file (merge_config is not used)"
         if checked.source.has_histories else
         f"merge        activation_threshold={merge.activation_threshold}, alpha={merge.alpha}, iters={merge.iters}, "
         f"sampler {sampler}, filter_dead_threshold={merge.filter_dead_threshold}, "
         f"module_name_filter={merge.module_name_filter!r}; seq_mode={config.seq_mode}"),
        f"distances    {', '.join(config.distance_methods)}",
        f"consensus    {consensus_rule(config)}, threshold={config.consensus.threshold}",
    ]
    if checked.activation_shape is not None:
        samples, components = checked.activation_shape
        lines.append(f"activations  {samples:,} samples x {components:,} components per member ({storage_of(checked.activation_bytes, checked.memory_budgeted)})")
    for index, need in enumerate(checked.needs):
        status = {True: "available", False: "MISSING", None: "needed at run time"}[need.available]
        detail = f" ({need.detail})" if need.detail else ""
        lines.append(f"{'needs' if index == 0 else '':<12} {need.what}: {status}{detail}")
    if checked.checked:
        lines.append("checked      the source loads and passes its checks")
    else:
        missing = [need.what for need in checked.needs if not need.available]
        lines.append(f"not checked  the source was not loaded here: it needs {', '.join(missing)}")
    lines.append("valid")
    return lines


def consensus_rule(config) -> str:
    """Where the consensus clusters will be taken, in words."""
    consensus = config.consensus
    if consensus.iteration is not None:
        return f"at iteration {consensus.iteration}"
    if consensus.k is not None:
        return f"where the members have k={consensus.k} groups (median over members)"
    return "at the median over members of each member's MDL-loss minimum"


def storage_of(activation_bytes: int | None, memory_budgeted: bool) -> str:
    """How one member's activations are held: dense (its size, and whether within a memory budget) or compact."""
    if activation_bytes is None:
        return "compact: only the entries above activation_threshold are kept"
    return f"{activation_bytes / 2**20:,.1f} MiB dense" + (", within the memory budget" if memory_budgeted else "")
