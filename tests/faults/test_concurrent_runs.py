"""Two `spd-cluster run` of one experiment at once on one home: the second waits for the members the first is
computing and uses what it stored (each member computed once); if the first is killed meanwhile, the second computes
those members itself, their merges resuming from the first run's checkpoints."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from dagster import AssetKey

from spd_assets.storage.checkpoints import checkpoint_path, read_checkpoint
from tests.pipeline_helpers import cli_process, instance_at, make_home, merging_experiment, store_at

ROOT = Path(__file__).resolve().parents[2]
MEMBERS = ["member_000", "member_001"]
TIMEOUT_S = 600
# Two members merging for about 15 s each: long enough for a second run to start while they do.
SLOW = merging_experiment("slow", iters=500, n_members=2)


def cli(home: Path, *args: str) -> subprocess.Popen:
    return cli_process(home, *args, devices="cpu:0,cpu:1", start_new_session=True)


def setup(tmp_path: Path) -> tuple[Path, Path]:
    home = make_home(tmp_path / "home")
    (home / "spd_cluster.yaml").write_text(yaml.safe_dump({"checkpoint_interval_s": 0.5}))
    config = tmp_path / "slow.yaml"
    config.write_text(yaml.safe_dump(SLOW))
    return home, config


def wait_until_merging(home: Path, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stdout.read()
        try:
            if all(read_checkpoint(checkpoint_path(store_at(home), "slow", m)).checkpoint.n_done > 20 for m in MEMBERS):
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    raise AssertionError("the members never merged")


def wait_until_waiting(process: subprocess.Popen, lines: list[str]) -> None:
    """Read the second run's output until it says it waits for both members."""
    while sum("being computed by another run" in line for line in lines) < len(MEMBERS):
        line = process.stdout.readline()
        assert line, "".join(lines)
        lines.append(line)


def second_run_waiting_for_the_first(tmp_path: Path) -> tuple[Path, subprocess.Popen, subprocess.Popen, list[str]]:
    """A first run whose members merge, and a second run of the same experiment that says it waits for them; the
    home, both processes and the second's output so far."""
    home, config = setup(tmp_path)
    first = cli(home, "run", "--config", str(config))
    wait_until_merging(home, first)
    second = cli(home, "run", "--config", str(config))
    lines: list[str] = []
    wait_until_waiting(second, lines)
    return home, first, second, lines


def history_materializations(home: Path) -> Counter:
    with instance_at(home) as instance:
        records = instance.fetch_materializations(AssetKey(["slow", "merge_history"]), limit=100).records
        return Counter(record.partition_key for record in records)


def test_a_second_run_waits_for_the_members_the_first_computes_and_uses_them(tmp_path):
    home, first, second, lines = second_run_waiting_for_the_first(tmp_path)
    first_output, _ = first.communicate(timeout=TIMEOUT_S)
    second_output = "".join(lines) + second.communicate(timeout=TIMEOUT_S)[0]
    assert first.returncode == 0, first_output
    assert second.returncode == 0, second_output
    for member in MEMBERS:
        assert f"{member}: being computed by another run of 'slow' (pid {first.pid}" in second_output, second_output
        assert any(member in line and "computed by another run of this experiment (waited for, not recomputed)" in line
                   for line in second_output.splitlines()), second_output
    assert history_materializations(home) == Counter(MEMBERS), "a member was computed twice"
    assert "2/2 members" in second_output and "ensemble" in second_output


@pytest.mark.slow  # a waiting run: also the first test here; a killed merge resuming: tests/faults/test_resume.py
def test_when_the_first_run_is_killed_the_waiting_run_computes_its_members_resuming_their_merges(tmp_path):
    home, first, second, lines = second_run_waiting_for_the_first(tmp_path)
    os.killpg(first.pid, signal.SIGKILL)  # the command line and its workers, as a lost terminal or OOM would
    first.communicate(timeout=TIMEOUT_S)
    second_output = "".join(lines) + second.communicate(timeout=TIMEOUT_S)[0]
    assert second.returncode == 0, second_output
    assert "2/2 members" in second_output
    for member in MEMBERS:
        line = next(line for line in second_output.splitlines() if f"ok     {member}" in line)
        assert "resumed at merge" in line, second_output
    assert history_materializations(home) == Counter(MEMBERS)
    doctor = cli(home, "doctor")
    report, _ = doctor.communicate(timeout=TIMEOUT_S)
    assert "doctor: no problems found" in report, report
