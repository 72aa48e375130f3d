"""How `spd-cluster run` shows the members in flight: a bar per member on a terminal, a line every ten seconds
otherwise (a log file, CI, a pipe), each under the lines printed so far."""

from __future__ import annotations

import shutil
import sys
from typing import TextIO

from spd_assets.storage.progress import ProgressLines, StepProgress, duration

# Without a terminal: one line per member in flight at most this often.
LINE_INTERVAL_S = 10.0
BAR_WIDTH = 24
# ANSI: cursor up n lines, then to the line's start and clear to the end of the screen.
_UP = "\x1b[{n}F"
_CLEAR_BELOW = "\r\x1b[J"


def bar_line(member: str, step: StepProgress, width: int) -> str:
    """`  member_003   merge       [#########...............]  41%  6,512/15,999, 4 min left, k 9,488, MDL 1.23e+06,
    38.2 merges/s` (cut at the terminal's width)."""
    filled = int(round(BAR_WIDTH * min(max(step.fraction, 0.0), 1.0)))
    parts = [f"{step.done:,}/{step.total:,}"]
    left = step.seconds_left
    if left is not None and step.done < step.total:
        parts.append(f"{duration(left)} left")
    if step.k is not None:
        parts.append(f"k {step.k:,}")
    if step.mdl_loss is not None:
        parts.append(f"MDL {step.mdl_loss:.4g}")
    if step.rate > 0:
        parts.append(f"{step.rate:,.1f} {step.unit}/s")
    line = (f"  {member:<12} {step.step:<11} [{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {step.fraction:4.0%}  "
            + ", ".join(parts))
    return line[:width]


class ProgressView:
    """Shows the latest progress of the members in flight on `stream`, and prints other lines above it."""

    def __init__(self, stream: TextIO | None = None, live: bool | None = None) -> None:
        self.stream = stream or sys.stdout
        self.live = self.stream.isatty() if live is None else live
        self.shown: list[str] = []  # the bar lines on the screen (live)
        self.lines = ProgressLines(LINE_INTERVAL_S)  # not live

    def print(self, text: str) -> None:
        """A line (or lines) of the run's output, above the bars."""
        self._clear()
        self.stream.write(text + "\n")
        self._draw(self.shown)
        self.stream.flush()

    def update(self, steps: dict[str, StepProgress]) -> None:
        """The members in flight and where they are."""
        if self.live:
            width = shutil.get_terminal_size((120, 20)).columns - 1
            lines = [bar_line(member, step, width) for member, step in sorted(steps.items())]
            if lines != self.shown:
                self._clear()
                self._draw(lines)
                self.stream.flush()
            return
        for line in self.lines.due(steps):
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        """Remove the bars (the run's summary follows)."""
        self._clear()
        self.shown = []
        self.stream.flush()

    def _clear(self) -> None:
        if self.live and self.shown:
            self.stream.write(_UP.format(n=len(self.shown)) + _CLEAR_BELOW)

    def _draw(self, lines: list[str]) -> None:
        if self.live:
            for line in lines:
                self.stream.write(line + "\n")
            self.shown = lines
