"""SmolLM2-135M-Instruct, multi-turn GRPO at temperature 0.5 over seeds 42-44: held-out accuracy
per seed, McNemar against the start, mean and its t interval (run from the repository root)."""
import json, statistics, sys
OUT = sys.argv[1] if len(sys.argv) > 1 else "/tmp/seeds77/real_t05_seeds.json"
sys.path.insert(0, "."); sys.argv = ["x"]
import benchmarks.quality.bench_agent_tools as b
from mlflow.tracking import MlflowClient
from scipy import stats
from mlxlab.stats.paired import mcnemar_exact

c = MlflowClient("sqlite:////tmp/agentgain/bench_real/mlruns/mlflow.db")
def last_run(name):
    return c.search_runs([c.get_experiment_by_name(name).experiment_id])[0].info.run_id
before_run = last_run("agent_real_before")
before = b.heldout_rewards(c, before_run)
seeds = {42: last_run("agent_real_after_t05"), 43: last_run("agent_real_after_t05_s43"),
         44: last_run("agent_real_after_t05_s44")}
per_seed = {}
for seed, run in seeds.items():
    after = b.heldout_rewards(c, run)
    only_b, only_a, p = mcnemar_exact([x == 1.0 for x in before], [x == 1.0 for x in after])
    per_seed[seed] = {"run": run, "heldout_accuracy": sum(after) / len(after),
                      "only_start_right": only_b, "only_after_right": only_a, "mcnemar_exact_p": p,
                      "tool_failures": b.metric(c, run, "val/tools/failure_frequency")}
accs = [v["heldout_accuracy"] for v in per_seed.values()]
mean, sd = statistics.mean(accs), statistics.stdev(accs)
half = stats.t.ppf(0.975, len(accs) - 1) * sd / len(accs) ** 0.5
out = {"start": "smollm2_sft_step3", "heldout_prompts": len(before), "before_run": before_run,
       "heldout_accuracy_before": sum(before) / len(before),
       "grpo": "8 steps of 4 prompts x 8 trajectories, LoRA 8, lr 3e-4, temperature 0.5, "
               "tool_call_parsed weight 0.5, 128 tokens",
       "per_seed": per_seed, "mean": mean, "interval_95": [mean - half, mean + half]}
print(json.dumps(out, indent=1))
json.dump(out, open(OUT, "w"), indent=2)
