"""A sweep's life in one room, read top to bottom (above training/ and tracking/, below runs/,
train.py and cli/; it reads and writes the store through tracking/mlflow):

- identity.py: what the user asked (overrides, sweeper params, task, root, store), hashed; the
  newest sweep with that identity and whether it finished (discovery);
- folder.py: the sweep folder's files: what the launching process tells its jobs (the parent
  run, the swept keys, the command that continues it), what a job reports back (the runs it
  made, why it failed) and a stop by a signal;
- parent.py: a parent run of child runs on any Tracker (distillation rounds hold one), and the
  sweep's, on MLflow while its launcher lives (process tags, heartbeat; FINISHED when every job
  is, KILLED after a signal);
- checks.py: the first Hydra callback: bad input and an unusable store refused before anything
  of the sweep exists; the start lock of searches started together;
- callback.py: the Hydra callback: the store created, its dead runs marked, a grid continued
  in its folder, the parent run started or adopted, each job's outcome (and failure) recorded,
  the parent closed with the sweep's table, groups and verdict;
- jobs.py: which jobs of a continued sweep are kept, resumed from their checkpoints, or run;
- search/: the Hydra sweeper every --multirun uses: a grid with replicates, or the Optuna
  search (study, space, pruning, a job's trial);
- store.py: queries over the store: a sweep's parent and children, its table;
- groups.py: a sweep's seeds as replicates: groups of runs with intervals;
- compare.py: paired comparisons between groups (through stats/);
- verdict.py: the verdict on the parent run (description, tags, comparison.json, bands).

tracking/mlflow/stale.py stays with the logging side (every command that opens the store marks
dead runs, not only sweeps).
"""
