"""An experiment end to end, as a user runs it, with what each stage cost: seconds, peak memory, bytes on disk.

    python benchmarks/bench_pipeline.py --components 16000 --samples 32768 --members 6
    python benchmarks/bench_pipeline.py --components 33000 --samples 16384 --members 4 --parallel 2
    python benchmarks/bench_pipeline.py --components 3000 --samples 3072 --members 4 --iters 1000 --keep /tmp/h

The data is the synthetic source sized to about `--components` live components (24 modules; 10% dead,
dropped by the dead filter) and `--samples` tokens per member (sequences of 128 tokens), with planted
groups as the default has (one per 12 components, 3-8 members each): shaped like real causal importances
(rates spread over an order of magnitude, most components in no group). `iters` is null (merge to the end)
unless `--iters` is given.

`spd-cluster run` runs in a new process, as from a shell, in a fresh DAGSTER_HOME (or `--keep DIR`).
Meanwhile every process of the run (the command line and its workers) is sampled for its resident memory
every 0.2 s. Afterwards Dagster's event log says when each step of each run started and ended and in which
process (each run's pid tag), which gives per stage: seconds (median and max over members for member
stages) and the peak resident memory of the process while the step ran; then the peak of each process over
the whole run, the bytes on disk of each asset's files (activations apart: they are the input), and the
total wall time.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SEQ_LEN = 128
MODULES_PER_LAYER = 6
LAYERS = 4
LIVE_SHARE = 0.9  # the source's dead_fraction is 0.1
SAMPLE_INTERVAL_S = 0.2
# Short helper processes (a shell, ldconfig) are not worth a line.
SMALL_PROCESS_KIB = 50 * 1024
BRIEF_PROCESS_S = 1.0
MEMBER_STAGES = ("component_activations", "merge_history")
ENSEMBLE_STAGES = ("normalized_ensemble", "distance_matrices", "consensus_clusters", "cluster_explorer")


def experiment_yaml(name: str, components: int, samples: int, members: int, iters: int | None) -> str:
    if samples % SEQ_LEN:
        raise SystemExit(f"--samples: expected a multiple of {SEQ_LEN} (tokens per sequence), got {samples}")
    per_module = components / (LAYERS * MODULES_PER_LAYER * LIVE_SHARE)
    low, high = int(per_module * 0.95), int(per_module * 1.05) + 1
    groups = max(1, components // 12)
    return f"""name: {name}
source:
  kind: synthetic
  n_members: {members}
  batch_size: {samples // SEQ_LEN}
  params:
    seq_len: {SEQ_LEN}
    components_per_module: [{low}, {high}]
    n_planted_groups: {groups}
merge_config:
  iters: {'null' if iters is None else iters}
"""


def _status_kib(pid: int, key: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = defaultdict(list)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    parent = int(stat.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children[parent].append(int(entry))
    found, stack = [], [root]
    while stack:
        pid = stack.pop()
        found.append(pid)
        stack.extend(children.get(pid, []))
    return found


class MemorySampler(threading.Thread):
    """Samples every process of a tree: (time, pid, resident KiB), and each process's own peak (VmHWM)."""

    def __init__(self, root: int) -> None:
        super().__init__(daemon=True)
        self.root = root
        self.samples: list[tuple[float, int, int]] = []
        self.peaks: dict[int, int] = {}
        self.names: dict[int, str] = {}
        self.seen: dict[int, list[float]] = {}  # pid -> [first, last] time sampled
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            now = time.time()
            for pid in _descendants(self.root):
                resident, peak = _status_kib(pid, "VmRSS"), _status_kib(pid, "VmHWM")
                if resident is None:
                    continue
                self.samples.append((now, pid, resident))
                self.peaks[pid] = max(self.peaks.get(pid, 0), peak or resident)
                self.seen.setdefault(pid, [now, now])[1] = now
                if pid not in self.names:
                    try:
                        self.names[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:80]
                    except OSError:
                        self.names[pid] = "?"
            self.done.wait(SAMPLE_INTERVAL_S)

    def peak_between(self, pid: int, start: float, end: float) -> int | None:
        values = [kib for at, sampled, kib in self.samples if sampled == pid and start <= at <= end + SAMPLE_INTERVAL_S]
        return max(values) if values else None


def step_records(home: Path, experiment: str) -> list[dict]:
    """Each step of the experiment's runs: stage, member, start, end, pid of the process that ran it."""
    os.environ["DAGSTER_HOME"] = str(home)
    from dagster import DagsterEventType, DagsterInstance, RunsFilter

    from spd_assets.defs.dead_runs import RUN_TAG_PID

    records = []
    with DagsterInstance.get() as instance:
        for run in instance.get_runs(filters=RunsFilter(tags={"spd_cluster/experiment": experiment})):
            steps: dict[str, dict] = {}
            for entry in instance.all_logs(run.run_id):
                event = entry.dagster_event
                if event is None or not entry.step_key:
                    continue
                step = steps.setdefault(entry.step_key.split("__")[-1], {})
                if event.event_type == DagsterEventType.STEP_START:
                    step["start"] = entry.timestamp
                elif event.event_type in (DagsterEventType.STEP_SUCCESS, DagsterEventType.STEP_FAILURE):
                    step["end"] = entry.timestamp
            for stage, step in steps.items():
                if "start" in step and "end" in step:
                    records.append({"stage": stage, "member": run.tags.get("dagster/partition"), **step,
                                    "pid": int(run.tags.get(RUN_TAG_PID, 0))})
    return records


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def disk_usage(home: Path, experiment: str) -> dict[str, int]:
    """Bytes of each asset's files: values under the experiment's folder, tables' Parquet files."""
    root = home / "spd_cluster"
    sizes = {}
    experiment_dir = root / experiment
    for path in sorted(experiment_dir.iterdir()) if experiment_dir.is_dir() else []:
        sizes[path.name.split(".")[0]] = _size(path)
    for table_dir in sorted((root / "tables").iterdir()) if (root / "tables").is_dir() else []:
        files = list(table_dir.glob(f"{experiment}__*.parquet"))
        if files:
            sizes[f"table {table_dir.name}"] = sum(p.stat().st_size for p in files)
    return sizes


def _mb(kib_or_bytes: float | None, unit: str = "kib") -> str:
    if kib_or_bytes is None:
        return "-"
    megabytes = kib_or_bytes / 1024 if unit == "kib" else kib_or_bytes / 1e6
    return f"{megabytes:,.0f} MB" if megabytes >= 10 else f"{megabytes:,.1f} MB"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--components", type=int, default=3000, help="about this many live components")
    parser.add_argument("--samples", type=int, default=SEQ_LEN * 24, help="tokens per member")
    parser.add_argument("--members", type=int, default=4)
    parser.add_argument("--iters", type=int, help="merges per member (default: to the end)")
    parser.add_argument("--parallel", type=int, help="members at once (default: spd-cluster run's)")
    parser.add_argument("--keep", type=Path, help="DAGSTER_HOME to run in and keep (default: a temporary one)")
    args = parser.parse_args()

    home = args.keep or Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    home.mkdir(parents=True, exist_ok=True)
    name = f"bench_{args.components}x{args.samples}"
    config = home / f"{name}.yaml"
    config.write_text(experiment_yaml(name, args.components, args.samples, args.members, args.iters))
    command = [sys.executable, "-m", "spd_assets.cli", "run", "--config", str(config)]
    if args.parallel:
        command += ["--parallel", str(args.parallel)]
    print(f"bench_pipeline: {' '.join(command[2:])}  (DAGSTER_HOME={home})", flush=True)
    env = {**os.environ, "DAGSTER_HOME": str(home), "PYTHONPATH": str(ROOT)}
    started = time.time()
    process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler = MemorySampler(process.pid)
    sampler.start()
    output = []
    for line in process.stdout:
        output.append(line)
        if line.startswith(("  [", "done in", "activations:", "devices:")):
            print("  | " + line.rstrip(), flush=True)
    process.wait()
    wall = time.time() - started
    sampler.done.set()
    sampler.join()
    if process.returncode != 0:
        print("".join(output[-40:]))
        print(f"bench_pipeline: spd-cluster run exited with {process.returncode}")
        return 1

    records = step_records(home, name)
    print(f"\nstages ({args.members} members; seconds median / max over members; peak RSS of the process while the "
          "step ran, max over members):")
    by_stage = defaultdict(list)
    for record in records:
        by_stage[record["stage"]].append(record)
    ensemble_seconds = 0.0
    for stage in [*MEMBER_STAGES, *ENSEMBLE_STAGES, "lineage"]:
        steps = by_stage.get(stage, [])
        if not steps:
            continue
        seconds = [step["end"] - step["start"] for step in steps]
        peaks = [sampler.peak_between(step["pid"], step["start"], step["end"]) for step in steps]
        peak = max((p for p in peaks if p is not None), default=None)
        if stage in ENSEMBLE_STAGES:
            ensemble_seconds += sum(seconds)
        spread = f"{statistics.median(seconds):8.1f} / {max(seconds):8.1f} s" if len(steps) > 1 else f"{seconds[0]:8.1f} s"
        print(f"  {stage:<22} {spread:>24}   peak RSS {_mb(peak):>10}")
    print(f"  {'ensemble step':<22} {ensemble_seconds:>19.1f} s   (normalize, distances, consensus, explorer)")

    print(f"\npeak RSS of each process (VmHWM; processes under {SMALL_PROCESS_KIB // 1024} MB or living under "
          f"{BRIEF_PROCESS_S:.0f} s left out: a fork about to exec shows its parent's pages):")
    for pid, peak in sorted(sampler.peaks.items(), key=lambda item: -item[1]):
        first, last = sampler.seen[pid]
        if peak >= SMALL_PROCESS_KIB and last - first >= BRIEF_PROCESS_S:
            role = "spd-cluster run" if pid == process.pid else "worker"
            print(f"  {role:<16} pid {pid:<8} {_mb(peak):>10}   {sampler.names.get(pid, '')[:60]}")

    print("\nbytes on disk:")
    sizes = disk_usage(home, name)
    results = 0
    for asset, size in sizes.items():
        print(f"  {asset:<28} {_mb(size, 'bytes'):>12}")
        if asset != "component_activations":
            results += size
    print(f"  {'results (all but activations)':<28} {_mb(results, 'bytes'):>12}")
    print(f"\nwall time {wall:,.1f} s (spd-cluster run, start to exit)")
    if args.keep is None:
        shutil.rmtree(home, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
