"""The sweeper of every multirun (part of sweeps/): replicates, the Optuna search, pruning.

- sweeper.py: the Hydra sweeper every `--multirun` uses (conf/hydra/sweeper/mlxlab.yaml): a
  grid with `replicates=N`, or an Optuna search (`hydra.sweeper.n_trials`);
- study.py: the study's RDB storage, stale trials, heartbeats (what makes a search resumable);
- space.py: Hydra's sweep grammar (choice, range, interval, tag(log, ...)) as distributions;
- trial_link.py: the sweep-folder file that tells a job which trial it trains;
- pruning.py: the pruners and `TrialReporter`, the training callback that feeds them.
"""
