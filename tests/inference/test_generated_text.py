"""Self-generated training text: its tokens come from the model's own distribution (the empirical
frequencies of sampled tokens against its softmax), from prompts of the given source only."""

import numpy as np
import torch

from kvlab import ModelConfig
from kvlab.inference.generated_text import generate_corpus
from kvlab.io.tokenizer import ByteTokenizer
from kvlab.recipes.pretrain import new_byte_level_model


def _peaked_model():
    model = new_byte_level_model(ModelConfig.from_preset("tiny"))
    with torch.no_grad():
        model.lm_head.weight.mul_(40)          # a peaked next-token distribution over a few tokens
    return model.eval()


def test_sampled_tokens_follow_the_models_distribution():
    model, tok = _peaked_model(), ByteTokenizer()
    prompt = np.full(64, 65, dtype=np.uint16)                     # every prompt is "AAAA"
    out = generate_corpus(model, tok, 3000 * 6, prompts=prompt, seq_len=5, prompt_tokens=4, batch_size=3000, seed=1)
    rows = out.reshape(-1, 6)                                     # prompt (4) + one sampled token + EOS
    assert (rows[:, :4] == 65).all() and (rows[:, 5] == tok.eos_token_id).all()
    sampled = rows[:, 4]
    with torch.no_grad():
        p = torch.softmax(model(torch.full((1, 4), 65))[0, -1].double(), -1).numpy()
    assert p[tok.eos_token_id] < 1e-3                              # (an EOS would end a row early)
    freq = np.bincount(sampled, minlength=len(p)) / len(sampled)
    assert 0.5 * np.abs(freq - p).sum() < 0.05                     # total variation (sampling noise ~0.02)


def test_prompts_come_from_the_source_and_the_result_is_deterministic():
    model, tok = new_byte_level_model(ModelConfig.from_preset("tiny")).eval(), ByteTokenizer()
    source = np.arange(40, 140, dtype=np.uint16)                   # prompts are windows of this
    a = generate_corpus(model, tok, 200, prompts=source, seq_len=12, prompt_tokens=3, batch_size=4, seed=5)
    b = generate_corpus(model, tok, 200, prompts=source, seq_len=12, prompt_tokens=3, batch_size=4, seed=5)
    assert np.array_equal(a, b) and len(a) >= 200
    for seq in np.split(a, np.flatnonzero(a == tok.eos_token_id) + 1):
        if len(seq):
            assert seq[1] == seq[0] + 1 and seq[2] == seq[0] + 2 and 40 <= seq[0] < 138
