"""The Dagster IO manager that stores each asset's value object in its file under DAGSTER_HOME.

Asset keys are `[experiment, asset]`; partitioned assets get one file per partition. A
downstream asset that reads every partition of an upstream one (the ensemble reading all
member histories) receives a dict of the partitions that exist: which members are missing
is for the asset to report, not a reason to fail loading the others.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dagster import ConfigurableIOManager, InputContext, MetadataValue, OutputContext

from spd_assets import storage
from spd_assets.history_format import read_history_zip, write_history_zip


@dataclass(frozen=True)
class Codec:
    suffix: str
    save: Callable[[Path, Any], None]
    load: Callable[[Path], Any]


CODECS: dict[str, Codec] = {
    "component_activations": Codec(".npz", storage.save_activations, storage.load_activations),
    "merge_history": Codec(".zip", lambda path, history: write_history_zip(history, path), read_history_zip),
    "normalized_ensemble": Codec(".npz", storage.save_ensemble, storage.load_ensemble),
    "distance_matrices": Codec(".npz", storage.save_distances, storage.load_distances),
}


def asset_path(experiment: str, asset: str, partition: str | None, home: Path | None = None) -> Path:
    suffix = CODECS[asset].suffix
    base = storage.results_root(home) / experiment
    return base / asset / f"{partition}{suffix}" if partition is not None else base / f"{asset}{suffix}"


class ResultsIOManager(ConfigurableIOManager):
    """Stores spd-cluster value objects in their native formats (sparse activations, original history zips)."""

    def _codec_and_names(self, asset_key) -> tuple[Codec, str, str]:
        experiment, asset = asset_key.path[0], asset_key.path[-1]
        if asset not in CODECS:
            raise KeyError(f"no storage format for asset {asset_key.to_user_string()}")
        return CODECS[asset], experiment, asset

    def handle_output(self, context: OutputContext, obj: Any) -> None:
        codec, experiment, asset = self._codec_and_names(context.asset_key)
        partition = context.partition_key if context.has_partition_key else None
        path = asset_path(experiment, asset, partition)
        codec.save(path, obj)
        context.add_output_metadata({"path": MetadataValue.path(str(path)), "bytes": path.stat().st_size})

    def load_input(self, context: InputContext) -> Any:
        codec, experiment, asset = self._codec_and_names(context.asset_key)
        if not context.has_asset_partitions:
            return codec.load(asset_path(experiment, asset, None))
        keys = context.asset_partition_keys
        if context.has_partition_key and len(keys) == 1:
            return codec.load(asset_path(experiment, asset, keys[0]))
        paths = {key: asset_path(experiment, asset, key) for key in keys}
        return {key: codec.load(path) for key, path in paths.items() if path.exists()}
