"""Shared test fixtures: where the golden vectors live."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

# ../shared/golden relative to the project root; present in CI, absent in a user's clone.
GOLDEN_DIR = Path(__file__).resolve().parent.parent.parent / "shared" / "golden"


def golden_files(pattern: str) -> list[Path]:
    """The golden files matching `pattern`, or one placeholder that makes the test skip."""
    files = sorted(GOLDEN_DIR.glob(pattern)) if GOLDEN_DIR.is_dir() else []
    return files or [GOLDEN_DIR / pattern]


def load_golden(path: Path) -> dict[str, np.ndarray]:
    if not path.exists():
        pytest.skip(f"golden vectors not found at {GOLDEN_DIR} (they live in ../shared/golden next to the project)")
    with np.load(path) as data:
        return {key: data[key] for key in data.files}


def pytest_addoption(parser):
    parser.addoption("--cycles", type=int, default=None,
                     help="fault-injection cycles of tests/faults (default: $SPD_FAULT_CYCLES, else a few)")
