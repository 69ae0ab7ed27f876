"""The supervising parent and the failures it answers: `supervise.py` runs mlxlab-train's child
and restarts it from its last checkpoint at half the micro-batch when it runs out of memory, or
ends it when it stops making progress; `failures.py` says which device failures must end a run.
Modules import their siblings, not this package.
"""
