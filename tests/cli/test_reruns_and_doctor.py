"""Identical re-runs, a member re-run, the README's lineage query, check summaries, and `spd-cluster doctor`
finding and repairing what a killed step or a deleted file leaves behind; all against real `spd-cluster run`s."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from dagster import AssetKey, AssetRecordsFilter

from tests.cli.test_results_queries import cli, query, readme_queries
from tests.pipeline_helpers import SMALL_SYNTHETIC, asset_path, instance_at, make_home, store_at

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
    assert [line.split()[0] for line in summary] == ["merge_history", "normalized_ensemble", "distance_matrices"]
    assert "partition_sizes 3/3 passed" in summary[0]
    assert "symmetric_with_zero_diagonal 1/1 passed" in summary[2]
    assert "partition_sizes 1/1 passed" in rerun.split("checks:\n", 1)[1]


def test_doctor_finds_nothing_wrong_after_normal_runs(reruns):
    result = cli(reruns["home"], "doctor")
    assert "doctor: no problems found" in result.stdout, result.stdout


def test_a_file_written_but_never_recorded_is_found_and_removed(reruns):
    """What a step killed between writing its value and Dagster recording it leaves: content that no
    materialization has. The doctor removes it and says what to recompute."""
    home = reruns["home"]
    history = asset_path(NAME, "merge_history", "member_002", home)
    shutil.copy(asset_path(NAME, "merge_history", "member_000", home), history)  # another member's content
    dry = cli(home, "doctor", "--dry-run", check=False)
    assert dry.returncode == 1 and "would remove it" in dry.stdout and history.exists()
    repaired = cli(home, "doctor", check=False)
    assert repaired.returncode == 1, "the member still needs recomputing"
    assert f"reruns/merge_history[member_002]: {history} holds data version" in repaired.stdout
    assert "--members member_002" in repaired.stdout
    assert not history.exists()
    cli(home, "run", "--config", str(reruns["config"]), "--members", "member_002")
    assert "no problems found" in cli(home, "doctor").stdout


def test_a_deleted_table_file_is_reported_by_sql_and_doctor(reruns):
    home = reruns["home"]
    table_file = store_at(home).table_file("merge_events", NAME, "member_000")
    table_file.unlink()
    answer = cli(home, "sql", f"SELECT count(DISTINCT member) AS n FROM merge_events WHERE experiment = '{NAME}'",
                 "--format", "csv")
    assert answer.stdout.splitlines()[1] == "2", "the rows of the deleted file are gone"
    assert "warning: 1 result file(s) that Dagster recorded are missing" in answer.stderr
    assert str(table_file) in answer.stderr and "spd-cluster doctor" in answer.stderr
    report = cli(home, "doctor", check=False)
    assert report.returncode == 1
    assert "reruns/merge_events[member_000]: materialized by run" in report.stdout
    assert f"but its file {table_file} is missing" in report.stdout
    cli(home, "run", "--config", str(reruns["config"]), "--members", "member_000")
    assert table_file.exists()
    again = cli(home, "sql", "SELECT count(*) FROM merge_events", "--format", "csv")
    assert "warning" not in again.stderr


def test_stale_lineage_tables_are_rebuilt_from_the_event_log(reruns):
    home = reruns["home"]
    edges = store_at(home).table_file("lineage_edges", NAME)
    edges.unlink()
    before = query(home, f"SELECT count(*) AS n FROM lineage_edges WHERE experiment = '{NAME}'")["n"][0]
    assert before == 0
    report = cli(home, "doctor")
    assert "the lineage tables disagree with Dagster's event log" in report.stdout
    assert "rebuilt them from the event log" in report.stdout
    answer = query(home, readme_queries()[1].replace("'default'", f"'{NAME}'"))
    assert answer["member"].to_list() == MEMBERS
    assert "no problems found" in cli(home, "doctor").stdout
