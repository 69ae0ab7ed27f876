"""`mlxlab <verb> ...`: dispatch to a verb's module; each verb parses its own arguments.

```text
mlxlab train [hydra overrides]      train (same as mlxlab-train)
mlxlab eval RUN DATA [--json]        metrics of a finished run on a labelled CSV / text file
mlxlab predict RUN DATA.csv          a submission CSV (classifier) or completions (LM)
mlxlab generate RUN --prompt TEXT    sample from a language-model run
mlxlab transcribe MODEL audio...     one transcript per audio file (a Whisper folder or run)
mlxlab register RUN --name NAME      log + register the run's model in MLflow
mlxlab serve RUN|MODEL_URI           MLflow's model server on 127.0.0.1
mlxlab runs list|show|compare|merge  the store's runs
mlxlab export RUN --format hf|mlx-lm|gguf --out DIR|FILE.gguf [...]
mlxlab cache list|clear              converted models and other caches: list, remove
mlxlab embed MODEL [--input F] [--out vectors.npy|.jsonl]   one vector per text
mlxlab mine-negatives MODEL --data pairs.jsonl --out mined.jsonl   hard negatives
```
"""

from __future__ import annotations

import importlib
import sys

# verb -> (module with main(argv) -> int, one-line help). New verbs register here.
VERBS = {
    "train": ("mlxlab.cli.train", "train a model: Hydra overrides, e.g. experiment=tinystories_nano"),
    "eval": ("mlxlab.cli.eval", "metrics of a finished run on a labelled CSV or a text file"),
    "predict": ("mlxlab.cli.predict", "predict a CSV: a submission (classifier) or completions"),
    "generate": ("mlxlab.cli.generate", "sample text from a language-model run"),
    "transcribe": ("mlxlab.cli.transcribe", "transcribe audio files with a Whisper model or run"),
    "register": ("mlxlab.cli.register", "register a run's model in the MLflow model registry"),
    "serve": ("mlxlab.cli.serve", "serve a run or a registered model over HTTP (127.0.0.1)"),
    "runs": ("mlxlab.cli.runs", "the store's runs: list, show, compare, merge, hardest"),
    "export": ("mlxlab.cli.export", "write a finished run as a Hugging Face or mlx-lm folder, or a GGUF file"),
    "cache": ("mlxlab.cli.cache", "what mlxlab caches (converted GGUF files, kernels): list, clear"),
    "embed": ("mlxlab.cli.embed", "embed texts with a sentence-transformers model: one vector each"),
    "mine-negatives": ("mlxlab.cli.mine_negatives",
                       "mine hard negatives for (anchor, positive) pairs with an embedder"),
}


def usage() -> str:
    lines = ["usage: mlxlab <command> [args]", "", "commands:"]
    lines += [f"  {verb:<8} {text}" for verb, (_, text) in VERBS.items()]
    lines += ["", "`mlxlab <command> --help` for its arguments"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        print(f"mlxlab: unknown command {verb!r}\n\n{usage()}", file=sys.stderr)
        return 2
    return int(importlib.import_module(VERBS[verb][0]).main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
