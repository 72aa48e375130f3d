"""`spd-cluster run` of the embedded default with `executor: slurm` against a local run, and what SLURM adds per member.

    python benchmarks/bench_slurm.py --members 6 [--postgres]

Starts a private single-node SLURM cluster (and, with --postgres, a PostgreSQL server for the
instance) as the tests do (tests/slurm/servers.py; needs root and Debian's slurm-wlm, munge,
postgresql), then runs the default experiment twice in fresh Dagster instances, one after the
other: locally (executor in_process) and on SLURM. Prints each wall time and, per member, the
merge's seconds inside the job against the step's seconds from submission to results: the
difference is SLURM's overhead (queueing, starting Python and imports on the node, loading the
activations, writing and reading back the results).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.slurm.servers import start_postgres, start_slurm  # noqa: E402


def run(home: Path, members: int) -> float:
    environment = {**os.environ, "DAGSTER_HOME": str(home)}
    environment.pop("SPD_CLUSTER_EXECUTOR", None)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "spd_assets.cli", "run", "--set", f"source.n_members={members}"],
                   env=environment, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def merge_metadata(home: Path) -> list[dict]:
    from dagster import AssetKey, AssetRecordsFilter, DagsterInstance

    with DagsterInstance.from_config(str(home)) as instance:
        records = instance.fetch_materializations(AssetRecordsFilter(asset_key=AssetKey(["default", "merge_history"])),
                                                  limit=1000).records
        return [{name: getattr(value, "value", value) for name, value in record.asset_materialization.metadata.items()}
                for record in records]


def main() -> None:
    arguments = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    arguments.add_argument("--members", type=int, default=6)
    arguments.add_argument("--postgres", action="store_true", help="the SLURM run's instance on PostgreSQL")
    args = arguments.parse_args()
    template = ROOT / "dagster_home" / "dagster.yaml"
    scratch = Path(tempfile.mkdtemp(prefix="bench-slurm-"))
    cluster = start_slurm()
    os.environ.update(cluster.env)
    server = start_postgres() if args.postgres else None
    try:
        local_home, slurm_home = scratch / "local", scratch / "slurm"
        for home in (local_home, slurm_home):
            home.mkdir()
            shutil.copy(template, home / "dagster.yaml")
        settings = {"executor": "slurm", "slurm": {"poll_interval_s": 0.5}}
        if server is not None:
            settings.update(instance="postgres", postgres_url=server.create_database("bench"))
        (slurm_home / "spd_cluster.yaml").write_text(yaml.safe_dump(settings))
        local_s = run(local_home, args.members)
        slurm_s = run(slurm_home, args.members)
        print(f"default experiment, {args.members} members: local {local_s:.1f} s, SLURM {slurm_s:.1f} s "
              f"(instance {'postgres' if server else 'sqlite'})")
        local_merges = [m["seconds"] for m in merge_metadata(local_home)]
        remote = merge_metadata(slurm_home)
        overheads = [m["slurm_seconds"] - m["seconds"] for m in remote]
        queued = [m["slurm_queued_seconds"] for m in remote]
        print(f"merge seconds per member: local median {statistics.median(local_merges):.2f}, in the SLURM job median "
              f"{statistics.median(m['seconds'] for m in remote):.2f}")
        print(f"SLURM overhead per member (submission to results, less the merge): median "
              f"{statistics.median(overheads):.2f} s, max {max(overheads):.2f} s; of it pending in the queue: median "
              f"{statistics.median(queued):.2f} s")
    finally:
        if server is not None:
            server.stop()
        cluster.stop()
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
