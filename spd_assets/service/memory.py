"""This machine's memory as the kernel counts it: what is available, what a process holds at its peak, and how
many processes the out-of-memory killer has ended (so that a worker it kills is reported as out of memory, not
only as killed by SIGKILL). Linux only; elsewhere each answers None.
"""

from __future__ import annotations

from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def _cgroup_dirs() -> list[tuple[int, Path]]:
    """This process's memory cgroup folders, (version, folder): its own group's, then the root of the mounted
    hierarchy (which is the group itself inside a container, where the group's path is not mounted)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        relative = path.lstrip("/")
        if controllers == "":
            found += [(2, CGROUP_ROOT / relative), (2, CGROUP_ROOT)]
        elif "memory" in controllers.split(","):
            found += [(1, CGROUP_ROOT / "memory" / relative), (1, CGROUP_ROOT / "memory")]
    return [(version, folder) for version, folder in dict.fromkeys(found) if folder.is_dir()]


def _cgroup_files() -> list[Path]:
    """This process's memory cgroup counters: v2 `memory.events`, v1 `memory.oom_control`."""
    names = {1: "memory.oom_control", 2: "memory.events"}
    return [folder / names[version] for version, folder in _cgroup_dirs() if (folder / names[version]).is_file()]


def oom_kills() -> int | None:
    """Processes of this cgroup the kernel's out-of-memory killer has ended so far (None: not counted here)."""
    for path in _cgroup_files():
        try:
            for line in path.read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except (OSError, ValueError):
            continue
    return None


def _status_bytes(pid: int, key: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def peak_resident_bytes(pid: int) -> int | None:
    """The most resident memory process `pid` has held (VmHWM), while it lives."""
    return _status_bytes(pid, "VmHWM")


def available_bytes() -> int | None:
    """Memory available for new work now: the kernel's MemAvailable, within this cgroup's limit where one is set."""
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    limit = _cgroup_limit()
    if limit is not None and available is not None:
        return min(available, limit)
    return available


def _cgroup_limit() -> int | None:
    """What this process's cgroup may still use: its limit less its usage (None: no limit)."""
    names = {1: ("memory.limit_in_bytes", "memory.usage_in_bytes"), 2: ("memory.max", "memory.current")}
    for version, folder in _cgroup_dirs():
        limit_name, usage_name = names[version]
        try:
            limit_text = (folder / limit_name).read_text().strip()
            usage = int((folder / usage_name).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit_text == "max" or int(limit_text) >= 1 << 60:  # unlimited
            return None
        return max(int(limit_text) - usage, 0)
    return None
