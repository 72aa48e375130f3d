"""Where this deployment runs: the Dagster instance in use, the machine's or cluster's settings, and its devices.

Facts about the machine, not about an experiment, and no Dagster definitions: the orchestration
layer (`spd_assets.defs`), the service and the faces all read them from here.

- `home`              where the Dagster instance (DAGSTER_HOME) and its results folder are
- `settings`          executor, devices, Kubernetes, SLURM and instance storage settings
                      (`$DAGSTER_HOME/spd_cluster.yaml`, environment overrides)
- `devices`           exclusive device leases (GPUs or CPU slots) across processes on one machine
- `instance_storage`  the Dagster instance's storage (SQLite or PostgreSQL) written into dagster.yaml

Nothing is imported here: `spd_assets.deployment.home` stays light (no torch) for the command line's queries.
"""
