"""The `slurm:` and `instance:` deployment settings: what they submit with, and what they refuse."""

from __future__ import annotations

import pytest
import yaml
from dagster import AssetKey

from spd_assets.defs.definitions import build_definitions
from spd_assets.defs.slurm import SlurmStepClient
from spd_assets.deployment.instance_storage import configure_instance_storage
from spd_assets.deployment.settings import DeploymentSettings, load_settings, settings_overridden
from spd_assets.errors import DeploymentError
from tests.pipeline_helpers import make_home, small_config


def test_slurm_settings_become_sbatch_options(tmp_path, monkeypatch):
    monkeypatch.delenv("SPD_CLUSTER_EXECUTOR", raising=False)
    (tmp_path / "spd_cluster.yaml").write_text(yaml.safe_dump({"executor": "slurm", "slurm": {
        "partition": "gpu", "account": "lab", "qos": "high", "time": "02:00:00", "mem": "32G", "cpus_per_task": 8,
        "gpus_per_job": 1, "extra_sbatch_args": ["--constraint=h100"], "python": "/shared/venv/bin/python"}}))
    settings = load_settings(tmp_path)
    assert settings.slurm.sbatch_options() == ["--partition=gpu", "--account=lab", "--qos=high", "--time=02:00:00",
                                               "--mem=32G", "--cpus-per-task=8", "--gres=gpu:1", "--requeue",
                                               "--constraint=h100"]
    client = SlurmStepClient(settings.slurm)
    assert "exec /shared/venv/bin/python -m spd_assets.defs.remote_step" in client.script()
    options = client.job_options(name="exp-member_000-merge", folder=tmp_path, run_id="abc")
    assert "--job-name=spd-exp-member_000-merge" in options and "--comment=spd_cluster_run=abc" in options
    monkeypatch.setenv("SPD_CLUSTER_SLURM_PARTITION", "h200-reserved")  # an original pipeline's slurm_partition
    assert load_settings(tmp_path).slurm.partition == "h200-reserved"


def test_an_invocations_executor_and_slurm_settings_hold_for_its_block_only(tmp_path, monkeypatch):
    monkeypatch.delenv("SPD_CLUSTER_EXECUTOR", raising=False)
    monkeypatch.delenv("SPD_CLUSTER_SLURM_JOB_NAME_PREFIX", raising=False)
    monkeypatch.setenv("SPD_CLUSTER_SLURM_PARTITION", "deployed")

    def seen():
        settings = load_settings(tmp_path)
        return settings.executor, settings.slurm.partition, settings.slurm.job_name_prefix

    with settings_overridden(executor="slurm", slurm={"partition": "h200-reserved", "job_name_prefix": "orig-"}):
        assert seen() == ("slurm", "h200-reserved", "orig-")
    assert seen() == ("in_process", "deployed", "spd-")
    with settings_overridden():
        assert seen() == ("in_process", "deployed", "spd-")
    with pytest.raises(DeploymentError, match="executor"), settings_overridden(executor="cluster"):
        load_settings(tmp_path)
    assert seen() == ("in_process", "deployed", "spd-")


def test_with_slurm_the_merge_leases_no_local_device(tmp_path, monkeypatch):
    monkeypatch.setenv("DAGSTER_HOME", str(make_home(tmp_path / "home")))
    config = small_config("remote")
    defs = build_definitions([config], DeploymentSettings(executor="slurm"))
    merge = defs.resolve_assets_def(AssetKey(["remote", "merge_history"]))
    assert merge.op.pool is None  # the device is on the node SLURM allocates, not in this machine's pool
    assert defs.resolve_job_def("remote__members").executor_def.name == "in_process"


def test_postgres_instance_settings(tmp_path, monkeypatch):
    monkeypatch.delenv("SPD_CLUSTER_POSTGRES_URL", raising=False)
    monkeypatch.delenv("SPD_CLUSTER_INSTANCE", raising=False)
    with pytest.raises(DeploymentError, match="instance: postgres needs postgres_url"):
        (tmp_path / "spd_cluster.yaml").write_text(yaml.safe_dump({"instance": "postgres"}))
        load_settings(tmp_path)
    monkeypatch.setenv("SPD_CLUSTER_POSTGRES_URL", "postgresql://dagster:secret@db:5432/dagster")
    settings = load_settings(tmp_path)
    assert settings.postgres_url == "postgresql+psycopg2://dagster:secret@db:5432/dagster"  # the driver installed
    home = make_home(tmp_path / "home")
    configure_instance_storage(home, settings)
    configure_instance_storage(home, settings)  # once only
    written = yaml.safe_load((home / "dagster.yaml").read_text())
    assert written["storage"] == {"postgres": {"postgres_url": "postgresql+psycopg2://dagster:secret@db:5432/dagster"}}
    assert written["concurrency"]["pools"]["default_limit"] == 2  # the rest of the file is kept
    with pytest.raises(DeploymentError, match="configures PostgreSQL storage but the deployment settings say"):
        configure_instance_storage(home, DeploymentSettings())
