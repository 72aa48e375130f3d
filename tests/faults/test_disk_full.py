"""A full disk under the results folder (a small tmpfs mounted for the test): the step that cannot write fails
saying where no space is left and what to free, no partial file is visible, earlier results stay as they were, and
after space is freed a re-run completes."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from tests.faults.invariants import no_partial_files
from tests.pipeline_helpers import SMALL_SYNTHETIC, make_home, store_at

ROOT = Path(__file__).resolve().parents[2]
FILESYSTEM_MB = 64
LEFT_FREE_BYTES = 64 * 1024  # after the filler: less than any member's activations take


@pytest.fixture
def small_filesystem():
    """A 64 MB tmpfs mounted in a temporary folder (needs root, as CI has)."""
    folder = Path(tempfile.mkdtemp(prefix="spd-small-fs-"))
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={FILESYSTEM_MB}m", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        reason = f"cannot mount a tmpfs here ({mounted.stderr.strip() or 'mount failed'}); needs root"
        if os.environ.get("SPD_CLUSTER_REQUIRE_SLURM") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)
        folder.rmdir()


def cli(home: Path, *args: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "DAGSTER_HOME": str(home), "SPD_CLUSTER_DEVICES": "cpu:0"}
    environment.pop("SPD_CLUSTER_EXECUTOR", None)
    return subprocess.run([sys.executable, "-m", "spd_assets.cli", *args], env=environment, cwd=ROOT, text=True,
                          capture_output=True, timeout=600)


def contents(folder: Path) -> dict[str, str]:
    """Every result file under `folder` (logs, progress, checkpoints and device leases apart) -> a hash of its bytes."""
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()
            and path.relative_to(folder).parts[0] not in ("logs", "progress", "checkpoints", "device_leases")}


def test_a_full_disk_fails_the_step_that_cannot_write_and_leaves_earlier_results_intact(tmp_path, small_filesystem):
    home = make_home(tmp_path / "home")
    (home / "spd_cluster").symlink_to(small_filesystem)  # the results folder on the small filesystem
    first = tmp_path / "first.yaml"
    first.write_text(yaml.safe_dump({"name": "first", "source": {**SMALL_SYNTHETIC, "n_members": 2},
                                     "merge_config": {"iters": None}}))
    second = tmp_path / "second.yaml"
    second.write_text(yaml.safe_dump({"name": "second", "source": {**SMALL_SYNTHETIC, "n_members": 2, "batch_size": 64},
                                      "merge_config": {"iters": None}}))
    done = cli(home, "run", "--config", str(first))
    assert done.returncode == 0, done.stdout + done.stderr
    before = contents(small_filesystem)

    filler = small_filesystem / "filler"
    with open(filler, "wb") as handle:  # everything but a few kB
        handle.truncate(0)
        free = os.statvfs(small_filesystem).f_bavail * os.statvfs(small_filesystem).f_frsize
        handle.write(b"\0" * max(free - LEFT_FREE_BYTES, 0))
    full = cli(home, "run", "--config", str(second))
    output = full.stdout + full.stderr
    assert full.returncode != 0, output
    assert f"no space left on {small_filesystem}" in output, output
    assert "free space there" in output and "earlier results are intact" in output, output
    assert "Traceback" not in output, output
    assert {path: digest for path, digest in contents(small_filesystem).items() if path in before} == before
    assert not no_partial_files(store_at(home), "second") and not no_partial_files(store_at(home), "first")
    assert not list(small_filesystem.rglob("*.tmp*")), "a partial file was left"

    filler.unlink()
    rerun = cli(home, "run", "--config", str(second))
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    doctor = cli(home, "doctor")
    assert doctor.returncode == 0 and "doctor: no problems found" in doctor.stdout, doctor.stdout + doctor.stderr
    print(output)
