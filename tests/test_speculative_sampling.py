"""Speculative decoding keeps the model's own distribution when it samples: on a vocabulary of 8
tokens, the first two tokens `generate_tokens` samples with a draft (temperature 1, mlx-lm's
speculative decoding) follow the model's exact joint distribution p(a) p(b | a), by a
chi-square test over 800 draws; the same test rejects a decoder that accepts every
draft token (the draft's distribution), so it can fail. The decoders are mlxlab's own
(models/decoders/transformer.py), whose cache mlx-lm's speculative decoding trims."""

from __future__ import annotations

from itertools import islice

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten
from scipy.stats import chisquare

from mlxlab.decoding.generation import generate_tokens
from mlxlab.decoding.speculative import check_draft
from mlxlab.errors import ConfigError
from mlxlab.models.decoders.transformer import Transformer

VOCAB = 8
PROMPT = [3, 1, 4]
DRAWS = 800
LEVEL = 1e-3  # a right decoder fails this one time in a thousand


def tiny_decoder(seed: int, num_layers: int) -> Transformer:
    """A random decoder whose next-token distributions are far from uniform (weights at 0.5,
    not the 0.02 of training's init) and differ from another seed's."""
    model = Transformer(vocab_size=VOCAB, dim=32, num_layers=num_layers, num_heads=4,
                        mlp_dim=64, max_seq_len=32)
    key = mx.random.key(seed)
    params = tree_flatten(model.parameters())
    keys = mx.random.split(key, len(params))
    model.update(tree_unflatten([(name, 0.5 * mx.random.normal(v.shape, key=k))
                                 for (name, v), k in zip(params, keys)]))
    model.eval()
    return model


def joint(model: Transformer) -> np.ndarray:
    """p(a, b) = p(a | PROMPT) p(b | PROMPT, a): the model's exact distribution of its first
    two tokens, (VOCAB, VOCAB)."""
    first = mx.softmax(model(mx.array([PROMPT]))[0, -1].astype(mx.float32))
    rows = mx.array([[*PROMPT, a] for a in range(VOCAB)])
    second = mx.softmax(model(rows)[:, -1].astype(mx.float32), axis=-1)
    return np.array(first[:, None] * second)


def accept_always(model: Transformer, draft: Transformer, seed: int) -> list[int]:
    """A broken speculative decoder: the model checks the draft's two tokens in one pass and
    every one is accepted, whatever the model would have sampled."""
    mx.random.seed(seed)
    ids = list(PROMPT)
    for _ in range(2):
        logits = draft(mx.array([ids]))[0, -1]
        ids.append(int(mx.random.categorical(logits).item()))
    model(mx.array([ids]))  # the verification pass, its verdict ignored
    return ids[len(PROMPT):]


def speculative(model: Transformer, draft: Transformer, seed: int) -> list[int]:
    return list(islice(generate_tokens(model, PROMPT, temperature=1.0, top_k=0, top_p=1.0,
                                       seed=seed, draft=draft, num_draft_tokens=2), 2))


def p_value(draws: list[list[int]], expected: np.ndarray) -> float:
    """Chi-square goodness of fit of the draws' (a, b) counts to `expected` (cells expecting
    fewer than 5 draws pooled into one)."""
    counts = np.zeros((VOCAB, VOCAB))
    for a, b in draws:
        counts[a, b] += 1
    want = expected.astype(np.float64).ravel()
    want = want / want.sum() * len(draws)
    seen = counts.ravel()
    rare = want < 5
    want = np.append(want[~rare], want[rare].sum())
    seen = np.append(seen[~rare], seen[rare].sum())
    return float(chisquare(seen, want).pvalue)


@pytest.fixture(scope="module")
def pair() -> tuple[Transformer, Transformer]:
    model, draft = tiny_decoder(0, num_layers=2), tiny_decoder(1, num_layers=1)
    check_draft(model, draft, same_tokenizer=True)
    # the two distributions are far apart: a decoder drawing the draft's is easy to tell
    assert 0.5 * np.abs(joint(model) - joint(draft)).sum() > 0.2
    return model, draft


@pytest.mark.slow  # the default run's 10-minute budget; run with -m slow
def test_speculative_sampling_keeps_the_models_distribution(pair):
    model, draft = pair
    draws = [speculative(model, draft, seed) for seed in range(DRAWS)]
    assert p_value(draws, joint(model)) > LEVEL
    # the draft's tokens were proposed and some accepted: the draft took part
    accepted: list[int] = []
    for seed in range(50):
        list(islice(generate_tokens(model, PROMPT, temperature=1.0, top_k=0, top_p=1.0,
                                    seed=seed, draft=draft, num_draft_tokens=2,
                                    accepted=accepted), 2))
    assert 0 < sum(accepted) < len(accepted)


def test_the_check_rejects_a_decoder_that_accepts_every_draft_token(pair):
    model, draft = pair
    draws = [accept_always(model, draft, seed) for seed in range(DRAWS)]
    assert p_value(draws, joint(model)) < 1e-6
    assert p_value(draws, joint(draft)) > LEVEL  # what it draws is the draft's



def quantized(model: Transformer) -> Transformer:
    nn.quantize(model, group_size=32, bits=4)
    return model


def test_a_draft_is_sized_by_its_weights_not_its_packed_words():
    """A 4-bit target holds 8 weights in each uint32 word: a float draft with fewer weights is
    accepted, a 4-bit draft with more weights than the target is refused."""
    target = quantized(tiny_decoder(0, num_layers=2))
    check_draft(target, tiny_decoder(1, num_layers=1), same_tokenizer=True)
    with pytest.raises(ConfigError, match=r"the draft \([\d,]+ parameters\) is not smaller"):
        check_draft(target, quantized(tiny_decoder(1, num_layers=3)), same_tokenizer=True)
