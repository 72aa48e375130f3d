"""The README's notebook example, run as written: `cluster_analysis_pipeline` through Dagster, then `load`."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from dagster import DagsterRunStatus, RunsFilter

from spd_assets.service.runs import RUN_TAG_EXPERIMENT
from tests.pipeline_helpers import instance_at, make_home

README = Path(__file__).resolve().parents[2] / "README.md"


def notebook_example() -> str:
    section = README.read_text().split("## In a notebook", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, flags=re.DOTALL).group(1)


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    home = make_home(tmp_path_factory.mktemp("notebook") / "home")
    namespace: dict = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DAGSTER_HOME", str(home))
        exec(compile(notebook_example(), "README.md", "exec"), namespace)
    return home, namespace


def test_readme_example_returns_frozen_results_with_everything(ran):
    home, namespace = ran
    results = namespace["results"]
    assert type(results).__name__ == "ClusteringResults" and results.experiment == "notebook"
    with pytest.raises(dataclasses.FrozenInstanceError):
        results.experiment = "other"
    assert list(results.histories) == ["member_000", "member_001", "member_002"] == results.ensemble.members
    assert set(results.distances) == {"perm_invariant_hamming", "matching_dist"}
    n_iters = results.ensemble.ensemble.n_iters
    assert all(d.shape == (n_iters, 3, 3) for d in results.distances.values())
    assert all(isinstance(frame, pl.DataFrame) for frame in results.tables.values())
    assert results.tables["merge_events"].height == sum(h.n_iters for h in results.histories.values())
    assert results.tables["consensus_clusters"].height == results.consensus.n_clusters > 0
    assert results.explorer_path.exists() and results.home == home.resolve()
    text = repr(results)
    assert len(text) < 1000 and "notebook" in text and "clusters" in text


def test_loading_again_gives_the_same_results(ran):
    _, namespace = ran
    results, again = namespace["results"], namespace["again"]
    assert again.consensus.iteration == results.consensus.iteration
    assert np.array_equal(again.consensus.cluster_of, results.consensus.cluster_of)
    assert again.tables["distances"].equals(results.tables["distances"])


def test_runs_are_in_the_dagster_instance_for_the_ui(ran):
    home, _ = ran
    with instance_at(home) as instance:
        runs = instance.get_runs(filters=RunsFilter(tags={RUN_TAG_EXPERIMENT: "notebook"}))
    assert len(runs) == 4 and all(run.status == DagsterRunStatus.SUCCESS for run in runs)
    assert (home / "spd_cluster" / "experiments" / "notebook.yaml").exists()


def test_importing_the_package_stays_light():
    light = "import sys, spd_assets; print(sorted({'torch', 'dagster', 'polars'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", light], capture_output=True, text=True, check=True).stdout.strip() == "[]"


def test_invalid_config_is_rejected_before_any_run(tmp_path):
    from spd_assets import cluster_analysis_pipeline
    from spd_assets.errors import ExperimentConfigError

    with pytest.raises(ExperimentConfigError, match="consensus.threshold"):
        cluster_analysis_pipeline({"consensus": {"threshold": 2}}, home=tmp_path / "home")
    assert not (tmp_path / "home").exists()


@pytest.mark.slow  # the same service as the command line's: tests/cli/test_replace.py
def test_a_changed_config_under_the_same_name_is_refused_unless_replaced(tmp_path):
    from spd_assets import cluster_analysis_pipeline
    from spd_assets.errors import ExperimentChangedError
    from tests.pipeline_helpers import SMALL_SYNTHETIC

    home = make_home(tmp_path / "home")
    config = {"name": "renamed", "source": {**SMALL_SYNTHETIC, "n_members": 2}, "merge_config": {"iters": 10}}
    cluster_analysis_pipeline(config, home=home)
    changed = {**config, "merge_config": {"iters": 10, "alpha": 0.5}}
    with pytest.raises(ExperimentChangedError, match=r"merge_config\.alpha: 1\.0 -> 0\.5"):
        cluster_analysis_pipeline(changed, home=home)
    replaced = cluster_analysis_pipeline(changed, home=home, replace=True)
    assert replaced.tables["experiments"]["config_json"].str.contains('"alpha":0.5').all()


SCRIPT_WITHOUT_GUARD = """
from spd_assets import cluster_analysis_pipeline
source = {"kind": "synthetic", "n_members": 2, "batch_size": 8}
results = cluster_analysis_pipeline({"name": "scripted", "source": source, "merge_config": {"iters": 20}}, replace=True)
print("consensus at iteration", results.consensus.iteration)
"""


@pytest.mark.parametrize("how", ["file", "stdin"])
def test_a_script_without_a_main_guard_or_read_from_standard_input_runs_once(tmp_path, how):
    """The workers are spawned without re-importing the script: it runs once, and `python - < script.py` works."""
    home = make_home(tmp_path / "home")
    script = tmp_path / "script.py"
    script.write_text(SCRIPT_WITHOUT_GUARD)
    command = [sys.executable, str(script)] if how == "file" else [sys.executable, "-"]
    done = subprocess.run(command, input=None if how == "file" else SCRIPT_WITHOUT_GUARD, cwd=tmp_path,
                          env={**os.environ, "DAGSTER_HOME": str(home)}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stdout + done.stderr
    assert done.stdout.count("scripted: 2 members") == 1 and done.stdout.count("consensus at iteration") == 1, done.stdout
    with instance_at(home) as instance:
        assert len(instance.get_runs(filters=RunsFilter(tags={RUN_TAG_EXPERIMENT: "scripted"}))) == 3, "two members, one ensemble"
