"""Wall time of materializing a multi-member experiment with 1 versus N device slots, side by side.

    python benchmarks/bench_backfill.py --members 4 --slots 1 2 --repeats 3

Each measurement is a fresh Dagster instance (temporary DAGSTER_HOME) whose pool limit and CPU
device slots are set to the slot count, then `spd-cluster run` with `--parallel` = slots: the
same runs, pools and device leases as a backfill. Prints the median wall time per slot count,
the median merge seconds per member (from the materialization metadata) and the speed-up.
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


def experiment(members: int, components: tuple[int, int], batch_size: int, iters: int) -> dict:
    return {
        "name": "backfill_bench",
        "source": {"kind": "synthetic", "n_members": members, "batch_size": batch_size,
                   "params": {"components_per_module": list(components), "n_planted_groups": 80}},
        "merge_config": {"iters": iters},
    }


def measure(slots: int, config: dict) -> tuple[float, float, list[float]]:
    home = Path(tempfile.mkdtemp(prefix=f"bench_backfill_{slots}_"))
    try:
        settings = yaml.safe_load((ROOT / "dagster_home" / "dagster.yaml").read_text())
        settings["concurrency"]["pools"]["default_limit"] = slots
        (home / "dagster.yaml").write_text(yaml.safe_dump(settings))
        config_path = home / "experiment.yaml"
        config_path.write_text(yaml.safe_dump(config))
        environment = {**os.environ, "DAGSTER_HOME": str(home),
                       "SPD_CLUSTER_DEVICES": ",".join(f"cpu:{i}" for i in range(slots))}
        started = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "spd_assets.cli", "run", "--config", str(config_path),
                                 "--parallel", str(slots)], env=environment, capture_output=True, text=True)
        wall = time.perf_counter() - started
        if result.returncode != 0:
            sys.exit(f"run with {slots} slot(s) failed:\n{result.stdout}\n{result.stderr}")
        return (wall, *member_phase(home))
    finally:
        shutil.rmtree(home, ignore_errors=True)


def member_phase(home: Path) -> tuple[float, list[float]]:
    """Seconds from the first member run's start to the last one's end, and each merge's seconds."""
    os.environ["DAGSTER_HOME"] = str(home)
    from dagster import AssetKey, DagsterInstance, RunsFilter

    with DagsterInstance.get() as instance:
        runs = instance.get_run_records(filters=RunsFilter(job_name="backfill_bench__members"))
        phase = max(r.end_time for r in runs) - min(r.start_time for r in runs)
        records = instance.fetch_materializations(AssetKey(["backfill_bench", "merge_history"]), limit=1000).records
        return phase, [record.asset_materialization.metadata["seconds"].value for record in records]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", type=int, default=4)
    parser.add_argument("--slots", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--components", type=int, nargs=2, default=[60, 80], help="components per module (range)")
    parser.add_argument("--batch-size", type=int, default=48)
    parser.add_argument("--iters", type=int, default=1000)
    args = parser.parse_args()
    config = experiment(args.members, tuple(args.components), args.batch_size, args.iters)
    walls: dict[int, list[float]] = {slots: [] for slots in args.slots}
    phases: dict[int, list[float]] = {slots: [] for slots in args.slots}
    merges: dict[int, list[float]] = {slots: [] for slots in args.slots}
    for repeat in range(args.repeats):
        for slots in args.slots:  # interleaved, so drifting machine load affects every slot count alike
            wall, phase, seconds = measure(slots, config)
            walls[slots].append(wall)
            phases[slots].append(phase)
            merges[slots].extend(seconds)
            print(f"  repeat {repeat + 1}: {slots} slot(s): {wall:6.1f} s (member runs {phase:.1f} s)", flush=True)
    wall_base, phase_base = statistics.median(walls[args.slots[0]]), statistics.median(phases[args.slots[0]])
    print(f"\n{args.members} members, {os.cpu_count()} cores; medians of {args.repeats}. wall: all of `spd-cluster run`; "
          "member runs: first member run start to last member run end")
    print(f"{'slots':>5}  {'wall s':>8}  {'speed-up':>8}  {'member runs s':>13}  {'speed-up':>8}  {'merge s/member':>14}")
    for slots in args.slots:
        wall, phase = statistics.median(walls[slots]), statistics.median(phases[slots])
        print(f"{slots:>5}  {wall:8.1f}  {wall_base / wall:7.2f}x  {phase:13.1f}  {phase_base / phase:7.2f}x  "
              f"{statistics.median(merges[slots]):14.2f}")


if __name__ == "__main__":
    main()
