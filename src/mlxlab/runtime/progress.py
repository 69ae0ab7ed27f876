"""Progress of long work outside a training run's loop (a verb's scoring, predictions,
generations): a bar where stderr is a terminal (tqdm), and a line at each tenth of the work
(count, rate, time left) and at the end wherever people look instead.

The lines go to the logger the caller names when something handles it (a training run's log
file, a test's capture); when nothing does (a verb run from a shell, whose logging is not set
up) and stderr is not a terminal (`mlxlab eval ... 2> eval.log`, a batch job's output), they
are written to stderr themselves, so a log file shows the work going on as a terminal does.
"""

from __future__ import annotations

import logging
import sys
import time


class Progress:
    """`total` units of work called `what`: `add(n)` as they are done, `close()` at the end."""

    def __init__(self, what: str, total: int, unit: str,
                 log: logging.Logger | None = None) -> None:
        from tqdm import tqdm  # a verb that shows no progress does not import it

        self.what, self.total, self.unit, self.done = what, total, unit, 0
        self.log = log or logging.getLogger(__name__)
        self.started, self.next_line = time.perf_counter(), max(1, total // 10)
        self.bar = tqdm(total=total, desc=what, unit=f" {unit}", disable=None, leave=False)
        # no handler and no bar: nobody would see the log lines, so stderr gets them
        self.to_stderr = self.bar.disable and not self.log.hasHandlers()

    def _say(self, message: str, *args: object) -> None:
        if self.to_stderr:
            print(message % args, file=sys.stderr, flush=True)
        else:
            self.log.info(message, *args)

    def add(self, n: int) -> None:
        self.done += n
        self.bar.update(n)
        if self.done >= self.next_line and self.done < self.total:
            while self.next_line <= self.done:
                self.next_line += max(1, self.total // 10)
            rate = self.done / max(time.perf_counter() - self.started, 1e-9)
            self._say("%s: %d/%d %s, %.2f/s, ~%.0f s left", self.what, self.done, self.total,
                      self.unit, rate, (self.total - self.done) / rate)

    def close(self) -> None:
        self.bar.close()
        seconds = time.perf_counter() - self.started
        if self.done:
            self._say("%s: %d %s in %.1f s (%.2f/s)", self.what, self.done, self.unit, seconds,
                      self.done / max(seconds, 1e-9))
