"""The command line (`spd-cluster`): `run` an experiment, query results with `sql`, print `clusters`.

- `main`      the argument parser and the commands
- `run`       `spd-cluster run`: one Dagster run per member in worker processes, then the ensemble
- `runs`      executing Dagster runs, and cleaning up after killed ones
- `sql`       one read-only query against the results database, printed or written
- `clusters`  component label -> cluster at an iteration, from stored results
"""
