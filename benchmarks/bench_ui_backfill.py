"""The UI's "Materialize all" (an asset backfill through `dagster dev`) beside `spd-cluster run`, with where the time goes.

    python benchmarks/bench_ui_backfill.py                 # the embedded default
    python benchmarks/bench_ui_backfill.py --repeats 2 --skip-cli

Each measurement starts from a fresh Dagster instance (temporary DAGSTER_HOME with the project's
dagster.yaml). The CLI side times `spd-cluster run`. The UI side starts `dagster dev` (webserver
and daemon, as a user does), asks its GraphQL API for a backfill of every asset of the experiment
over all partitions (what "Materialize all" launches), and times it from the request until the
backfill completes. It then prints a breakdown from the instance's run records and event logs:
waiting for the backfill daemon, run queue and launch, per-step process start, and compute.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DONE = {"COMPLETED", "COMPLETED_SUCCESS", "COMPLETED_FAILED", "FAILED", "CANCELED"}
READY_TIMEOUT_S = 300
BACKFILL_TIMEOUT_S = 900


def fresh_home() -> Path:
    home = Path(tempfile.mkdtemp(prefix="bench_ui_"))
    shutil.copy(ROOT / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
    return home


def time_cli(experiment_args: list[str]) -> float:
    home = fresh_home()
    try:
        started = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "spd_assets.cli", "run", *experiment_args],
                                env={**os.environ, "DAGSTER_HOME": str(home)}, capture_output=True, text=True)
        wall = time.perf_counter() - started
        if result.returncode != 0:
            sys.exit(f"spd-cluster run failed:\n{result.stdout}\n{result.stderr}")
        return wall
    finally:
        shutil.rmtree(home, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def graphql(port: int, query: str, variables: dict | None = None) -> dict:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql", data=json.dumps({"query": query, "variables": variables or {}}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        answer = json.loads(response.read())
    if answer.get("errors"):
        raise RuntimeError(f"GraphQL errors: {answer['errors']}")
    return answer["data"]


ASSET_NODES = "{ assetNodes { assetKey { path } groupName } }"
LAUNCH = """mutation($params: LaunchBackfillParams!) { launchPartitionBackfill(backfillParams: $params) {
  __typename ... on LaunchBackfillSuccess { backfillId } ... on PythonError { message } } }"""
STATUS = """query($id: String!) { partitionBackfillOrError(backfillId: $id) {
  __typename ... on PartitionBackfill { status } } }"""


def wait_for_code_location(port: int, experiment: str, process: subprocess.Popen) -> list[list[str]]:
    """The experiment's asset keys, once `dagster dev` serves them."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit("dagster dev exited before it served the code location")
        try:
            nodes = graphql(port, ASSET_NODES)["assetNodes"]
            keys = [node["assetKey"]["path"] for node in nodes if node["groupName"] == experiment]
            if keys:
                return keys
        except (OSError, RuntimeError):
            pass
        time.sleep(1.0)
    sys.exit(f"dagster dev did not serve experiment {experiment!r} within {READY_TIMEOUT_S} s")


def time_ui_backfill(experiment: str) -> tuple[float, Path, str, subprocess.Popen, float]:
    """Seconds from the backfill request to its completion; the home, backfill id, the running `dagster dev` and
    when the backfill was requested."""
    home = fresh_home()
    port = free_port()
    log = open(home / "dagster_dev.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "dagster", "dev", "-w", str(ROOT / "workspace.yaml"), "-p", str(port)],
        cwd=ROOT, env={**os.environ, "DAGSTER_HOME": str(home)}, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    keys = wait_for_code_location(port, experiment, process)
    time.sleep(5.0)  # let the daemon's threads come up, as they have by the time a user clicks
    params = {"assetSelection": [{"path": key} for key in keys], "allPartitions": True}
    requested = time.time()
    launched = graphql(port, LAUNCH, {"params": params})["launchPartitionBackfill"]
    if launched["__typename"] != "LaunchBackfillSuccess":
        sys.exit(f"backfill not launched: {launched}")
    backfill_id = launched["backfillId"]
    status = None
    while time.time() - requested < BACKFILL_TIMEOUT_S:
        status = graphql(port, STATUS, {"id": backfill_id})["partitionBackfillOrError"]["status"]
        if status in DONE:
            break
        time.sleep(0.5)
    wall = time.time() - requested
    if status not in ("COMPLETED", "COMPLETED_SUCCESS"):
        print(f"  backfill ended as {status}; see {home / 'dagster_dev.log'}")
    return wall, home, backfill_id, process, requested


def stop(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def breakdown(home: Path, backfill_id: str, requested: float) -> float:
    """Where the backfill's time went, from the runs' records and event logs (seconds after the request); returns
    when the last run ended (every result materialized; the daemon marks the backfill complete at its next
    iteration)."""
    os.environ["DAGSTER_HOME"] = str(home)
    from dagster import DagsterEventType, DagsterInstance, RunsFilter

    with DagsterInstance.get() as instance:
        records = instance.get_run_records(filters=RunsFilter(tags={"dagster/backfill": backfill_id}))
        ready = max((r.end_time or requested) for r in records) - requested
        print(f"  {'run':<10} {'partition':<11} {'created':>7} {'started':>7} {'ended':>7}   steps (start->end s, of which compute s)")
        for record in sorted(records, key=lambda r: r.create_timestamp.timestamp()):
            run = record.dagster_run
            steps = {}
            for entry in instance.all_logs(run.run_id):
                event = entry.dagster_event
                if event is None or not entry.step_key:
                    continue
                step = steps.setdefault(entry.step_key.split("__")[-1], {})
                if event.event_type == DagsterEventType.STEP_WORKER_STARTING:
                    step["worker"] = entry.timestamp
                elif event.event_type == DagsterEventType.STEP_START:
                    step["start"] = entry.timestamp
                elif event.event_type in (DagsterEventType.STEP_SUCCESS, DagsterEventType.STEP_FAILURE):
                    step["end"] = entry.timestamp
            parts = []
            for name, step in steps.items():
                began = step.get("worker", step.get("start"))
                if began and step.get("end"):
                    compute = step["end"] - step.get("start", began)
                    parts.append(f"{name} {began - requested:.0f}->{step['end'] - requested:.0f} ({compute:.1f})")
            print(f"  {run.run_id[:8]:<10} {run.tags.get('dagster/partition', '-'):<11} "
                  f"{record.create_timestamp.timestamp() - requested:7.1f} "
                  f"{(record.start_time or requested) - requested:7.1f} {(record.end_time or requested) - requested:7.1f}   "
                  + "; ".join(parts))
    return ready


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="default", help="a registered experiment (default: the embedded default)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--skip-cli", action="store_true", help="only the UI backfill")
    args = parser.parse_args()
    cli_walls, ui_walls, ready_walls = [], [], []
    for repeat in range(args.repeats):  # interleaved, so drifting machine load affects both alike
        if not args.skip_cli:
            cli_walls.append(time_cli([]))
            print(f"repeat {repeat + 1}: spd-cluster run {cli_walls[-1]:.1f} s", flush=True)
        wall, home, backfill_id, process, requested = time_ui_backfill(args.experiment)
        try:
            ui_walls.append(wall)
            print(f"repeat {repeat + 1}: UI backfill   {wall:.1f} s (request to completion)", flush=True)
            ready_walls.append(breakdown(home, backfill_id, requested))
            print(f"repeat {repeat + 1}: results ready {ready_walls[-1]:.1f} s after the request (last run ended)")
        finally:
            stop(process)
            shutil.rmtree(home, ignore_errors=True)
    print(f"\n{os.cpu_count()} cores; medians of {args.repeats}")
    if cli_walls:
        print(f"spd-cluster run   {statistics.median(cli_walls):7.1f} s")
    print(f"UI backfill       {statistics.median(ui_walls):7.1f} s   results ready {statistics.median(ready_walls):7.1f} s")
    if cli_walls:
        cli = statistics.median(cli_walls)
        print(f"ratio             {statistics.median(ui_walls) / cli:7.2f}x   results ready {statistics.median(ready_walls) / cli:7.2f}x")


if __name__ == "__main__":
    main()
