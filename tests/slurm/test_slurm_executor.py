"""`executor: slurm` and `instance: postgres` against a real single-node SLURM cluster and a real PostgreSQL server
(started by this folder's conftest): every member's merge is a SLURM job, the results equal a local run's, and
failed, canceled and interrupted jobs fail their member with the reason and leave nothing in the queue."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import yaml
from dagster import DagsterEventType, DagsterRunStatus, RunsFilter

from spd_assets.defs.slurm import SLURM_JOB_TAG
from tests.dagster_dev import wait_for as shared_wait_for
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
    """The shared wait, asking twice a second (jobs change state fast)."""
    return shared_wait_for(condition, timeout_s, what, poll_s=0.5)


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

    # The code location, with this experiment registered, validates with executor slurm on the PostgreSQL instance.
    environment = {**os.environ, "DAGSTER_HOME": str(remote_home)}
    environment.pop("SPD_CLUSTER_EXECUTOR", None)
    validated = subprocess.run([sys.executable, "-m", "dagster", "definitions", "validate", "-w",
                                str(ROOT / "workspace.yaml")], cwd=ROOT, env=environment, capture_output=True,
                               text=True, timeout=300)
    assert validated.returncode == 0 and "passed validation" in validated.stdout + validated.stderr, (
        validated.stdout + validated.stderr)


# Merges that take seconds (200 iterations of 880 components), so a job can be caught running.
SLOW_SOURCE = {"kind": "synthetic", "n_members": 3, "batch_size": 48,
               "params": {"n_layers": 2, "modules": ["attn.q", "mlp.up", "mlp.down"],
                          "components_per_module": [150, 180], "n_planted_groups": 6, "group_size": [2, 4],
                          "seq_len": 64}}


def slow_config(tmp_path: Path, name: str = "slow") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "source": SLOW_SOURCE, "merge_config": {"iters": 200}}))
    return path


def merging_jobs(home: Path, cluster) -> list[str]:
    """Ids of the jobs whose remote step has started merging (its Pipes messages say so)."""
    started = []
    for messages in (home / "spd_cluster" / "slurm_jobs").glob("*/merge_history/pipes_messages.jsonl"):
        if "merging" in messages.read_text():
            started += [path.stem.removeprefix("slurm-") for path in messages.parent.glob("slurm-*.err")]
    queued = set(cluster.queue())
    return [job for job in started if job in queued]


def wait_for_merging(home: Path, cluster, process: subprocess.Popen) -> list[str]:
    """The jobs merging once one is; fails at once, with its output, if the command line ends first."""
    def merging():
        if process.poll() is not None:
            raise AssertionError(f"the command line ended ({process.returncode}) before a job merged:\n"
                                 f"{process.stdout.read()[-3000:]}")
        return merging_jobs(home, cluster)

    return wait_for(merging, TIMEOUT_S, "a member's job to start merging")


@pytest.mark.slow  # a job ended mid-merge: also the time limit in tests/slurm/test_slurm_faults.py
def test_a_job_canceled_mid_merge_fails_its_member_with_the_reason_and_a_rerun_completes(tmp_path, slurm_cluster):
    home = slurm_home(tmp_path / "home")
    config = slow_config(tmp_path)
    process = cli(home, "run", "--config", str(config), "--members", "member_000")
    (job,) = wait_for_merging(home, slurm_cluster, process)
    slurm_cluster.run("scancel", job)
    output = finish(process)
    assert process.returncode == 1, output
    assert "FAILED member_000" in output, output
    assert f"SLURM job {job} (spd-slow-member_000-merge) ended CANCELLED" in output, output
    assert "the tail of its stderr" in output and "CANCELLED" in output.split("the tail of its stderr", 1)[1], output
    assert slurm_cluster.queue() == []

    rerun = cli(home, "run", "--config", str(config), "--members", "member_000")
    output = finish(rerun)
    assert rerun.returncode == 0, output
    assert "1/1 members" in output
    assert table_of(home, "slow", "merge_events", "member_000")["iteration"].max() == 199


def table_of(home: Path, experiment: str, name: str, part: str | None) -> pl.DataFrame:
    return pl.read_parquet(store_at(home).table_file(name, experiment, part))


def test_a_job_that_fails_on_its_node_fails_its_member_with_its_stderr(tmp_path, slurm_cluster):
    home = slurm_home(tmp_path / "home", python="/nonexistent/bin/python3")
    process = cli(home, "run", *SMALL_DEFAULT, "--members", "member_000")
    output = finish(process)
    assert process.returncode == 1, output
    assert "ended FAILED" in output and "exit code 127" in output, output
    assert "/nonexistent/bin/python3" in output, output  # bash's "No such file or directory", from the job's stderr


def test_ctrl_c_of_the_command_line_cancels_every_job(tmp_path, slurm_cluster):
    home = slurm_home(tmp_path / "home")
    process = cli(home, "run", "--config", str(slow_config(tmp_path)))
    wait_for_merging(home, slurm_cluster, process)
    before = slurm_cluster.queue()
    process.send_signal(signal.SIGINT)
    output = finish(process)
    assert process.returncode == 130, output
    assert "canceled SLURM job(s)" in output, output
    wait_for(lambda: slurm_cluster.queue() == [], 60, f"the jobs {before} to leave the queue")
    with instance_at(home) as instance:
        assert not instance.get_runs(filters=RunsFilter(statuses=[DagsterRunStatus.STARTED]))


def test_spd_clustering_no_local_submits_to_slurm_with_the_pipeline_partition_and_prefix(tmp_path, slurm_cluster):
    home = make_home(tmp_path / "home")  # the deployment says in_process: --no-local alone sends members to SLURM
    config = tmp_path / "synthetic.yaml"
    config.write_text(yaml.safe_dump({"name": "via_original_cli", "source": {**SLOW_SOURCE, "batch_size": 8},
                                      "merge_config": {"iters": 10}}))
    # What an original pipeline config's slurm_partition and slurm_job_name_prefix set for the invocation.
    environment = {**os.environ, "DAGSTER_HOME": str(home), "SPD_CLUSTER_SLURM_PARTITION": slurm_cluster.partition,
                   "SPD_CLUSTER_SLURM_JOB_NAME_PREFIX": "orig-"}
    process = subprocess.run([sys.executable, "-m", "spd_assets.cli.original", "--config", str(config), "--n-runs", "1",
                              "--no-local"], env=environment, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert process.returncode == 0, process.stdout + process.stderr
    assert "executor slurm" in process.stdout and "1/1 members" in process.stdout
    with instance_at(home) as instance:
        (run,) = [run for run in instance.get_runs() if run.tags.get("dagster/partition")]
        logs = " ".join(entry.user_message for entry in instance.all_logs(run.run_id))
        assert f"submitted SLURM job {run.tags[SLURM_JOB_TAG]} (orig-via_original_cli-member_000-merge)" in logs


def test_doctor_fails_a_run_whose_job_is_gone(tmp_path, slurm_cluster, monkeypatch):
    from spd_assets.defs import dead_runs
    from spd_assets.defs.dead_runs import RUN_TAG_HOST
    from spd_assets.service.doctor import examine

    home = slurm_home(tmp_path / "home")
    process = cli(home, "run", "--config", str(slow_config(tmp_path)), "--members", "member_000")
    (job,) = wait_for_merging(home, slurm_cluster, process)
    process.kill()  # its worker dies with it (parent-death signal); the run stays STARTED
    process.communicate()
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.delenv("SPD_CLUSTER_EXECUTOR", raising=False)
    with instance_at(home) as instance:
        (run,) = instance.get_runs(filters=RunsFilter(statuses=[DagsterRunStatus.STARTED]))
        # As if the run's process lived on another host: its pid cannot be checked here, only its job.
        instance.add_run_tags(run.run_id, {RUN_TAG_HOST: "another-host"})
        findings = examine(store_at(home), instance, repair=False)
        assert not [finding for finding in findings if f"SLURM job {job} " in finding.problem], findings
        slurm_cluster.run("scancel", job)
        wait_for(lambda: job not in slurm_cluster.queue(), 60, f"job {job} to leave the queue")
        monkeypatch.setattr(dead_runs, "GONE_JOB_GRACE_S", 0.0)
        findings = examine(store_at(home), instance, repair=True)
        (gone,) = [finding for finding in findings if f"SLURM job {job}" in finding.problem]
        assert gone.problem == f"run {run.run_id[:8]} is STARTED but its SLURM job {job} ended CANCELLED"
        assert gone.repair == "marked it failed"
        assert instance.get_run_by_id(run.run_id).status == DagsterRunStatus.FAILURE
