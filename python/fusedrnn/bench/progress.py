"""A dependency-free progress bar on stderr: redrawn in place on a terminal, one line per finished
cell otherwise (logs and CI stay readable)."""
from __future__ import annotations

import sys
import time


def _fmt_s(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Progress:
    def __init__(self, total: int, enabled: bool = True, stream=None, width: int = 24):
        self.total = max(1, total)
        self.done = 0.0
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.width = width
        self.start = time.monotonic()
        self.label = ""
        self.stage_name = ""     # what the current cell is doing, shown after its label
        self.within = 0.0        # fraction of the current cell done, as last reported

    def _line(self, fraction: float) -> str:
        filled = int(self.width * fraction)
        elapsed = time.monotonic() - self.start
        eta = elapsed / fraction * (1 - fraction) if fraction > 0 else 0.0
        stage = f" ({self.stage_name})" if self.stage_name else ""
        return (f"[{'#' * filled}{'.' * (self.width - filled)}] {fraction * 100:5.1f}% "
                f"{_fmt_s(elapsed)} elapsed, ~{_fmt_s(eta)} left  {self.label}{stage}")

    def begin(self, label: str) -> None:
        self.label = label
        self.stage_name = ""
        self.update(0.0)

    def stage(self, name: str) -> None:
        """Names what the cell does next. The float64 check and the warm-up of a large cell take
        seconds with nothing timed, and a bar that neither moves nor says why looks hung."""
        self.stage_name = name
        self.update(self.within)

    def update(self, within_cell: float) -> None:
        """within_cell: fraction of the current cell done (0..1)."""
        self.within = within_cell
        if not self.enabled or not self.tty:
            return
        fraction = min(1.0, (self.done + within_cell) / self.total)
        self.stream.write("\r\033[K" + self._line(fraction)[:160])
        self.stream.flush()

    def end_cell(self, summary: str = "") -> None:
        """summary: the finished cell's results, shown in the one-line-per-cell (non-terminal) form."""
        self.done += 1
        self.within = 0.0
        self.stage_name = ""
        if not self.enabled:
            return
        if self.tty:
            self.update(0.0)
        else:
            line = self._line(min(1.0, self.done / self.total))
            self.stream.write(line + (f": {summary}" if summary else "") + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\r\033[K")
            self.stream.flush()

    def note(self, text: str) -> None:
        """A message that must not be overwritten by the bar."""
        if self.tty and self.enabled:
            self.stream.write("\r\033[K")
        self.stream.write(text + "\n")
        self.stream.flush()
