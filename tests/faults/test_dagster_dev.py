"""A real `dagster dev` (webserver and daemon) clears the run of a killed `spd-cluster run` that holds the only
device pool slot, and a run launched from the UI (its GraphQL API) then gets the slot and completes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from dagster import DagsterEventType, DagsterRunStatus, RunsFilter

from spd_assets.deployment.devices import LEASE_LOG
from spd_assets.deployment.settings import DEVICE_POOL
from tests.dagster_dev import LAUNCH, dagster_dev, graphql, wait_for
from tests.pipeline_helpers import SMALL_SYNTHETIC, instance_at, make_home

SLOW = {**SMALL_SYNTHETIC, "n_members": 2, "batch_size": 48,
        "params": {**SMALL_SYNTHETIC["params"], "components_per_module": [150, 180], "seq_len": 64}}
@pytest.mark.slow  # the dead_runs sensor itself is tested in tests/defs/test_devices.py
def test_dagster_dev_clears_a_dead_cli_run_and_a_ui_launch_then_runs(tmp_path):
    home = make_home(tmp_path / "home")
    settings = yaml.safe_load((home / "dagster.yaml").read_text())
    settings["concurrency"]["pools"]["default_limit"] = 1  # one slot: the dead run's, unless it is freed
    (home / "dagster.yaml").write_text(yaml.safe_dump(settings))
    config = tmp_path / "blocked.yaml"
    config.write_text(yaml.safe_dump({"name": "blocked", "source": SLOW, "merge_config": {"iters": 30}}))
    environment = {**os.environ, "DAGSTER_HOME": str(home), "SPD_CLUSTER_DEVICES": "cpu:0"}

    cli = subprocess.Popen([sys.executable, "-m", "spd_assets.cli", "run", "--config", str(config)], env=environment,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    log = home / "spd_cluster" / "device_leases" / LEASE_LOG
    wait_for(lambda: log.exists() and "acquired" in log.read_text(), 300, "the command line's merge to start")
    os.kill(cli.pid, signal.SIGKILL)
    cli.wait()
    with instance_at(home) as instance:
        (dead,) = instance.get_runs(filters=RunsFilter(statuses=[DagsterRunStatus.STARTED]))
        assert instance.event_log_storage.get_concurrency_info(DEVICE_POOL).claimed_slots, "the dead run holds the slot"

    with dagster_dev(environment, tmp_path / "dagster_dev.log") as served:
        serving = time.monotonic()
        with instance_at(home) as instance:
            wait_for(lambda: instance.get_run_by_id(dead.run_id).status == DagsterRunStatus.FAILURE, 180,
                     "the daemon's dead_runs sensor to mark the dead run failed")
            cleared = time.monotonic()
            failure = instance.all_logs(dead.run_id, of_type=DagsterEventType.RUN_FAILURE)[0]
            assert "marked by the dead_runs sensor" in failure.message

        params = {"selector": {"repositoryLocationName": served.location, "repositoryName": served.repository,
                               "jobName": "blocked__members"},
                  "runConfigData": {},
                  "executionMetadata": {"tags": [{"key": "dagster/partition", "value": "member_001"}]}}
        launched = graphql(served.port, LAUNCH, {"params": params})["launchRun"]
        assert launched["__typename"] == "LaunchRunSuccess", launched
        run_id = launched["run"]["runId"]
        launched_at = time.time()
        with instance_at(home) as instance:
            final = wait_for(lambda: (run := instance.get_run_by_id(run_id)).is_finished and run, 600,
                             "the run launched from the UI to finish")
            assert final.status == DagsterRunStatus.SUCCESS, (tmp_path / "dagster_dev.log").read_text()[-3000:]
            merge_started = min(entry.timestamp for entry in instance.all_logs(run_id, of_type=DagsterEventType.STEP_START)
                                if entry.step_key.endswith("merge_history"))
        print(f"\ndead run cleared {cleared - serving:.1f} s after dagster dev served the code location; "
              f"the UI-launched merge started {merge_started - launched_at:.1f} s after its launch")
