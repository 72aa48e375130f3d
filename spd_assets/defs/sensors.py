"""Sensors the Dagster daemon evaluates while `dagster dev` (or a deployment's daemon) runs."""

from __future__ import annotations

from dagster import DefaultSensorStatus, SensorEvaluationContext, SkipReason, sensor

from spd_assets.defs.dead_runs import free_slots_of_finished_runs, reap_dead_runs

# How often dead runs are looked for: a step queued behind a dead run's pool slot waits about this long.
DEAD_RUNS_INTERVAL_S = 10


@sensor(
    name="dead_runs",
    minimum_interval_seconds=DEAD_RUNS_INTERVAL_S,
    default_status=DefaultSensorStatus.RUNNING,
    description="Marks runs whose process died (killed `spd-cluster run` workers, killed run processes) as failed "
    "and frees the concurrency pool slots they and finished runs still hold. Dagster's run monitoring cannot "
    "tell for these runs (see spd_assets.defs.dead_runs).",
)
def dead_runs(context: SensorEvaluationContext) -> SkipReason:
    """Mark runs whose process died failed and free pool slots finished runs still hold (every few seconds)."""
    reaped = reap_dead_runs(context.instance, reaper="the dead_runs sensor")
    freed = free_slots_of_finished_runs(context.instance)
    for dead in reaped:
        context.log.warning(f"run {dead.run_id}: its {dead.how_known} (pid {dead.pid}) is gone; marked failed")
    if not reaped and not freed:
        return SkipReason("no dead runs")
    return SkipReason(f"marked {len(reaped)} dead run(s) failed ({', '.join(d.run_id[:8] for d in reaped) or '-'}); "
                      f"freed the pool slots of {len(reaped) + len(freed)} run(s)")
