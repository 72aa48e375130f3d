"""Seconds and peak memory of one `spd-cluster sql` / `spd-cluster clusters` call, as a user runs them.

    python benchmarks/bench_queries.py                         # this checkout, on a fresh run of the default
    python benchmarks/bench_queries.py --code /path/to/other   # another checkout's code (e.g. an older version)
    python benchmarks/bench_queries.py --home /tmp/h           # an instance that already has the default's results

Each command is a new process (`python -m spd_assets.cli ...`, `PYTHONPATH=--code` first), as from a
shell; the figures are the median and least wall time over `--repeats` calls, the median CPU time
(user + system, which depends little on what else the machine runs) and the largest peak resident
memory of any call. A command a version does not support is reported as failed. Without `--home`,
the default is materialized first with `spd-cluster run` into a temporary DAGSTER_HOME by the same code.
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

ROOT = Path(__file__).resolve().parent.parent

COMMANDS = {
    "sql": ["sql", "SELECT member, min(mdl_loss) AS best_mdl, arg_min(k_groups, mdl_loss) AS k_at_best "
                   "FROM merge_events WHERE experiment = 'default' GROUP BY member ORDER BY member"],
    "clusters --member": ["clusters", "--member", "member_000", "--iteration", "300"],
    "clusters --consensus (stored)": ["clusters", "--consensus"],
    "clusters --consensus --iteration 300": ["clusters", "--consensus", "--iteration", "300"],
}


# What no query can go below: starting Python, and starting it and importing DuckDB.
FLOORS = {
    "(floor) python": ["-c", "pass"],
    "(floor) python + import duckdb": ["-c", "import duckdb"],
}


def environment(home: Path, code: Path) -> dict[str, str]:
    return {**os.environ, "DAGSTER_HOME": str(home), "PYTHONPATH": str(code)}


def call(arguments: list[str], env: dict[str, str]) -> tuple[float, float, float, int]:
    """Wall seconds, CPU seconds (user + system), peak resident MiB and exit code of one command-line call
    (`arguments` after `python`: `-m spd_assets.cli ...` or a floor's)."""
    started = time.perf_counter()
    # `python -m` puts the working directory first on the path: run in the checkout being measured.
    process = subprocess.Popen([sys.executable, *arguments], env=env, cwd=env["PYTHONPATH"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, process.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--code", type=Path, default=ROOT, help="checkout whose spd_assets is measured")
    parser.add_argument("--home", type=Path, help="DAGSTER_HOME with the default's results (default: a fresh run)")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    code = args.code.resolve()
    home = args.home
    made = home is None
    if made:
        home = Path(tempfile.mkdtemp(prefix="bench_queries_"))
        shutil.copy(ROOT / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
        print(f"materializing the default with {code} into {home} ...", flush=True)
        run = subprocess.run([sys.executable, "-m", "spd_assets.cli", "run"], env=environment(home, code), cwd=code,
                             capture_output=True, text=True)
        if run.returncode != 0:
            sys.exit(f"spd-cluster run failed:\n{run.stdout}\n{run.stderr}")
    try:
        env = environment(home.resolve(), code)
        call(["-m", "spd_assets.cli", *COMMANDS["sql"]], env)  # the first call may create the views; not what a user waits for each time
        print(f"code {code}, {args.repeats} calls each, load average {os.getloadavg()[0]:.1f}")
        # CPU seconds hardly depend on what else the machine runs; wall seconds do.
        print(f"{'command':<40} {'median s':>9} {'min s':>7} {'median cpu s':>13} {'peak MiB':>9}")
        measured = {**FLOORS, **{name: ["-m", "spd_assets.cli", *arguments] for name, arguments in COMMANDS.items()}}
        for name, arguments in measured.items():
            results = [call(arguments, env) for _ in range(args.repeats)]
            failed = [code_ for *_, code_ in results if code_ != 0]
            if failed:
                print(f"{name:<40} failed (exit {failed[0]})")
                continue
            walls = [wall for wall, *_ in results]
            print(f"{name:<40} {statistics.median(walls):>9.3f} {min(walls):>7.3f} "
                  f"{statistics.median(cpu for _, cpu, _, _ in results):>13.3f} "
                  f"{max(peak for _, _, peak, _ in results):>9.0f}")
    finally:
        if made:
            shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
