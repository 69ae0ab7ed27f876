"""Which entries of a task list are MTEB's (`mteb:NAME`), and the checks made before a model is
loaded: mteb installed, NAME one of its retrieval tasks, the task's data in the local Hugging
Face datasets cache, where an offline run (HF_HUB_OFFLINE, the norm) finds it; mlxlab never
downloads an evaluation set on its own.
Each failure is one ConfigError line naming the task and the fix."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mlxlab.errors import ConfigError

PREFIX = "mteb:"
INSTALL = 'pip install "mlxlab[mteb]"'
RETRIEVAL = "Retrieval"  # mteb's TaskMetadata.type of the tasks mlxlab scores


def is_mteb_entry(entry: object) -> bool:
    """`mteb:NAME`: an MTEB task, scored on a text embedder."""
    return str(entry).startswith(PREFIX)


def task_name(entry: str) -> str:
    return str(entry).removeprefix(PREFIX).strip()


def mteb_module() -> Any:
    try:
        import mteb
    except ImportError:
        raise ConfigError(f"mteb: tasks need the mteb package: {INSTALL}") from None
    return mteb


def fetch_command(task: Any) -> str:
    """The command that loads the task's data once through mteb (the network open), leaving it
    in the datasets cache an offline run reads."""
    return (f'python -c "import mteb; mteb.get_task(\'{task.metadata.name}\').load_data()" '
            "(HF_HUB_OFFLINE unset)")


def is_cached(task: Any, cache_dir: str | None = None) -> bool:
    """Whether the task's dataset is in the local datasets cache (`cache_dir`; None:
    HF_DATASETS_CACHE's), where datasets' own offline loading looks for it (its
    CachedDatasetModuleFactory: a dataset loaded once before); a Hugging Face hub snapshot
    alone does not load offline."""
    import logging

    from datasets.load import CachedDatasetModuleFactory

    quiet = logging.getLogger("datasets.load")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its "using the latest cached version" note
    try:
        CachedDatasetModuleFactory(task.metadata.dataset["path"], cache_dir=cache_dir).get_module()
    except FileNotFoundError:
        return False
    finally:
        quiet.setLevel(level)
    return True


def retrieval_task(entry: str) -> Any:
    """mteb's task object for `mteb:NAME`, checked to be a retrieval task (one line if not)."""
    mteb = mteb_module()
    name = task_name(entry)
    if not name:
        raise ConfigError(f"{entry!r} names no task: give mteb:NAME, e.g. mteb:SciFact")
    try:
        task = mteb.get_task(name)
    except KeyError as err:  # mteb's message names the close ones ("Did you mean: ...")
        hint = str(err).strip("'\"").split(" not found.", 1)[-1].strip()
        raise ConfigError(f"{entry}: mteb has no task {name!r}{' (' + hint + ')' if hint else ''}"
                          ": `mteb available-tasks --task-types Retrieval` lists them") from None
    if task.metadata.type != RETRIEVAL:
        raise ConfigError(f"{entry} is an MTEB {task.metadata.type} task; mlxlab scores MTEB's "
                          "Retrieval tasks")
    return task


def check_mteb_entries(entries: Sequence[str], cache_dir: str | None = None) -> list[Any]:
    """mteb's task for each `mteb:NAME` entry, every one checked (retrieval_task, its data
    cached); the first that fails is one ConfigError line."""
    tasks = [retrieval_task(entry) for entry in entries]
    for entry, task in zip(entries, tasks):
        if not is_cached(task, cache_dir):
            raise ConfigError(f"{entry}: its data ({task.metadata.dataset['path']}) is not in the "
                              "local Hugging Face datasets cache; load it once where the network "
                              f"is open: {fetch_command(task)}")
    return tasks
