"""The command that goes on with a run: what a run stopped by a signal prints.

A single run continues with its own command line and `resume=auto`. A sweep's job continues
with the sweep's own command, as the launcher was started (sweeps/folder.py keeps it in the
sweep folder, without `sweep.fresh=true`): run again, it continues that sweep, each killed job
from its own checkpoint (sweeps/jobs.py). `resume=auto` added to a sweep command would continue
every job from one run; the callback refuses it.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from mlxlab.sweeps.folder import current_job, record_stop, signal_name, sweep_command
from mlxlab.tracking.source import command_line

log = logging.getLogger("mlxlab")


def leave_after_signal(checkpoint: Path | None, exit_code: int, requeue: bool) -> None:
    """A run stopped by a signal (after its checkpoint): the hint logged, the Slurm job
    requeued when it asked (SIGUSR1 with trainer.requeue), and the process left with the
    signal's exit code."""
    log.error("%s", stopped_hint(checkpoint, exit_code))
    if requeue:
        from mlxlab.runtime.cluster import slurm

        slurm.requeue()
    sys.exit(exit_code)


def stopped_hint(checkpoint: Path | None, exit_code: int) -> str:
    """The line a run stopped by a signal logs: its checkpoint, and the command that goes on.
    In a sweep's job, the stop is also written into the sweep folder (its parent run ends
    KILLED)."""
    name = signal_name(exit_code)
    job = current_job()
    if job is None:
        argv = [a for a in sys.argv if not a.lstrip("+~").startswith("resume=")]
        command = " ".join(a for a in [command_line(argv), "resume=auto"] if a)
        return f"stopped by {name}; checkpoint: {checkpoint}; resume with: {command}"
    record_stop(job.sweep_dir, exit_code)
    command = sweep_command(job.sweep_dir) or "the same sweep command"
    return (
        f"stopped by {name}; checkpoint: {checkpoint}; continue the sweep (this job from its "
        f"checkpoint) with the same command: {command}"
    )
