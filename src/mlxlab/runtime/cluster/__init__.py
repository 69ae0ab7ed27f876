"""One job's processes across ranks and machines: the process group on MLX's own engine, its
world and the watchdog over its collectives (distributed.py), and Slurm's warning before a
job's time limit (slurm.py)."""
