"""Identical re-runs, a member re-run, the README's lineage query, check summaries, and `spd-cluster doctor`
finding and repairing what a killed step or a deleted file leaves behind; all against real `spd-cluster run`s."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest
import yaml
from dagster import AssetKey, AssetRecordsFilter

from spd_assets.config import load_config
from spd_assets.defs.dead_runs import RUN_TAG_HOST, RUN_TAG_PID
from tests.cli.test_results_queries import cli, query, readme_queries
from tests.pipeline_helpers import SMALL_SYNTHETIC, asset_path, definitions_for, instance_at, make_home, store_at

NAME = "reruns"
MEMBERS = ["member_000", "member_001", "member_002"]
RERUN = "member_001"


def write_config(path: Path, **source) -> Path:
    path.write_text(yaml.safe_dump({"name": NAME, "source": {**SMALL_SYNTHETIC, **source}, "merge_config": {"iters": 20}}))
    return path


@pytest.fixture(scope="module")
def reruns(tmp_path_factory) -> dict:
    """Two identical runs, then a re-run of one member (with the ensemble after it)."""
    root = tmp_path_factory.mktemp("reruns")
    home = make_home(root / "home")
    config = write_config(root / "reruns.yaml")
    outputs = [cli(home, "run", "--config", str(config)).stdout for _ in range(2)]
    outputs.append(cli(home, "run", "--config", str(config), "--members", RERUN).stdout)
    return {"home": home, "config": config, "outputs": outputs}


def latest_run(instance, asset: str, partition: str | None) -> str:
    records_filter = AssetRecordsFilter(asset_key=AssetKey([NAME, asset]),
                                        asset_partitions=[partition] if partition else None)
    return instance.fetch_materializations(records_filter, limit=1).records[0].run_id


def test_readme_lineage_query_names_each_member_once_with_the_run_it_came_from(reruns):
    home = reruns["home"]
    answer = query(home, readme_queries()[1].replace("'default'", f"'{NAME}'"))
    assert answer["member"].to_list() == MEMBERS, "one row per member, whatever the number of identical re-runs"
    with instance_at(home) as instance:
        expected = {member: latest_run(instance, "merge_history", member) for member in MEMBERS}
        ensemble_runs = {r.run_id for r in instance.fetch_materializations(AssetKey([NAME, "normalized_ensemble"]),
                                                                           limit=10).records}
    assert dict(zip(answer["member"], answer["run_id"])) == expected
    # The re-run member came from the third invocation, the others from the second: identical content,
    # told apart by run.
    assert expected[RERUN] != expected["member_000"]
    assert len(ensemble_runs) == 3
    versions = query(home, f"SELECT DISTINCT data_version FROM materializations WHERE experiment = '{NAME}' "
                           "AND asset = 'normalized_ensemble'")
    assert versions.height == 1, "the three ensembles are identical, so data versions alone cannot tell them apart"


def test_each_run_prints_a_check_summary_per_asset(reruns):
    full, _, rerun = reruns["outputs"]
    summary = full.split("checks:\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert [line.split()[0] for line in summary[:4]] == ["merge_history", "normalized_ensemble", "distance_matrices",
                                                         "consensus_clusters"]
    assert any(line.startswith("consensus: ") and " clusters of " in line for line in summary[4:]), summary
    assert "partition_sizes 3/3 passed" in summary[0]
    assert "symmetric_with_zero_diagonal 1/1 passed" in summary[2]
    assert "partition_sizes 1/1 passed" in rerun.split("checks:\n", 1)[1]
    # A UI started before the first run has not loaded the new experiment: the first run says how to see it.
    assert f"a UI started before this run shows '{NAME}' once you click \"Reload definitions\"" in full
    assert "Reload definitions" not in rerun


def test_a_failed_check_says_its_members_and_its_reason_and_nothing_stray():
    from spd_assets.cli.run import check_summary
    from spd_assets.service.runs import CheckOutcome

    lines = check_summary([
        CheckOutcome("merge_history", "partition_sizes", "member_000", True, "ERROR", None),
        CheckOutcome("merge_history", "partition_sizes", "member_001", False, "ERROR", "group sizes do not sum to c"),
        CheckOutcome("normalized_ensemble", "all_members_present", None, False, "WARN", None),
        CheckOutcome("consensus_clusters", "mdl_minimum_inside_the_merge", None, False, "WARN", "the MDL loss is lowest"),
    ])
    assert lines == [
        "  merge_history          partition_sizes 1/2 passed (FAILED: member_001: group sizes do not sum to c)",
        "  normalized_ensemble    all_members_present 0/1 passed (warning: no reason given)",
        "  consensus_clusters     mdl_minimum_inside_the_merge 0/1 passed (warning: the MDL loss is lowest)",
    ]


@pytest.mark.slow  # doctor after kills: also every cycle of tests/faults/test_kill_cycles.py
def test_doctor_repairs_what_killed_steps_and_deleted_files_leave_and_says_what_to_recompute(reruns):
    """Three kinds of damage at once: a value file overwritten by a step killed before Dagster recorded it
    (content no materialization has), a deleted table file, and stale lineage tables."""
    home, store = reruns["home"], store_at(reruns["home"])
    history = asset_path(NAME, "merge_history", "member_002", home)
    shutil.copy(asset_path(NAME, "merge_history", "member_000", home), history)  # another member's content
    table_file = store.table_file("merge_events", NAME, "member_000")
    table_file.unlink()
    store.table_file("lineage_edges", NAME).unlink()

    answer = cli(home, "sql", f"SELECT count(DISTINCT member) AS n FROM merge_events WHERE experiment = '{NAME}'",
                 "--format", "csv")
    assert answer.stdout.splitlines()[1] == "2", "the rows of the deleted file are gone"
    assert "warning: 1 result file(s) that Dagster recorded are missing" in answer.stderr
    assert str(table_file) in answer.stderr and "spd-cluster doctor" in answer.stderr

    dry = cli(home, "doctor", "--dry-run", check=False)
    assert dry.returncode == 1 and "would remove it" in dry.stdout and "would rebuild them" in dry.stdout
    assert history.exists()
    report = cli(home, "doctor", check=False)
    assert report.returncode == 1, "two members still need recomputing"
    assert f"{NAME}/merge_history[member_002]: {history} holds data version" in report.stdout
    assert f"{NAME}/merge_events[member_000]: materialized by run" in report.stdout
    assert f"but its file {table_file} is missing" in report.stdout
    assert "the lineage tables disagree with Dagster's event log" in report.stdout
    assert "rebuilt them from the event log" in report.stdout
    assert not history.exists()
    answer = query(home, readme_queries()[1].replace("'default'", f"'{NAME}'"))
    assert answer["member"].to_list() == MEMBERS, "the rebuilt lineage answers the README's query"

    (command,) = [line.removeprefix("recompute: ") for line in report.stdout.splitlines() if line.startswith("recompute:")]
    assert command.endswith("--members member_000,member_002")
    cli(home, *command.split()[1:])
    assert table_file.exists() and history.exists()
    assert "warning" not in cli(home, "sql", "SELECT count(*) FROM merge_events", "--format", "csv").stderr
    assert "doctor: no problems found" in cli(home, "doctor").stdout


def test_doctor_leaves_result_files_alone_while_runs_are_in_flight(reruns):
    """A live step may have written a file that Dagster has not recorded yet; the doctor must not judge it."""
    home = reruns["home"]
    history = asset_path(NAME, "merge_history", "member_002", home)
    recorded = history.read_bytes()
    shutil.copy(asset_path(NAME, "merge_history", "member_000", home), history)  # as a live step would have it
    config = load_config(reruns["config"])
    job = definitions_for(config).resolve_job_def(f"{NAME}__members")
    with instance_at(home) as instance:  # a run in flight, executed by this (live) process
        live = instance.create_run_for_job(job_def=job, tags={RUN_TAG_HOST: socket.gethostname(),
                                                               RUN_TAG_PID: str(os.getpid())})
        try:
            report = cli(home, "doctor", check=False)
            assert "1 run(s) in flight" in report.stdout and "run doctor again then" in report.stdout
            assert history.exists(), "a file a live run may have written was removed"
        finally:
            instance.delete_run(live.run_id)
    assert "holds data version" in cli(home, "doctor", "--dry-run", check=False).stdout, "judged once none is in flight"
    history.write_bytes(recorded)
