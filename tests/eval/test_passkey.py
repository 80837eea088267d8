"""Passkey retrieval (kvlab.eval.passkey): the prompts hold the key where the depth says and fit the
length; the score is a model's greedy answer — checked with a model whose reach is known in closed
form, and against greedy decoding on SmolLM2."""

from types import SimpleNamespace

import pytest
import torch

from kvlab.errors import ConfigError
from kvlab.eval.passkey import (
    FILLER,
    INSTRUCTION,
    NEEDLE,
    QUESTION,
    default_lengths,
    passkey_retrieval,
    passkey_trials,
)
from kvlab.io.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


class Reach:
    """A model that retrieves a key exactly when the needle's first token lies within its last
    ``reach`` input tokens: at the answer's positions it predicts " KEY", copied from the needle."""

    def __init__(self, reach: int):
        self.reach, self.device = reach, "cpu"
        self.cfg = SimpleNamespace(max_seq_len=10**6, pos="rope", vocab_size=TOK.vocab_size)
        self.head = TOK.encode("The pass key is ", add_special_tokens=False)
        self.tail = TOK.encode(". Remember it.", add_special_tokens=False)

    def eval(self):
        return self

    def __call__(self, tokens, *, backend=None, cache=None, logits_to_keep=None):
        row = tokens[0].tolist()
        start = max(0, len(row) - self.reach)
        answer = [0] * 6
        h = len(self.head)
        for i in range(start, len(row)):             # "The pass key is NNNNN. Remember it." from i on
            if row[i:i + h] == self.head and row[i + h + 5:i + h + 5 + len(self.tail)] == self.tail:
                answer = TOK.encode(" " + TOK.decode(row[i + h:i + h + 5]), add_special_tokens=False)
                break
        logits = torch.zeros(1, logits_to_keep, TOK.vocab_size)
        for j in range(logits_to_keep):
            logits[0, j, answer[j]] = 1.0
        return logits


def test_a_prompt_fits_its_length_and_holds_the_key_at_its_depth():
    trials = passkey_trials(TOK, [600, 1200], depths=(0, 0.5, 1), trials=2, seed=3)
    assert len(trials) == 2 * 3 * 2
    per_filler = len(FILLER)
    for t in trials:
        total = len(t.prompt) + len(t.answer) - 1              # what the model reads
        assert t.length - per_filler < total <= t.length
        assert len(t.key) == 5 and t.key.isdigit() and TOK.decode(t.answer) == " " + t.key
        text = TOK.decode(t.prompt[1:])
        assert t.prompt[0] == TOK.bos_token_id and text.startswith(INSTRUCTION) and text.endswith(QUESTION)
        before, needle, after = text.partition(NEEDLE.format(key=t.key))
        assert needle and after.endswith(QUESTION)
        fillers_before = before[len(INSTRUCTION):].count(FILLER)
        fillers = fillers_before + after.count(FILLER)
        assert fillers_before == round(t.depth * fillers)
    # the same seed gives the same keys; another seed other keys
    assert [t.key for t in passkey_trials(TOK, [600, 1200], depths=(0, 0.5, 1), trials=2, seed=3)] == \
        [t.key for t in trials]
    assert [t.key for t in passkey_trials(TOK, [600], depths=(0, 0.5, 1), trials=2, seed=4)] != \
        [t.key for t in trials[:6]]
    assert default_lengths(8192) == [1024, 2048, 4096, 8192] and default_lengths(3000) == [1024, 2048, 3000]
    with pytest.raises(ConfigError, match="too short"):
        passkey_trials(TOK, [100])
    with pytest.raises(ConfigError, match="depths"):
        passkey_trials(TOK, [600], depths=(1.5,))


def test_retrieval_is_scored_per_length_and_depth_as_a_model_of_known_reach_answers():
    trials = passkey_trials(TOK, [600, 1200], depths=(0, 0.25, 0.5, 0.75, 1), trials=1)
    reach = 500
    result = passkey_retrieval(Reach(reach), trials)

    def expected(t):               # the needle's first token within the last `reach` of the model's input
        row = [*t.prompt, *t.answer[:-1]]
        needle = TOK.encode(NEEDLE.format(key=t.key), add_special_tokens=False)
        at = next(i for i in range(len(row)) if row[i:i + len(needle)] == needle)
        return at >= len(row) - reach

    cells = {str(n): {f"{d:g}": float(expected(t)) for t in trials if t.length == n for d in [t.depth]}
             for n in (600, 1200)}
    assert result.by_cell == cells
    assert 0 < result.accuracy < 1 and result.trials == len(trials)     # a mixed result, so a real check
    assert result.by_length["600"] > result.by_length["1200"]
    assert passkey_retrieval(Reach(10**6), trials).accuracy == 1


def test_teacher_forcing_gives_greedy_decodings_answer_on_smollm2(smollm2):
    from kvlab.inference.generation import generate

    trials = passkey_trials(smollm2.tokenizer, [1024], depths=(0, 0.5, 1), trials=1)
    result = passkey_retrieval(smollm2, trials)
    for t in trials:
        greedy = generate(smollm2, [list(t.prompt)], len(t.answer))[0]
        assert result.by_cell["1024"][f"{t.depth:g}"] == float(greedy == list(t.answer))
