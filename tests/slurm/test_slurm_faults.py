"""SLURM faults mid-merge on the real single-node cluster (this folder's conftest): a job requeued (`scontrol requeue`,
as preemption does), its node set down, its time limit reached, its memory limit exceeded. A requeued job and a
retried one resume the merge from the member's checkpoint; a job past its retries or out of memory fails its member
with SLURM's state and reason; nothing is left in the queue, and every history equals a merge never interrupted."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import torch
import yaml

from spd_assets.config import load_config
from spd_assets.storage.checkpoints import checkpoint_path, read_checkpoint
from spd_assets.storage.values import load_activations, load_history
from spd_math import merge_iteration
from tests.pipeline_helpers import merging_experiment, store_at
from tests.slurm.test_slurm_executor import cli, finish, slurm_home, wait_for

MEMBER = "member_000"


# Long enough to be caught mid-merge twice.
SHORT = merging_experiment("short", iters=500, n_members=1)
# Long enough to still be merging when SLURM's time-limit check (every 30 s) comes round.
LONG = merging_experiment("long", iters=1200, n_members=1)
CHECKPOINT_INTERVAL_S = 0.5
TIMEOUT_S = 600


def config_file(folder: Path, values: dict) -> Path:
    path = folder / f"{values['name']}.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def uninterrupted(config_path: Path, home: Path):
    """The member's merge never interrupted, from the activations `home` stored."""
    config = load_config(config_path)
    activations = load_activations(store_at(home).value_path(config.name, "component_activations", MEMBER, ".npz"))
    return merge_iteration(activations, config.merge_config, seed=config.member_seed(MEMBER))


def faults_home(path: Path, **slurm) -> Path:
    home = slurm_home(path, **slurm)
    settings = yaml.safe_load((home / "spd_cluster.yaml").read_text())
    (home / "spd_cluster.yaml").write_text(yaml.safe_dump({**settings, "checkpoint_interval_s": CHECKPOINT_INTERVAL_S}))
    return home


def job_field(cluster, job: str, field: str) -> str | None:
    answer = subprocess.run(["scontrol", "show", "job", "--oneliner", job], env={**cluster.env, "PATH": "/usr/bin:/bin"},
                            capture_output=True, text=True)
    fields = dict(part.split("=", 1) for part in answer.stdout.split() if "=" in part)
    return fields.get(field)


def merged(home: Path, experiment: str) -> int:
    """Merges in the member's checkpoint (0 when there is none yet)."""
    try:
        return read_checkpoint(checkpoint_path(store_at(home), experiment, MEMBER)).checkpoint.n_done
    except (OSError, ValueError, KeyError):
        return 0


def wait_for_merges(home: Path, experiment: str, process, more_than: int) -> int:
    def progressed():
        assert process.poll() is None, f"the run ended early:\n{process.stdout.read()[-3000:]}"
        done = merged(home, experiment)
        return done if done > more_than else None

    return wait_for(progressed, TIMEOUT_S, f"a checkpoint of more than {more_than} merges")


def member_job(home: Path, cluster) -> str:
    """The id of the member's current job (the newest job folder's stderr names it)."""
    def running():
        errors = sorted((home / "spd_cluster" / "slurm_jobs").glob("*/merge_history/slurm-*.err"),
                        key=lambda path: path.stat().st_mtime)
        jobs = [path.stem.removeprefix("slurm-") for path in errors]
        return jobs[-1] if jobs and jobs[-1] in cluster.queue() else None

    return wait_for(running, TIMEOUT_S, "the member's job")


def release(cluster, job: str) -> None:
    """Start a requeued job now: SLURM holds one back for about two minutes (its BeginTime) before it runs again."""
    def started():
        if job_field(cluster, job, "JobState") == "RUNNING":
            return True
        if job_field(cluster, job, "Reason") == "BeginTime":
            cluster.run("scontrol", "update", f"jobid={job}", "StartTime=now")
        return False

    wait_for(started, 120, f"job {job} to run again")


def assert_uninterrupted(home: Path, config_path: Path) -> None:
    stored = load_history(store_at(home).value_path(config_path.stem, "merge_history", MEMBER, ".npz"))
    clean = uninterrupted(config_path, home)
    for name in ("selected_pairs", "pair_costs", "mdl_losses", "k_groups"):
        assert torch.equal(getattr(stored, name), getattr(clean, name)), name
    assert not checkpoint_path(store_at(home), config_path.stem, MEMBER).exists()


def test_a_requeued_job_and_a_failed_node_resume_the_merge_from_its_checkpoint(tmp_path, slurm_cluster):
    config = config_file(tmp_path, SHORT)
    home = faults_home(tmp_path / "home")
    process = cli(home, "run", "--config", str(config))
    job = member_job(home, slurm_cluster)
    assert job_field(slurm_cluster, job, "Requeue") == "1", "jobs are submitted requeueable"

    # Preemption as SLURM does it: SIGTERM (the job saves a checkpoint and ends), then back to the queue.
    before = wait_for_merges(home, "short", process, 50)
    slurm_cluster.run("scontrol", "requeue", job)
    wait_for(lambda: job_field(slurm_cluster, job, "JobState") == "PENDING", 60, "the requeue")
    requeued_at = merged(home, "short")  # saved on SIGTERM, before the job ended
    assert requeued_at >= before
    release(slurm_cluster, job)
    wait_for_merges(home, "short", process, requeued_at)  # the same job, going on from its checkpoint

    # The node fails under a job that may not be requeued: SLURM ends it NODE_FAIL; Dagster retries the step.
    slurm_cluster.run("scontrol", "update", f"jobid={job}", "Requeue=0")
    node = socket.gethostname()
    slurm_cluster.run("scontrol", "update", f"nodename={node}", "state=down", "reason=fault_test")
    wait_for(lambda: job_field(slurm_cluster, job, "JobState") == "NODE_FAIL", 60, "the job to end NODE_FAIL")
    failed_at = merged(home, "short")
    subprocess.run(["scontrol", "update", f"nodename={node}", "state=resume"], env={**slurm_cluster.env},
                   capture_output=True)  # ReturnToService=2 may have brought it back already
    output = finish(process)
    assert process.returncode == 0, output
    assert "resumed at merge" in output, output
    resumed_at = int(output.split("resumed at merge ", 1)[1].split()[0].replace(",", ""))
    assert resumed_at >= failed_at > requeued_at
    logs = "".join(path.read_text() for path in store_at(home).logs_dir.glob("short-*.log"))
    assert logs.count(f"{MEMBER}: resuming from the checkpoint saved") == 2, "the requeued job and the retry"
    assert "ended NODE_FAIL" in logs
    assert slurm_cluster.queue() == []
    assert_uninterrupted(home, config)


def test_a_job_past_its_time_limit_and_retries_fails_with_slurms_reason_and_a_rerun_resumes(tmp_path, slurm_cluster):
    config = config_file(tmp_path, LONG)
    home = faults_home(tmp_path / "home", transient_retries=0)
    process = cli(home, "run", "--config", str(config))
    job = member_job(home, slurm_cluster)
    wait_for_merges(home, "long", process, 20)
    slurm_cluster.run("scontrol", "update", f"jobid={job}", "TimeLimit=0")  # its limit reached now
    output = finish(process)
    assert process.returncode == 1, output
    assert f"FAILED {MEMBER}" in output, output
    assert f"SLURM job {job} (spd-long-{MEMBER}-merge) ended TIMEOUT (reason TimeLimit)" in output, output
    assert "it hit its time limit" in output and "resumes from the merge's checkpoint" in output, output
    assert slurm_cluster.queue() == []
    at_timeout = merged(home, "long")
    assert at_timeout > 20, "SIGTERM before the time limit's kill saved a checkpoint"

    rerun = cli(home, "run", "--config", str(config))
    output = finish(rerun)
    assert rerun.returncode == 0, output
    assert f"resumed at merge {at_timeout:,}" in output, output
    assert slurm_cluster.queue() == []
    assert not checkpoint_path(store_at(home), "long", MEMBER).exists()


def test_a_job_over_its_memory_limit_fails_its_member_saying_it_ran_out_of_memory(tmp_path, slurm_cluster):
    home = faults_home(tmp_path / "home", mem="200M")
    process = cli(home, "run", "--config", str(config_file(tmp_path, SHORT)))
    output = finish(process)
    assert process.returncode == 1, output
    assert f"FAILED {MEMBER}" in output, output
    assert "it ran out of memory (its limit: --mem=200M); ask for more with slurm.mem" in output, output
    assert "exceeded memory limit" in output  # SLURM's own words, from the job's stderr
    assert slurm_cluster.queue() == []
