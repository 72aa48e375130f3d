"""Shared test helpers: where the golden vectors live, and the one way a test skips without them; the
`browser` fixture.

Golden vectors are read from ../shared/golden relative to the project root; where that folder
is absent (a user's clone of the project alone), every golden test skips with the reason below
and all other tests still run. CI sets SPD_CLUSTER_REQUIRE_GOLDEN=1, which turns that skip into
a failure: there the math is always checked against them.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from tests.browser import browser  # noqa: F401 (a fixture: a real Chromium for the pages' tests)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
GOLDEN_DIR = PROJECT_ROOT.parent / "shared" / "golden"
REQUIRE_GOLDEN_ENV = "SPD_CLUSTER_REQUIRE_GOLDEN"


def golden_files(pattern: str) -> list[Path]:
    """The golden files matching `pattern`, or one placeholder that makes `load_golden` skip the test."""
    files = sorted(GOLDEN_DIR.glob(pattern)) if GOLDEN_DIR.is_dir() else []
    return files or [GOLDEN_DIR / pattern]


def load_golden(path: Path) -> dict[str, np.ndarray]:
    """All arrays of one golden file; skips the calling test when the file is not there."""
    if not path.exists():
        reason = f"golden vectors not found at {path} (they live in ../shared/golden next to the project)"
        if os.environ.get(REQUIRE_GOLDEN_ENV) == "1":
            pytest.fail(f"{reason}; {REQUIRE_GOLDEN_ENV}=1 requires them")
        pytest.skip(reason)
    with np.load(path) as data:
        return {key: data[key] for key in data.files}


def pytest_addoption(parser):
    parser.addoption("--cycles", type=int, default=None,
                     help="fault-injection cycles of tests/faults (default: $SPD_FAULT_CYCLES, else a few)")


# The files that take longest start first, so that with two workers (pyproject's `-n 2`) neither is
# left alone with one of them at the end.
LONGEST_FIRST = ("tests/slurm/test_soak.py", "tests/slurm/test_slurm_faults.py", "tests/slurm/",
                 "tests/faults/", "tests/cli/test_results_queries.py", "tests/cli/test_reruns_and_doctor.py",
                 "tests/defs/test_devices.py", "tests/cli/test_replace.py")


def _start_rank(item) -> int:
    return next((rank for rank, prefix in enumerate(LONGEST_FIRST) if item.nodeid.startswith(prefix)),
                len(LONGEST_FIRST))


def pytest_collection_modifyitems(config, items):
    items.sort(key=_start_rank)  # stable: otherwise in order
