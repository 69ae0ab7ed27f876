"""What a run trains toward: the `Objective` interface (base.py) the loop calls, and the
objectives (supervised, distillation, preference) a `conf/objective/*.yaml` picks."""
