"""`spd-cluster run`: run an experiment (`spd_assets.service`) and print what happens and where the results are."""

from __future__ import annotations

import signal
import sys
from collections import defaultdict
from collections.abc import Mapping

from spd_assets.cli.progress_view import ProgressView
from spd_assets.cli.validate import describe_loaded, storage_of
from spd_assets.config import ExperimentConfig, LoadedConfig, load_config_file
from spd_assets.deployment.home import PROJECT_ROOT, dagster_home, results_store
from spd_assets.errors import SpdClusterError
from spd_assets.service.experiment import ExperimentPlan, ExperimentRun, Interrupted, Progress, run_experiment
from spd_assets.service.runs import CheckOutcome, RunOutcome

# Exit status after an interruption: 128 + the signal's number, as shells report it.
INTERRUPTED_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}


class _Stopper:
    """Ctrl-C and SIGTERM stop the run. The exception a signal handler raises can be lost: raised while Python runs
    a `__del__` or a weakref callback (SQLAlchemy's, Dagster's), it is printed as "Exception ignored" and the run
    goes on. So the signal is also remembered, and raised again at the run's next progress report (twice a second)."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __call__(self, signum, _frame) -> None:
        self.signum = signum
        self.raise_pending()

    def raise_pending(self) -> None:
        if self.signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.signum is not None:
            raise Interrupted(self.signum)


def outcome_line(outcome: RunOutcome, done: int, total: int) -> str:
    """`[2/6] ok     member_001    4.2 s   run 1a2b3c4d` (`, resumed at merge 1,234` when its merge went on from a
    checkpoint), and the error on a second line when it failed."""
    mark = "ok    " if outcome.success else "FAILED"
    run = outcome.run_id[:8] if outcome.run_id else "-"
    line = f"  [{done}/{total}] {mark} {outcome.label:<24} {outcome.seconds:6.1f} s   run {run}"
    merge = outcome.metadata.get("merge_history", {})
    if merge.get("resumed_at_merge"):
        line += f", resumed at merge {merge['resumed_at_merge']:,}"
    if merge.get("computed_by_another_run"):
        line += ", computed by another run of this experiment (waited for, not recomputed)"
    return line + (f"\n           {outcome.error}" if outcome.error else "")


class _Printer(Progress):
    """Prints each step of the run as it happens, with the members in flight below (bars on a terminal)."""

    def __init__(self, stopper: _Stopper) -> None:
        self.view = ProgressView()
        self.stopper = stopper

    def note(self, line: str) -> None:
        self.stopper.raise_pending()
        self.view.print(line)

    def planned(self, plan: ExperimentPlan) -> None:
        self.stopper.raise_pending()
        lines = [f"spd-cluster: experiment {plan.experiment!r} (config {plan.config_hash}), {len(plan.members)} "
                 f"members, DAGSTER_HOME={plan.home}"]
        if plan.activation_shape is not None:
            samples, components = plan.activation_shape
            lines.append(f"activations: {samples:,} samples x {components:,} components per member "
                         f"({storage_of(plan.activation_bytes, plan.memory_budgeted)})")
        limit = plan.pool_limit if plan.pool_limit is not None else "none"
        if plan.executor == "slurm":
            lines.append(f"devices: on SLURM nodes (executor slurm, partition {plan.slurm_partition or 'the default'}); "
                         f"one job per member's merge; instance storage {plan.instance_storage}")
        else:
            lines.append(f"devices: {', '.join(plan.devices)} (executor {plan.executor}); at most "
                         f"{plan.merges_at_once} merges at once (pool {plan.pool!r} limit {limit}, across runs)")
        lines.append(f"members ({plan.parallel} at a time): activations and merge history per member")
        self.view.print("\n".join(lines))

    def running(self, steps) -> None:
        self.stopper.raise_pending()
        self.view.update(steps)

    def member_finished(self, outcome: RunOutcome, done: int, total: int) -> None:
        self.view.print(outcome_line(outcome, done, total))
        self.stopper.raise_pending()

    def ensemble_started(self) -> None:
        self.stopper.raise_pending()
        self.view.close()
        self.view.print("ensemble: normalized ensemble, distances, consensus clusters and the cluster explorer")

    def ensemble_finished(self, outcome: RunOutcome) -> None:
        self.view.print(outcome_line(outcome, 1, 1))


def check_summary(checks: list[CheckOutcome]) -> list[str]:
    """One line per asset: each check's passes out of its evaluations, and which members failed it and why."""
    by_asset: dict[str, dict[str, list[CheckOutcome]]] = defaultdict(lambda: defaultdict(list))
    for check in checks:
        by_asset[check.asset][check.check].append(check)
    lines = []
    for asset, by_check in by_asset.items():
        parts = []
        for name, evaluations in by_check.items():
            passed = sum(e.passed for e in evaluations)
            part = f"{name} {passed}/{len(evaluations)} passed"
            failed = [e for e in evaluations if not e.passed]
            if failed:
                label = "warning" if all(e.severity == "WARN" for e in failed) else "FAILED"
                # A member's check names the members that failed it; a whole-experiment check only its reason.
                said = [", ".join(e.partition for e in failed if e.partition), failed[0].description]
                part += f" ({label}: {': '.join(filter(None, said)) or 'no reason given'})"
            parts.append(part)
        lines.append(f"  {asset:<22} " + "; ".join(parts))
    return lines


def summary_lines(run: ExperimentRun, *, new_experiment: bool = False) -> list[str]:
    """What `spd-cluster run` prints at the end: members, checks, consensus, and where everything is (and, for an
    experiment run here for the first time, that a UI started before shows it once it reloads its definitions)."""
    plan, failed = run.plan, run.failed_members
    total = len(plan.members)
    ensemble = run.ensemble is not None and run.ensemble.success
    lines = [f"\ndone in {run.seconds:.1f} s: {total - len(failed)}/{total} members"
             + (f" (failed: {', '.join(failed)}; retry with --members {','.join(failed)})" if failed else "")
             + (", ensemble, distances and consensus materialized" if ensemble else ", ensemble FAILED")]
    if run.checks:
        lines += ["checks:", *check_summary(run.checks)]
    consensus = run.consensus
    if consensus:
        lines.append(f"consensus: {consensus.get('clusters')} clusters of {consensus.get('clustered_components')} "
                     f"components at iteration {consensus.get('iteration')} ({consensus.get('rule')})")
        if consensus.get("minimum_at_last_iteration"):
            lines.append(f"  warning: {consensus['minimum_at_last_iteration']}")
    query = (f"SELECT member, max(iteration) + 1 AS iterations, min(mdl_loss) AS best_mdl FROM merge_events "
             f"WHERE experiment = '{plan.experiment}' GROUP BY member ORDER BY member")
    lines.append(f"""
results   {run.results_dir}""")
    if run.explorer_path is not None:
        lines.append(f"explorer  {run.explorer_path}  (open it in a browser; no server needed)")
    lines.append(f"""run logs  {plan.log_path}  (and every run in the Dagster UI)
tables    {run.database_path}  (DuckDB views over Parquet; any DuckDB client can open it read-only)
  query:  spd-cluster sql "{query}"
UI        DAGSTER_HOME={plan.home} dagster dev -w {PROJECT_ROOT / 'workspace.yaml'}   (then open http://localhost:3000)""")
    if new_experiment:
        # The code location reads the registered experiments when it loads: a UI already running has not seen this one.
        lines.append(f"          a UI started before this run shows {plan.experiment!r} once you click "
                     "\"Reload definitions\" (or restart it)")
    return lines


def interruption_line(run: ExperimentRun) -> str:
    """The one line an interrupted run prints (to standard error)."""
    stopped = run.interruption
    # A member just handed to a worker may have no Dagster run yet: members and runs are counted apart.
    flight = (f" ({', '.join(stopped.in_flight)}; {len(stopped.canceled_runs)} of their Dagster runs had started, now "
              f"marked canceled)" if stopped.in_flight else "")
    jobs = f"; canceled SLURM job(s) {', '.join(stopped.canceled_slurm_jobs)}" if stopped.canceled_slurm_jobs else ""
    return (f"\nspd-cluster: interrupted ({stopped.signal_name}): canceled {len(stopped.in_flight)} member(s) in flight"
            f"{flight} and {len(stopped.queued)} queued member(s); {len(stopped.finished)} finished before{jobs}")


def run_config_file(path, overrides: list[str], *, parallel: int | None = None, only_members: list[str] | None = None,
                    program: str = "spd-cluster", not_used_flags: list[str] = (), replace: bool = False,
                    executor: str | None = None) -> int:
    """Load a config file (an experiment config or an original one) and run it (on `executor`, default the
    deployment's); 2 when it is invalid."""
    try:
        loaded = load_config_file(path, overrides)
    except SpdClusterError as error:
        print(f"{program}: {error}", file=sys.stderr)
        return 2
    return run_loaded(loaded, parallel=parallel, only_members=only_members, program=program,
                      not_used_flags=not_used_flags, replace=replace, executor=executor)


def run_loaded(loaded: LoadedConfig, *, parallel: int | None = None, only_members: list[str] | None = None,
               program: str = "spd-cluster", not_used_flags: list[str] = (), replace: bool = False,
               executor: str | None = None) -> int:
    """Run a config file already read (see `run_config_file`)."""
    for line in describe_loaded(loaded):
        print(line)
    if not_used_flags:
        print(f"  flags not used here: {' '.join(not_used_flags)}")
    try:
        # An original pipeline's SLURM keys: for this invocation's jobs.
        return run_and_print(loaded.config, parallel=parallel, only_members=only_members, replace=replace,
                             program=program, executor=executor, slurm=loaded.slurm)
    except SpdClusterError as error:
        print(f"{program}: {error}", file=sys.stderr)
        return 2


def run_and_print(config: ExperimentConfig, *, parallel: int | None, only_members: list[str] | None,
                  replace: bool = False, program: str = "spd-cluster", executor: str | None = None,
                  slurm: Mapping[str, str] | None = None) -> int:
    """Run `config` in the instance of DAGSTER_HOME (`executor` and `slurm` settings over the deployment's),
    printing as it goes; the exit status.

    0 when every member and the ensemble succeeded, 1 when some failed, 130/143 after Ctrl-C/SIGTERM.
    """
    stopper = _Stopper()
    previous = {signum: signal.signal(signum, stopper) for signum in (signal.SIGINT, signal.SIGTERM)}
    printer = _Printer(stopper)
    new_experiment = config.name not in results_store(dagster_home()).experiment_names()
    try:
        run = run_experiment(config, home=dagster_home(), parallel=parallel, only_members=only_members,
                             replace=replace, origin=program, progress=printer, executor=executor, slurm=slurm)
    except Interrupted as stopped:  # before any member started (SIGTERM; Ctrl-C is the command line's to say)
        print(f"{program}: interrupted ({signal.Signals(stopped.signum).name}) before any member started",
              file=sys.stderr)
        return INTERRUPTED_EXIT.get(stopped.signum, 130)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        printer.view.close()
    if run.interruption is not None:
        print(interruption_line(run), file=sys.stderr, flush=True)
        return INTERRUPTED_EXIT.get(run.interruption.signum, 130)
    print("\n".join(summary_lines(run, new_experiment=new_experiment)))
    return 0 if run.success else 1
