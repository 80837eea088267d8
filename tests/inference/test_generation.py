import pytest
import torch

from kvlab import ConfigError, generate
from kvlab.inference.generation import filter_logits

from conftest import make_model


def _greedy_without_cache(model, prompt, n):
    """Independent oracle: recompute the full forward over the whole sequence at every step."""
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


@pytest.mark.parametrize("variant", [dict(n_kv_head=2), dict(n_kv_head=1, cla=2), dict(pos="learned")])
def test_greedy_equals_full_recompute(variant):
    model = make_model(**variant)
    prompt = [256, 10, 20, 30, 40]
    assert generate(model, [prompt], 12, stop_tokens=[]) == [_greedy_without_cache(model, prompt, 12)]


def test_ragged_batch_equals_each_prompt_alone():
    model = make_model(n_kv_head=2)
    prompts = [[256, 1, 2, 3, 4, 5, 6, 7], [256, 9], [256, 50, 60, 70]]
    batched = generate(model, prompts, 10, stop_tokens=[])
    assert batched == [generate(model, [p], 10, stop_tokens=[])[0] for p in prompts]
    assert batched == [_greedy_without_cache(model, p, 10) for p in prompts]


def test_seed_makes_sampling_deterministic():
    model = make_model()
    kw = dict(temperature=1.0, top_k=50, top_p=0.95, stop_tokens=[])
    a = generate(model, [[256, 3, 4]] * 2, 20, seed=7, **kw)
    assert a == generate(model, [[256, 3, 4]] * 2, 20, seed=7, **kw)
    assert a != generate(model, [[256, 3, 4]] * 2, 20, seed=8, **kw)


def test_top_k_one_and_tiny_top_p_are_greedy():
    model = make_model()
    greedy = generate(model, [[256, 5]], 10, stop_tokens=[])
    assert generate(model, [[256, 5]], 10, temperature=2.0, top_k=1, seed=0, stop_tokens=[]) == greedy
    assert generate(model, [[256, 5]], 10, temperature=2.0, top_p=1e-6, seed=0, stop_tokens=[]) == greedy


def test_filter_logits_by_hand():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    kept = lambda out: torch.isfinite(out)[0].tolist()  # noqa: E731
    assert kept(filter_logits(logits, 2, None)) == [True, True, False, False, False]
    # Nucleus 0.8: 0.5 + 0.2 = 0.7 < 0.8, so the third token is needed; the fourth is not.
    assert kept(filter_logits(logits, None, 0.8)) == [True, True, True, False, False]
    assert kept(filter_logits(logits, None, 0.5)) == [True, False, False, False, False]
    # Order-independent: shuffle the vocabulary.
    perm = torch.tensor([3, 0, 4, 2, 1])
    assert kept(filter_logits(logits[:, perm], None, 0.8)) == [False, True, False, True, True]


def test_stop_tokens_end_rows_and_streaming_sees_every_token():
    model = make_model()
    free = generate(model, [[256, 7, 8], [256, 1]], 12, stop_tokens=[])
    stop = free[0][3]
    streamed = {0: [], 1: []}
    out = generate(model, [[256, 7, 8], [256, 1]], 12, stop_tokens=[stop],
                   on_token=lambda row, tok: streamed[row].append(tok))
    first = free[0].index(stop)
    assert out[0] == free[0][:first + 1]
    expected1 = free[1][:free[1].index(stop) + 1] if stop in free[1] else free[1]
    assert out[1] == expected1
    assert streamed == {0: out[0], 1: out[1]}


def test_default_stop_is_eos():
    model = make_model()
    with torch.no_grad():  # make EOS (257) overwhelmingly likely after any token
        model.lm_head.weight[257] = 0
        model.lm_head.weight[257, :] = model.norm.weight.sign() * 5
    out = generate(model, [[256, 1, 2]], 8)
    assert out[0][-1] == 257 and len(out[0]) < 8


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompts=[[]]), "prompt 0 is empty"),
    (dict(prompts=[1, 2]), "non-empty list of token-id lists"),
    (dict(prompts=[[1, 999]]), r"token id\(s\) \[999\] outside the vocabulary"),
    (dict(temperature=-1), "temperature=-1 must be >= 0"),
    (dict(top_k=0), "top_k=0 must be a positive integer"),
    (dict(top_p=1.5), r"top_p=1.5 must be in \(0, 1\]"),
    (dict(max_new_tokens=-2), "max_new_tokens=-2"),
])
def test_generate_validation(kwargs, match):
    args = {"prompts": [[1, 2]], "max_new_tokens": 3, **kwargs}
    with pytest.raises(ConfigError, match=match):
        generate(make_model(), args.pop("prompts"), **args)
