"""A frozen Whisper encoder's states, computed once per training utterance and read back in later
epochs (objectives/supervised/encoder_states.py): the loss and the decoder's gradients equal the
uncached step's on every batch of two shuffled epochs, each utterance's encoder runs once, and
the cache stays off where the encoder trains, drops out, or the step is not float32."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("soundfile", reason="the speech extra: pip install -e '.[dev]'")

import mlx.nn as nn  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from mlxlab.data.batching import Batching  # noqa: E402
from mlxlab.data.speech import SpeechTranscripts  # noqa: E402
from mlxlab.errors import ConfigError  # noqa: E402
from mlxlab.models.speech.whisper import WhisperModel  # noqa: E402
from mlxlab.objectives.base import ObjectiveSetup  # noqa: E402
from mlxlab.objectives.supervised.encoder_states import EncoderStates  # noqa: E402
from mlxlab.objectives.supervised.speech_to_text import SpeechToText, speech_to_text_loss  # noqa: E402
from speech_fixtures import utterance_set, write_jsonl  # noqa: E402
from whisper_fixtures import whisper_folder  # noqa: E402

BATCHING = Batching(batch_size=3, bucket_multiple=8)
DECODER_LORA = {"rank": 4, "modules": ["decoder"]}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("speech")
    train = write_jsonl(folder / "train.jsonl", utterance_set(folder, 8))
    return train, whisper_folder(folder / "model")


@pytest.fixture
def world(files):
    """Fresh data (its batches keep their place in an epoch) and the model's folder."""
    train, folder = files
    data = SpeechTranscripts(str(train), processor=str(folder), val_fraction=0.25)
    data.setup()
    return data, folder


def gradients(model, batch) -> dict:
    grad = nn.value_and_grad(model, lambda m, b: speech_to_text_loss(m, b)[0])(model, batch)[1]
    return dict(tree_flatten(grad))


def test_cached_states_give_the_uncached_loss_and_gradients_over_two_epochs(world):
    data, folder = world
    model = WhisperModel(pretrained=str(folder), lora=DECODER_LORA)
    assert model.frozen_encoder
    states = EncoderStates()
    orders = []
    for epoch in range(2):
        for batch in data.train_batches(BATCHING, epoch):
            cached = states.batch(model, batch)
            assert "input_features" not in cached
            orders.append(np.asarray(batch["index"]).tolist())
            assert float(speech_to_text_loss(model, cached)[0]) == pytest.approx(
                float(speech_to_text_loss(model, batch)[0]), rel=1e-6)
            if epoch == 0:  # the gradients of read-back states (epoch 1) are what could differ
                continue
            want, got = gradients(model, batch), gradients(model, cached)
            assert want.keys() == got.keys() and want
            for name in want:
                np.testing.assert_allclose(np.array(got[name]), np.array(want[name]),
                                           rtol=1e-4, atol=1e-7, err_msg=name)
    rows = len(data.train)
    assert orders[: len(orders) // 2] != orders[len(orders) // 2:]  # the epochs are shuffled
    assert states.computed == rows and states.read == rows  # each encoded once, read once
    folder_used = states.folder
    states.close()
    assert not folder_used.exists()


def setup_for(model, data, float32_step: bool = True, encoder_cache: str = "auto") -> SpeechToText:
    objective = SpeechToText(encoder_cache=encoder_cache)
    objective.setup(ObjectiveSetup(model=model, data=data, batching=BATCHING, world=None,
                                   float32_step=float32_step))
    return objective


@pytest.mark.parametrize("case", ["encoder trains", "dropout", "bf16 step", "off"])
def test_the_cache_is_off_where_the_states_would_change_or_it_is_asked_off(world, case):
    data, folder = world
    lora = {"rank": 4, "modules": ["encoder", "decoder"]} if case == "encoder trains" else DECODER_LORA
    model = WhisperModel(pretrained=str(folder), lora=lora,
                         dropout=0.1 if case == "dropout" else 0.0)
    objective = setup_for(model, data, float32_step=case != "bf16 step",
                          encoder_cache="off" if case == "off" else "auto")
    assert objective.states is None
    batch = next(iter(objective.train_batches(data, BATCHING, 0, model)))
    assert "input_features" in batch and "encoder_states" not in batch
    on = setup_for(WhisperModel(pretrained=str(folder), lora=DECODER_LORA), data)
    assert "encoder_states" in next(iter(on.train_batches(data, BATCHING, 1, model)))


def test_a_wrong_encoder_cache_setting_is_one_line():
    with pytest.raises(ConfigError, match="objective.encoder_cache='yes': use auto .* or off"):
        SpeechToText(encoder_cache="yes")
