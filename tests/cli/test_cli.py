"""`spd-cluster run` as a user runs it: a real subprocess, with someone querying DuckDB meanwhile."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import yaml

from spd_assets.storage.database import connect_read_only, ensure_database
from tests.pipeline_helpers import SMALL_SYNTHETIC, make_home, store_at


def run_cli(args: list[str], home, **kwargs) -> subprocess.Popen:
    environment = {**os.environ, "DAGSTER_HOME": str(home)}
    return subprocess.Popen(
        [sys.executable, "-m", "spd_assets.cli", *args], env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, **kwargs,
    )


def test_run_while_a_user_queries_the_database(tmp_path):
    home = make_home(tmp_path / "home")
    config_path = tmp_path / "experiment.yaml"
    config_path.write_text(yaml.safe_dump({"name": "queried", "source": {**SMALL_SYNTHETIC, "n_members": 2},
                                           "merge_config": {"iters": 30}}))
    ensure_database(store_at(home))
    reader = connect_read_only(store_at(home))  # held open for the whole run, as a user's session would be
    try:
        process = run_cli(["run", "--config", str(config_path), "--parallel", "2"], home)
        seen = []
        while process.poll() is None:
            seen.append(reader.execute("SELECT count(*) FROM merge_events WHERE experiment = 'queried'").fetchone()[0])
            time.sleep(0.2)
        stdout, stderr = process.communicate()
        assert process.returncode == 0, stdout + stderr
        final = reader.execute("SELECT count(*) FROM merge_events WHERE experiment = 'queried'").fetchone()[0]
    finally:
        reader.close()
    assert seen, "the run finished before any query ran"
    assert final == 2 * 30
    assert "2/2 members" in stdout and "ensemble, distances and consensus materialized" in stdout
    assert str(home / "spd_cluster.duckdb") in stdout and "dagster dev" in stdout


def test_invalid_config_is_rejected_before_any_work(tmp_path):
    home = make_home(tmp_path / "home")
    config_path = tmp_path / "bad.yaml"
    config_path.write_text(yaml.safe_dump({"name": "bad", "merge_config": {"alpha": -1, "sampler": "x"},
                                           "source": {"kind": "synthetic", "n_members": 0}}))
    process = run_cli(["run", "--config", str(config_path)], home)
    stdout, stderr = process.communicate()
    assert process.returncode == 2
    assert "merge_config" in stderr and "sampler" in stderr
    assert "source.n_members" in stderr and "source.synthetic" not in stderr, "keys as written in the file"
    assert not (home / "spd_cluster").exists(), "nothing may be written for an invalid config"
    assert "merge_config.alpha: expected a number >= 0.0" in stderr, "the known keys' values are checked too"

    # A consensus setting outside every member's merges is said before any member runs, not after all of them.
    config_path.write_text(yaml.safe_dump({"name": "bad", "source": SMALL_SYNTHETIC, "consensus": {"k": 100_000}}))
    process = run_cli(["run", "--config", str(config_path)], home)
    stdout, stderr = process.communicate()
    assert process.returncode == 2 and "consensus.k: expected fewer groups than a member's" in stderr, stderr
    assert not (home / "spd_cluster" / "bad").exists(), "no member may run"


def test_a_mistake_in_the_config_is_said_before_dagster_is_imported(tmp_path):
    config_path = tmp_path / "typo.yaml"
    config_path.write_text("name: typo\nmerge_config: {alpah: 1}\n")
    probe = ("import sys\nfrom spd_assets.cli.main import main\ncode = main(sys.argv[1:])\n"
             "sys.stderr.write('dagster imported: %s' % ('dagster' in sys.modules))\nsys.exit(code)")
    for command in ("run", "validate"):
        done = subprocess.run([sys.executable, "-c", probe, command, "--config", str(config_path)], capture_output=True,
                              text=True, env={**os.environ, "DAGSTER_HOME": str(make_home(tmp_path / command))})
        assert done.returncode == 2 and "merge_config.alpah: unknown key 'alpah'" in done.stderr, done.stderr
        assert done.stderr.endswith("dagster imported: False"), done.stderr
