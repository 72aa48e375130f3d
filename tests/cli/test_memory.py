"""Members that would not fit in memory are said so before anything starts; a worker the kernel's out-of-memory
killer ends is reported as out of memory (a real memory cgroup, where this machine lets the tests make one)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from spd_assets.cli.main import main as spd_cluster
from spd_assets.config import parse_config
from spd_assets.errors import MemoryFitError
from spd_assets.service import memory
from spd_assets.service.preflight import member_bytes, members_at_once_that_fit, preflight
from spd_assets.storage.progress import read_progress
from tests.pipeline_helpers import SMALL_SYNTHETIC, make_home, store_at

CONFIG = {"name": "fitting", "source": {**SMALL_SYNTHETIC, "n_members": 2}, "merge_config": {"iters": 20}}


def test_a_member_needs_its_activations_and_its_merge_state():
    config = parse_config({**CONFIG, "source": {**SMALL_SYNTHETIC, "params": {
        **SMALL_SYNTHETIC["params"], "components_per_module": [600, 600]}}})
    checked = preflight(config, check_all=True)
    samples, components = checked.activation_shape
    needed = member_bytes(config, checked)
    assert needed > 2 * components * components  # the merge's 16-bit coactivation counts, at least
    assert needed < 2**30 + 8 * components * components  # and not much more than a worker's own modules


def test_fewer_members_at_once_when_they_would_not_fit():
    config = parse_config(CONFIG)
    checked = preflight(config, check_all=True)
    needed = member_bytes(config, checked)
    assert members_at_once_that_fit(config, checked, 2, asked=False, available=10 * needed) == (2, None)
    fit, note = members_at_once_that_fit(config, checked, 2, asked=False, available=int(1.5 * needed))
    assert fit == 1 and "1 at a time fit" in note and "not 2" in note
    with pytest.raises(MemoryFitError, match=r"--parallel 2: each member needs about .* enough for 1 at once; "
                                             r"expected --parallel 1 or fewer"):
        members_at_once_that_fit(config, checked, 2, asked=True, available=int(1.5 * needed))
    with pytest.raises(MemoryFitError, match=r"expected a smaller member: fewer samples \(source.batch_size\)"):
        members_at_once_that_fit(config, checked, 1, asked=False, available=needed // 2)


def test_run_refuses_what_would_not_fit_before_changing_anything(tmp_path, monkeypatch, capsys):
    home = make_home(tmp_path / "home")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    config = parse_config(CONFIG)
    needed = member_bytes(config, preflight(config, check_all=True))
    monkeypatch.setattr(memory, "available_bytes", lambda: int(1.5 * needed))
    path = tmp_path / "fitting.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    assert spd_cluster(["run", "--config", str(path), "--parallel", "2"]) == 2
    error = capsys.readouterr().err
    assert "--parallel 2: each member needs about" in error and "expected --parallel 1 or fewer" in error
    assert not (store_at(home).experiments_dir / "fitting.yaml").exists()  # not even registered


# --- the kernel's out-of-memory killer, for real ---------------------------------------------------------------

CGROUP_V1 = Path("/sys/fs/cgroup/memory")
# Large enough for the command line and a worker merging this experiment, not for a greedy neighbour as well.
LIMIT_BYTES = 3 * 2**30
SLOW = {"name": "starved", "source": {"kind": "synthetic", "n_members": 1, "batch_size": 32, "params": {
    "n_layers": 2, "modules": ["attn.q", "mlp.up", "mlp.down"], "components_per_module": [900, 1000],
    "n_planted_groups": 400}}, "merge_config": {"iters": None}}
# Another job on a shared machine: it takes what memory is left in the cgroup, 50 MB at a time, while the worker
# `argv[1]` lives, then lets go.
GREEDY = """
import os, sys, time
worker, held = int(sys.argv[1]), []
while os.path.exists(f"/proc/{worker}") and len(held) < 200:
    try:
        held.append(bytearray(50 * 2**20))
        for offset in range(0, len(held[-1]), 4096):
            held[-1][offset] = 1
    except MemoryError:
        time.sleep(0.1)
while os.path.exists(f"/proc/{worker}"):
    time.sleep(0.1)
"""


def _memory_cgroup(tmp_path) -> Path:
    if os.geteuid() != 0 or not (CGROUP_V1 / "cgroup.procs").exists():
        pytest.skip("needs root and a cgroup v1 memory hierarchy to make a memory-limited group")
    group = CGROUP_V1 / f"spd-cluster-test-{os.getpid()}"
    try:
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(LIMIT_BYTES))
    except OSError as error:
        pytest.skip(f"cannot make a memory cgroup here: {error}")
    return group


def test_a_worker_the_oom_killer_ends_is_reported_as_out_of_memory(tmp_path):
    group = _memory_cgroup(tmp_path)
    home = make_home(tmp_path / "home")
    path = tmp_path / "starved.yaml"
    path.write_text(yaml.safe_dump(SLOW))
    join = lambda: (group / "cgroup.procs").write_text(str(os.getpid()))  # noqa: E731 (runs in the child)
    env = {**os.environ, "DAGSTER_HOME": str(home)}
    run = subprocess.Popen([sys.executable, "-m", "spd_assets.cli", "run", "--config", str(path)], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=join)
    greedy = None
    try:
        deadline = time.monotonic() + 120
        worker = None
        while worker is None and time.monotonic() < deadline and run.poll() is None:
            merging = [step for step in read_progress(store_at(home), "starved").values() if step.step == "merge"]
            worker = merging[0].pid if merging else None
            time.sleep(0.2)
        assert worker is not None, "the member's merge never started"
        # The OOM killer picks the worker first (as it would a merge holding gigabytes; raising a score needs no
        # privilege, lowering one does).
        Path(f"/proc/{worker}/oom_score_adj").write_text("1000")
        greedy = subprocess.Popen([sys.executable, "-c", GREEDY, str(worker)], preexec_fn=join)
        output, _ = run.communicate(timeout=300)
    finally:
        for process in (run, greedy):
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGKILL)
                process.wait()
        for pid in (group / "cgroup.procs").read_text().split():
            os.kill(int(pid), signal.SIGKILL)
        time.sleep(0.5)
        group.rmdir()
    assert run.returncode == 1, output
    assert "FAILED member_000" in output
    assert "ran out of memory: the kernel's out-of-memory killer ended it (SIGKILL) after holding" in output
    assert "run fewer members at once (--parallel)" in output
