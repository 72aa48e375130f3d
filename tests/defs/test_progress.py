"""Progress of members as they run: what the run's starter is shown (from the members' worker processes), what
Dagster's log says, and that nothing is left behind."""

from __future__ import annotations

from spd_assets.config import parse_config
from spd_assets.results import ClusteringResults
from spd_assets.service.experiment import Progress, run_experiment
from spd_assets.storage import progress
from spd_assets.storage.progress import progress_dir
from tests.pipeline_helpers import definitions_for, instance_at, make_home, materialize_experiment, store_at

# About 2,000 components merged to the end: a few seconds of merging per member.
MERGING = {"kind": "synthetic", "n_members": 2, "batch_size": 16,
           "params": {"n_layers": 2, "modules": ["attn.q", "mlp.up", "mlp.down"], "components_per_module": [330, 340],
                      "n_planted_groups": 120}}


class Recorder(Progress):
    def __init__(self) -> None:
        self.seen: list[dict] = []

    def running(self, steps) -> None:
        self.seen.append(dict(steps))


def test_the_starter_sees_each_members_merge_advance(tmp_path):
    home = make_home(tmp_path / "home")
    recorder = Recorder()
    run = run_experiment(parse_config({"name": "watched", "source": MERGING, "merge_config": {"iters": None}}),
                         home=home, progress=recorder)
    assert run.success
    merges = {}
    for steps in recorder.seen:
        for member, step in steps.items():
            if step.step == "merge":
                merges.setdefault(member, []).append(step)
    assert set(merges) == {"member_000", "member_001"}
    results = ClusteringResults.load("watched", home=home)
    for member, steps in merges.items():
        c = results.histories[member].c_components
        assert [step.done for step in steps] == sorted(step.done for step in steps)
        assert all(step.total == c - 3 and step.k == c - step.done and step.unit == "merges" for step in steps)
    assert not any(progress_dir(store_at(home), "watched").glob("*.json"))  # each file went with its step


def test_dagster_logs_where_a_merge_is(tmp_path, monkeypatch):
    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 0.2)  # the merge runs in this process: its log lines come often
    home = make_home(tmp_path / "home")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    config = parse_config({"name": "logged", "source": {**MERGING, "n_members": 1}, "merge_config": {"iters": None}})
    with instance_at(home) as instance:
        members, _ = materialize_experiment(definitions_for(config), instance, config, ["member_000"])
        assert members["member_000"].success
        messages = [entry.user_message for entry in instance.all_logs(members["member_000"].run_id)]
    lines = [message for message in messages if message.startswith("member_000: merge ")]
    assert len(lines) >= 2 and "merges (" in lines[0] and ", k " in lines[0] and "merges/s" in lines[-1]
