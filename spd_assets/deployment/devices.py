"""Exclusive device leases, across steps, runs and processes on one machine.

A device is a name: `cuda:<i>` for a GPU, `cpu:<i>` for one CPU slot. A step leases one
device for its whole duration by taking an exclusive `flock` on the device's lock file
under DAGSTER_HOME. The operating system drops the lock when the holding process ends,
however it ends (success, exception, `kill -9`), so a dead step never blocks a device.
Every acquisition and release is appended to a lease log, which is how tests (and people)
can see who held what, when.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from spd_assets.errors import DeviceError

LEASE_LOG = "leases.jsonl"
POLL_INTERVAL_S = 0.25
# Waiting is reported this often, so a queued step says why it is not running.
REPORT_INTERVAL_S = 30.0


def visible_devices(cpu_slots: int | None = None) -> list[str]:
    """Every visible CUDA device, or, without one, CPU slots (one per core unless `cpu_slots` says otherwise)."""
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        return [f"cuda:{index}" for index in range(torch.cuda.device_count())]
    return [f"cpu:{index}" for index in range(cpu_slots or os.cpu_count() or 1)]


def validate_devices(names: Sequence[str]) -> list[str]:
    """The device names as given, checked (`cuda:<i>` or `cpu:<i>`, no repeats); DeviceError otherwise."""
    if not names:
        raise DeviceError("devices: expected at least one device name like 'cuda:0' or 'cpu:0', got none")
    problems = [name for name in names if not _parse(name)]
    if problems:
        raise DeviceError(f"devices: expected names like 'cuda:0' or 'cpu:0', got {problems}")
    if len(set(names)) != len(names):
        raise DeviceError(f"devices: expected distinct names, got {list(names)}")
    return list(names)


def _parse(name: str) -> tuple[str, int] | None:
    kind, _, index = name.partition(":")
    if kind not in ("cuda", "cpu") or not index.isdigit():
        return None
    return kind, int(index)


def torch_device(name: str) -> torch.device:
    """The torch device a lease name computes on: CPU slots all compute on `cpu`."""
    kind, index = _parse(name)
    return torch.device(kind, index) if kind == "cuda" else torch.device("cpu")


@dataclass(frozen=True)
class Lease:
    """A device held by a step: its name, the torch device, and how long the step waited for it."""

    device: str
    torch_device: torch.device
    waited_s: float


def _preference(devices: Sequence[str]) -> list[str]:
    """GPUs with the most free memory first (a retry after running out lands elsewhere); CPU slots in random order."""
    if all(_parse(d)[0] == "cuda" for d in devices) and torch.cuda.is_available():
        def free_memory(name: str) -> int:
            try:
                return torch.cuda.mem_get_info(torch_device(name))[0]
            except (RuntimeError, AssertionError):
                return 0

        return sorted(devices, key=free_memory, reverse=True)
    order = list(devices)
    random.shuffle(order)  # spread waiting steps instead of all polling device 0 first
    return order


def _append_log(lease_dir: Path, record: dict) -> None:
    # One short O_APPEND write per record: lines from concurrent processes do not interleave.
    line = (json.dumps(record) + "\n").encode()
    handle = os.open(lease_dir / LEASE_LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(handle, line)
    finally:
        os.close(handle)


def holders(lease_dir: Path, devices: Sequence[str]) -> dict[str, dict | None]:
    """Who holds each device now (None when free), read from the lock files."""
    result: dict[str, dict | None] = {}
    for device in devices:
        path = lease_dir / f"{device}.lock"
        if not path.exists():
            result[device] = None
            continue
        with open(path, "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                try:
                    result[device] = json.loads(handle.read() or "{}")
                except json.JSONDecodeError:
                    result[device] = {}
                continue
            fcntl.flock(handle, fcntl.LOCK_UN)
            result[device] = None
    return result


def leases_at_once(devices: Sequence[str], limit: int | None) -> int:
    """How many of `devices` may be leased at once under `limit` (None: no limit)."""
    return min(len(devices), limit or len(devices))


def _try_lock(path: Path):
    """An open handle holding an exclusive lock on `path`, or None when another process holds it."""
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


def _try_lease(devices: Sequence[str], lease_dir: Path, limit: int | None):
    """(device, its locked handle, the slot's locked handle or None), or None while nothing may be leased now.

    Below `limit` devices, a step first takes one of `limit` slot locks: Dagster's pool keeps the
    same limit, but its SQLite storage claims slots with a read-then-write that two processes
    starting at once can both win, so the locks are what makes the limit exact.
    """
    slot = None
    if limit is not None and limit < len(devices):
        slot = next(filter(None, (_try_lock(lease_dir / f"slot-{i}.lock") for i in range(limit))), None)
        if slot is None:
            return None
    for device in _preference(devices):
        handle = _try_lock(lease_dir / f"{device}.lock")
        if handle is not None:
            return device, handle, slot
    if slot is not None:
        slot.close()
    return None


@contextmanager
def lease_device(
    devices: Sequence[str],
    lease_dir: Path,
    *,
    holder: dict,
    timeout_s: float,
    limit: int | None = None,
    report: Callable[[str], None] = lambda message: None,
) -> Iterator[Lease]:
    """Hold one of `devices` exclusively for the duration of the block, with at most `limit` held at once
    (all devices when None); wait while none may be leased."""
    devices = validate_devices(devices)
    if limit is not None and limit < 1:
        raise DeviceError(f"device limit: expected at least 1 step at once, got {limit}")
    at_once = leases_at_once(devices, limit)
    lease_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    next_report = started + REPORT_INTERVAL_S
    while (leased := _try_lease(devices, lease_dir, limit)) is None:
        now = time.monotonic()
        if now - started > timeout_s:
            raise DeviceError(
                f"no device free after {timeout_s:.0f} s (at most {at_once} at once); "
                f"holders: {holders(lease_dir, devices)}. "
                "Raise device_lease_timeout_s, add devices, or raise the pool limit in dagster.yaml."
            )
        if now >= next_report:
            report(f"waiting {now - started:.0f} s for a device: {at_once} of {list(devices)} are leased")
            next_report = now + REPORT_INTERVAL_S
        time.sleep(POLL_INTERVAL_S)
    device, handle, slot = leased
    concurrent = min(sum(d.startswith("cpu:") for d in devices) or 1, at_once)
    try:
        yield from _held(device, concurrent, handle, lease_dir, holder, time.monotonic() - started)
    finally:
        handle.close()  # closing a descriptor releases its lock
        if slot is not None:
            slot.close()


def _held(device: str, concurrent: int, handle, lease_dir: Path, holder: dict, waited_s: float) -> Iterator[Lease]:
    record = {**holder, "device": device, "pid": os.getpid(), "host": socket.gethostname(), "acquired_at": time.time()}
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps(record))
    handle.flush()
    _append_log(lease_dir, {"event": "acquired", **record})
    # A CPU slot shares the cores with the other steps that may run at once; a GPU step keeps torch's default threads.
    threads = max(1, (os.cpu_count() or 1) // concurrent) if device.startswith("cpu:") else None
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield Lease(device=device, torch_device=torch_device(device), waited_s=waited_s)
    finally:
        torch.set_num_threads(previous_threads)
        if device.startswith("cuda:"):
            torch.cuda.empty_cache()  # give the memory back before the next lease of this process
        _append_log(lease_dir, {"event": "released", **record, "released_at": time.time()})
