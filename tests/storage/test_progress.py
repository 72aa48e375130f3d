"""Progress of long steps: the files a step writes and the lines it logs, and how the command line shows them."""

from __future__ import annotations

import io
import json
import time

import pytest

from spd_assets.cli.progress_view import ProgressView, bar_line
from spd_assets.storage import progress
from spd_assets.storage.progress import ProgressLines, ProgressReporter, StepProgress, progress_path, read_progress
from spd_assets.storage.store import ResultsStore


def step(member: str = "member_000", done: int = 40, total: int = 100, rate: float = 4.0) -> StepProgress:
    return StepProgress(experiment="e", member=member, step="merge", done=done, total=total, unit="merges", rate=rate,
                        seconds=10.0, updated=time.time(), k=60, mdl_loss=1234.5, pid=1)


def test_a_reporter_writes_its_file_logs_lines_and_removes_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(progress, "FILE_INTERVAL_S", 0.0)
    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 0.05)
    store = ResultsStore(tmp_path)
    path = progress_path(store, "e", "member_001")
    logged = []
    created = time.monotonic()
    reporter = ProgressReporter(path, logged.append, experiment="e", member="member_001", step="merge", unit="merges")
    time.sleep(1.0)  # the merge's set-up: not part of its pace
    first = time.monotonic()
    for done in range(1, 51):
        reporter.update(done, 100, k=200 - done, mdl_loss=float(done))
        time.sleep(0.004)
    last = time.monotonic()
    found = read_progress(store, "e")["member_001"]
    assert (found.done, found.total, found.k, found.mdl_loss, found.step) == (50, 100, 150, 50.0, "merge")
    # The pace of the merges themselves, not diluted by the set-up before the first.
    assert 49 / (last - first) / 2 < found.rate < 49 / (last - first) * 2
    assert found.rate > 2 * 50 / (last - created)
    assert found.seconds_left == pytest.approx(50 / found.rate)
    assert logged and logged[-1].startswith("member_001: merge ") and "k 1" in logged[-1] and "merges/s" in logged[-1]
    reporter.close()
    assert not path.exists() and read_progress(store, "e") == {}


def test_files_of_earlier_runs_are_not_read_as_current(tmp_path):
    store = ResultsStore(tmp_path)
    path = progress_path(store, "e", "member_000")
    path.parent.mkdir(parents=True)
    stale = step()
    path.write_text(json.dumps({**stale.__dict__, "updated": time.time() - 3600}))
    assert read_progress(store, "e", since=time.time() - 60) == {}
    assert read_progress(store, "e")["member_000"].done == 40
    (path.parent / "member_001.json").write_text("{not json")  # half written by a killed step: skipped
    assert set(read_progress(store, "e")) == {"member_000"}


def test_descriptions_say_the_time_left_and_the_pace():
    text = step(done=6512, total=15999, rate=38.2).describe()
    assert text.startswith("merge 6,512/15,999 merges (41%), about 4 min left, k 60, MDL 1234") and "38.2 merges/s" in text
    assert "left" not in step(done=100, total=100).describe()
    line = bar_line("member_003", step(done=6512, total=15999, rate=38.2), width=200)
    assert "[#########" in line and " 41%" in line and "4 min left" in line
    assert len(bar_line("member_003", step(), width=30)) == 30


def test_the_live_view_redraws_bars_below_the_printed_lines():
    out = io.StringIO()
    view = ProgressView(out, live=True)
    view.update({"member_000": step(done=10), "member_001": step("member_001", done=20)})
    view.print("  [1/6] ok     member_002")
    view.update({"member_000": step(done=30)})
    view.close()
    text = out.getvalue()
    # Bars are erased (cursor up two lines, clear below) before the line, then drawn again under it.
    assert text.count("\x1b[2F\r\x1b[J") == 2 and text.rstrip().endswith("\x1b[1F\r\x1b[J")
    assert text.index("[1/6] ok") > text.index("member_001")
    unchanged = io.StringIO()
    quiet = ProgressView(unchanged, live=True)
    quiet.update({"member_000": step()})
    quiet.update({"member_000": step()})  # the same text: nothing is redrawn
    assert unchanged.getvalue().count("member_000") == 1


def test_without_a_terminal_a_line_per_member_every_interval(monkeypatch):
    lines = ProgressLines(interval_s=0.05)
    assert lines.due({"member_000": step()}) == []  # a member just seen: its first line after one interval
    time.sleep(0.06)
    due = lines.due({"member_000": step(), "member_001": step("member_001")})
    assert len(due) == 1 and due[0].startswith("  member_000") and "merge 40/100 merges (40%)" in due[0]
    time.sleep(0.06)
    assert [line.split()[0] for line in lines.due({"member_001": step("member_001")})] == ["member_001"]
