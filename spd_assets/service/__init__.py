"""Layer 4, running an experiment: the one service under every face (the command line, the notebook call).

`run_experiment` (`experiment.py`) does it: preflight (`preflight.py`), registration
(`registration.py`), one Dagster run per member and one for the ensemble (`runs.py`), executed in
worker processes (`workers.py`), interruption, and an `ExperimentRun` summary as data. `doctor.py` examines
and repairs what disagrees between Dagster's record, the result files and the processes alive. The faces
only parse, print or return values; nothing below this package imports it.
"""

from spd_assets.service.experiment import (
    ExperimentPlan,
    ExperimentRun,
    Interrupted,
    Interruption,
    Progress,
    run_experiment,
)

__all__ = ["ExperimentPlan", "ExperimentRun", "Interrupted", "Interruption", "Progress", "run_experiment"]
