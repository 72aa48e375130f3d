"""A real SLURM cluster and a real PostgreSQL server for the tests of `executor: slurm` and `instance: postgres`.

Both are started once per test process and stopped after. Where their binaries are absent (a
machine without Debian's slurm-wlm, munge and postgresql), these tests skip with the reason; CI
sets SPD_CLUSTER_REQUIRE_SLURM=1, which turns that skip into a failure.
"""

from __future__ import annotations

import os

import pytest

from tests.slurm.servers import postgres_missing, slurm_missing, start_postgres, start_slurm

REQUIRE_ENV = "SPD_CLUSTER_REQUIRE_SLURM"


def _unavailable(reason: str | None) -> None:
    if reason is None:
        return
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"${REQUIRE_ENV}=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def slurm_cluster():
    _unavailable(slurm_missing())
    cluster = start_slurm()
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)  # for this process's sbatch/squeue and every child's
    try:
        yield cluster
    finally:
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous
        cluster.stop()


@pytest.fixture(scope="session")
def postgres_server():
    _unavailable(postgres_missing())
    server = start_postgres()
    try:
        yield server
    finally:
        server.stop()
