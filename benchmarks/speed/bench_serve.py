"""How does `mlxlab serve` hold up under concurrent OpenAI clients, beside `mlx_lm.server` on the
same model: is any request lost or mixed up, and what latency and tokens/s does each client see?

    python benchmarks/speed/bench_serve.py [--clients 8] [--requests 4] [--max-tokens 32]
        [--hidden 512 --layers 8] [--rounds 2] [--deadline 300] [--blas-threads 1] [--control]
        [--adapters]

A random Llama served by both on loopback, rounds alternating; `--clients` threads each send
`--requests` greedy completions with the `openai` client; unanswered by `--deadline`: lost; every
answer checked against that prompt asked alone. `--adapters`: two LoRA runs served at once,
beside mlx_lm.server's per-request adapters; `--control`: mlxlab serve on MLX's bundled BLAS.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: benchmarks.*
from benchmarks.harness import REPO, add_options, print_table, write_record  # noqa: E402

PROMPTS = ["Once upon a time", "The little dog", "A girl named Lily", "In the big forest",
           "Tom had a red ball", "The sun was hot", "One day, a cat", "There was a boat",
           "The bird sang", "Mom made a cake", "A tiny frog", "The old tree", "Sam and Max",
           "It was raining", "The king said", "A blue car"]
HOST = "127.0.0.1"  # loopback only


def start(command: list[str], log: Path, pattern: str, env: dict) -> tuple[subprocess.Popen, str]:
    """Start a server, wait until its log shows the URL `pattern` captures (or it answers)."""
    out = open(log, "w")  # noqa: SIM115 (the server writes it until stopped)
    proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    deadline = time.monotonic() + 300
    while not (found := re.search(pattern, log.read_text())):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{command[:3]} did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.3)
    return proc, found.group(1)


def wait_ready(base_url: str) -> None:
    deadline = time.monotonic() + 300
    while True:
        try:
            urllib.request.urlopen(f"{base_url}/models", timeout=5)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit(f"{base_url} does not answer") from None
            time.sleep(0.5)


def ask(client, route: tuple[str, dict], prompt: str, max_tokens: int
        ) -> tuple[str, int, float]:
    """One greedy completion; `route` = (model, extra body fields: mlx_lm.server's adapters)."""
    start = time.perf_counter()
    answer = client.completions.create(model=route[0], prompt=prompt, max_tokens=max_tokens,
                                       temperature=0, extra_body=route[1] or None)
    return answer.choices[0].text, answer.usage.completion_tokens, time.perf_counter() - start


def one_round(client_for, routes: list, args: argparse.Namespace, expected: dict[int, str]
              ) -> dict:
    """`args.clients` clients, `args.requests` requests each, stopped at args.deadline; client c
    asks its own prompt of the model routes[c % len(routes)]."""
    stop_at = time.monotonic() + args.deadline
    results: dict[int, list] = {c: [] for c in range(args.clients)}

    def client_loop(c: int) -> None:
        client, prompt, route = client_for(), PROMPTS[c], routes[c % len(routes)]
        for _ in range(args.requests):
            if time.monotonic() > stop_at:
                return
            try:
                results[c].append((c, *ask(client, route, prompt, args.max_tokens)))
            except Exception as err:  # counted as lost, and said why
                results[c].append((c, None, 0, 0.0))
                print(f"  client {c}: {type(err).__name__}: {err}", file=sys.stderr)

    started = time.perf_counter()
    with ThreadPoolExecutor(args.clients) as pool:
        wait([pool.submit(client_loop, c) for c in range(args.clients)])
    wall = time.perf_counter() - started
    answered = [r for rs in results.values() for r in rs if r[1] is not None]
    sent = args.clients * args.requests
    per_client = [(sum(r[2] for r in rs if r[1] is not None),
                   sum(r[3] for r in rs if r[1] is not None)) for rs in results.values()]
    latencies = [r[3] for r in answered]
    return {
        "lost": sent - len(answered),
        "differs": sum(r[1] != expected[r[0]] for r in answered),
        "latency_median": statistics.median(latencies) if latencies else float("nan"),
        "latency_max": max(latencies, default=float("nan")),
        "client_tok_s": statistics.median(t / s for t, s in per_client if s) if answered else 0,
        "total_tok_s": sum(r[2] for r in answered) / wall,
        "wall": wall,
    }


def lora_run(mlxlab: str, model: Path, work: Path, name: str, env: dict) -> Path:
    """A LoRA run of `model` (2 steps at a high rate on its own half of the shipped pairs: the
    two runs' adapters differ)."""
    from mlxlab.config import asset_path

    lines = Path(asset_path("tinystories/pairs.jsonl"))
    rows = lines.read_text().splitlines()[:48]
    pairs = work / f"pairs_{name}.jsonl"
    pairs.write_text("\n".join(rows[:24] if name == "a" else rows[24:]) + "\n")
    run = work / f"run_{name}"
    subprocess.run([mlxlab, "train", "experiment=finetune_completions",
                    f"model.pretrained={model}", f"data.train_file={pairs}", "data.max_length=64",
                    "tracking=none", "callbacks.progress.enabled=false", "trainer.max_steps=2",
                    "trainer.eval_every_steps=2", "optimizer.learning_rate=1e-2",
                    "trainer.batch_size=8", f"paths.root_dir={work}", f"hydra.run.dir={run}"],
                   check=True, cwd=work, env=env, capture_output=True)
    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_options(parser, clients=8, requests=(4, "per client, per round"), max_tokens=32,
                hidden=512, layers=8, rounds=(2, "per server, alternating"),
                deadline=(300.0, "seconds a round may take"),
                blas_threads=(1, "OPENBLAS_NUM_THREADS"),
                control=(False, "also mlxlab serve with MLXLAB_BLAS=off (MLX's bundled BLAS)"),
                adapters=(False, "two LoRA runs of the model, clients alternating between them"))
    args = parser.parse_args()
    if args.smoke:  # 2 clients x 1 request, 4 tokens, a 1-layer model, one round per server
        args.clients, args.requests, args.max_tokens, args.hidden, args.layers = 2, 1, 4, 64, 1
        args.rounds, args.deadline = 1, 120
    if not 1 <= args.clients <= 16 or not 1 <= args.requests <= 32:
        parser.error("--clients 1..16 and --requests 1..32 (a bounded load)")
    import openai

    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    model = work / "llama"
    subprocess.run([sys.executable, str(REPO / "scripts" / "tiny_hf_model.py"), "llama",
                    str(model), "--no-torch", "--hidden", str(args.hidden), "--layers",
                    str(args.layers)], check=True, cwd=REPO)
    mlxlab = str(Path(sys.executable).parent / "mlxlab")
    env = {**os.environ, "OPENBLAS_NUM_THREADS": str(args.blas_threads)}
    # both name a model by its folder (mlx_lm.server: the path it was started with)
    served, base = [str(model)], model
    routes = {"mlxlab serve": [(str(model), {})], "mlx_lm.server": [(str(model), {})]}
    if args.adapters:
        runs = [lora_run(mlxlab, model, work, name, env) for name in ("a", "b")]
        exported = [run.with_name(run.name + "_mlx_lm") for run in runs]  # base + its adapters
        for run, out in zip(runs, exported):
            subprocess.run([mlxlab, "export", str(run), "--format", "mlx-lm", "--adapters",
                            "--out", str(out)], check=True, env=env, capture_output=True)
        served, base = [str(r) for r in runs], exported[0]  # the same base in both exports
        routes = {"mlxlab serve": [(str(r), {}) for r in runs],
                  "mlx_lm.server": [(str(base), {"adapters": str(e / "adapters")})
                                    for e in exported]}
    # mlxlab serve says its URL (port 0: a free one); mlx_lm.server's is the port it is given
    serve, said = [mlxlab, "serve", *served, "--host", HOST, "--port", "0"], r"on (http://127\.0\.0\.1:\d+/v1)"
    servers = {"mlxlab serve": start(serve, work / "mlxlab.log", said, env)}
    servers["mlx_lm.server"] = (start([sys.executable, "-m", "mlx_lm.server", "--model", str(base),
                                       "--host", HOST, "--port", "8765", "--log-level", "WARNING"],
                                      work / "mlx_lm.log", r"()", env)[0], f"http://{HOST}:8765/v1")
    if args.control:
        servers["mlxlab, BLAS off"] = start(serve, work / "control.log", said,
                                            {**env, "MLXLAB_BLAS": "off"})
        routes["mlxlab, BLAS off"] = routes["mlxlab serve"]
    local = threading.local()

    def client_for(base_url: str):
        def make():
            if getattr(local, "url", None) != base_url:
                local.url = base_url
                local.client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0,
                                             timeout=args.deadline)
            return local.client
        return make

    try:
        expected = {}
        for name, (_, url) in servers.items():
            wait_ready(url)
            expected[name] = {c: ask(client_for(url)(), routes[name][c % len(routes[name])],
                                     PROMPTS[c], args.max_tokens)[0]
                              for c in range(args.clients)}
        same = all(e == expected["mlx_lm.server"] for e in expected.values())
        print(f"model: llama hidden {args.hidden}, {args.layers} layers (float32, random)"
              f"{', two LoRA runs of it, clients alternating' if args.adapters else ''}; "
              f"{args.clients} clients x {args.requests} greedy completions of "
              f"{args.max_tokens} tokens; solo answers equal across servers: {same}")
        rows = {name: [] for name in servers}
        for r in range(args.rounds):
            for name, (_, url) in servers.items():
                load = os.getloadavg()[0]
                row = one_round(client_for(url), routes[name], args, expected[name])
                rows[name].append(row)
                print(f"round {r + 1} {name:16s} load {load:5.2f}  lost {row['lost']}  differs "
                      f"{row['differs']}  latency median {row['latency_median']:.2f} s max "
                      f"{row['latency_max']:.2f} s  per client {row['client_tok_s']:.1f} tok/s  "
                      f"all clients {row['total_tok_s']:.1f} tok/s  ({row['wall']:.1f} s)",
                      flush=True)
        shown = {"head": ["server", "lost", "differs", "latency median (s)", "per client tok/s",
                          "all clients tok/s"], "rows": []}
        for name, rs in rows.items():
            med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
            shown["rows"].append([name, sum(r["lost"] for r in rs), sum(r["differs"] for r in rs),
                                  f"{med['latency_median']:.2f}", f"{med['client_tok_s']:.1f}",
                                  f"{med['total_tok_s']:.1f}"])
        print_table(shown)
        names = list(rows)
        ratio = (statistics.median(a["total_tok_s"] / b["total_tok_s"]
                                   for a, b in zip(rows[names[0]], rows[names[1]]))
                 if len(names) > 1 else None)
        write_record("serve-vs-mlx-lm-server", {"rounds": rows, "solo_answers_equal": same,
                                                "table": shown},
                     question="speed-mlx", reference=ratio and names[1], ratio=ratio and round(ratio, 2),
                     summary=ratio and f"{names[0]}: tokens/s of all {args.clients} clients (higher is better)",
                     smoke=args.smoke)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(timeout=60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
