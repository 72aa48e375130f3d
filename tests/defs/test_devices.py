"""Device leases and Dagster pools: exclusive devices across concurrent runs, killed steps, executors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from dagster import AssetKey, DagsterEventType, DagsterRunStatus, Definitions, RunsFilter, build_sensor_context

from spd_assets.defs.dead_runs import reap_dead_runs
from spd_assets.defs.definitions import build_definitions
from spd_assets.defs.sensors import dead_runs
from spd_assets.deployment.devices import LEASE_LOG, DeviceError, holders, lease_device
from spd_assets.deployment.settings import DEVICE_POOL, DeploymentSettings, load_settings
from tests.pipeline_helpers import SMALL_SYNTHETIC, instance_at, make_home, small_config

# Members whose merge takes long enough (seconds) that concurrently started runs surely overlap.
SLOW_SOURCE = {**SMALL_SYNTHETIC, "batch_size": 48, "params": {**SMALL_SYNTHETIC["params"], "components_per_module": [150, 180], "seq_len": 64}}


def lease_intervals(home: Path) -> list[dict]:
    records = [json.loads(line) for line in (home / "spd_cluster" / "device_leases" / LEASE_LOG).read_text().splitlines()]
    released = {(r["pid"], r["acquired_at"]): r["released_at"] for r in records if r["event"] == "released"}
    return [{**r, "released_at": released.get((r["pid"], r["acquired_at"]))} for r in records if r["event"] == "acquired"]


def max_overlap(intervals: list[dict]) -> int:
    edges = sorted([(i["acquired_at"], 1) for i in intervals] + [(i["released_at"], -1) for i in intervals])
    running = peak = 0
    for _, step in edges:
        running += step
        peak = max(peak, running)
    return peak


def write_experiment(tmp_path: Path, name: str, n_members: int, **merge) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "source": {**SLOW_SOURCE, "n_members": n_members},
                                    "merge_config": {"iters": None, **merge}}))
    return path


def run_cli(home: Path, *args: str, devices: str, **popen) -> subprocess.Popen:
    environment = {**os.environ, "DAGSTER_HOME": str(home), "SPD_CLUSTER_DEVICES": devices}
    return subprocess.Popen([sys.executable, "-m", "spd_assets.cli", *args], env=environment, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def set_pool_limit(home: Path, limit: int) -> None:
    settings = yaml.safe_load((home / "dagster.yaml").read_text())
    settings["concurrency"]["pools"]["default_limit"] = limit
    (home / "dagster.yaml").write_text(yaml.safe_dump(settings))


@pytest.mark.parametrize("devices, pool_limit", [
    # Device leases alone limiting: slow; leases are also tested directly below.
    pytest.param("cpu:0,cpu:1", 5, id="leases-limit", marks=pytest.mark.slow),
    pytest.param("cpu:0,cpu:1,cpu:2", 2, id="dagster-pool-limits"),
])
def test_five_concurrent_runs_share_two_slots_without_overlap(tmp_path, devices, pool_limit):
    """Five member runs at once. Either the number of devices (2, roomy pool) or the pool limit in
    dagster.yaml (2, with 3 devices) must keep at most 2 merges running, and never two on one device."""
    home = make_home(tmp_path / "home")
    set_pool_limit(home, pool_limit)
    config = write_experiment(tmp_path, "pooled", n_members=5)
    process = run_cli(home, "run", "--config", str(config), "--parallel", "5", devices=devices)
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stdout + stderr

    intervals = lease_intervals(home)
    assert len(intervals) == 5 and all(i["released_at"] for i in intervals)
    assert {i["device"] for i in intervals} <= set(devices.split(","))
    for device in {i["device"] for i in intervals}:
        on_device = sorted((i for i in intervals if i["device"] == device), key=lambda i: i["acquired_at"])
        for earlier, later in zip(on_device, on_device[1:]):
            assert earlier["released_at"] <= later["acquired_at"], f"two steps on {device} at once"
    assert max_overlap(intervals) == 2, "expected the five runs to use both slots, and never more"

    with instance_at(home) as instance:
        events = instance.fetch_materializations(AssetKey(["pooled", "merge_history"]), limit=10).records
        recorded = {e.event_log_entry.dagster_event.partition: e.asset_materialization.metadata["device"].value for e in events}
    assert recorded == {i["partition"]: i["device"] for i in intervals}


HOLDER_SCRIPT = """
import sys, time
from pathlib import Path
from spd_assets.deployment.devices import lease_device
with lease_device(["cpu:0"], Path(sys.argv[1]), holder={"who": "doomed"}, timeout_s=5):
    print("leased", flush=True)
    time.sleep(600)
"""


def test_a_killed_holder_does_not_keep_its_device(tmp_path):
    lease_dir = tmp_path / "leases"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER_SCRIPT, str(lease_dir)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "leased"
    assert holders(lease_dir, ["cpu:0"])["cpu:0"]["who"] == "doomed"
    with pytest.raises(DeviceError, match="no device free"):
        with lease_device(["cpu:0"], lease_dir, holder={}, timeout_s=0.5):
            pass
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    started = time.monotonic()
    with lease_device(["cpu:0"], lease_dir, holder={"who": "next"}, timeout_s=5) as lease:
        assert lease.device == "cpu:0" and holders(lease_dir, ["cpu:0"])["cpu:0"]["who"] == "next"
    assert time.monotonic() - started < 2
    assert holders(lease_dir, ["cpu:0"])["cpu:0"] is None


def test_a_limit_below_the_device_count_is_exact(tmp_path):
    lease_dir = tmp_path / "leases"
    devices = ["cpu:0", "cpu:1", "cpu:2"]
    with lease_device(devices, lease_dir, holder={}, timeout_s=1, limit=2) as first:
        with lease_device(devices, lease_dir, holder={}, timeout_s=1, limit=2) as second:
            assert first.device != second.device
            with pytest.raises(DeviceError, match="at most 2 at once"):
                with lease_device(devices, lease_dir, holder={}, timeout_s=0.5, limit=2):
                    pass
        with lease_device(devices, lease_dir, holder={}, timeout_s=1, limit=2) as third:
            assert third.device != first.device
    with pytest.raises(DeviceError, match="at least 1"):
        with lease_device(devices, lease_dir, holder={}, timeout_s=1, limit=0):
            pass


def test_a_killed_run_is_cleared_by_the_dead_runs_sensor(tmp_path):
    """The sensor `dagster dev`'s daemon evaluates (here evaluated directly) marks the dead run failed and frees
    its pool slot; tests/faults/test_dagster_dev.py has the daemon do it."""
    home = make_home(tmp_path / "home")
    config = write_experiment(tmp_path, "killed", n_members=1)
    process = run_cli(home, "run", "--config", str(config), devices="cpu:0", start_new_session=True)
    log = home / "spd_cluster" / "device_leases" / LEASE_LOG
    deadline = time.monotonic() + 120
    while not (log.exists() and "acquired" in log.read_text()):
        assert process.poll() is None and time.monotonic() < deadline, "the run never leased a device"
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGKILL)  # the CLI and its worker, mid-merge
    process.wait()

    with instance_at(home) as instance:
        assert instance.event_log_storage.get_concurrency_info(DEVICE_POOL).claimed_slots, "the run held a pool slot"
        (dead,) = instance.get_runs(filters=RunsFilter(tags={"spd_cluster/experiment": "killed"}))
        assert dead.status == DagsterRunStatus.STARTED
        result = dead_runs(build_sensor_context(instance=instance))
        assert "marked 1 dead run(s) failed" in result.skip_message
        assert instance.get_run_by_id(dead.run_id).is_failure
        assert not instance.event_log_storage.get_concurrency_info(DEVICE_POOL).claimed_slots
        assert reap_dead_runs(instance, reaper="the test") == [], "nothing left to reap"
        failure = instance.all_logs(dead.run_id, of_type=DagsterEventType.RUN_FAILURE)[0]
        assert f"(pid {dead.tags['spd_cluster/pid']}) is gone; marked by the dead_runs sensor" in failure.message
    with lease_device(["cpu:0"], home / "spd_cluster" / "device_leases", holder={}, timeout_s=2) as lease:
        assert lease.device == "cpu:0"


@pytest.mark.parametrize("executor", ["multiprocess", "in_process", "k8s"])
def test_definitions_validate_with_each_executor(executor):
    settings = DeploymentSettings(executor=executor, devices=["cuda:0", "cuda:1"])
    defs = build_definitions([small_config()], settings)
    Definitions.validate_loadable(defs)
    job = defs.resolve_job_def("small__members")
    expected = {"multiprocess": "multi_or_in_process_executor", "in_process": "in_process", "k8s": "spd_k8s_job_executor"}
    assert job.executor_def.name == expected[executor]
    merge_step = defs.resolve_assets_def(AssetKey(["small", "merge_history"]))
    assert merge_step.op.pool == DEVICE_POOL
    tags = merge_step.op.tags.get("dagster-k8s/config")
    if executor == "k8s":
        assert json.loads(tags) if isinstance(tags, str) else tags
        limits = (json.loads(tags) if isinstance(tags, str) else tags)["container_config"]["resources"]["limits"]
        assert limits == {"nvidia.com/gpu": "1"}
    else:
        assert tags is None


def test_workspace_validates_with_kubernetes_from_the_environment(tmp_path):
    home = make_home(tmp_path / "home")
    environment = {**os.environ, "DAGSTER_HOME": str(home), "SPD_CLUSTER_EXECUTOR": "k8s", "SPD_CLUSTER_DEVICES": "cuda:0"}
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-m", "dagster", "definitions", "validate", "-w", str(root / "workspace.yaml")],
                            cwd=root, env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "passed validation" in result.stdout + result.stderr


def test_deployment_settings_from_file_and_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("SPD_CLUSTER_EXECUTOR", raising=False)
    assert load_settings(tmp_path).executor == "in_process", "the default: each run one process, its steps in it"
    (tmp_path / "spd_cluster.yaml").write_text(yaml.safe_dump({"executor": "multiprocess", "devices": ["cuda:0", "cuda:1"]}))
    monkeypatch.delenv("SPD_CLUSTER_EXECUTOR", raising=False)
    monkeypatch.delenv("SPD_CLUSTER_DEVICES", raising=False)
    settings = load_settings(tmp_path)
    assert settings.executor == "multiprocess" and settings.device_names() == ["cuda:0", "cuda:1"]
    monkeypatch.setenv("SPD_CLUSTER_DEVICES", "cpu:0,cpu:1,cpu:2")
    assert load_settings(tmp_path).device_names() == ["cpu:0", "cpu:1", "cpu:2"]
    monkeypatch.setenv("SPD_CLUSTER_DEVICES", "gpu0")
    with pytest.raises(ValueError, match="cuda:0"):
        load_settings(tmp_path)
