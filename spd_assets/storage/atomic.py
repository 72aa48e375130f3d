"""Writing files so that readers only ever see a complete old or a complete new version.

A file is written under a hidden temporary name beside its target, then renamed over it. The
temporary name carries the writer's pid (`.<name>.<pid>.<random>.tmp`), so one left behind by a
killed writer can be told from one being written (`leftover_temporaries`); no reader globbing
`*.parquet` or opening a value's name ever sees it.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

TEMPORARY_SUFFIX = ".tmp"


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` in one rename.

    On error the temporary file is removed and `path` is left as it was.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{target.name}.{os.getpid()}.", suffix=TEMPORARY_SUFFIX, dir=target.parent)
    os.close(fd)
    try:
        yield Path(temporary)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def leftover_temporaries(root: Path, is_alive: Callable[[int], bool]) -> list[Path]:
    """Temporary files under `root` whose writer (by the pid in their name) is no longer alive."""
    found = []
    for path in root.rglob(f".*{TEMPORARY_SUFFIX}") if root.is_dir() else []:
        parts = path.name[: -len(TEMPORARY_SUFFIX)].split(".")
        pid = next((int(part) for part in reversed(parts[:-1]) if part.isdigit()), None)
        if pid is not None and not is_alive(pid):
            found.append(path)
    return found
