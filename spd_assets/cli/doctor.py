"""`spd-cluster doctor`: the findings of `spd_assets.service.doctor.examine` printed, with the commands that
recompute what no repair can bring back."""

from __future__ import annotations

from collections import defaultdict

from spd_assets.service.doctor import Finding
from spd_assets.storage.store import ResultsStore


def recompute_commands(store: ResultsStore, findings: list[Finding]) -> list[str]:
    """The `spd-cluster run` commands that recompute what the findings need."""
    needed: dict[str, set[str]] = defaultdict(set)
    for finding in findings:
        if finding.recompute is not None and finding.experiment is not None:
            needed[finding.experiment].add(finding.recompute)
    commands = []
    for experiment, members in sorted(needed.items()):
        registered = store.experiments_dir / f"{experiment}.yaml"
        config = f" --config {registered}" if registered.exists() else ""
        # `run` recomputes the members it is given, then the ensemble; the ensemble alone needs every member run.
        only = sorted(m for m in members if m)
        commands.append(f"spd-cluster run{config}" + (f" --members {','.join(only)}" if only and "" not in members else ""))
    return commands


def report(store: ResultsStore, findings: list[Finding], *, repair: bool) -> int:
    """Print the findings and what to recompute; 0 when nothing is left to do."""
    for finding in findings:
        status = "note     " if finding.note else (
            "to do    " if finding.repair is None else ("repaired " if repair else "found    "))
        print(f"  {status} {finding.problem}" + (f": {finding.repair}" if finding.repair else ""))
    commands = recompute_commands(store, findings)
    for command in commands:
        print(f"recompute: {command}")
    notes = [f for f in findings if f.note]
    findings = [f for f in findings if not f.note]
    left = [f for f in findings if f.repair is None or not repair]
    repaired = len(findings) - len(left)
    if not findings:
        print("doctor: no problems found" + (f" ({len(notes)} note(s) above)" if notes else ""))
    else:
        print(f"doctor: {len(findings)} problem(s), {repaired} repaired, {len(left)} left"
              + (" (run without --dry-run to repair)" if not repair else ""))
    return 0 if not left and not commands else 1
