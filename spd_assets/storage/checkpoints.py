"""Checkpoints of running merges, so that a member killed mid-merge goes on where it was.

A member's merge saves `<root>/checkpoints/<experiment>/<member>.npz` about every minute (atomically:
a reader sees the previous checkpoint or the new one) and, on SIGTERM (a SLURM time limit, preemption or
requeue), once more before it ends. Its next attempt (a re-run after kill -9, a Dagster retry, a requeued
SLURM job) resumes from it: `spd_math.merge_iteration(resume_from=...)` replays the saved merges and
goes on, bit-identical to a run never stopped. The file is removed once the member's history is stored.

A checkpoint is used only by the merge it was made for: the same experiment config, the same activations
(their content fingerprint) and the same merge code (a digest of `spd_math`'s source); otherwise it is
ignored, and the log says why. It holds O(merges) numbers: a few hundred kB at 16k components.
"""

from __future__ import annotations

import hashlib
import json
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path

import numpy as np

from spd_assets.errors import DiskFullError
from spd_assets.storage.atomic import atomic_path
from spd_assets.storage.store import ResultsStore
from spd_math.checkpoint import MergeCheckpoint

CHECKPOINT_DIR = "checkpoints"
LAYOUT = "spd-cluster merge checkpoint 1"
# How often a running merge saves its checkpoint by default, seconds.
DEFAULT_INTERVAL_S = 60.0


@cache
def merge_code_version() -> str:
    """A digest of the merge's code (every module of `spd_math`): a checkpoint of other code is never resumed."""
    import spd_math

    digest = hashlib.sha256()
    for path in sorted(Path(spd_math.__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class CheckpointKey:
    """What a checkpoint was made for: the experiment config, the activations' content, the merge code."""

    config_hash: str
    activations: str  # fingerprint of the member's activations
    code: str = ""

    def __post_init__(self) -> None:
        if not self.code:
            object.__setattr__(self, "code", merge_code_version())

    def mismatch(self, other: CheckpointKey) -> str | None:
        """What differs from `other` (the run about to resume), in words; None when nothing does."""
        for field, what in (("config_hash", "experiment config"), ("activations", "activations"),
                            ("code", "merge code version")):
            if getattr(self, field) != getattr(other, field):
                return f"it was made with another {what} ({getattr(self, field)}, now {getattr(other, field)})"
        return None


def checkpoint_dir(store: ResultsStore, experiment: str) -> Path:
    return store.root / CHECKPOINT_DIR / experiment


def checkpoint_path(store: ResultsStore, experiment: str, member: str) -> Path:
    return checkpoint_dir(store, experiment) / f"{member}.npz"


@dataclass(frozen=True)
class StoredCheckpoint:
    """A checkpoint file: what it was made for, when, and the merge so far."""

    path: Path
    key: CheckpointKey
    saved: float  # seconds since the epoch
    total: int  # merges the run plans
    checkpoint: MergeCheckpoint


def write_checkpoint(path: Path, key: CheckpointKey, checkpoint: MergeCheckpoint, total: int) -> None:
    header = {"layout": LAYOUT, "key": asdict(key), "saved": time.time(), "total": total,
              "seed": checkpoint.seed, "n_components": checkpoint.n_components}
    with atomic_path(path) as temporary:
        with open(temporary, "wb") as handle:
            np.savez(handle, header=np.frombuffer(json.dumps(header).encode(), dtype=np.uint8),
                     selected_pairs=checkpoint.selected_pairs, pair_costs=checkpoint.pair_costs,
                     mdl_losses=checkpoint.mdl_losses, generator_state=checkpoint.generator_state)


def read_checkpoint(path: Path) -> StoredCheckpoint:
    """The checkpoint in `path`; ValueError (or OSError) when it is not one."""
    with np.load(path) as data:
        header = json.loads(data["header"].tobytes())
        if header.get("layout") != LAYOUT:
            raise ValueError(f"{path}: not a merge checkpoint (layout {header.get('layout')!r})")
        checkpoint = MergeCheckpoint(
            seed=int(header["seed"]), n_components=int(header["n_components"]),
            selected_pairs=data["selected_pairs"].astype(np.int64), pair_costs=data["pair_costs"].astype(np.float64),
            mdl_losses=data["mdl_losses"].astype(np.float64), generator_state=data["generator_state"].astype(np.uint8))
    return StoredCheckpoint(path, CheckpointKey(**header["key"]), float(header["saved"]), int(header["total"]),
                            checkpoint)


class StoppedAfterCheckpoint(Exception):
    """A merge stopped on SIGTERM once its checkpoint was saved (the process is to end: exit status 143)."""

    exit_status = 128 + signal.SIGTERM

    def __init__(self, merges: int) -> None:
        super().__init__(f"stopped on SIGTERM after saving a checkpoint at {merges:,} merges")
        self.merges = merges


class MemberCheckpoints:
    """One member's checkpoints: the one to resume from (`resumable`), and the sink a running merge saves to.

    Parameters
    ----------
    path : Path
        The member's checkpoint file.
    key : CheckpointKey
        What the running merge is (a checkpoint of anything else is not resumed).
    total : int
        Merges the run plans (said in the file, for `doctor`).
    interval_s : float
        Seconds between checkpoints.
    log, warn : callable
        Take a line: what was resumed or ignored, and a checkpoint that could not be written.
    """

    def __init__(self, path: Path, key: CheckpointKey, total: int, *, interval_s: float = DEFAULT_INTERVAL_S,
                 log: Callable[[str], None] = print, warn: Callable[[str], None] | None = None) -> None:
        self.path, self.key, self.total, self.interval_s = path, key, total, interval_s
        self.log, self.warn = log, warn or log
        self.next_save = time.monotonic() + interval_s
        self.requested = False
        self.stop_after_save = False
        self.saved_merges = 0
        self.failed = False

    def resumable(self) -> MergeCheckpoint | None:
        """The saved checkpoint if it was made for this merge; else None, with the reason logged."""
        if not self.path.exists():
            return None
        try:
            stored = read_checkpoint(self.path)
        except (OSError, ValueError, KeyError) as error:
            self.log(f"not resuming from {self.path}: it cannot be read ({type(error).__name__}: {error})")
            return None
        why = stored.key.mismatch(self.key)
        if why is not None:
            self.log(f"not resuming from {self.path}: {why}; merging from the start")
            return None
        age = time.time() - stored.saved
        self.log(f"resuming from the checkpoint saved {age:.0f} s ago: {stored.checkpoint.n_done:,} of "
                 f"{stored.total:,} merges done")
        return stored.checkpoint

    # --- the sink a running merge saves to (spd_math.checkpoint.CheckpointSink) ---

    def due(self) -> bool:
        return self.requested or time.monotonic() >= self.next_save

    def save(self, checkpoint: MergeCheckpoint) -> None:
        self.next_save = time.monotonic() + self.interval_s
        self.requested = False
        try:
            write_checkpoint(self.path, self.key, checkpoint, self.total)
            self.saved_merges = checkpoint.n_done
        except (OSError, DiskFullError) as error:  # a checkpoint only saves time: the merge goes on without it
            if not self.failed:
                reason = getattr(error, "strerror", None) or str(error).split(":", 1)[0]
                self.warn(f"could not save a checkpoint to {self.path} ({reason}); merging on without one")
            self.failed = True
        if self.stop_after_save:
            self.log(f"saved a checkpoint at {checkpoint.n_done:,} merges after SIGTERM; ending")
            raise StoppedAfterCheckpoint(checkpoint.n_done)

    def checkpoint_on_sigterm(self) -> None:
        """On SIGTERM (SLURM's notice before a time limit, preemption, requeue or scancel kills the job): save a
        checkpoint after the merge in progress, then raise `StoppedAfterCheckpoint` out of the merge."""

        def handle(signum, frame) -> None:
            self.requested = self.stop_after_save = True

        signal.signal(signal.SIGTERM, handle)

    def clear(self) -> None:
        """Remove the checkpoint: the member's history is stored."""
        self.path.unlink(missing_ok=True)


def stored_checkpoints(store: ResultsStore) -> dict[tuple[str, str], Path]:
    """(experiment, member) -> checkpoint file, of every checkpoint in the results folder."""
    root = store.root / CHECKPOINT_DIR
    return {(path.parent.name, path.stem): path for path in sorted(root.glob("*/*.npz"))} if root.is_dir() else {}
