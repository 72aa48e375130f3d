"""Ctrl-C (SIGINT to the terminal's process group) or SIGTERM to `spd-cluster run`: queued members are canceled,
runs in flight are marked canceled in Dagster, one line is printed, the exit status says which signal."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from dagster import DagsterRunStatus, RunsFilter

from spd_assets.deployment.devices import LEASE_LOG, holders
from spd_assets.deployment.settings import DEVICE_POOL
from tests.faults.invariants import children_of, no_orphans
from tests.pipeline_helpers import SMALL_SYNTHETIC, instance_at, make_home

SLOW = {**SMALL_SYNTHETIC, "n_members": 6, "batch_size": 48,
        "params": {**SMALL_SYNTHETIC["params"], "components_per_module": [150, 180], "seq_len": 64}}


@pytest.mark.parametrize("signum, status", [
    pytest.param(signal.SIGINT, 130, id="ctrl-c"),
    pytest.param(signal.SIGTERM, 143, id="sigterm", marks=pytest.mark.slow),  # the same path as Ctrl-C
])
def test_an_interrupted_run_cancels_in_order_and_says_so_in_one_line(tmp_path, signum, status):
    home = make_home(tmp_path / "home")
    config = tmp_path / "interrupted.yaml"
    config.write_text(yaml.safe_dump({"name": "interrupted", "source": SLOW, "merge_config": {"iters": None}}))
    environment = {**os.environ, "DAGSTER_HOME": str(home), "SPD_CLUSTER_DEVICES": "cpu:0,cpu:1"}
    process = subprocess.Popen([sys.executable, "-m", "spd_assets.cli", "run", "--config", str(config)],
                               env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)  # its own process group, as a terminal's foreground job
    log = home / "spd_cluster" / "device_leases" / LEASE_LOG
    deadline = time.monotonic() + 300
    while not (log.exists() and "acquired" in log.read_text()):
        assert process.poll() is None and time.monotonic() < deadline, "the run never leased a device"
        time.sleep(0.1)
    workers = children_of(process.pid)
    signalled = time.monotonic()
    os.killpg(process.pid, signum)  # what the terminal does on Ctrl-C: the whole foreground group
    stdout, stderr = process.communicate(timeout=120)
    print(f"\n{signal.Signals(signum).name}: exited {time.monotonic() - signalled:.1f} s after the signal")

    assert process.returncode == status, stdout + stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"spd-cluster: interrupted ({signal.Signals(signum).name}): canceled")
    assert "queued member(s)" in lines[0]
    time.sleep(1.0)
    assert no_orphans(workers) == []
    with instance_at(home) as instance:
        runs = instance.get_runs(filters=RunsFilter(tags={"spd_cluster/experiment": "interrupted"}))
        statuses = [run.status for run in runs]
        assert DagsterRunStatus.CANCELED in statuses, statuses
        assert not {DagsterRunStatus.STARTED, DagsterRunStatus.STARTING, DagsterRunStatus.NOT_STARTED} & set(statuses)
        assert len(runs) < 6, "queued members must not have been started"
        assert not instance.event_log_storage.get_concurrency_info(DEVICE_POOL).claimed_slots
    assert all(holder is None for holder in holders(home / "spd_cluster" / "device_leases", ["cpu:0", "cpu:1"]).values())
    # What finished before the interruption is in the lineage tables too: they agree with Dagster's event log.
    doctor = subprocess.run([sys.executable, "-m", "spd_assets.cli", "doctor", "--dry-run"], env=environment,
                            capture_output=True, text=True, timeout=300)
    assert "lineage tables disagree" not in doctor.stdout, doctor.stdout


def test_a_ctrl_c_lost_in_a_weakref_callback_still_stops_the_run():
    """Python drops the KeyboardInterrupt of a Ctrl-C that lands in a weakref callback ("Exception ignored"): seen
    in a soak, when SQLAlchemy's callbacks ran. The command line remembers the signal and stops at its next report."""
    import weakref

    from spd_assets.cli.run import _Printer, _Stopper

    stopper = _Stopper()
    printer = _Printer(stopper)

    class Collected:
        pass

    kept = Collected()
    reference = weakref.ref(kept, lambda gone: stopper(signal.SIGINT, None))
    del kept  # the callback's KeyboardInterrupt is printed and ignored, as the soak saw
    assert reference() is None
    with pytest.raises(KeyboardInterrupt):
        printer.running({})
