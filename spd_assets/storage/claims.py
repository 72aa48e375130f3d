"""Which `spd-cluster run` is computing which member of an experiment, so that two runs of one experiment on one
home never compute a member twice.

A run claims a member before it starts the member's Dagster run: an exclusive `flock` on
`<root>/claims/<experiment>/<member>.lock`, held by the run's own process until the member's run ends. The
kernel drops the lock when that process ends however it ends (kill -9 included), so a claim never outlives its
holder. A second run finds the member claimed, waits for the lock, and then either reuses what the first run
stored or, if the first run failed or was killed, computes the member itself (resuming its merge from the
checkpoint). The ensemble step is claimed the same way, so two ensembles are never written at once.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from spd_assets.storage.atomic import disk_full, is_disk_full
from spd_assets.storage.store import ResultsStore

CLAIMS_DIR = "claims"
# The ensemble step's claim, beside the members'.
ENSEMBLE = "_ensemble"


@dataclass(frozen=True)
class Holder:
    """Who holds a claim, as it wrote in the lock file: host, pid and the run's invocation."""

    host: str
    pid: int
    invocation: str

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}, invocation {self.invocation}"


class Claims:
    """The claims this process holds on the members (and the ensemble) of one experiment."""

    def __init__(self, store: ResultsStore, experiment: str, invocation: str) -> None:
        self.folder = store.root / CLAIMS_DIR / experiment
        self.invocation = invocation
        self.held: dict[str, int] = {}  # name -> open file descriptor holding its lock

    def path(self, name: str) -> Path:
        return self.folder / f"{name}.lock"

    def try_claim(self, name: str) -> bool:
        """Claim `name` (a member, or ENSEMBLE) unless another process holds it; whether this process now holds it."""
        if name in self.held:
            return True
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            handle = os.open(self.path(name), os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise disk_full(self.path(name)) if is_disk_full(error) else error from error
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(handle)
            return False
        try:  # who holds it, for the waiting run's message: a courtesy (a full disk must not stop the run here)
            os.ftruncate(handle, 0)
            os.write(handle, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                         "invocation": self.invocation}).encode())
        except OSError:
            pass
        self.held[name] = handle
        return True

    def holder(self, name: str) -> Holder | None:
        """Who holds `name` now, as far as its lock file says (None when unknown)."""
        try:
            return Holder(**json.loads(self.path(name).read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def wait_for(self, name: str, poll_s: float = 0.5, on_wait=lambda: None) -> float:
        """Block until `name` is claimed by this process; seconds waited. `on_wait` is called at each poll."""
        started = time.monotonic()
        while not self.try_claim(name):
            on_wait()
            time.sleep(poll_s)
        return time.monotonic() - started

    def release(self, name: str) -> None:
        handle = self.held.pop(name, None)
        if handle is not None:
            os.close(handle)  # closing the descriptor drops the lock

    def release_all(self) -> None:
        for name in list(self.held):
            self.release(name)
