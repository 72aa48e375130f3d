"""Layer 3, orchestration: the Dagster definitions of spd-cluster (no math here).

- `definitions`  the code location: every registered experiment's definitions, merged (`defs`)
- `assets`       the asset graph of one experiment, thin wrappers around `steps`
- `steps`        what each asset computes, as plain functions (no Dagster)
- `checks`       asset checks
- `lineage`      which materialization each step consumed, and the lineage tables from the event log
- `dead_runs`    runs whose process died: found, marked failed, their pool slots freed
- `sensors`      the sensor that does so under `dagster dev`
- `resources`    the results folder, activation sources and the device pool as Dagster resources
- `io_managers`  values to their files, tables to Parquet
- `jobs`         per-member and whole-ensemble jobs
- `executors`    multiprocess, in-process or Kubernetes
- `slurm`        a member's device step as one SLURM job
- `remote_step`  what that job runs on a node

Where steps run (settings, devices, the instance) is `spd_assets.deployment`, below this package.
"""
