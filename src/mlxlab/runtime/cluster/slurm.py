"""Slurm preemption: `sbatch --signal=USR1@90` warns a job 90 s before its time limit.

SIGUSR1 stops a run like SIGTERM (finish the step, checkpoint: training/signals.py). With
trainer.requeue=true the run then puts its job back in the queue (`scontrol requeue`), and the
requeued start (Slurm sets SLURM_RESTART_COUNT) resumes with resume=auto by itself.
"""

from __future__ import annotations

import logging
import shutil
import subprocess

from mlxlab.runtime import settings

log = logging.getLogger(__name__)


def job_id() -> str | None:
    return settings.current().slurm_job_id


def restarted() -> bool:
    """True in a requeued job's later starts."""
    return settings.current().slurm_restart_count > 0


def requeue(timeout_s: float = 30.0) -> bool:
    """`scontrol requeue $SLURM_JOB_ID`: True when Slurm took the job back; else one log line
    saying why and what to run instead."""
    job = job_id()
    if job is None:
        log.warning("trainer.requeue: not a Slurm job (no SLURM_JOB_ID): nothing requeued; "
                    "start it again with resume=auto")
        return False
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        log.error("trainer.requeue: scontrol is not on PATH: job %s not requeued; submit it "
                  "again with resume=auto", job)
        return False
    try:
        done = subprocess.run([scontrol, "requeue", job], capture_output=True, text=True,
                              timeout=timeout_s)
    except subprocess.TimeoutExpired:
        log.error("trainer.requeue: scontrol requeue %s gave no answer in %.0f s; submit the job "
                  "again with resume=auto", job, timeout_s)
        return False
    if done.returncode != 0:
        log.error("trainer.requeue: scontrol requeue %s failed (%s); submit the job again with "
                  "resume=auto", job, (done.stderr or done.stdout).strip()[:300])
        return False
    log.info("trainer.requeue: job %s requeued; its next start resumes from the checkpoint", job)
    return True
