"""`executor: slurm` and `instance: postgres` against a real single-node SLURM cluster and a real PostgreSQL server
(started by this folder's conftest): every member's merge is a SLURM job, the results equal a local run's, and
failed, canceled and interrupted jobs fail their member with the reason and leave nothing in the queue."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
import yaml
from dagster import DagsterEventType, DagsterRunStatus, RunsFilter

from spd_assets.defs.slurm import SLURM_JOB_TAG
from tests.pipeline_helpers import instance_at, make_home, store_at

ROOT = Path(__file__).resolve().parents[2]
# The embedded default experiment, made small enough for CI: three members.
SMALL_DEFAULT = ["--set", "source.n_members=3"]
MEMBERS = ["member_000", "member_001", "member_002"]
TIMEOUT_S = 600


def slurm_home(path: Path, postgres_url: str | None = None, **slurm) -> Path:
    """A Dagster instance whose deployment settings say executor: slurm (and instance: postgres with a URL)."""
    home = make_home(path)
    settings = {"executor": "slurm", "slurm": {"poll_interval_s": 0.5, **slurm}}
    if postgres_url:
        settings.update(instance="postgres", postgres_url=postgres_url)
    (home / "spd_cluster.yaml").write_text(yaml.safe_dump(settings))
    return home


def cli(home: Path, *args: str, **popen) -> subprocess.Popen:
    environment = {**os.environ, "DAGSTER_HOME": str(home)}
    environment.pop("SPD_CLUSTER_EXECUTOR", None)
    return subprocess.Popen([sys.executable, "-m", "spd_assets.cli", *args], env=environment, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def finish(process: subprocess.Popen) -> str:
    output, _ = process.communicate(timeout=TIMEOUT_S)
    return output


def table(home: Path, name: str, part: str) -> pl.DataFrame:
    return pl.read_parquet(store_at(home).table_file(name, "default", part))


def wait_for(condition, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def test_default_experiment_on_slurm_and_postgres_equals_a_local_run(tmp_path, slurm_cluster, postgres_server):
    url = postgres_server.create_database("default_on_slurm")
    remote_home = slurm_home(tmp_path / "slurm_home", url)
    local_home = make_home(tmp_path / "local_home")

    remote = cli(remote_home, "run", *SMALL_DEFAULT)
    local = cli(local_home, "run", *SMALL_DEFAULT)
    remote_output, local_output = finish(remote), finish(local)
    assert remote.returncode == 0, remote_output
    assert local.returncode == 0, local_output
    assert "executor slurm" in remote_output and "3/3 members" in remote_output, remote_output
    assert "storage:" in (remote_home / "dagster.yaml").read_text()  # instance: postgres wrote its storage block

    with instance_at(remote_home) as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        member_runs = [run for run in instance.get_runs() if run.tags.get("dagster/partition")]
        assert sorted(run.tags["dagster/partition"] for run in member_runs) == MEMBERS
        job_ids = {run.tags[SLURM_JOB_TAG] for run in member_runs}
        assert len(job_ids) == 3, "every member's merge is a SLURM job of its own"
        for run in member_runs:
            assert run.status == DagsterRunStatus.SUCCESS
            (materialization,) = [
                entry.asset_materialization for entry in
                instance.all_logs(run.run_id, of_type=DagsterEventType.ASSET_MATERIALIZATION)
                if entry.asset_materialization.asset_key.path[-1] == "merge_history"]
            metadata = materialization.metadata
            assert metadata["slurm_job_id"].value == run.tags[SLURM_JOB_TAG]
            assert metadata["iterations"].value > 0 and "mdl_curve" in metadata  # reported over Pipes by the job
            logs = " ".join(entry.user_message for entry in instance.all_logs(run.run_id))
            assert f"submitted SLURM job {run.tags[SLURM_JOB_TAG]}" in logs
            assert "merging" in logs  # the remote step's own log line, streamed back over Pipes
            checks = [entry for entry in instance.all_logs(run.run_id, of_type=DagsterEventType.ASSET_CHECK_EVALUATION)]
            assert checks and all(entry.dagster_event.event_specific_data.passed for entry in checks
                                  if entry.dagster_event.event_specific_data.check_name == "partition_sizes")
    assert slurm_cluster.queue() == []

    for member in MEMBERS:
        for name in ("merge_events", "membership_spans"):
            assert table(remote_home, name, member).equals(table(local_home, name, member)), (name, member)
    assert table(remote_home, "distances", None).equals(table(local_home, "distances", None))
