"""What a run trains toward: the `Objective` interface (base.py) the loop calls, what the
objectives share (losses, metrics, validation, rollouts, the metric catalog), and the objectives a
`conf/objective/*.yaml` picks, by family: supervised/ (supervised, distillation, GKD),
preference/ (DPO/IPO/SimPO/ORPO, KTO, reward models), rl/ (GRPO, its rewards, tools and
environments)."""
