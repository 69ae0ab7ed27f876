"""mlxlab's LM presets vs an independent PyTorch twin on exactly the same batches.

    python benchmarks/quality/bench_lm_twin.py [--models nano,tiny] [--part mlxlab] [override ...]

mlxlab trains `experiment=tinystories_<model>` (the shipped sample minus its last --heldout
paragraphs) through `train(cfg)`, recording its initial weights and every batch; the twin
(bench_torch.py's decoder in PyTorch eager, fp32) rebuilds the same tokenizer, stream and weights
from the config and seed, trains on the same batches with torch.optim.AdamW, clip and PyTorch's
own schedulers (`reference`: the plain script mlxlab was first measured against; `same`: the
preset's values), scored on the same windows at the same steps (the shipped val split and the
held-out slice). The parts may run as two processes at once; `report` refuses unless the sha256
of the initial weights, batches and windows agree.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

import mlxlab  # noqa: F401  (first: loads the fast BLAS before anything imports mlx.core)
from mlxlab.runtime.compute.blas import set_blas_threads

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: benchmarks.*
from benchmarks.harness import REPO, SMOKE_RUN, add_options, print_table, smoke_dir, write_record  # noqa: E402
from benchmarks.speed.bench import compose  # noqa: E402
from benchmarks.speed.bench_torch import torch_models, torch_warmup_cosine  # noqa: E402

SAMPLE = REPO / "src" / "mlxlab" / "assets" / "tinystories" / "sample.txt"
# The plain PyTorch script mlxlab was first measured against (the presets' values before it).
REFERENCE = {"learning_rate": 1e-3, "warmup_steps": 30, "min_lr_ratio": 0.1,
             "weight_decay": 0.01, "grad_clip": 1.0}
HPARAMS = tuple(REFERENCE)


def hparams(cfg) -> dict:
    """The preset's values of HPARAMS, from the config nodes they live in."""
    node = {"learning_rate": cfg.optimizer, "weight_decay": cfg.optimizer,
            "warmup_steps": cfg.trainer.schedule, "min_lr_ratio": cfg.trainer.schedule,
            "grad_clip": cfg.trainer}
    return {k: node[k][k] for k in HPARAMS}


def split_sample(out: Path, heldout: int) -> tuple[Path, Path]:
    """(training file, held-out file): the sample's blank-line paragraphs, the last `heldout` apart."""
    paragraphs = [p.strip() for p in SAMPLE.read_text().split("\n\n") if p.strip()]
    if not 0 < heldout < len(paragraphs) // 2:
        raise SystemExit(f"--heldout must be between 1 and {len(paragraphs) // 2 - 1}, got {heldout}")
    files = {out / "train.txt": paragraphs[:-heldout], out / "heldout.txt": paragraphs[-heldout:]}
    for path, part in files.items():
        text = "\n\n".join(part) + "\n"
        if not path.is_file() or path.read_text() != text:  # the other part may be reading it
            path.write_text(text)
    return tuple(files)


def digest(arrays) -> str:
    """sha256 over arrays in order: the two parts must have trained on identical inputs."""
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def held_out_data(train_file: Path, heldout_file: Path, seq_len: int, tokenizer: Path):
    """The held-out paragraphs as validation windows, packed like the shipped split's."""
    from mlxlab.data.streaming import StreamingText

    held = StreamingText(
        source={"data_files": {"train": str(train_file), "validation": str(heldout_file)}},
        splits={"val_split": "validation", "val_examples": 10**9}, packing={"seq_len": seq_len},
        tokenizer={"path": str(tokenizer)},
    )
    held.setup(None)
    return held


def preset(model_name: str, train_file: Path, root: Path, overrides: list[str]):
    return compose(root, [f"experiment=tinystories_{model_name}",
                          f"data.source.data_files={train_file}", "tracking=none",
                          "callbacks.progress.enabled=false", *overrides])


def run_mlxlab(model_name: str, train_file: Path, heldout_file: Path, root: Path,
               overrides: list[str]) -> dict:
    """The real stack, `train(cfg)`; records what the twin must match and the two curves."""
    from mlx.utils import tree_flatten
    from omegaconf import OmegaConf

    from benchmarks.callbacks import HOOKS, OVERRIDE
    from mlxlab.objectives.validation import evaluate_cross_entropy as evaluate
    from mlxlab.train import train
    from mlxlab.training.trainer import Trainer

    cfg = preset(model_name, train_file, root, [*overrides, OVERRIDE])
    rec: dict = {"batches": [], "val": [], "heldout": []}
    original_fit = Trainer.fit

    def fit(self, model, data, tracker, run_dir, *args, **kwargs):
        if self.settings.grad_accum != 1:
            raise SystemExit("bench_lm_twin.py replays one batch per step: use trainer.grad_accum=1")
        rec["init"] = digest(np.array(v) for _, v in tree_flatten(model.parameters()))
        held = held_out_data(train_file, heldout_file, data.packing.seq_len,
                             Path(run_dir) / "tokenizer.json")
        rec["windows"] = digest(np.array(b["input_ids"]) for d in (data, held)
                                for b in d.val_batches(self.settings.data_batching()))
        live = data.train_batches

        def recorded(batching, epoch):
            for batch in live(batching, epoch):
                rec["batches"].append(np.array(batch["input_ids"]))
                yield batch

        batching = self.settings.data_batching()

        def on_eval(step, metrics):  # metrics: the trainer's own, on the shipped split
            rec["val"].append((step, metrics["val/loss"]))
            rec["heldout"].append((step, evaluate(model, held, batching).metrics["val/loss"]))
            print(f"  mlxlab step {step}: val {rec['val'][-1][1]:.4f} "
                  f"heldout {rec['heldout'][-1][1]:.4f}", file=sys.stderr, flush=True)

        HOOKS["on_eval"] = on_eval  # called by bench_callbacks.StepClock, added by OVERRIDE
        data.train_batches = recorded
        return original_fit(self, model, data, tracker, run_dir, *args, **kwargs)

    Trainer.fit = fit
    try:
        train(cfg)
    finally:
        Trainer.fit = original_fit
    steps = int(cfg.trainer.max_steps)
    return {
        "curves": {"val": rec["val"], "heldout": rec["heldout"]}, "init": rec["init"],
        "windows": rec["windows"], "batches": digest(rec["batches"][:steps]), "steps": steps,
        "hparams": hparams(cfg),
        "model_cfg": OmegaConf.to_container(cfg.model, resolve=True),
    }


def twin_inputs(model_name: str, train_file: Path, heldout_file: Path, root: Path,
                overrides: list[str]) -> dict:
    """What train(cfg) gives the trainer, rebuilt without training: the same data module and
    seed give the same tokenizer, token stream and initial weights (checked by digest)."""
    from mlx.utils import tree_flatten
    from omegaconf import OmegaConf

    from mlxlab.config import instantiate
    from mlxlab.launch.wiring import seed_everything

    cfg = preset(model_name, train_file, root, overrides)
    seed_everything(cfg.seed)
    run_dir = root / "run"
    run_dir.mkdir(parents=True)
    data = instantiate(cfg.data)
    data.setup(run_dir)
    model = instantiate(cfg.model, vocab_size=data.vocab_size, num_labels=data.num_labels)
    init = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    batching = instantiate(cfg.trainer).data_batching()  # TrainerSettings
    steps, batches, epoch = int(cfg.trainer.max_steps), [], 0
    while len(batches) < steps:  # the trainer's loop: epochs of the stream until max_steps
        batches += [{k: np.array(v) for k, v in b.items()}
                    for b in data.train_batches(batching, epoch)]
        epoch += 1
    held = held_out_data(train_file, heldout_file, data.packing.seq_len, run_dir / "tokenizer.json")
    windows = {name: [{k: np.array(v) for k, v in b.items()} for b in d.val_batches(batching)]
               for name, d in (("val", data), ("heldout", held))}
    return {
        "init": init, "batches": batches[:steps], "windows": windows, "steps": steps,
        "vocab_size": data.vocab_size, "hparams": hparams(cfg),
        "model_cfg": OmegaConf.to_container(cfg.model, resolve=True),
        "eval_every": int(cfg.trainer.eval_every_steps),
    }


def run_twin(rec: dict, hp: dict, threads: int) -> dict:
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    cfg = {k: v for k, v in rec["model_cfg"].items() if k not in ("_target_", "lora", "max_seq_len")}
    model = torch_models()[0](rec["vocab_size"], **cfg)
    model.load_state_dict({k: torch.tensor(v) for k, v in rec["init"].items()})
    optimizer = torch.optim.AdamW(model.parameters(), lr=hp["learning_rate"],
                                  weight_decay=hp["weight_decay"])
    schedule = torch_warmup_cosine(optimizer, rec["steps"], hp["warmup_steps"], hp["min_lr_ratio"])

    def loss_of(batch):
        logits = model(torch.from_numpy(batch["input_ids"]).long())
        ce = F.cross_entropy(logits.flatten(0, 1), torch.from_numpy(batch["labels"]).long().flatten(),
                             reduction="none")
        mask = torch.from_numpy(batch["loss_mask"]).flatten()
        return (ce * mask).sum(), mask.sum()

    def evaluate(batches):
        with torch.no_grad():
            total = [loss_of(b) for b in batches]
        return float(sum(t for t, _ in total) / sum(n for _, n in total))

    curves: dict[str, list] = {"val": [], "heldout": []}
    for step, batch in enumerate(rec["batches"], start=1):
        optimizer.zero_grad(set_to_none=True)
        total, n = loss_of(batch)
        (total / n.clamp(min=1.0)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), hp["grad_clip"])
        optimizer.step()
        schedule.step()
        if step % rec["eval_every"] == 0 or step == rec["steps"]:  # the trainer's eval steps
            for split in curves:
                curves[split].append((step, evaluate(rec["windows"][split])))
            print(f"  torch step {step}: val {curves['val'][-1][1]:.4f} "
                  f"heldout {curves['heldout'][-1][1]:.4f}", file=sys.stderr, flush=True)
    return curves


def table(results: dict) -> dict:
    """Each model's losses at each evaluation, mlxlab beside its twins."""
    first = next(iter(results.values()))
    labels = list(first["curves"])
    rows = []
    for name, res in results.items():
        for i, (step, _) in enumerate(res["curves"]["mlxlab"]["val"]):
            rows.append([name, step, *(f"{res['curves'][lab][split][i][1]:.4f}"
                                       for lab in labels for split in ("val", "heldout"))])
    return {"head": ["model", "step", *(f"{lab} {split}" for lab in labels for split in ("val", "held-out"))],
            "rows": rows}


def part_mlxlab(name: str, args, files) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        return run_mlxlab(name, *files, Path(tmp), args.overrides)


def part_torch(name: str, args, files) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        rec = twin_inputs(name, *files, Path(tmp), args.overrides)
    out = {"init": digest(rec["init"].values()), "batches": digest(b["input_ids"] for b in rec["batches"]),
           "windows": digest(b["input_ids"] for s in ("val", "heldout") for b in rec["windows"][s]),
           "vocab_size": rec["vocab_size"], "steps": rec["steps"],
           "tokens": rec["steps"] * int(rec["batches"][0]["loss_mask"].size),
           "window_tokens": {s: sum(int(b["loss_mask"].sum()) for b in rec["windows"][s])
                             for s in ("val", "heldout")},
           "curves": {}, "twins": {}}
    twins = {"reference": REFERENCE, "same": rec["hparams"]}
    done: dict[str, str] = {}
    for twin in args.twins.split(","):
        hp = {k: float(v) for k, v in twins[twin].items()}
        key = json.dumps(hp, sort_keys=True)
        if key in done:  # the preset uses the reference values: one run serves both
            out["twins"][twin] = {"same_as": done[key], **hp}
            continue
        print(f"{name}: torch:{twin} {hp} ...", file=sys.stderr, flush=True)
        out["curves"][f"torch:{twin}"] = run_twin(rec, hp, args.threads)
        out["twins"][twin], done[key] = hp, f"torch:{twin}"
    return out


def report(name: str, mine: dict, theirs: dict) -> dict:
    for key in ("init", "batches", "windows"):
        if mine[key] != theirs[key]:
            raise SystemExit(f"{name}: the two parts' {key} differ ({mine[key]} vs {theirs[key]}): "
                             "rerun both parts with the same overrides")
    curves = {"mlxlab": mine["curves"], **theirs["curves"]}
    summary = (f"{mine['steps']} steps, {theirs['tokens']:,} training tokens, vocab "
               f"{theirs['vocab_size']}; mlxlab {mine['hparams']}; twins {theirs['twins']}; "
               f"val windows {theirs['window_tokens']['val']:,} tokens, held-out "
               f"{theirs['window_tokens']['heldout']:,}; inputs identical (sha256 {mine['init']} "
               f"init, {mine['batches']} batches, {mine['windows']} windows)")
    return {"curves": curves, "summary": summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_options(parser, models="nano,tiny", twins=("reference,same", "reference and/or same"),
                heldout=(800, "paragraphs held out (tail)"), threads=1,
                out=REPO / "outputs" / "bench_lm_twin")
    parser.add_argument("--part", choices=("all", "mlxlab", "torch", "report"), default="all",
                        help="mlxlab and torch may run as two processes at once; report merges")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides (both parts)")
    args = parser.parse_args()
    if args.smoke:  # nano, 4 steps, both parts and the report
        args.models, args.out, args.overrides = "nano", smoke_dir("lm_twin"), [*args.overrides, *SMOKE_RUN]
    set_blas_threads(args.threads)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    args.out.mkdir(parents=True, exist_ok=True)
    files = split_sample(args.out, args.heldout)
    results = {}
    for name in args.models.split(","):
        parts = {}
        for part, fn in (("mlxlab", part_mlxlab), ("torch", part_torch)):
            path = args.out / f"{name}.{part}.json"
            if args.part in (part, "all"):
                print(f"{name}: {part} ...", file=sys.stderr, flush=True)
                path.write_text(json.dumps(fn(name, args, files), indent=1))
            if args.part in ("report", "all"):
                parts[part] = json.loads(path.read_text())
        if parts:
            results[name] = report(name, parts["mlxlab"], parts["torch"])
            (args.out / f"{name}.json").write_text(json.dumps(results[name], indent=1))
            print(results[name]["summary"], flush=True)
    if results:
        shown = table(results)
        print_table(shown)
        write_record("lm-twin", {**results, "table": shown}, question="quality", smoke=args.smoke)


if __name__ == "__main__":
    main()
