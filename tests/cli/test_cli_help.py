"""The command line's own answers: its version and what its options mean (a real subprocess)."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version


def spd_cluster(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spd_assets.cli", *args], capture_output=True, text=True, timeout=120)


def test_version_prints_the_installed_version():
    result = spd_cluster("--version")
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout == f"spd-cluster {version('spd-cluster')}\n"


HELP = {
    "clusters": "--experiment EXPERIMENT the experiment's name (its config's `name`; default: default)",
    "sql": "--allow-read PATH let the query also read this file or folder (repeatable)",
}


def test_options_of_the_query_commands_are_explained():
    for command, explained in HELP.items():
        result = spd_cluster(command, "--help")
        assert result.returncode == 0 and explained in " ".join(result.stdout.split()), result.stdout
