"""The `spd` source against the real `spd` package, on small real SPD runs (where `../shared/spd_real` exists).

spd is not on the package registry and wants Python 3.12; `../shared/spd_real` builds an
environment that runs its real source on 3.11. That environment is built once per machine in a
cache folder (about two minutes), spd-cluster's dependencies are added to it once (about a
minute), and this checkout's code runs in it through `PYTHONPATH`, in subprocesses: the
project's own environment has no spd.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import yaml
from filelock import FileLock

from spd_assets.storage.values import TokenBatch, value_format
from tests.pipeline_helpers import make_home, store_at

PROJECT_ROOT = Path(__file__).resolve().parents[2]
# ../shared/spd_real beside the checkout; SPD_CLUSTER_SPD_REAL points elsewhere (e.g. from a second worktree).
SPD_REAL = Path(os.environ.get("SPD_CLUSTER_SPD_REAL", PROJECT_ROOT.parent / "shared" / "spd_real"))
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "spd-cluster" / "spd-real"
# spd's pinned wandb needs protobuf < 7; pip would otherwise pick 7 for spd-cluster's dependencies.
EXTRA_PINS = ["protobuf<7"]
DEPENDENCIES_MARKER = ".spd_cluster_dependencies"
SUBPROCESS_TIMEOUT_S = 900

pytestmark = pytest.mark.skipif(not SPD_REAL.is_dir(), reason=f"the real spd package is not available ({SPD_REAL})")


def _imports_spd(python: Path) -> bool:
    probe = [str(python), "-c", "import spd.models.component_model, spd.clustering.dataset"]
    return python.exists() and subprocess.run(probe, capture_output=True, env=_environment(CACHE / "out")).returncode == 0


def _environment(spd_out: Path) -> dict[str, str]:
    # Under CI=true the September 2025 spd takes its repository root from GITHUB_WORKSPACE (its own CI's): not ours.
    inherited = {name: value for name, value in os.environ.items() if name != "CI"}
    return {**inherited, "PYTHONPATH": str(PROJECT_ROOT), "SPD_OUT_DIR": str(spd_out), "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled"}


@pytest.fixture(scope="session")
def spd_python() -> Path:
    """The cached environment's interpreter: spd, plus spd-cluster's dependencies (its code comes from PYTHONPATH)."""
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    python = CACHE / "venv" / "bin" / "python"
    with FileLock(str(CACHE.parent / "spd-real.lock")):
        if not _imports_spd(python):
            subprocess.run(["bash", str(SPD_REAL / "build.sh"), str(CACHE)], check=True, timeout=SUBPROCESS_TIMEOUT_S,
                           env={**os.environ, "PYTHON": sys.executable})
        dependencies = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
        wanted = sorted([*dependencies, *EXTRA_PINS])
        digest = hashlib.sha256(json.dumps(wanted).encode()).hexdigest()
        marker = CACHE / "venv" / DEPENDENCIES_MARKER
        if not marker.exists() or marker.read_text() != digest:
            installed = subprocess.run([str(python), "-m", "pip", "install", "-q", *wanted], capture_output=True,
                                       text=True, timeout=SUBPROCESS_TIMEOUT_S)
            assert installed.returncode == 0, installed.stderr[-4000:]
            marker.write_text(digest)
    return python


@pytest.fixture(scope="module")
def real_runs(spd_python, tmp_path_factory) -> dict[str, Path]:
    """Small real SPD runs written by spd itself (random weights; run directories hold absolute paths)."""
    folder = tmp_path_factory.mktemp("spd_runs")
    runs = {}
    for task in ("resid_mlp", "lm"):
        runs[task] = folder / task
        subprocess.run([str(spd_python), str(SPD_REAL / "make_run.py"), str(runs[task]), "--task", task],
                       check=True, capture_output=True, env=_environment(folder / "spd_out"),
                       timeout=SUBPROCESS_TIMEOUT_S)
    np.save(folder / "lm_ids.npy", np.random.default_rng(0).integers(0, 64, size=(50, 8)))  # the run's vocab and n_ctx
    runs["lm_ids"] = folder / "lm_ids.npy"
    return runs


def test_causal_importances_are_spds_own(spd_python, real_runs, tmp_path):
    process = subprocess.run(
        [str(spd_python), str(Path(__file__).with_name("spd_real_checks.py")), str(real_runs["resid_mlp"]),
         str(real_runs["lm"]), str(real_runs["lm_ids"])],
        capture_output=True, text=True, env=_environment(tmp_path / "spd_out"), timeout=SUBPROCESS_TIMEOUT_S)
    assert process.returncode == 0, process.stderr[-4000:]
    found = json.loads(process.stdout.strip().splitlines()[-1])

    resid = found["resid_mlp"]
    assert resid["checkpoint"].endswith("model_100.pth")  # a run directory resolves to its latest checkpoint
    assert resid["seeds"] == [5, 6, 7]  # dataset_seed + member index, as the original's ensemble
    assert resid["batch_shape"] == [32, 20] and resid["batch_dtype"] == "float32"
    assert resid["batch_equals_spd_loader"] and resid["same_seed_same_batch"] and resid["other_seed_other_batch"]
    assert resid["global_rng_untouched"]
    assert resid["modules"] == ["layers.0.mlp_in", "layers.0.mlp_out", "layers.1.mlp_in", "layers.1.mlp_out"]
    assert resid["importances_equal_spd"]
    assert resid["chunked_max_abs_difference"] < 1e-6
    low, high = resid["value_range"]
    assert low >= 0.0 and 1.0 < high < 1.1  # upper-leaky: [0, 1] plus a small leak
    processed = resid["processed"]
    assert processed["labels_equal"] and processed["dead_equal"] and processed["matrix_equal"] and processed["compact_equal"], processed
    assert processed["shape"][0] == 32 and processed["shape"][1] + processed["dead"] == 128
    assert "the SPD run's task is 'resid_mlp'" in resid["wrong_task_error"]

    lm = found["lm"]
    assert lm["batch_shape"] == [16, 8] and lm["importances_equal_spd"]
    assert lm["chunked_max_abs_difference"] < 1e-5
    assert lm["modules"] == ["transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj",
                             "transformer.h.1.mlp.c_fc", "transformer.h.1.mlp.c_proj"]
    concat, seq_mean = lm["processed_concat"], lm["processed_seq_mean"]
    assert all(concat[check] for check in ("labels_equal", "dead_equal", "matrix_equal", "compact_equal")), concat
    assert concat["shape"][0] == 128
    # Means over the sequence of each chunk of 6 sequences, against spd's over all 16 at once: torch may reduce
    # tensors of other shapes in another order (the last bit of a float32 mean), on some CPUs.
    assert seq_mean["labels_equal"] and seq_mean["dead_equal"] and seq_mean["shape"][0] == 16, seq_mean
    assert seq_mean["matrix_max_abs_difference"] < 1e-6 and seq_mean["compact_max_abs_difference"] < 1e-6, seq_mean
    assert "expected token ids of shape [sequences, 8]" in lm["too_long_error"]
    assert "does not exist; expected an SPD run directory" in lm["missing_run_error"]

    presets = found["registry"]
    assert presets["resid_mlp1"] == "wandb:goodfire/spd/runs/0d2lld8j"  # the original's experiment_key rule
    assert "'no_such_preset' names no preset with a canonical run" in presets["unknown_error"]
    assert "expected one of them, or both equal" in presets["disagreeing_error"]


@pytest.mark.slow  # spd-clustering: also tests/cli/test_original_configs.py
def test_an_original_pipeline_config_runs_through_the_graph(spd_python, real_runs, tmp_path):
    """The original's command line and config shapes, unchanged, on a real SPD run: every member merged."""
    repository = tmp_path / "repository"
    crc = repository / "spd" / "clustering" / "configs" / "crc" / "real_resid_mlp.json"
    crc.parent.mkdir(parents=True)
    crc.write_text(json.dumps({
        "model_path": str(real_runs["resid_mlp"]), "batch_size": 48, "dataset_seed": 10,
        "merge_config": {"activation_threshold": 0.01, "alpha": 1, "iters": 20, "merge_pair_sampling_method": "range",
                         "merge_pair_sampling_kwargs": {"threshold": 0.05}, "filter_dead_threshold": 0.001,
                         "module_name_filter": None},
        "wandb_project": "spd", "logging_intervals": {"stat": 1, "tensor": 100, "plot": 100, "artifact": 100},
    }))
    pipeline = repository / "spd" / "clustering" / "configs" / "pipeline_real.yaml"
    pipeline.write_text(yaml.safe_dump({
        "clustering_run_config_path": "spd/clustering/configs/crc/real_resid_mlp.json", "n_runs": 3,
        "distances_methods": ["perm_invariant_hamming", "matching_dist_vec"], "slurm_job_name_prefix": "spd",
        "slurm_partition": "h200", "wandb_project": "spd", "wandb_entity": "goodfire", "create_git_snapshot": True,
    }))
    home = make_home(tmp_path / "home")
    process = subprocess.run(
        [str(spd_python), "-m", "spd_assets.cli.original", "--config", str(pipeline), "--n-runs", "2", "--local"],
        capture_output=True, text=True, env={**_environment(tmp_path / "spd_out"), "DAGSTER_HOME": str(home)},
        timeout=SUBPROCESS_TIMEOUT_S, cwd=tmp_path)
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    assert "original pipeline config" in process.stdout and "flags not used here: --local" in process.stdout
    assert "2/2 members" in process.stdout and "ensemble, distances and consensus materialized" in process.stdout

    store = store_at(home)
    batches = [value_format(TokenBatch).load(store.value_path("pipeline_real", "token_batches", member, ".npz"))
               for member in ("member_000", "member_001")]
    assert [batch.inputs.shape for batch in batches] == [(48, 20), (48, 20)]
    assert not np.array_equal(batches[0].inputs, batches[1].inputs)
    histories = [value_format("MergeHistory").load(store.value_path("pipeline_real", "merge_history", member, ".zip"))
                 for member in ("member_000", "member_001")]
    assert [history.n_iters for history in histories] == [20, 20]
    assert all(label.split(":")[0].startswith("layers.") for label in histories[0].labels)
