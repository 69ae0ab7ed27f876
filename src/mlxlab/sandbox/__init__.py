"""Code nobody reviewed (what a model writes) run confined: `confine.py` starts a fresh interpreter
with its limits and layers (rlimits, network and PID namespaces, Landlock, seccomp, an audit hook)
and says which took effect; `child.py` is that interpreter's script, which confines itself before
the code runs. Imports nothing of mlxlab above it; GRPO's `run_python` tool
(objectives/rl/sandbox.py) is what calls it. Modules import their siblings, not this package.
"""
