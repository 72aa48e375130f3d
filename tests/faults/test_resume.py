"""A member killed mid-merge resumes from its checkpoint: real `spd-cluster run` processes, a real kill -9 of the
worker merging, the re-run's merge going on from the checkpoint, and results equal to a run never killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import yaml

from spd_assets.storage.checkpoints import (
    CheckpointKey,
    MemberCheckpoints,
    checkpoint_path,
    read_checkpoint,
    write_checkpoint,
)
from spd_assets.storage.lineage import fingerprint
from spd_math import MergeConfig, ProcessedActivations, merge_iteration
from tests.faults.invariants import children_of
from tests.faults.test_kill_cycles import is_worker
from tests.math.test_resume import EveryNth, heterogeneous, same_history
from tests.pipeline_helpers import cli_process, make_home, store_at

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 600
# Merges that take several seconds (880 components, 3,072 samples, to the end), checkpointed twice a second.
SLOW = {"name": "slow", "merge_config": {"iters": None},
        "source": {"kind": "synthetic", "n_members": 2, "batch_size": 48,
                   "params": {"n_layers": 2, "modules": ["attn.q", "mlp.up", "mlp.down"],
                              "components_per_module": [150, 180], "n_planted_groups": 6, "group_size": [2, 4],
                              "seq_len": 64}}}
INTERVAL_S = 0.5


def home_with_checkpoints(path: Path) -> Path:
    home = make_home(path)
    (home / "spd_cluster.yaml").write_text(yaml.safe_dump({"checkpoint_interval_s": INTERVAL_S}))
    return home


def cli(home: Path, *args: str) -> subprocess.Popen:
    return cli_process(home, *args, start_new_session=True)


def finish(process: subprocess.Popen) -> str:
    output, _ = process.communicate(timeout=TIMEOUT_S)
    return output


def member_table(home: Path, table: str, member: str) -> pl.DataFrame:
    return pl.read_parquet(store_at(home).table_file(table, "slow", member))


def wait_for_checkpoint(path: Path, process: subprocess.Popen, at_least: int) -> int:
    """Merges in the member's checkpoint once it holds `at_least`; fails if the run ends first."""
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the run ended before a checkpoint:\n{process.stdout.read()}"
        try:
            done = read_checkpoint(path).checkpoint.n_done
        except (OSError, ValueError, KeyError):
            done = 0
        if done >= at_least:
            return done
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint of {at_least} merges in {path}")


def test_a_member_killed_mid_merge_resumes_from_its_checkpoint_with_identical_results(tmp_path):
    config = tmp_path / "slow.yaml"
    config.write_text(yaml.safe_dump(SLOW))
    clean_home, home = home_with_checkpoints(tmp_path / "clean"), home_with_checkpoints(tmp_path / "killed")
    clean = cli(clean_home, "run", "--config", str(config), "--members", "member_000")

    run = cli(home, "run", "--config", str(config), "--members", "member_000")
    checkpoint = checkpoint_path(store_at(home), "slow", "member_000")
    saved = wait_for_checkpoint(checkpoint, run, at_least=100)
    (worker,) = [pid for pid in children_of(run.pid) if is_worker(pid)]
    os.kill(worker, signal.SIGKILL)
    output = finish(run)
    assert run.returncode == 1 and "FAILED member_000" in output, output
    at_kill = read_checkpoint(checkpoint).checkpoint.n_done
    assert at_kill >= saved

    # The doctor lists the checkpoint a run will resume from, and removes one that no run can resume.
    stale = checkpoint_path(store_at(home), "slow", "member_001")
    stored = read_checkpoint(checkpoint)
    write_checkpoint(stale, CheckpointKey("another-config", stored.key.activations), stored.checkpoint, stored.total)
    output = finish(cli(home, "doctor"))
    assert f"a merge checkpoint of {at_kill:,} of {stored.total:,} merges" in output, output
    assert "the member's next run resumes from it" in output
    assert f"the merge checkpoint {stale} it was made with another experiment config" in output, output
    assert checkpoint.exists() and not stale.exists()

    rerun = cli(home, "run", "--config", str(config), "--members", "member_000")
    output = finish(rerun)
    assert rerun.returncode == 0, output
    assert "ok     member_000" in output and f"resumed at merge {at_kill:,}" in output, output
    logs = "".join(path.read_text() for path in (store_at(home).logs_dir).glob("slow-*.log"))
    assert "member_000: resuming from the checkpoint saved" in logs and f"{at_kill:,} of" in logs
    assert not checkpoint.exists(), "the checkpoint outlived the member's stored history"

    clean_output = finish(clean)
    assert clean.returncode == 0, clean_output
    for table in ("merge_events", "membership_spans", "component_stats"):
        assert member_table(home, table, "member_000").equals(member_table(clean_home, table, "member_000")), table
    history = store_at(home).value_path("slow", "merge_history", "member_000", ".npz")
    clean_history = store_at(clean_home).value_path("slow", "merge_history", "member_000", ".npz")
    assert history.read_bytes() == clean_history.read_bytes()


def small_run(tmp_path: Path):
    values = heterogeneous(400, 40)
    activations = ProcessedActivations(values, [f"m:{i}" for i in range(40)])
    config = MergeConfig(activation_threshold=0.1, iters=None)
    sink = EveryNth(10)
    clean = merge_iteration(activations, config, seed=3, checkpoints=sink)
    return activations, config, clean, sink.saved[1]


def test_a_checkpoint_of_another_config_activations_or_code_is_not_resumed_and_the_log_says_why(tmp_path):
    activations, config, clean, checkpoint = small_run(tmp_path)
    path = tmp_path / "member_000.npz"
    key = CheckpointKey("config-a", fingerprint(activations))
    lines: list[str] = []
    MemberCheckpoints(path, key, clean.n_iters, log=lines.append).save(checkpoint)

    resumed = MemberCheckpoints(path, key, clean.n_iters, log=lines.append).resumable()
    assert resumed is not None and resumed.n_done == checkpoint.n_done
    assert same_history(clean, merge_iteration(activations, config, seed=3, resume_from=resumed))

    for other, why in [(CheckpointKey("config-b", key.activations), "another experiment config (config-a, now config-b)"),
                       (CheckpointKey("config-a", "0" * 16), "another activations"),
                       (CheckpointKey("config-a", key.activations, code="another-code"), "another merge code version")]:
        lines.clear()
        assert MemberCheckpoints(path, other, clean.n_iters, log=lines.append).resumable() is None
        assert len(lines) == 1 and why in lines[0] and "merging from the start" in lines[0], lines

    path.write_bytes(b"not a checkpoint")
    lines.clear()
    assert MemberCheckpoints(path, key, clean.n_iters, log=lines.append).resumable() is None
    assert "cannot be read" in lines[0]


def test_a_checkpoint_that_cannot_be_written_warns_once_and_the_merge_goes_on(tmp_path):
    activations, config, clean, checkpoint = small_run(tmp_path)
    blocked = tmp_path / "a_file"
    blocked.write_text("")
    warnings: list[str] = []
    sink = MemberCheckpoints(blocked / "member_000.npz", CheckpointKey("c", "a"), clean.n_iters, interval_s=0.0,
                             warn=warnings.append)
    history = merge_iteration(activations, config, seed=3, checkpoints=sink)
    assert same_history(clean, history)
    assert len(warnings) == 1 and "could not save a checkpoint" in warnings[0] and "merging on without one" in warnings[0]


SIGTERM_SCRIPT = """
import sys
from pathlib import Path
from spd_assets.storage.checkpoints import CheckpointKey, MemberCheckpoints, StoppedAfterCheckpoint
from spd_math import MergeConfig, ProcessedActivations, merge_iteration
from tests.math.test_resume import heterogeneous

values = heterogeneous(3000, 1500)
activations = ProcessedActivations(values, [f"m:{i}" for i in range(1500)])
sink = MemberCheckpoints(Path(sys.argv[1]), CheckpointKey("c", "a"), 1497, interval_s=3600.0)
sink.checkpoint_on_sigterm()

def started(where):
    if where.done == 1:
        print("merging", flush=True)

try:
    merge_iteration(activations, MergeConfig(activation_threshold=0.1, iters=None), seed=3, checkpoints=sink,
                    progress=started)
except StoppedAfterCheckpoint as stopped:
    print(stopped, flush=True)
    sys.exit(stopped.exit_status)
print("finished", flush=True)
"""


def test_sigterm_saves_a_checkpoint_and_ends_the_merge(tmp_path):
    """What a SLURM job does on its time limit, preemption or requeue notice (SIGTERM, then SIGKILL later)."""
    path = tmp_path / "member_000.npz"
    process = subprocess.Popen([sys.executable, "-c", SIGTERM_SCRIPT, str(path)], cwd=ROOT, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout.readline().strip() == "merging"
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr
    assert "finished" not in stdout
    saved = read_checkpoint(path).checkpoint.n_done
    assert saved >= 1, "no checkpoint after SIGTERM"
    assert f"stopped on SIGTERM after saving a checkpoint at {saved:,} merges" in stdout
