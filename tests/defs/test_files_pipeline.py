"""The `files` activation source end to end: real .safetensors, .npz and .pt files, some broken."""

from __future__ import annotations

import numpy as np
import pytest
import safetensors.torch
import torch
from dagster import AssetCheckKey, AssetKey, DagsterInstance

from spd_assets.config import parse_config
from spd_assets.errors import BatchFileError
from spd_assets.service.runs import first_failure_message
from spd_assets.sources import source_for
from spd_assets.sources.synthetic import SyntheticParams, build_model, generate_batch
from spd_assets.storage.database import connect_read_only
from tests.pipeline_helpers import definitions_for, make_home, materialize_experiment, store_at

PARAMS = SyntheticParams(
    n_layers=2, modules=("attn.q", "mlp.up"), components_per_module=(8, 10), n_planted_groups=4, group_size=(2, 3), seq_len=16
)


def write_batch(path, batch: dict[str, torch.Tensor]) -> None:
    if path.suffix == ".safetensors":
        safetensors.torch.save_file(batch, str(path))
    elif path.suffix == ".npz":
        np.savez(path, **{name: tensor.numpy() for name, tensor in batch.items()})
    else:
        torch.save(batch, path)


@pytest.fixture()
def batch_directory(tmp_path):
    model = build_model(PARAMS)
    directory = tmp_path / "batches"
    directory.mkdir()
    for index, name in enumerate(["b0.safetensors", "b1.npz", "b2.pt", "b3.npz", "b4.pt"]):
        # safetensors lists modules by name, so every file is written in that order to share one layout.
        batch = generate_batch(model, seed=index, batch_size=6)
        write_batch(directory / name, dict(sorted(batch.items())))
    return directory


def test_each_format_materializes_and_broken_files_fail_only_their_partition(tmp_path, batch_directory, monkeypatch):
    home = make_home(tmp_path / "home")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    config = parse_config({"name": "from_files", "source": {"kind": "files", "directory": str(batch_directory)},
                           "merge_config": {"iters": 20}})
    members = source_for(config.source).member_keys()
    assert members == ["b0", "b1", "b2", "b3", "b4"]
    defs = definitions_for(config)
    # Broken after the partitions were discovered: one file corrupt, one gone.
    (batch_directory / "b1.npz").write_bytes(b"not a zip archive")
    (batch_directory / "b3.npz").unlink()

    with DagsterInstance.get() as instance:
        member_results, ensemble_result = materialize_experiment(defs, instance, config, members)
        succeeded = {m for m, result in member_results.items() if result.success}
        assert succeeded == {"b0", "b2", "b4"}
        corrupt = first_failure_message(member_results["b1"])
        assert "b1.npz" in corrupt and "cannot be read" in corrupt
        gone = first_failure_message(member_results["b3"])
        assert "BatchFileError" in gone and "'b3'" in gone and "deleted or renamed" in gone

        assert ensemble_result.success
        ensemble_event = instance.get_latest_materialization_event(AssetKey(["from_files", "normalized_ensemble"]))
        assert ensemble_event.asset_materialization.metadata["missing_members"].value == ["b1", "b3"]
        assert ensemble_event.asset_materialization.metadata["members"].value == 3
        check = instance.event_log_storage.get_asset_check_execution_history(
            AssetCheckKey(AssetKey(["from_files", "normalized_ensemble"]), "all_members_present"), limit=1
        )[0]
        evaluation = check.event.dagster_event.event_specific_data
        assert not evaluation.passed
        assert evaluation.description == "the ensemble was built without b1, b3 (no merge history stored)"

    with connect_read_only(store_at(home)) as connection:
        statuses = dict(connection.execute(
            "SELECT member, status FROM ensemble_members WHERE experiment = 'from_files'").fetchall())
        assert statuses == {"b0": "used", "b1": "missing", "b2": "used", "b3": "missing", "b4": "used"}
        assert connection.execute(
            "SELECT count(DISTINCT member) FROM merge_events WHERE experiment = 'from_files'").fetchone()[0] == 3


def test_values_outside_the_expected_range_fail_with_a_clear_message(tmp_path, batch_directory, monkeypatch):
    home = make_home(tmp_path / "home")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    batch = dict(sorted(generate_batch(build_model(PARAMS), seed=9, batch_size=6).items()))
    first_module = next(iter(batch))
    batch[first_module] = batch[first_module] * 3.0
    write_batch(batch_directory / "b2.pt", batch)
    config = parse_config({"name": "ranged", "source": {"kind": "files", "directory": str(batch_directory)}})
    defs = definitions_for(config)
    with DagsterInstance.get() as instance:
        result = defs.resolve_job_def("ranged__members").execute_in_process(
            instance=instance, partition_key="b2", raise_on_error=False
        )
    assert not result.success
    message = first_failure_message(result)
    assert "b2.pt" in message and first_module in message and "expected within [0, 1]" in message


def test_file_names_that_cannot_be_partition_keys_are_named(tmp_path, batch_directory):
    (batch_directory / "b2.pt").rename(batch_directory / "b[2].pt")
    config = parse_config({"name": "odd", "source": {"kind": "files", "directory": str(batch_directory)}})
    with pytest.raises(BatchFileError, match=r"b\[2\]\.pt"):
        source_for(config.source).member_keys()
