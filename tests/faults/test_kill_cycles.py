"""Fault injection: start `spd-cluster run`, `kill -9` the command line or one of its workers at a random
moment, and check that nothing is left wrong, stale or blocked; after the last kill a re-run must complete.

One cycle runs in the normal suite; a long soak:

    pytest tests/faults/test_kill_cycles.py --cycles 30 -s        # or SPD_FAULT_CYCLES=30; SPD_FAULT_SEED=...

After each kill: the command line is gone (killed, or finished after losing a worker), every process it
started ends, then `spd-cluster doctor` runs, and the invariants of `invariants.check_all` must hold:
no run in flight, no pool slot or device lease held, no orphan process, no partial or unreadable file,
lineage tables equal to what Dagster's event log says.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from spd_assets.config import load_config
from tests.faults.invariants import check_all, children_of
from tests.pipeline_helpers import SMALL_SYNTHETIC, instance_at, make_home, store_at

DEFAULT_CYCLES = 1  # the soak (tests/slurm/test_soak.py) adds random kills on SLURM
DEVICES = ["cpu:0", "cpu:1"]
ORPHAN_GRACE_S = 10.0  # how long the killed command line's processes may take to end
RUN_TIMEOUT_S = 900


def cli(home: Path, *args: str) -> subprocess.Popen:
    environment = {**os.environ, "DAGSTER_HOME": str(home), "SPD_CLUSTER_DEVICES": ",".join(DEVICES)}
    return subprocess.Popen([sys.executable, "-m", "spd_assets.cli", *args], env=environment, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def finished(process: subprocess.Popen, what: str) -> tuple[str, str]:
    stdout, stderr = process.communicate(timeout=RUN_TIMEOUT_S)
    assert "Traceback" not in stderr, f"{what} printed a traceback:\n{stderr}"
    return stdout, stderr


def is_worker(pid: int) -> bool:
    """A worker process of the command line (a spawned run executor, not multiprocessing's resource tracker)."""
    try:
        return b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def gone(pids: list[int]) -> list[int]:
    """Wait up to ORPHAN_GRACE_S for `pids` to end; those still alive."""
    deadline = time.monotonic() + ORPHAN_GRACE_S
    alive = pids
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [pid for pid in alive if Path(f"/proc/{pid}").exists()
                 and Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"]
    return alive


def kill_at_random(home: Path, config_path: Path, rng: random.Random, window_s: float, target: str) -> dict:
    """One cycle: a run killed (`target` "cli" or "worker") after a random delay; then the doctor."""
    process = cli(home, "run", "--config", str(config_path))
    delay = rng.uniform(0.0, window_s)
    deadline = time.monotonic() + delay
    while time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    tree = children_of(process.pid)
    killed = None
    if process.poll() is None:
        workers = [pid for pid in tree if is_worker(pid)]
        if target == "worker" and workers:
            killed = rng.choice(workers)
        elif target == "cli":
            killed = process.pid
        if killed is not None:
            try:
                os.kill(killed, signal.SIGKILL)
            except ProcessLookupError:
                killed = None
    finished(process, "the killed run")
    orphans = gone(children_of(process.pid) + tree)
    doctor = cli(home, "doctor")
    finished(doctor, "spd-cluster doctor")
    return {"delay": delay, "target": target if killed else "none (the run had ended)", "pids": tree,
            "orphans": orphans}


def cycles_wanted(request) -> int:
    return request.config.getoption("--cycles") or int(os.environ.get("SPD_FAULT_CYCLES", DEFAULT_CYCLES))


def test_kills_never_leave_results_wrong_stale_or_blocked(tmp_path, request):
    cycles = cycles_wanted(request)
    seed = int(os.environ.get("SPD_FAULT_SEED", random.randrange(2**31)))
    rng = random.Random(seed)
    home = make_home(tmp_path / "home")
    config_path = tmp_path / "faults.yaml"
    config_path.write_text(yaml.safe_dump({"name": "faults", "source": {**SMALL_SYNTHETIC, "n_members": 4},
                                           "merge_config": {"iters": 40}}))
    config = load_config(config_path)
    store = store_at(home)

    started = time.monotonic()
    first = cli(home, "run", "--config", str(config_path))
    finished(first, "the first run")
    assert first.returncode == 0
    window = time.monotonic() - started  # kills land anywhere in a run's life, start-up included

    violations, kills = [], 0
    for cycle in range(cycles):
        outcome = kill_at_random(home, config_path, rng, window, target=("cli", "worker")[cycle % 2])
        kills += outcome["target"] != "none (the run had ended)"
        with instance_at(home) as instance:
            found = check_all(store, instance, config, DEVICES, outcome["orphans"])
        violations += [f"cycle {cycle} (kill {outcome['target']} after {outcome['delay']:.1f} s): {v}" for v in found]

    rerun = cli(home, "run", "--config", str(config_path))
    stdout, _ = finished(rerun, "the re-run")
    with instance_at(home) as instance:
        violations += [f"after the re-run: {v}" for v in check_all(store, instance, config, DEVICES, [])]
    print(f"\nfault injection (seed {seed}): {cycles} cycles, {kills} kills, {len(violations)} violations, "
          f"{time.monotonic() - started:.0f} s")
    assert rerun.returncode == 0, stdout
    assert not violations, "\n".join(violations)

