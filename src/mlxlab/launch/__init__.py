"""What `mlxlab-train` does around the training of a run: the command line checked (argv.py),
Hydra composing it (composing.py), the entry point with its supervising parent (entry.py), one
job under the failure policy (app.py), the parts wired from the config (wiring.py), the config a
resumed run trains (resume.py), and rounds of distillation as a parent run with a child run per
round (rounds.py). train.py's `train(cfg)` wires one run from these; nothing here imports
train.py (it hands `train` in)."""
