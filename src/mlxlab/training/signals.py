"""SIGTERM/SIGINT/SIGUSR1: finish the current step, checkpoint, then stop.

SIGUSR1 is what Slurm sends ahead of a job's time limit (`sbatch --signal=USR1@90`); with
trainer.requeue the stopped run requeues its job (runtime/cluster/slurm.py).

The first signal only sets a flag the loop reads between steps. A second SIGINT exits at once;
that is safe because checkpoints are written to a temporary folder and renamed into place, so
an interrupted save never leaves a half-written committed checkpoint.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from types import FrameType

SIGUSR1 = getattr(signal, "SIGUSR1", None)  # Slurm's time-limit warning; Windows has none
STOP_SIGNALS = tuple(s for s in (signal.SIGTERM, signal.SIGINT, SIGUSR1) if s is not None)


class GracefulStop:
    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            sys.stderr.write("\nsecond interrupt: exiting now (committed checkpoints are intact)\n")
            os._exit(130)
        self.signum = signum
        name = signal.Signals(signum).name
        sys.stderr.write(f"\n{name} received: finishing this step and writing a checkpoint...\n")

    def arm(self) -> None:
        """From now on the stop signals set the flag (only the main thread can handle them)."""
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def disarm(self) -> None:
        """The handlers from before arm() again (nothing, if it was never armed)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    @property
    def time_limit_warning(self) -> bool:
        """The signal was SIGUSR1: Slurm's warning ahead of the job's time limit (requeue)."""
        return self.signum is not None and self.signum == SIGUSR1

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or 0)
