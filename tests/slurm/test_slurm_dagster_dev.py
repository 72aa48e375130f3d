"""Through a real `dagster dev` (webserver and daemon) with `executor: slurm` and `instance: postgres`: a backfill
launched as the UI launches it (GraphQL) runs every member's merge as a SLURM job, and Terminate of a run cancels
its job."""

from __future__ import annotations

import os

from dagster import DagsterRunStatus

from spd_assets.defs.slurm import SLURM_JOB_TAG
from tests.dagster_dev import LAUNCH, dagster_dev, graphql, wait_for
from tests.pipeline_helpers import instance_at
from tests.slurm.test_slurm_executor import cli, finish, merging_jobs, slow_config, slurm_home

BACKFILL = """mutation($params: LaunchBackfillParams!) { launchPartitionBackfill(backfillParams: $params) {
  __typename ... on LaunchBackfillSuccess { backfillId } ... on PythonError { message } } }"""
TERMINATE = """mutation($runId: String!) { terminateRun(runId: $runId) {
  __typename ... on TerminateRunFailure { message } ... on PythonError { message } } }"""
MEMBER_ASSETS = ["component_activations", "component_stats", "merge_history", "merge_events", "membership_spans"]


def test_a_ui_backfill_runs_on_slurm_and_terminate_cancels_the_job(tmp_path, slurm_cluster, postgres_server):
    home = slurm_home(tmp_path / "home", postgres_server.create_database("dagster_dev_on_slurm"))
    config = slow_config(tmp_path)
    # The command line registers the experiment (so the code location defines it) with its first member.
    first = cli(home, "run", "--config", str(config), "--members", "member_000")
    output = finish(first)
    assert first.returncode == 0, output

    environment = {**os.environ, "DAGSTER_HOME": str(home)}
    with dagster_dev(environment, tmp_path / "dagster_dev.log") as served:
        params = {"assetSelection": [{"path": ["slow", asset]} for asset in MEMBER_ASSETS],
                  "partitionNames": ["member_001", "member_002"]}
        launched = graphql(served.port, BACKFILL, {"params": params})["launchPartitionBackfill"]
        assert launched["__typename"] == "LaunchBackfillSuccess", launched
        backfill_id = launched["backfillId"]
        log = tmp_path / "dagster_dev.log"
        with instance_at(home) as instance:
            def backfill_runs():
                runs = [run for run in instance.get_runs() if run.tags.get("dagster/backfill") == backfill_id]
                return runs if len(runs) == 2 and all(run.is_finished for run in runs) else None

            runs = wait_for(backfill_runs, 600, "the backfill's two runs to finish")
            assert all(run.status == DagsterRunStatus.SUCCESS for run in runs), log.read_text()[-3000:]
            assert len({run.tags[SLURM_JOB_TAG] for run in runs}) == 2, "one SLURM job per member"

        run_params = {"selector": {"repositoryLocationName": served.location, "repositoryName": served.repository,
                                   "jobName": "slow__members"},
                      "runConfigData": {},
                      "executionMetadata": {"tags": [{"key": "dagster/partition", "value": "member_000"}]}}
        launched = graphql(served.port, LAUNCH, {"params": run_params})["launchRun"]
        assert launched["__typename"] == "LaunchRunSuccess", launched
        run_id = launched["run"]["runId"]
        (job,) = wait_for(lambda: merging_jobs(home, slurm_cluster), 600, "the launched run's job to start merging")
        terminated = graphql(served.port, TERMINATE, {"runId": run_id})["terminateRun"]
        assert terminated["__typename"] == "TerminateRunSuccess", terminated
        with instance_at(home) as instance:
            final = wait_for(lambda: (run := instance.get_run_by_id(run_id)).is_finished and run, 120,
                             "the terminated run to finish")
            assert final.status == DagsterRunStatus.CANCELED, log.read_text()[-3000:]
            assert final.tags[SLURM_JOB_TAG] == job
        wait_for(lambda: slurm_cluster.queue() == [], 60, f"job {job} to leave the queue")
