"""A sweep's life in one room, read top to bottom (above training/ and tracking/, below train.py
and cli/; it reads and writes the store through tracking/mlflow):

- folder.py: the sweep folder's files: what the launching process tells its jobs (the parent
  run, the swept keys) and what a job's trackers report back (the runs it made);
- callback.py: the Hydra callback: the store created and the sweep's parent run started before
  any job, each job's outcome logged, the parent closed with the sweep's table and groups;
- store.py: queries over the store: a sweep's parent and children, its table, a config's
  finished run;
- groups.py: a sweep's seeds as replicates: groups of runs with intervals;
- compare.py: paired comparisons between groups and the verdict (through stats/).

The Optuna search (search/) will move under here; tracking/mlflow/stale.py stays with the
logging side (every command that opens the store marks dead runs, not only sweeps).
"""
