"""Progress of a long loop with its rate and ETA: a tqdm bar on a terminal, a log line every ~10 s elsewhere.

    with Progress(total=37, desc="eval v0", unit="question") as bar:
        for answer in answers:
            bar.update(1)
            bar.write(table_row)      # a line on stdout that does not tear the bar on stderr

On a terminal (stderr is a TTY) the bar redraws at most once a second. In a log file or a pipe a bar
would be one line rewritten thousands of times; instead the `medvl_engine.progress` logger gets a start
line, then `eval v0: 12/37 questions (32%), 1.45 questions/s, ETA 0:17` at most every `interval_s`
(and a last line when the loop ends). MEDVL_PROGRESS=bar forces the bar, =log the lines, =off neither.
With `heartbeat` (loops whose single units take long: a GRPO step, whose first one waits for the rollout
workers to load the model) the line also comes every `interval_s` while no unit finishes.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time

logger = logging.getLogger(__name__)

MODES = ("bar", "log", "off")
ENV = "MEDVL_PROGRESS"


def choose_mode(enabled: bool = True) -> str:
    """off when disabled, else $MEDVL_PROGRESS when it names a mode, else bar on a terminal and log lines elsewhere."""
    if not enabled:
        return "off"
    forced = os.environ.get(ENV, "").strip().lower()
    if forced in MODES:
        return forced
    isatty = getattr(sys.stderr, "isatty", None)
    return "bar" if isatty is not None and isatty() else "log"


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    """Counts `unit`s done of `total` (None: unknown), from `initial` (work a resumed run already did)."""

    def __init__(self, total: int | None, desc: str, *, unit: str = "it", initial: int = 0, enabled: bool = True,
                 interval_s: float = 10.0, mode: str | None = None, heartbeat: bool = False, clock=time.monotonic):
        self.total = total
        self.desc = desc
        self.unit = unit
        self.initial = self.n = initial
        self.interval_s = interval_s
        self.mode = mode or choose_mode(enabled)
        if self.mode not in MODES:
            raise ValueError(f"progress mode {self.mode!r}: choose from {', '.join(MODES)}")
        self.postfix = ""
        self._clock = clock
        self._start = self._last = clock()
        self._logged_n = initial
        self._bar = None
        if self.mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True,
                             mininterval=1.0)
        elif self.mode == "log":
            done = f"{initial}/{total}" if total is not None else str(initial)
            logger.info("%s: %s %ss done, starting", desc, done, unit)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._beat = None
        if heartbeat and self.mode == "log" and interval_s > 0:
            self._beat = threading.Thread(target=self._heartbeat, name=f"progress {desc}", daemon=True)
            self._beat.start()

    # -- counting -------------------------------------------------------------------------------------

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.mode == "log" and self._clock() - self._last >= self.interval_s:
            self._log_line()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.interval_s / 4):
            if self._clock() - self._last >= self.interval_s:
                self._log_line()

    def set_postfix(self, text: str) -> None:
        """Extra figures after the rate (e.g. `4.1 answers/s`), shown with the next redraw or line."""
        self.postfix = text
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=False)

    @property
    def rate(self) -> float:
        """Units per second since the start (work done before `initial` does not count)."""
        elapsed = self._clock() - self._start
        return (self.n - self.initial) / elapsed if elapsed > 0 else 0.0

    def line(self) -> str:
        """`desc: n/total units (pct%), rate units/s, ETA m:ss[, postfix]`."""
        rate = self.rate
        if self.total:
            text = f"{self.desc}: {self.n}/{self.total} {self.unit}s ({100 * self.n / self.total:.0f}%), "
        else:
            text = f"{self.desc}: {self.n} {self.unit}s, "
        text += f"{rate:.2f} {self.unit}s/s"
        if self.total and self.n < self.total:
            elapsed = format_duration(self._clock() - self._start)
            text += f", ETA {format_duration((self.total - self.n) / rate)}" if rate > 0 else f", {elapsed} in, ETA ?"
        elif self.total:
            text += f", {format_duration(self._clock() - self._start)} in all"
        return text + (f", {self.postfix}" if self.postfix else "")

    def _log_line(self) -> None:
        with self._lock:
            self._last = self._clock()
            self._logged_n = self.n
            logger.info("%s", self.line())

    # -- output ---------------------------------------------------------------------------------------

    def write(self, text: str) -> None:
        """Print `text` to stdout (a command's result, e.g. a table row) without garbling the bar."""
        if self._bar is not None:
            self._bar.write(text, file=sys.stdout)
            sys.stdout.flush()
        else:
            print(text, flush=True)

    def close(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
            self._beat = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.mode == "log" and self.n != self._logged_n:
            self._log_line()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
