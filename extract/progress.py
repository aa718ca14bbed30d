"""Progress of the long loops (`msdn extract`, `msdn train`): a bar on a terminal, plain lines in a log.

    bar = progress_bar(total=4234, desc="final run", unit="steps", enabled=True)
    bar.update(1); bar.set_postfix({"loss": "1.234"}); bar.write("a message"); bar.close()

When stderr is a terminal this is a tqdm bar. When it is not (a batch scheduler's log file,
`> log 2>&1`, a pipe), a bar would become one line of thousands of carriage returns; instead one
short line is printed every $MSDN_PROGRESS_INTERVAL seconds (default 30; 0 = at every update) and
one when the loop ends:

    final run: 1200/4234 steps (28%), 45.3 steps/s, elapsed 00:26, ETA 01:07, loss=1.234, samples/s=2265
    final run: done, 4234/4234 steps in 01:33 (45.5 steps/s), loss=1.101, samples/s=2270

Rate and ETA are the average since the loop started (evaluations included: they recur, so the
average is what the rest of the run will take). The postfix is whatever the loop last set; the
training loop sets it only at its existing host read-back (every log_every steps), so following a
run costs no extra device synchronisation.

This module is in extract/ because the extraction needs it and extract/ imports nothing from
pipeline/; pipeline/engine.py uses it too.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import time

from tqdm import tqdm

ENV_INTERVAL = "MSDN_PROGRESS_INTERVAL"
DEFAULT_INTERVAL_S = 30.0


def progress_interval(environ=None, stream=None) -> float:
    """Seconds between two progress lines: $MSDN_PROGRESS_INTERVAL, else 30. A value that is not a
    number >= 0 gets one warning line on `stream` (stderr) and the default: a display setting is
    no reason to stop a run."""
    raw = (os.environ if environ is None else environ).get(ENV_INTERVAL, "").strip()
    if not raw:
        return DEFAULT_INTERVAL_S
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        print(f"warning: ${ENV_INTERVAL} must be a number of seconds >= 0, got {raw!r}; "
              f"printing progress every {DEFAULT_INTERVAL_S:g} s", file=stream or sys.stderr, flush=True)
        return DEFAULT_INTERVAL_S
    return value


def is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


def progress_bar(total: int | None, desc: str, *, unit: str = "it", enabled: bool = True, stream=None,
                 interval: float | None = None, **tqdm_options):
    """A tqdm bar when `stream` (default: stderr) is a terminal, ProgressLines when it is not, a
    disabled tqdm when not `enabled`. `tqdm_options` only concern the bar (dynamic_ncols, leave...)."""
    stream = sys.stderr if stream is None else stream
    if not enabled:
        return tqdm(total=total, disable=True)
    if is_terminal(stream):
        return tqdm(total=total, desc=desc, unit=unit, file=stream, **tqdm_options)
    return ProgressLines(total, desc, unit=unit, stream=stream,
                         interval=progress_interval(stream=stream) if interval is None else interval)


def above_bars():
    """Context in which a message printed to stderr does not tear a live bar (tqdm clears the
    bars before and redraws them after); with plain lines it changes nothing."""
    return tqdm.external_write_mode(file=sys.stderr)


class ProgressLines:
    """The plain-line stand-in for a tqdm bar: update, set_postfix, write and close, as tqdm's."""

    def __init__(self, total: int | None, desc: str, *, unit: str = "it", stream=None,
                 interval: float = DEFAULT_INTERVAL_S):
        self.total, self.desc, self.unit, self.interval = total, desc, unit, float(interval)
        self.stream = sys.stderr if stream is None else stream
        self.n, self.postfix, self.closed = 0, {}, False
        self.start = self._last_line = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._last_line >= self.interval:
            self._print(self.line(now))
            self._last_line = now

    def set_postfix(self, ordered_dict=None, **values) -> None:
        self.postfix = {**(ordered_dict or {}), **values}

    def write(self, message: str, file=None, end: str = "\n") -> None:
        print(message, file=file or self.stream, end=end, flush=True)

    def close(self) -> None:
        """One last line: done (every step) or where it stopped (an error or Ctrl-C ended the loop)."""
        if self.closed:
            return
        self.closed = True
        self._print(self.line(time.monotonic(), final=True))

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def line(self, now: float, final: bool = False) -> str:
        elapsed = max(now - self.start, 0.0)
        rate = self.n / elapsed if elapsed > 0 else 0.0
        extra = "".join(f", {k}={v}" for k, v in self.postfix.items())
        of = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        if final:
            state = "done" if not self.total or self.n >= self.total else "stopped at"
            return (f"{self.desc}: {state} {of} {self.unit} in {_clock(elapsed)} "
                    f"({_rate(rate)} {self.unit}/s){extra}")
        parts = [f"{self.desc}: {of} {self.unit}"]
        if self.total:
            parts[0] += f" ({100 * self.n / self.total:.0f}%)"
        parts += [f"{_rate(rate)} {self.unit}/s", f"elapsed {_clock(elapsed)}"]
        if self.total:
            parts.append("ETA " + (_clock((self.total - self.n) / rate) if rate > 0 else "?"))
        return ", ".join(parts) + extra

    def _print(self, line: str) -> None:
        with contextlib.suppress(ValueError):  # the stream was closed under us: nothing to follow
            print(line, file=self.stream, flush=True)


def _rate(rate: float) -> str:
    return f"{rate:.3g}" if rate < 100 else f"{rate:.0f}"


def _clock(seconds: float) -> str:
    return tqdm.format_interval(seconds)
