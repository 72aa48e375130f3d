"""The original research code's configs and command line: every shape loads, validates, and runs as spd-cluster runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from spd_assets.cli.main import main
from spd_assets.config import load_config_file
from spd_assets.config.original import SHAPE_FLAT, SHAPE_PIPELINE, SHAPE_RUN
from spd_assets.storage.database import connect_read_only
from tests.model_helpers import minilm_directory, write_corpus
from tests.pipeline_helpers import SMALL_SYNTHETIC, make_home, store_at

ORIGINAL = Path(__file__).resolve().parent.parent / "configs" / "original"


def test_a_pipeline_config_reads_its_run_config_from_the_repository_root():
    loaded = load_config_file(ORIGINAL / "pipeline.yaml")
    config = loaded.config
    assert loaded.shape == SHAPE_PIPELINE
    # "configs/original/crc/..." is relative to a folder above the pipeline file, as to the original's repository root.
    assert loaded.files == [ORIGINAL / "pipeline.yaml", ORIGINAL / "crc" / "resid_mlp_run.json"]
    source = config.source
    assert (source.kind, source.model_path, source.n_members, source.batch_size, source.dataset_seed) == (
        "spd", "wandb:goodfire/spd/runs/0d2lld8j", 3, 64, 3)
    assert config.name == "pipeline"
    assert config.distance_methods == ("perm_invariant_hamming", "matching_dist")  # matching_dist_vec is matching_dist
    assert config.merge_config.iters == 20 and config.merge_config.activation_threshold == 0.01
    assert set(loaded.not_used) >= {"create_git_snapshot", "wandb_project", "resid_mlp_run.json: logging_intervals"}
    assert "slurm_partition" not in loaded.not_used  # it names the partition of the members' SLURM jobs
    assert loaded.slurm == {"partition": "h200-reserved", "job_name_prefix": "spd"}


def test_run_and_flat_configs_translate_as_the_original_reads_them():
    run = load_config_file(ORIGINAL / "crc" / "resid_mlp_run.json")
    assert run.shape == SHAPE_RUN and run.config.source.n_members == 1  # one clustering run
    lm = load_config_file(ORIGINAL / "crc" / "lm_run.yaml").config
    assert lm.source.experiment_key == "ss_llama_simple_mlp" and lm.source.dataset_streaming
    assert lm.merge_config.merge_pair_sampling_method == "mcmc" and lm.merge_config.module_name_filter == "model.layers.0."
    flat = load_config_file(ORIGINAL / "flat_run.yaml")
    assert flat.shape == SHAPE_FLAT
    assert (flat.config.source.n_members, flat.config.source.task_name, flat.config.merge_config.iters) == (4, "resid_mlp", 25)
    assert flat.config.seq_mode is None  # toy models: no sequence axis, as the original sets it
    assert set(flat.not_used) == {"wandb_enabled", "wandb_project", "intervals"}


@pytest.mark.parametrize(("name", "expected"), [
    ("pipeline.yaml", ["original pipeline config", "ensemble     3 members: member_000, member_001, member_002",
                       "distances    perm_invariant_hamming, matching_dist", "the spd package: MISSING",
                       "network access to wandb: needed at run time"]),
    ("crc/resid_mlp_run.json", ["original clustering run config", "ensemble     1 member: member_000",
                                "iters=20", "dataset_seed=3"]),
    ("crc/lm_run.yaml", ["experiment_key=ss_llama_simple_mlp", "sampler mcmc {'temperature': 0.5}",
                         "module_name_filter='model.layers.0.'"]),
    ("flat_run.yaml", ["original flat run config", "ensemble     4 members", "seq_mode=None",
                       "not used here (wandb, logging, git): intervals, wandb_enabled, wandb_project"]),
])
def test_validate_says_what_would_run(capsys, name, expected):
    assert main(["validate", "--config", str(ORIGINAL / name)]) == 0
    output = capsys.readouterr().out
    assert "source       spd:" in output and output.rstrip().endswith("valid")
    for line in expected:
        assert line in output, (line, output)


@pytest.mark.parametrize(("values", "expected"), [
    ({"pop_component_prob": 0.1}, "pop_component_prob: 0.1; only 0 (no random popping of components) is implemented"),
    ({"rank_cost_fn_name": "log"}, "rank_cost_fn_name: 'log'; only 'const_1'"),
    ({"module_name_filter": ["layers.0.mlp_in"]}, "is a set of module names, which is not supported here"),
    ({"save_plots": True}, "unknown key(s) ['save_plots']"),
    ({"alpha": -1.0}, "merge_config.alpha: expected a number >= 0.0, got -1.0"),
])
def test_unsupported_values_are_refused_with_a_reason(tmp_path, capsys, values, expected):
    flat = yaml.safe_load((ORIGINAL / "flat_run.yaml").read_text())
    path = tmp_path / "flat.yaml"
    path.write_text(yaml.safe_dump({**flat, **values}))
    assert main(["validate", "--config", str(path)]) == 2
    error = capsys.readouterr().err
    assert "invalid" in error and expected in error, error


def test_a_pipeline_config_whose_run_config_is_nowhere(tmp_path, capsys):
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(
        {"clustering_run_config_path": "spd/clustering/configs/crc/missing.json", "n_runs": 2,
         "distances_methods": ["perm_invariant_hamming"]}))
    assert main(["validate", "--config", str(tmp_path / "pipeline.yaml")]) == 2
    assert f"found neither in {tmp_path} nor in any folder above it" in capsys.readouterr().err


def test_without_spd_a_run_stops_before_any_member_and_says_what_to_install(tmp_path, capsys, monkeypatch):
    home = make_home(tmp_path / "home")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    assert main(["run", "--config", str(ORIGINAL / "pipeline.yaml")]) == 2
    error = capsys.readouterr().err
    assert "needs the `spd` package" in error and "github.com/goodfire-ai/spd" in error and "not on PyPI" in error
    assert not (home / "spd_cluster").exists()


def test_validate_a_torch_source_checks_the_model_and_the_memory_budget(tmp_path, capsys):
    write_corpus(tmp_path / "corpus", modules=("json", "textwrap"))
    source = {"kind": "torch", "model": str(minilm_directory()), "modules": ["encoder.layer.*.intermediate.dense"],
              "text": "corpus", "seq_len": 64, "batch_size": 8}
    (tmp_path / "ok.yaml").write_text(yaml.safe_dump({"name": "ok", "source": source}))
    assert main(["validate", "--config", str(tmp_path / "ok.yaml")]) == 0
    output = capsys.readouterr().out
    assert "activations  512 samples x 9,216 components per member (compact: only the entries above" in output
    assert "the transformers package: available" in output and "checked      the source loads" in output
    # Continuous mode needs the dense matrix: 18 MiB, so a 10 MiB budget refuses it up front.
    continuous = {"name": "big", "source": {**source, "memory_budget_gb": 0.01},
                  "merge_config": {"activation_threshold": None}}
    (tmp_path / "big.yaml").write_text(yaml.safe_dump(continuous))
    assert main(["validate", "--config", str(tmp_path / "big.yaml")]) == 2
    assert "each member: the activations would take 0.02 GiB (512 samples x 9,216 components" in capsys.readouterr().err
    (tmp_path / "fits.yaml").write_text(yaml.safe_dump({**continuous, "source": source}))
    assert main(["validate", "--config", str(tmp_path / "fits.yaml")]) == 0
    assert "(18.0 MiB dense, within the memory budget)" in capsys.readouterr().out


def test_spd_clustering_runs_what_spd_cluster_runs(tmp_path):
    home = make_home(tmp_path / "home")
    config = tmp_path / "synthetic.yaml"
    config.write_text(yaml.safe_dump({"name": "via_original_cli", "source": SMALL_SYNTHETIC, "merge_config": {"iters": 10}}))
    process = subprocess.run(
        [sys.executable, "-m", "spd_assets.cli.original", "--config", str(config), "--n-runs", "2",
         "--distances-methods", "matching_dist_vec", "--local", "--wandb-project", "spd", "--local-clustering-parallel"],
        env={**os.environ, "DAGSTER_HOME": str(home)}, capture_output=True, text=True, timeout=600,
    )
    assert process.returncode == 0, process.stdout + process.stderr
    assert "flags not used here: --wandb-project --local-clustering-parallel" in process.stdout
    assert "2/2 members" in process.stdout
    with connect_read_only(store_at(home)) as connection:
        methods = connection.execute(
            "SELECT DISTINCT method FROM distances WHERE experiment = 'via_original_cli'").fetchall()
        members = connection.execute(
            "SELECT count(DISTINCT member) FROM merge_events WHERE experiment = 'via_original_cli'").fetchone()[0]
        config_json = connection.execute(
            "SELECT config_json FROM experiments WHERE experiment = 'via_original_cli'").fetchone()[0]
    assert methods == [("matching_dist",)] and members == 2
    assert json.loads(config_json)["source"]["n_members"] == 2
