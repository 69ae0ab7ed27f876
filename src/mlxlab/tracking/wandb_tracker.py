"""WandbTracker: a run tracked in Weights & Biases (`tracking=wandb`, alone or beside the others:
`tracking=[mlflow,wandb]`, `tracking=[csv,wandb]`; conf/tracking/wandb.yaml).

    the resolved config      -> the wandb run's config (nested, as MLflow's params flattened)
    metrics                  -> history rows at the trainer's step (run.log(..., step=step)); the
                                last value of each is in the run's summary, `best/*` included
    tags                     -> config["mlxlab_tags"]; the group choices also as wandb tags
                                ("model=bert"), next to tracking.wandb.tags
    artifacts                -> files under the run's files/ folder (plots/, checkpoint/, ...),
                                uploaded with the run
    end(status)              -> finish(exit_code=0) for FINISHED, 1 for KILLED / FAILED

Offline (`tracking.wandb.mode=offline` or WANDB_MODE=offline) needs no account and no network:
the run is written to <dir>/wandb/offline-run-<time>-<id>/ and `wandb sync` uploads it later.

The wandb run id is kept in <run dir>/wandb-run.json. A resumed run continues that wandb run, as
it continues its MLflow run: the trainer calls `continue_from(<killed run's folder>, <step>)`
before `start`, and `start` opens the same id with resume="allow". This tracker's `run_id` stays
None: the checkpoint's run id is MLflow's (the primary tracker's), which wandb ids are not.

The `wandb` package is an optional extra (`pip install -e ".[wandb]"`): it is imported when a
WandbTracker is built, never when mlxlab is.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from mlxlab.errors import ConfigError
from mlxlab.tracking import tags as T
from mlxlab.tracking.base import BaseTracker

log = logging.getLogger(__name__)

RUN_FILE = "wandb-run.json"  # in the run folder: the wandb run this mlxlab run tracks to
TAG_CONFIG_KEY = "mlxlab_tags"  # tags live in the wandb config (wandb tags are bare labels)
MAX_TAG_LENGTH = 64  # wandb refuses longer tags


def import_wandb() -> Any:
    """The wandb module, or one line naming the extra that installs it."""
    try:
        import wandb
    except ImportError:
        raise ConfigError("tracking=wandb needs the wandb package: pip install -e '.[wandb]' "
                          "(or pip install wandb)") from None
    return wandb


class WandbTracker(BaseTracker):
    """The Tracker protocol on a wandb run; see the module docstring for what goes where."""

    def __init__(
        self,
        project: str | None = None,
        entity: str | None = None,
        mode: str | None = None,
        dir: str | None = None,  # noqa: A002 (config key)
        group: str | None = None,
        tags: list[str] | None = None,
        console: str = "off",
        run_name: str | None = None,
        **_ignored: Any,
    ) -> None:
        self._wandb = import_wandb()  # fails here, before any training, when it is missing
        if mode not in (None, "online", "offline", "disabled"):
            raise ConfigError(f"tracking.wandb.mode={mode!r} is not one of [null, 'online', "
                              "'offline', 'disabled']")
        self.project, self.entity, self.mode = project, entity, mode
        self.wandb_dir = dir
        self.group, self.extra_tags, self.console = group, list(tags or []), console
        self.run_name = run_name
        # No MLflow run behind it: a resumed run must not claim a source's MLflow run id.
        self.run_id: str | None = None
        self.run: Any = None
        self.wandb_id: str | None = None
        self._resume_id: str | None = None
        self._first_step = 0
        self._tags: dict[str, str] = {}
        self.summary_line: str | None = None

    def continue_from(self, source_run_dir: str | Path, step: int) -> None:
        """The run resumes `source_run_dir`'s checkpoint of `step`: continue its wandb run."""
        record = _read_json(Path(source_run_dir) / RUN_FILE)
        self._resume_id = record.get("id")
        if self._resume_id is None:
            log.info("wandb: %s tracked no wandb run; this run starts a new one", source_run_dir)

    def start(self, params: dict, tags: dict, run_id: str | None = None) -> None:
        run_dir = Path(str(tags.get(T.RUN_DIR) or "."))
        folder = Path(self.wandb_dir or os.environ.get("WANDB_DIR") or run_dir)
        folder.mkdir(parents=True, exist_ok=True)
        self._tags = {str(k): str(v) for k, v in tags.items()}
        wandb = self._wandb
        try:
            self.run = wandb.init(
                project=self.project, entity=self.entity, name=self.run_name, group=self.group,
                # mode and dir are read here, not by wandb's process-wide setup, so each run
                # (a sweep's jobs, distillation rounds) gets the environment as it is now
                mode=self.mode or os.environ.get("WANDB_MODE") or None, dir=str(folder),
                id=self._resume_id, resume="allow" if self._resume_id else None,
                config={**params, TAG_CONFIG_KEY: self._tags},
                tags=self._wandb_tags(tags),
                # several runs at once in one process: distillation rounds' parent and children
                reinit="create_new",
                settings=wandb.Settings(console=self.console),
            )
        except wandb.Error as err:
            raise ConfigError(f"wandb: {err} (log in with `wandb login`, set WANDB_API_KEY, or "
                              "track offline: tracking.wandb.mode=offline)") from err
        self.wandb_id = self.run.id
        # Resumed online, wandb drops steps at or below the last one it holds: the steps the
        # killed run logged after its checkpoint keep the killed run's values.
        self._first_step = int(self.run.step or 0) if self._resume_id else 0
        (run_dir / RUN_FILE).write_text(json.dumps(
            {"id": self.run.id, "project": self.run.project, "entity": self.run.entity,
             "mode": self.run.settings.mode, "dir": str(self.run.dir)}, indent=1) + "\n")
        log.info("wandb run %s (%s): %s", self.run.id,
                 "resumed" if self._resume_id else "new", self.run.dir)
        where = (f"offline: wandb sync {Path(self.run.dir).parent}" if self.run.settings.mode ==
                 "offline" else self.run.url or self.run.settings.mode)
        self.summary_line = f"wandb run:  {self.run.id} ({where})"  # summary(): the run's end

    def summary(self) -> list[str]:
        return [self.summary_line] if self.summary_line else []

    def _wandb_tags(self, tags: dict) -> list[str]:
        choices = [f"{k.removeprefix(T.CHOICE_PREFIX)}={v}" for k, v in tags.items()
                   if str(k).startswith(T.CHOICE_PREFIX) and v not in (None, "", "None")]
        return [t[:MAX_TAG_LENGTH] for t in dict.fromkeys([*choices, *self.extra_tags])]

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.run is None or step < self._first_step:
            return
        self.run.log({k: float(v) for k, v in metrics.items()}, step=int(step))

    def flush(self) -> None:
        """Nothing to force: run.log hands each row to wandb's service process at once (a
        separate process, which writes the run's log and uploads it)."""

    def set_tags(self, tags: dict) -> None:
        if self.run is None:
            return
        self._tags.update({str(k): str(v) for k, v in tags.items()})
        self.run.config.update({TAG_CONFIG_KEY: dict(self._tags)}, allow_val_change=True)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Copy a file, or a directory's contents, to files/<artifact_path>/ of the run."""
        if self.run is None:
            return
        src = Path(path)
        dest = Path(self.run.dir) / (artifact_path or "")
        dest.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dest, dirs_exist_ok=True)
            copied = [dest / f.relative_to(src) for f in src.rglob("*") if f.is_file()]
        elif src.is_file():
            copied = [Path(shutil.copy2(src, dest / src.name))]
        else:
            return
        for file in copied:
            self._publish(file)

    def _publish(self, file: Path) -> None:
        """Record a file written under files/ in the run, so `wandb sync` of an offline run
        uploads it too (online runs upload the folder at the end anyway)."""
        self.run.save(str(file), base_path=self.run.dir, policy="end", glob=False)

    def log_dict(self, data: dict, artifact_file: str) -> None:
        self._write_file(artifact_file, json.dumps(data, indent=1, default=str))

    def log_text(self, text: str, artifact_file: str) -> None:
        self._write_file(artifact_file, text)

    def log_figure(self, figure: Any, name: str) -> None:
        if self.run is None:
            return
        file = Path(self.run.dir) / "plots" / (name if name.endswith(".png") else f"{name}.png")
        file.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(file)
        self._publish(file)

    def _write_file(self, artifact_file: str, text: str) -> None:
        if self.run is None:
            return
        file = Path(self.run.dir) / artifact_file
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(text)
        self._publish(file)

    def end(self, status: str = "FINISHED") -> None:
        if self.run is None:
            return
        self.set_tags({"status": status})
        self.run.finish(exit_code=0 if status == "FINISHED" else 1)
        self.run = None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
