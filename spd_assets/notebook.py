"""`cluster_analysis_pipeline(config)`: run an experiment from a notebook and get its results back as values.

The same service as `spd-cluster run` (`spd_assets.service`): each member's Dagster run, then the
ensemble's, recorded in the Dagster instance at `home` (so the UI shows them), results in its
results folder. The notebook shows one line per member, not Dagster's log (that goes to the run
log file, and to the UI); the answer is read back as a `ClusteringResults`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from spd_assets.config import ExperimentConfig
from spd_assets.deployment.home import dagster_home
from spd_assets.errors import PipelineError
from spd_assets.processing import experiment_config
from spd_assets.results import ClusteringResults
from spd_assets.service.experiment import ExperimentPlan, Progress, run_experiment
from spd_assets.service.runs import RunOutcome
from spd_assets.storage.progress import ProgressLines


class _NotebookProgress(Progress):
    """One line per member as it finishes, one about every ten seconds per member in flight (how far its merge or
    activations are, and the time left), and one for the ensemble; silent with `verbose=False`."""

    def __init__(self, verbose: bool) -> None:
        self.verbose = verbose
        self.lines = ProgressLines()

    def running(self, steps) -> None:
        for line in self.lines.due(steps):
            self._say(line)

    def _say(self, line: str) -> None:
        if self.verbose:
            print(line, flush=True)

    def planned(self, plan: ExperimentPlan) -> None:
        self._say(f"{plan.experiment}: {len(plan.members)} members, {plan.parallel} at a time on "
                  f"{', '.join(plan.devices)} (Dagster's log: {plan.log_path})")

    def member_finished(self, outcome: RunOutcome, done: int, total: int) -> None:
        state = "ok" if outcome.success else f"FAILED: {outcome.error}"
        self._say(f"  [{done}/{total}] {outcome.label} {outcome.seconds:.1f} s {state}")

    def ensemble_finished(self, outcome: RunOutcome) -> None:
        state = "ok" if outcome.success else f"FAILED: {outcome.error}"
        self._say(f"  ensemble, distances, consensus and explorer {outcome.seconds:.1f} s {state}")


def cluster_analysis_pipeline(
    config: ExperimentConfig | Mapping[str, Any] | str | os.PathLike[str] | None = None,
    *,
    home: str | os.PathLike[str] | None = None,
    replace: bool = False,
    parallel: int | None = None,
    verbose: bool = True,
) -> ClusteringResults:
    """Cluster an experiment's components and return its results.

    Parameters
    ----------
    config
        An `ExperimentConfig`, a mapping of its keys (as in a YAML file), the path of a YAML config,
        or None for the embedded default.
    home
        The Dagster instance (DAGSTER_HOME) to materialize into; default: `$DAGSTER_HOME`, else the
        project's `dagster_home/`. `dagster dev` on the same folder shows the runs.
    replace
        The experiment's name has results of another config (or of members no longer in it):
        remove them first, as `spd-cluster run --replace` does; otherwise that is an error.
    parallel
        Members at once (default: as many as merges can run at once on this machine's devices).
    verbose
        Print one line per member as it finishes (False: nothing).

    Returns
    -------
    ClusteringResults
        Histories, normalized ensemble, distances, consensus clusters and result tables.

    Raises
    ------
    ExperimentConfigError
        The config is invalid (nothing is run).
    ExperimentChangedError
        The name has results of another config or of departed members and `replace` is False
        (nothing is run; the message names what changed).
    SourceError
        The source cannot give any member's batch: a missing model or text, a pattern matching no module
        (nothing is run).
    PipelineError
        The ensemble could not be built (e.g. every member failed); the message gives the first failure.
    KeyboardInterrupt
        Interrupted (the runs in flight are marked canceled first, and the lineage tables brought up to date).

    Examples
    --------
    >>> from spd_assets import cluster_analysis_pipeline
    >>> results = cluster_analysis_pipeline({"name": "small", "source": {"kind": "synthetic", "n_members": 3}})  # doctest: +SKIP
    small: 3 members, 2 at a time on cpu:0, cpu:1 (Dagster's log: .../small-20261204T120000.log)
      [1/3] member_000 9.8 s ok
      ...
    >>> results.consensus.iteration, len(results.histories)  # doctest: +SKIP
    (472, 3)
    """
    config = experiment_config(config)
    home = Path(home).resolve() if home is not None else dagster_home()
    run = run_experiment(config, home=home, parallel=parallel, replace=replace,
                         origin="cluster_analysis_pipeline", progress=_NotebookProgress(verbose))
    if run.interruption is not None:
        # The runs in flight were canceled and the lineage tables brought up to date; stop the cell as Ctrl-C does.
        raise KeyboardInterrupt(f"interrupted: canceled {', '.join(run.interruption.in_flight) or 'no member'} "
                                f"in flight and {len(run.interruption.queued)} queued")
    if run.ensemble is None or not run.ensemble.success:
        error = run.ensemble.error if run.ensemble is not None else "it did not run"
        raise PipelineError(f"the ensemble of {config.name!r} failed: {error}")
    return ClusteringResults.load(config.name, home=home)
