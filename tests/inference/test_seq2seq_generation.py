"""Encoder–decoder generation: greedy against the full forward, beam search against a brute-force
enumeration of every target on a tiny vocabulary, sampling, stop tokens and bad calls."""

from __future__ import annotations

import itertools

import pytest
import torch

from kvlab import EncoderDecoder, ModelConfig
from kvlab.errors import ConfigError
from kvlab.inference.seq2seq import generate_seq2seq

SOURCES = [[2, 3, 2], [3, 3]]


def tiny(seed: int, **extra) -> EncoderDecoder:
    """Vocabulary {0 pad/start, 1 eos, 2, 3}; weights wide enough that greedy is not always best."""
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=4, d_model=16, n_layer=2, n_head=2, n_encoder_layer=1, pos="t5", relative_buckets=4,
                      relative_max_distance=8, eos_token_id=1, pad_token_id=0, decoder_start_token_id=0, **extra)
    model = EncoderDecoder(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    return model


@torch.no_grad()
def _logprob(model, src: list[int], target: list[int]) -> float:
    tgt = torch.tensor([[0] + target[:-1]])
    lp = torch.log_softmax(model(torch.tensor([src]), tgt).double(), -1)[0]
    return sum(float(lp[i, t]) for i, t in enumerate(target))


def _brute_force(model, src, max_len: int, length_penalty: float) -> list[int]:
    """The best of every target: ending in EOS at any length up to max_len, or running to max_len."""
    body = [0, 2, 3]
    targets = [list(b) + [1] for n in range(max_len) for b in itertools.product(body, repeat=n)]
    targets += [list(b) for b in itertools.product(body, repeat=max_len)]
    return max(targets, key=lambda t: _logprob(model, src, t) / len(t) ** length_penalty)


@pytest.mark.parametrize("seed,length_penalty", [(1, 1.0), (3, 0.0), (0, 0.0), (3, 2.0)])
def test_beam_search_finds_the_brute_force_best(seed, length_penalty):
    """With a beam for every possible target (4³), beam search is exact; on these seeds greedy is not."""
    model = tiny(seed)
    best = [_brute_force(model, src, 3, length_penalty) for src in SOURCES]
    assert generate_seq2seq(model, SOURCES, 3, num_beams=64, length_penalty=length_penalty) == best
    if (seed, length_penalty) != (3, 2.0):
        assert generate_seq2seq(model, SOURCES, 3) != best          # the case beam search exists for


def test_small_beams_never_worse_than_greedy_here():
    model = tiny(5)
    greedy = generate_seq2seq(model, SOURCES, 3)
    beam = generate_seq2seq(model, SOURCES, 3, num_beams=3, length_penalty=0.0)
    for src, g, b in zip(SOURCES, greedy, beam):
        assert _logprob(model, src, b) >= _logprob(model, src, g) - 1e-9


def test_greedy_equals_argmax_of_full_forwards():
    model = tiny(2, n_kv_head=1, cross_n_kv_head=1, cross_cla=2)
    sources = [[2, 3, 2, 3, 3], [3], [2, 2]]
    out = generate_seq2seq(model, sources, 6, stop_tokens=[])
    for src, got in zip(sources, out):
        tgt = [0]
        with torch.no_grad():
            for _ in range(6):
                tgt.append(int(model(torch.tensor([src]), torch.tensor([tgt]))[0, -1].argmax()))
        assert got == tgt[1:]


def test_sampling_is_seeded_and_stops_at_stop_tokens():
    model = tiny(0)
    a = generate_seq2seq(model, SOURCES * 4, 8, temperature=1.0, seed=7)
    assert a == generate_seq2seq(model, SOURCES * 4, 8, temperature=1.0, seed=7)
    assert len({tuple(x) for x in a}) > 1
    for row in a:                                        # the EOS ends a row and is its last token
        assert 1 not in row[:-1]
    streamed = []
    generate_seq2seq(model, SOURCES, 4, on_token=lambda r, t: streamed.append((r, t)))
    assert len(streamed) >= 2


def test_bad_calls():
    model = tiny(0)
    with pytest.raises(ConfigError, match="source 1 is empty"):
        generate_seq2seq(model, [[2], []])
    with pytest.raises(ConfigError, match=r"token id\(s\) \[9\]"):
        generate_seq2seq(model, [[9]])
    with pytest.raises(ConfigError, match="num_beams=0"):
        generate_seq2seq(model, [[2]], num_beams=0)
    with pytest.raises(ConfigError, match="temperature=0 with num_beams"):
        generate_seq2seq(model, [[2]], num_beams=2, temperature=0.7)
    assert generate_seq2seq(model, [[2], [3]], 0) == [[], []]
