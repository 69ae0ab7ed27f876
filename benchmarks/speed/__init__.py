"""How fast: a step, a run, a kernel, a save, a sweep, beside a reference timed in the same run."""
