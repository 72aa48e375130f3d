"""The Dagster instance's storage as the deployment settings say: SQLite (embedded) or PostgreSQL.

Dagster reads its storage from `$DAGSTER_HOME/dagster.yaml`; `instance: postgres` in
`spd_cluster.yaml` (or `SPD_CLUSTER_INSTANCE=postgres`) adds the `storage: postgres:` block
there (dagster-postgres: runs, event logs and schedules in one database server), so that every
process on every host that opens the instance (the command line's workers, `dagster dev`, the
daemon) shares one. SQLite stays the default: one host, no server.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from spd_assets.deployment.settings import POSTGRES_URL_ENV, DeploymentSettings
from spd_assets.errors import DeploymentError


def postgres_storage(settings: DeploymentSettings) -> dict:
    """The `storage:` block of dagster.yaml for `settings.postgres_url` (read from the environment variable at
    run time when that is where it came from, so the password is not written to the file)."""
    from_env = os.environ.get(POSTGRES_URL_ENV) == settings.postgres_url
    url = {"env": POSTGRES_URL_ENV} if from_env else settings.postgres_url
    return {"postgres": {"postgres_url": url}}


def configure_instance_storage(home: Path, settings: DeploymentSettings) -> None:
    """Make `home/dagster.yaml` use the storage `settings` ask for; DeploymentError where it names another."""
    path = home / "dagster.yaml"
    text = path.read_text() if path.exists() else ""
    try:
        current = (yaml.safe_load(text) or {}).get("storage")
    except yaml.YAMLError as error:
        raise DeploymentError(f"{path} is not valid YAML: {error}") from None
    if settings.instance == "sqlite":
        if current is not None and "postgres" in current:
            raise DeploymentError(f"{path} configures PostgreSQL storage but the deployment settings say instance: "
                                  "sqlite; set instance: postgres (and postgres_url) or remove its storage block")
        return
    try:
        import dagster_postgres  # noqa: F401
    except ImportError:
        raise DeploymentError('instance: postgres needs dagster-postgres: pip install -e ".[slurm]"') from None
    wanted = postgres_storage(settings)
    if current == wanted:
        return
    if current is not None:
        raise DeploymentError(f"{path} has a storage block {current} but the deployment settings ask for {wanted}; "
                              "remove it from dagster.yaml to have it written, or make the two agree")
    block = yaml.safe_dump({"storage": wanted}, sort_keys=False)
    path.write_text(text.rstrip("\n") + "\n\n# Written from spd_cluster.yaml's `instance: postgres`.\n" + block)
