"""How far each running member's long step is, shared through the results folder.

A step that runs for minutes (a member's merge, a model's forward passes) reports where it is with
a `ProgressReporter`: about once a second it replaces its member's progress file,
`<root>/progress/<experiment>/<member>.json`, and about every ten seconds it logs a line (to Dagster's
log, or a SLURM job's). Whoever started the run (`spd-cluster run`, the notebook call) reads the files
(`read_progress`) and shows them; a file exists while its step runs, on whatever machine it runs, as
long as the results folder is shared (as it is for SLURM jobs).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from spd_assets.errors import DiskFullError
from spd_assets.storage.atomic import atomic_path
from spd_assets.storage.store import ResultsStore

PROGRESS_DIR = "progress"
# What each long step counts.
PROGRESS_UNITS = {"merge": "merges", "activations": "sequences"}
# How often a step replaces its progress file, and logs a line.
FILE_INTERVAL_S = 1.0
LOG_INTERVAL_S = 10.0
# The rate is the mean over about this much of the recent past (merges slow down as groups grow).
RATE_WINDOW_S = 30.0


@dataclass(frozen=True)
class StepProgress:
    """Where one member's step is: `done` of `total` units (merges, sequences), the merge's k and MDL loss, the
    recent rate (units per second) and the time left at that rate, when it was said, and by which process."""

    experiment: str
    member: str
    step: str  # "merge" or "activations"
    done: int
    total: int
    unit: str
    rate: float
    seconds: float
    updated: float  # seconds since the epoch
    k: int | None = None
    mdl_loss: float | None = None
    pid: int | None = None

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 1.0

    @property
    def seconds_left(self) -> float | None:
        return (self.total - self.done) / self.rate if self.rate > 0 else None

    def describe(self) -> str:
        """`merge 6,512/15,999 merges (41%), about 4 min left, k 9,488, MDL 1.23e+06, 38.2 merges/s`."""
        parts = [f"{self.step} {self.done:,}/{self.total:,} {self.unit} ({self.fraction:.0%})"]
        left = self.seconds_left
        if left is not None and self.done < self.total:
            parts.append(f"about {duration(left)} left")
        if self.k is not None:
            parts.append(f"k {self.k:,}")
        if self.mdl_loss is not None and math.isfinite(self.mdl_loss):
            parts.append(f"MDL {self.mdl_loss:.4g}")
        if self.rate > 0:
            parts.append(f"{self.rate:,.1f} {self.unit}/s")
        return ", ".join(parts)


class ProgressLines:
    """For output without a live display (a log, a notebook): the progress lines due, one per member in flight at
    most every `interval_s` seconds (the first after a member has run that long)."""

    def __init__(self, interval_s: float = LOG_INTERVAL_S) -> None:
        self.interval_s = interval_s
        self.last: dict[str, float] = {}

    def due(self, steps: dict[str, StepProgress]) -> list[str]:
        now = time.monotonic()
        lines = []
        for member, step in sorted(steps.items()):
            if now - self.last.setdefault(member, now) >= self.interval_s:
                self.last[member] = now
                lines.append(f"  {member:<24} {step.describe()}")
        for member in set(self.last) - set(steps):
            del self.last[member]
        return lines


def duration(seconds: float) -> str:
    """`45 s`, `4 min`, `1 h 20 min`."""
    if seconds < 90:
        return f"{max(seconds, 0):.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60)} min"


def progress_dir(store: ResultsStore, experiment: str) -> Path:
    return store.root / PROGRESS_DIR / experiment


def progress_path(store: ResultsStore, experiment: str, member: str) -> Path:
    return progress_dir(store, experiment) / f"{member}.json"


def read_progress(store: ResultsStore, experiment: str, since: float = 0.0) -> dict[str, StepProgress]:
    """member -> its step's progress, of the steps of `experiment` that reported since `since` (seconds since the
    epoch: a file left by a killed step is older than the run looking)."""
    found = {}
    folder = progress_dir(store, experiment)
    for path in folder.glob("*.json") if folder.is_dir() else []:
        try:
            progress = StepProgress(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):  # replaced or removed while read: the next look sees it
            continue
        if progress.updated >= since:
            found[progress.member] = progress
    return found


class ProgressReporter:
    """Reports one member's step as it goes: `update(done, total, ...)` as often as it likes (it costs a clock read
    between writes); `close()` when the step ends (its file is removed).

    Parameters
    ----------
    path : Path, or None
        The member's progress file (None: log only).
    log : callable
        Takes a line; called about every `LOG_INTERVAL_S` (e.g. Dagster's `context.log.info`).
    identity : dict
        `experiment`, `member`, `step` and `unit` of the progress reported.
    """

    def __init__(self, path: Path | None, log: Callable[[str], None], **identity) -> None:
        self.path, self.log, self.identity = path, log, identity
        self.started = time.monotonic()
        self.next_file = 0.0
        self.next_log = self.started + LOG_INTERVAL_S
        # (time, done) of recent updates: the rate counts from the first (a step's set-up is not its pace).
        self.recent: deque[tuple[float, int]] = deque()

    def update(self, done: int, total: int, *, k: int | None = None, mdl_loss: float | None = None) -> None:
        now = time.monotonic()
        if now < self.next_file and now < self.next_log and done < total:
            return
        if not self.recent:
            self.recent.append((now, done))
        self.recent.append((now, done))
        while len(self.recent) > 2 and self.recent[1][0] < now - RATE_WINDOW_S:
            self.recent.popleft()
        then, done_then = self.recent[0]
        rate = (done - done_then) / (now - then) if now > then else 0.0
        progress = StepProgress(done=int(done), total=int(total), rate=rate, seconds=now - self.started,
                                updated=time.time(), k=k, mdl_loss=mdl_loss, pid=os.getpid(), **self.identity)
        if now >= self.next_file and self.path is not None:
            self.next_file = now + FILE_INTERVAL_S
            try:
                with atomic_path(self.path) as temporary:
                    temporary.write_text(json.dumps(asdict(progress)))
            except (OSError, DiskFullError):  # progress is a courtesy: a full or read-only disk must not fail the step
                self.path = None
        if now >= self.next_log:
            self.next_log = now + LOG_INTERVAL_S
            self.log(f"{progress.member}: {progress.describe()}")

    def close(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)
