"""Writing files so that readers only ever see a complete old or a complete new version.

A file is written under a hidden temporary name beside its target, then renamed over it. The
temporary name carries the writer's pid (`.<name>.<pid>.<random>.tmp`), so one left behind by a
killed writer can be told from one being written (`leftover_temporaries`); no reader globbing
`*.parquet` or opening a value's name ever sees it.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from spd_assets.errors import DiskFullError

TEMPORARY_SUFFIX = ".tmp"


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` in one rename.

    On error the temporary file is removed and `path` is left as it was.
    """
    target = Path(path)
    temporary = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(prefix=f".{target.name}.{os.getpid()}.", suffix=TEMPORARY_SUFFIX,
                                         dir=target.parent)
        os.close(fd)
        yield Path(temporary)
        os.replace(temporary, target)
    except BaseException as error:
        if temporary is not None:
            Path(temporary).unlink(missing_ok=True)
        if is_disk_full(error):
            raise disk_full(target) from error
        raise


def is_disk_full(error: BaseException) -> bool:
    """Whether `error` (an OSError, or a library's error wrapping one, as Polars' and NumPy's writers raise) says
    that the filesystem is full or over quota."""
    if isinstance(error, DiskFullError):
        return False  # said already
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(error)
    return "No space left on device" in text or "os error 28" in text or "Disk quota exceeded" in text


def disk_full(target: Path) -> DiskFullError:
    """The error for a write of `target` that found its filesystem full: where, how much is free, what to free."""
    mount = target.parent
    while not mount.exists() or not os.path.ismount(mount):
        if mount.parent == mount:
            break
        mount = mount.parent
    try:
        free = shutil.disk_usage(mount).free
    except OSError:
        free = 0
    return DiskFullError(
        f"no space left on {mount} ({free / 1e6:,.1f} MB free) writing {target}: free space there (experiments you no "
        "longer need: their folders and tables under the results folder; exports under <experiment>/exports; old "
        "run logs under logs/), or put the results folder on a larger filesystem; then run again (earlier results "
        "are intact, and members stopped mid-merge resume from their checkpoints)")


def leftover_temporaries(root: Path, is_alive: Callable[[int], bool]) -> list[Path]:
    """Temporary files under `root` whose writer (by the pid in their name) is no longer alive."""
    found = []
    for path in root.rglob(f".*{TEMPORARY_SUFFIX}") if root.is_dir() else []:
        parts = path.name[: -len(TEMPORARY_SUFFIX)].split(".")
        pid = next((int(part) for part in reversed(parts[:-1]) if part.isdigit()), None)
        if pid is not None and not is_alive(pid):
            found.append(path)
    return found
