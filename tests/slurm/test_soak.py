"""A soak: one experiment run again and again on SLURM with a PostgreSQL instance, each run hit by a random fault
(kill -9 of a worker or of the command line, Ctrl-C, a requeue of a running job, a PostgreSQL restart); after each,
`doctor`, and nothing may be left wrong (runs in flight, pool slots, partial files, lineage, orphan processes, jobs in
the queue). A last run completes; its tables equal a clean run's, and `doctor` finds nothing.

It is in `pytest -m slow` (each fault also has its own test in the normal suite), two cycles; a longer soak:

    SPD_SOAK_CYCLES=20 pytest -m slow tests/slurm/test_soak.py -s        # SPD_SOAK_SEED=... repeats one
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time

import polars as pl
import pytest
import yaml

from spd_assets.config import load_config
from tests.faults.invariants import check_all, children_of
from tests.faults.test_kill_cycles import gone, is_worker
from tests.pipeline_helpers import instance_at, make_home, merging_experiment, store_at
from tests.slurm.test_slurm_executor import cli, slurm_home, wait_for

DEFAULT_CYCLES = 2
FAULTS = ("kill worker", "kill command line", "ctrl-c", "requeue job", "restart postgres")
MEMBERS = ["member_000", "member_001", "member_002"]
# Three members merging for several seconds each: a fault lands mid-merge as often as not.
CONFIG = merging_experiment("soak", iters=200, n_members=3)
TIMEOUT_S = 600
TABLES = ("merge_events", "membership_spans", "component_stats")


def inflict(fault: str, process: subprocess.Popen, cluster, postgres) -> str:
    """Apply `fault` to the running command line; what was done, in words."""
    if fault == "kill worker":
        workers = [pid for pid in children_of(process.pid) if is_worker(pid)]
        if not workers:
            return "none (no worker yet)"
        os.kill(random.choice(workers), signal.SIGKILL)
    elif fault == "kill command line":
        os.kill(process.pid, signal.SIGKILL)
    elif fault == "ctrl-c":
        process.send_signal(signal.SIGINT)
    elif fault == "requeue job":
        running = cluster.run("squeue", "--noheader", "--states=RUNNING", "--format=%i").split()
        if not running:
            return "none (no job running)"
        job = random.choice(running)
        cluster.run("scontrol", "requeue", job)
        # SLURM holds a requeued job back for a while (its BeginTime); start it again as soon as it may.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            state = cluster.run("squeue", "--noheader", f"--jobs={job}", "--format=%T|%r").strip()
            if state.startswith("PENDING") and "BeginTime" in state:
                cluster.run("scontrol", "update", f"jobid={job}", "StartTime=now")
                break
            if not state:
                break
            time.sleep(0.2)
        return f"requeued job {job}"
    elif fault == "restart postgres":
        postgres.restart()
    return fault


@pytest.mark.slow  # each fault has its own test in the normal suite; the soak strikes them at random, in turn
def test_soak_under_random_faults(tmp_path, slurm_cluster, postgres_server):
    cycles = int(os.environ.get("SPD_SOAK_CYCLES", DEFAULT_CYCLES))
    seed = int(os.environ.get("SPD_SOAK_SEED", random.randrange(2**31)))
    random.seed(seed)
    home = slurm_home(tmp_path / "home", postgres_server.create_database(f"soak_{seed}"))
    settings = yaml.safe_load((home / "spd_cluster.yaml").read_text())
    (home / "spd_cluster.yaml").write_text(yaml.safe_dump({**settings, "checkpoint_interval_s": 0.5}))
    clean_home = make_home(tmp_path / "clean")
    config_path = tmp_path / "soak.yaml"
    config_path.write_text(yaml.safe_dump(CONFIG))
    config, store = load_config(config_path), store_at(home)

    started = time.monotonic()
    clean = cli(clean_home, "run", "--config", str(config_path))  # the reference, computed meanwhile
    window = 15.0  # a clean run here takes about 20 s
    order = random.sample(FAULTS, len(FAULTS))  # every fault once before any repeats
    violations, log = [], []
    for cycle in range(cycles):
        fault = order[cycle] if cycle < len(order) else random.choice(FAULTS)
        process = cli(home, "run", "--config", str(config_path))
        delay = random.uniform(3.0, window)
        deadline = time.monotonic() + delay
        while time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.1)
        tree = children_of(process.pid)
        done = inflict(fault, process, slurm_cluster, postgres_server) if process.poll() is None else "none (ended)"
        output, _ = process.communicate(timeout=TIMEOUT_S)
        if "Traceback" in output:
            violations.append(f"cycle {cycle} ({done}): the command line printed a traceback:\n{output[-3000:]}")
        orphans = gone(children_of(process.pid) + tree)
        doctor = cli(home, "doctor")
        doctor.communicate(timeout=TIMEOUT_S)
        wait_for(lambda: slurm_cluster.queue() == [], 120, "the queue to empty")
        with instance_at(home) as instance:
            found = check_all(store, instance, config, [], orphans)
        violations += [f"cycle {cycle} ({done} after {delay:.1f} s): {problem}" for problem in found]
        log.append(f"cycle {cycle}: {done} after {delay:.1f} s, exit status {process.returncode}")

    last = cli(home, "run", "--config", str(config_path))
    output, _ = last.communicate(timeout=TIMEOUT_S)
    clean_output, _ = clean.communicate(timeout=TIMEOUT_S)
    print(f"\nsoak (seed {seed}): {cycles} cycles in {time.monotonic() - started:.0f} s\n" + "\n".join(log))
    assert clean.returncode == 0, clean_output
    assert last.returncode == 0, output
    assert not violations, "\n".join(violations)
    assert slurm_cluster.queue() == []
    for member in MEMBERS:
        for table in TABLES:
            ours = pl.read_parquet(store.table_file(table, "soak", member))
            assert ours.equals(pl.read_parquet(store_at(clean_home).table_file(table, "soak", member))), (table, member)
    for table in ("distances", "consensus_components"):
        ours = pl.read_parquet(store.table_file(table, "soak", None))
        assert ours.equals(pl.read_parquet(store_at(clean_home).table_file(table, "soak", None))), table
    doctor = cli(home, "doctor")
    report, _ = doctor.communicate(timeout=TIMEOUT_S)
    assert doctor.returncode == 0 and "doctor: no problems found" in report, report
