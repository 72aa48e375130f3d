"""The Dagster instance's PostgreSQL server restarted (`pg_ctl restart`) while members merge: the runs go on, no
materialization is lost or recorded twice, and `doctor` finds nothing. With the server down, a run stops at once
saying where the server is and what to do, having changed nothing."""

from __future__ import annotations

import subprocess
from collections import Counter
from pathlib import Path

import yaml
from dagster import AssetKey

from spd_assets.storage.checkpoints import checkpoint_path, read_checkpoint
from tests.pipeline_helpers import cli_process, instance_at, make_home, merging_experiment, store_at
from tests.slurm.test_slurm_executor import wait_for

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 600
MEMBERS = ["member_000", "member_001"]
# Two members merging for several seconds each, side by side.
CONFIG = merging_experiment("pg", iters=400, n_members=2)


def cli(home: Path, *args: str) -> subprocess.Popen:
    return cli_process(home, *args, devices="cpu:0,cpu:1")


def merging(home: Path, process: subprocess.Popen) -> bool:
    assert process.poll() is None, f"the run ended before its members merged:\n{process.stdout.read()}"
    for member in MEMBERS:
        try:
            read_checkpoint(checkpoint_path(store_at(home), "pg", member))
        except (OSError, ValueError, KeyError):
            return False
    return True


def materializations_once_each(home: Path) -> None:
    """Every member's activations and history recorded once per run that made them, and none missing."""
    with instance_at(home) as instance:
        for asset in ("merge_history", "component_activations"):
            records = instance.fetch_materializations(AssetKey(["pg", asset]), limit=1000).records
            by_run_and_member = Counter((record.run_id, record.partition_key) for record in records)
            assert all(count == 1 for count in by_run_and_member.values()), by_run_and_member
            assert {member for _, member in by_run_and_member} == set(MEMBERS)


def test_a_postgres_restart_mid_run_loses_and_duplicates_nothing_and_an_outage_is_said_plainly(tmp_path, postgres_server):
    home = make_home(tmp_path / "home")
    url = postgres_server.create_database("restart_mid_run")
    (home / "spd_cluster.yaml").write_text(yaml.safe_dump({"instance": "postgres", "postgres_url": url,
                                                           "checkpoint_interval_s": 0.5}))
    config = tmp_path / "pg.yaml"
    config.write_text(yaml.safe_dump(CONFIG))

    # A restart (fast shutdown, back within a second): Dagster's connection retries carry the runs through.
    run = cli(home, "run", "--config", str(config))
    wait_for(lambda: merging(home, run), TIMEOUT_S, "two members to merge")
    postgres_server.restart()
    output, _ = run.communicate(timeout=TIMEOUT_S)
    assert run.returncode == 0 and "2/2 members" in output, output
    materializations_once_each(home)

    # Down when a run starts: it stops at once, saying where the server is and what to do.
    postgres_server.pg_ctl("-m", "fast", "-w", "stop")
    try:
        refused = cli(home, "run", "--config", str(config))
        output, _ = refused.communicate(timeout=TIMEOUT_S)
    finally:
        postgres_server.pg_ctl("-w", "start")
    assert refused.returncode != 0 and "Traceback" not in output and "Retrying" not in output, output
    assert f"the Dagster instance's PostgreSQL server at 127.0.0.1:{postgres_server.port} did not answer" in output
    assert "run again: members stopped mid-merge resume from their checkpoints" in output, output

    doctor = cli(home, "doctor")
    report, _ = doctor.communicate(timeout=TIMEOUT_S)
    assert doctor.returncode == 0 and "doctor: no problems found" in report, report
