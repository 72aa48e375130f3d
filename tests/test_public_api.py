"""The public API under the original research code's names, end to end: the README's script (batch files ->
BatchProcessor -> normalize_ensemble -> compute_distances) against the pipeline materialized into a temporary
Dagster instance, the device leases they share, history files, and every docstring example."""

from __future__ import annotations

import doctest
import importlib
import json
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from spd_assets.config import parse_config
from spd_assets.deployment.devices import LEASE_LOG, lease_device
from spd_assets.errors import BatchFileError, BatchProcessingError, DeviceError, StorageError
from spd_assets.sources.synthetic import SyntheticParams, build_model, generate_batch
from spd_assets.storage.lineage import fingerprint
from spd_assets.storage.values import MemberEnsemble, load_ensemble, save_ensemble
from spd_math import MergeHistory
from tests.pipeline_helpers import make_home, store_at

README = Path(__file__).resolve().parents[1] / "README.md"
PARAMS = SyntheticParams(
    n_layers=2, modules=("attn.q", "mlp.up"), components_per_module=(8, 10), n_planted_groups=4, group_size=(2, 3), seq_len=16
)
MEMBERS = ["b0", "b1", "b2", "b3"]
# The plan of the public API: layer 1 in spd_math, layers 2 and 3 in spd_assets.
PUBLIC_NAMES = {
    "spd_math": ["merge_iteration", "compute_merge_costs", "normalize_ensemble", "compute_distances",
                 "NormalizedHistories", "MergeHistoryEnsemble", "MergeHistory", "ProcessedActivations"],
    "spd_assets": ["extract_and_process_activations", "load_merge_histories", "save_merge_history",
                   "process_data_batch", "cluster_analysis_pipeline", "ClusteringResults", "BatchProcessor",
                   "MergeHistoryEnsemble"],
}


def readme_script() -> str:
    section = README.read_text().split("## Scripts without Dagster", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, flags=re.DOTALL).group(1)


def write_batches(directory: Path, members: list[str]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    model = build_model(PARAMS)
    for index, member in enumerate(members):
        batch = generate_batch(model, seed=index, batch_size=6)
        np.savez(directory / f"{member}.npz", **{name: batch[name].numpy() for name in sorted(batch)})


def assert_same_history(ours: MergeHistory, theirs: MergeHistory) -> None:
    assert ours.labels == theirs.labels and ours.seed == theirs.seed and ours.config == theirs.config
    for name in ("group_idxs", "selected_pairs", "k_groups", "pair_costs", "mdl_losses"):
        assert torch.equal(getattr(ours, name), getattr(theirs, name)), name


def lease_records(home: Path) -> list[dict]:
    log = store_at(home).lease_dir / LEASE_LOG
    return [json.loads(line) for line in log.read_text().splitlines()]


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    """The README's script run as written (in a folder of batch files), and the pipeline on the same files and
    config, both in one temporary Dagster instance."""
    from spd_assets import cluster_analysis_pipeline

    folder = tmp_path_factory.mktemp("scripted")
    write_batches(folder / "batches", MEMBERS)
    home = make_home(folder / "home")
    namespace: dict = {"__name__": "__main__"}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DAGSTER_HOME", str(home))
        patch.chdir(folder)
        exec(compile(readme_script(), "README.md", "exec"), namespace)
        config = parse_config(namespace["config"]).model_copy(
            update={"source": parse_config(namespace["config"]).source.resolved(folder)})
        results = cluster_analysis_pipeline(config, home=home)
    return folder, home, namespace, config, results


def test_every_name_of_the_plan_imports_from_its_layer():
    for module_name, names in PUBLIC_NAMES.items():
        module = importlib.import_module(module_name)
        missing = [name for name in names if not hasattr(module, name)]
        assert not missing, (module_name, missing)
    light = "import sys, spd_assets; print(sorted({'torch', 'dagster', 'polars'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", light], capture_output=True, text=True, check=True).stdout.strip() == "[]"


def test_batch_processor_gives_the_pipelines_histories(scripted):
    folder, home, namespace, config, results = scripted
    histories = namespace["histories"]
    assert list(results.histories) == MEMBERS and len(histories) == len(MEMBERS)
    for member, history in zip(MEMBERS, histories):
        assert history.seed == config.member_seed(member)
        assert_same_history(history, results.histories[member])


def test_normalized_and_distances_are_the_pipelines(scripted):
    _, _, namespace, config, results = scripted
    normalized, stored = namespace["normalized"], results.normalized
    assert type(normalized).__name__ == type(stored).__name__ == "NormalizedHistories"
    assert np.array_equal(normalized.merges_array, stored.merges_array)
    assert normalized.component_labels == stored.component_labels
    assert torch.equal(normalized.present, stored.present)
    assert dict(normalized.metadata) == dict(stored.metadata)
    metadata = normalized.metadata
    assert metadata["n_ensemble"] == len(MEMBERS) and metadata["c_components"] == len(normalized.component_labels)
    assert metadata["config"] == config.merge_config.to_dict()
    assert [entry["seed"] for entry in metadata["history_metadatas"]] == [config.member_seed(m) for m in MEMBERS]
    json.dumps(dict(metadata))  # the original's ensemble_meta.json is this metadata as JSON
    copied = pickle.loads(pickle.dumps(normalized))  # e.g. to or from worker processes
    assert torch.equal(copied.merges, normalized.merges) and copied.metadata == normalized.metadata
    assert copied.component_labels == normalized.component_labels and torch.equal(copied.present, normalized.present)
    assert torch.equal(namespace["distances"], results.distances["perm_invariant_hamming"])
    from spd_math import compute_distances

    for method, stored_distances in results.distances.items():
        assert torch.equal(compute_distances(normalized, method), stored_distances), method
    assert results.config.config_hash == config.config_hash  # the registered config, defaults filled in


def test_the_script_and_the_pipeline_lease_the_same_devices(scripted):
    _, home, _, _, _ = scripted
    records = lease_records(home)
    holders = {record.get("step_key") for record in records if record["event"] == "acquired"}
    assert "batch_processor" in holders and "scripted__merge_history" in holders
    scripted_batches = {record["partition"] for record in records if record.get("step_key") == "batch_processor"}
    assert scripted_batches == set(MEMBERS)


def test_a_device_held_elsewhere_is_not_used(tmp_path):
    from spd_assets import BatchProcessor

    write_batches(tmp_path / "batches", ["x0", "x1", "x2"])
    home = make_home(tmp_path / "home")
    config = tmp_path / "experiment.yaml"  # a config file, its directory relative to it
    config.write_text("source: {kind: files, directory: batches}\nmerge_config: {iters: 5}\n")
    processor = BatchProcessor(2, ["cpu:0", "cpu:1"], home=home)
    # As a pipeline step holds a device: the lock file of cpu:0 in the same instance's results folder.
    with lease_device(["cpu:0"], processor.lease_dir, holder={"step_key": "held_elsewhere"}, timeout_s=5):
        histories = processor.process_all_batches(sorted((tmp_path / "batches").glob("*.npz")), config)
    assert [history.n_iters for history in histories] == [5, 5, 5]
    used = [record["device"] for record in lease_records(home)
            if record["event"] == "acquired" and record["step_key"] == "batch_processor"]
    assert used == ["cpu:1"] * 3
    with lease_device(["cpu:0"], processor.lease_dir, holder={"step_key": "held_elsewhere"}, timeout_s=5):
        waiting = BatchProcessor(1, ["cpu:0"], home=home, lease_timeout_s=0.5)
        with pytest.raises(BatchProcessingError, match=r"x0.npz: DeviceError: no device free") as raised:
            waiting.process_all_batches([tmp_path / "batches" / "x0.npz"], config)
    assert raised.value.completed == {}


def test_failed_batches_are_named_and_the_others_returned(tmp_path):
    from spd_assets import BatchProcessor

    write_batches(tmp_path, ["y0", "y1"])
    (tmp_path / "y2.npz").write_bytes(b"not a zip archive")
    config = {"source": {"kind": "files", "directory": str(tmp_path)}, "merge_config": {"iters": 4}}
    batches = [tmp_path / f"y{index}.npz" for index in range(3)] + [tmp_path / "gone.npz"]
    with pytest.raises(BatchProcessingError) as raised:
        BatchProcessor(2, ["cpu:0", "cpu:1"], home=make_home(tmp_path / "home")).process_all_batches(batches, config)
    message = str(raised.value)
    assert message.startswith("2 of 4 batches failed")
    assert "y2.npz: BatchFileError" in message and "cannot be read" in message
    assert "gone.npz: BatchFileError" in message and "no such file" in message
    assert sorted(Path(path).name for path in raised.value.completed) == ["y0.npz", "y1.npz"]


def test_bad_arguments_say_what_was_expected(tmp_path):
    from spd_assets import BatchProcessor, load_merge_histories, process_data_batch

    with pytest.raises(DeviceError, match="expected names like 'cuda:0'"):
        BatchProcessor(1, ["gpu0"], home=tmp_path)
    with pytest.raises(DeviceError, match="got the string"):
        BatchProcessor(1, "cuda:0", home=tmp_path)
    with pytest.raises(ValueError, match="n_workers: expected a whole number of at least 1"):
        BatchProcessor(0, ["cpu:0"], home=tmp_path)
    with pytest.raises(ValueError, match="at least one batch file"):
        BatchProcessor(1, ["cpu:0"], home=tmp_path).process_all_batches([], {})
    with pytest.raises(BatchFileError, match=r"expected a batch file ending in \.safetensors, \.npz, \.pt"):
        process_data_batch({}, tmp_path / "batch.csv")
    with pytest.raises(StorageError, match="holds no"):
        load_merge_histories(tmp_path)
    with pytest.raises(StorageError, match="at least one merge history file"):
        load_merge_histories([])
    with pytest.raises(TypeError, match="expected an ExperimentConfig, a mapping of its keys or a config file path"):
        process_data_batch(42, tmp_path / "b.npz")


def test_history_files_round_trip_and_read_the_pipelines(scripted, tmp_path):
    from spd_assets import load_merge_histories, save_merge_history
    from spd_math import MergeHistoryEnsemble

    _, home, namespace, config, results = scripted
    for member, history in zip(MEMBERS, namespace["histories"]):
        save_merge_history(history, tmp_path / f"{member}.zip")
    saved = load_merge_histories(tmp_path)
    stored = load_merge_histories(store_at(home).experiment_dir(config.name) / "merge_history")
    assert isinstance(saved, MergeHistoryEnsemble) and saved.n_ensemble == stored.n_ensemble == len(MEMBERS)
    for ours, theirs in zip(saved, stored):
        assert_same_history(ours, theirs)
    assert np.array_equal(saved.normalized().merges_array, results.normalized.merges_array)
    assert torch.equal(saved.get_distances("matching_dist"), results.distances["matching_dist"])
    with pytest.raises(TypeError, match="expected a spd_math.MergeHistory"):
        save_merge_history(saved, tmp_path / "ensemble.zip")


def test_stored_ensemble_fingerprints_as_the_one_computed(scripted, tmp_path):
    """The pipeline stores what normalize_ensemble returns; read back, it must fingerprint the same (lineage)."""
    _, _, namespace, _, results = scripted
    written = MemberEnsemble(namespace["normalized"], MEMBERS, [])
    save_ensemble(tmp_path / "ensemble.npz", written)
    assert fingerprint(load_ensemble(tmp_path / "ensemble.npz")) == fingerprint(written)
    assert fingerprint(results.ensemble) == fingerprint(written)


@pytest.mark.parametrize("module_name", ["spd_assets.processing", "spd_assets.batch_processor"])
def test_docstring_examples_run(module_name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    outcome = doctest.testmod(importlib.import_module(module_name), optionflags=doctest.ELLIPSIS)
    assert outcome.attempted > 0 and outcome.failed == 0
