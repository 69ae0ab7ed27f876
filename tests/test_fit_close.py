"""Fit.run's close (training/run_end.py `RunEnd._close`): each step guarded, the tracked run always ends.

A real short fit of the shipped Titanic classifier, tracked in a real sqlite MLflow store; what
fails at the end is a user callback's on_train_end and the checkpoint writer's last upload round
(an uploader, the writer's plug-in protocol, whose close raises as a storage client does when
its bucket is gone). Before the guard either failure skipped tracker.end: the run stayed RUNNING.
"""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

from conftest import FAST
from mlxlab.config import instantiate
from mlxlab.tracking import tags as T
from mlxlab.tracking.mlflow import MlflowTracker
from mlxlab.training.callbacks import Callback
from mlxlab.training.loop import Fit
from mlxlab.training.settings import CheckpointPolicy, TrainerSettings
from mlxlab.training.trainer import Trainer


class BucketGone(OSError):
    pass


class GoneUploader:
    """An uploader whose final round fails (its store refuses): Uploader in async_writer.py."""

    def __init__(self) -> None:
        self.store, self.uploaded, self.closed = None, {}, 0

    def notify(self, path) -> None:
        pass

    def close(self) -> list[str]:
        self.closed += 1
        raise BucketGone("remote checkpoints: the bucket is gone")


class EndsBadly(Callback):
    """A callback whose on_train_end raises (when `fails`) and that plugs the uploader into the
    fit's writer once it exists (on_train_start)."""

    def __init__(self, fit_box: list, uploader: GoneUploader | None, fails: bool) -> None:
        self.fit_box, self.uploader, self.fails, self.ended = fit_box, uploader, fails, 0

    def on_train_start(self, total_steps: int, step: int) -> None:
        if self.uploader is not None:
            self.fit_box[0].writer.uploader = self.uploader

    def on_train_end(self) -> None:
        self.ended += 1
        if self.fails:
            raise RuntimeError("callback broke at the end")


def fit_with(make_cfg, tmp_path, uploader: GoneUploader | None, fails: bool):
    cfg = make_cfg(*FAST, "tracking=none")
    data = instantiate(cfg.data)
    data.setup(tmp_path / "run")
    model = instantiate(cfg.model, vocab_size=data.vocab_size, num_labels=data.num_labels)
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    tracker = MlflowTracker(uri=uri, experiment_name="close", async_logging=False)
    box: list = []
    callbacks = [EndsBadly(box, uploader, fails), EndsBadly(box, None, False)]
    settings = TrainerSettings(max_steps=4, max_epochs=1, eval_every_steps=4)
    fit = Fit(
        Trainer(settings, instantiate(cfg.optimizer), callbacks, CheckpointPolicy()),
        model,
        data,
        tracker,
        tmp_path / "run",
        {},
        {},
        None,
    )
    box.append(fit)
    return fit, tracker, callbacks, uri


def test_a_failing_callback_and_writer_close_still_end_the_run_failed(make_cfg, tmp_path):
    uploader = GoneUploader()
    fit, tracker, callbacks, uri = fit_with(make_cfg, tmp_path, uploader, fails=True)
    with pytest.raises(RuntimeError, match="callback broke at the end"):  # the first failure
        fit.run()
    assert [cb.ended for cb in callbacks] == [1, 1]  # the second callback still ended
    assert uploader.closed == 1  # the writer still closed after the callback failed
    run = MlflowClient(tracking_uri=uri).get_run(tracker.run_id)
    assert run.info.status == "FAILED"  # was RUNNING: tracker.end was skipped
    assert run.data.tags[T.ERROR].startswith("EndsBadly.on_train_end: RuntimeError")
    assert (tmp_path / "run" / "checkpoints").is_dir()  # the training itself ran and saved


def test_a_writer_close_that_fails_alone_fails_the_run_and_is_raised(make_cfg, tmp_path):
    fit, tracker, _, uri = fit_with(make_cfg, tmp_path, GoneUploader(), fails=False)
    with pytest.raises(BucketGone, match="bucket is gone"):
        fit.run()
    run = MlflowClient(tracking_uri=uri).get_run(tracker.run_id)
    assert run.info.status == "FAILED"
    assert "the checkpoint writer's close: BucketGone" in run.data.tags[T.ERROR]
    assert "val/accuracy" in run.data.metrics  # its metrics were flushed before the end


def test_a_clean_close_finishes(make_cfg, tmp_path):
    fit, tracker, _, uri = fit_with(make_cfg, tmp_path, None, fails=False)
    fit.run()
    run = MlflowClient(tracking_uri=uri).get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and T.ERROR not in run.data.tags
