"""A real `dagster dev` (webserver and daemon) for tests: started on a free port, its GraphQL API, stopped after."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
READY_TIMEOUT_S = 300
LAUNCH = """mutation($params: ExecutionParams!) { launchRun(executionParams: $params) {
  __typename ... on LaunchRunSuccess { run { runId } } ... on PythonError { message } } }"""
REPOSITORIES = "{ repositoriesOrError { ... on RepositoryConnection { nodes { name location { name } } } } }"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def graphql(port: int, query: str, variables: dict | None = None) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/graphql", headers={"Content-Type": "application/json"},
                                     data=json.dumps({"query": query, "variables": variables or {}}).encode())
    with urllib.request.urlopen(request, timeout=60) as response:
        answer = json.loads(response.read())
    assert not answer.get("errors"), answer["errors"]
    return answer["data"]


def wait_for(condition, timeout_s: float, what: str, poll_s: float = 1.0):
    """`condition()`'s first true value, asked every `poll_s` seconds; an AssertionError after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


@dataclass(frozen=True)
class DagsterDev:
    """A served code location: the port, and the location and repository names a launch names."""

    port: int
    location: str
    repository: str


@contextmanager
def dagster_dev(environment: dict[str, str], log_path: Path) -> Iterator[DagsterDev]:
    """`dagster dev` on this project's workspace, once it serves the code location; stopped (its whole process
    group) on leaving, whatever happened."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "dagster", "dev", "-w", str(ROOT / "workspace.yaml"),
                               "-p", str(port)], cwd=ROOT, env=environment, start_new_session=True,
                              stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
    try:
        def repository():
            try:
                nodes = graphql(port, REPOSITORIES)["repositoriesOrError"]["nodes"]
            except OSError:
                return None
            return nodes[0] if nodes else None

        found = wait_for(repository, READY_TIMEOUT_S, "dagster dev to serve the code location")
        yield DagsterDev(port, found["location"]["name"], found["name"])
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
