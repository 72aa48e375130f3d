"""The command line (`spd-cluster`): `run` an experiment, query results with `sql`, print `clusters`, `doctor`.

- `main`          the argument parser and the commands
- `run`           `spd-cluster run`: one Dagster run per member in worker processes, then the ensemble
- `workers`       the worker processes that execute those runs and end with the command line
- `runs`          executing one Dagster run; outcomes, check results, canceling runs in flight
- `registration`  registering an experiment: a changed config or member set is refused unless replaced
- `doctor`        what disagrees between Dagster, the result files and the processes, and its repair
- `sql`           one read-only query against the results database, printed or written
- `clusters`      component label -> cluster at an iteration, from stored results
"""
