"""Continuous batching against generation run alone: requests that arrive at different steps, share
decode calls, are preempted and resumed, give exactly what ``generate`` gives each prompt by itself."""

import time

import pytest
import torch

from kvlab.config.accounting import cache_bytes
from kvlab.errors import ConfigError
from kvlab.inference.engine import Engine, QueueFull, Request
from kvlab.inference.generation import SamplingParams, generate

from conftest import VARIANTS, fail_call, make_model


def _prompts(model, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, model.cfg.vocab_size, (n,), generator=g).tolist() for n in lengths]


def _run_staggered(engine, requests, arrivals):
    """Submit request i at step arrivals[i]; step until all are done."""
    step = 0
    pending = sorted(zip(arrivals, range(len(requests))))
    while pending or engine.has_work:
        while pending and pending[0][0] <= step:
            engine.submit(requests[pending.pop(0)[1]])
        engine.step()
        step += 1


@pytest.mark.parametrize("name", ["mha", "mqa-cla2", "mla", "sliding-window", "linear-elu", "compressed-hybrid",
                                  "learned-pos"])
def test_staggered_requests_equal_generate_alone(name):
    model = make_model(**VARIANTS[name])
    prompts = _prompts(model, [9, 3, 17, 5, 12])
    max_tokens = [12, 20, 7, 15, 10]
    engine = Engine(model, kv_budget_bytes=2**22, max_len=64, block_size=4, prefill_chunk=6)
    reqs = [Request(p, m, stop_tokens=frozenset()) for p, m in zip(prompts, max_tokens)]
    _run_staggered(engine, reqs, [0, 0, 2, 5, 5])
    for r, p, m in zip(reqs, prompts, max_tokens):
        assert r.finish_reason == "length"
        assert r.output == generate(model, [p], m, stop_tokens=[])[0]
    assert engine.pool.free_blocks == engine.pool.num_blocks and not engine.pool.sequences
    assert engine.stats.max_running >= 3


def test_preemption_recomputes_and_keeps_the_output():
    model = make_model(n_kv_head=2)
    prompts = _prompts(model, [10, 14, 6, 11], seed=3)
    per_token = cache_bytes(model.cfg, model.dtype).per_token
    # 12 blocks of 4 tokens: the four sequences (up to 30 tokens = 8 blocks each) cannot all grow.
    engine = Engine(model, kv_budget_bytes=per_token * 4 * 12, max_len=64, block_size=4, admission="optimistic")
    reqs = [Request(p, 16, stop_tokens=frozenset()) for p in prompts]
    for r in reqs:
        engine.submit(r)
    engine.run_until_done()
    assert engine.stats.preemptions > 0
    for r, p in zip(reqs, prompts):
        assert r.output == generate(model, [p], 16, stop_tokens=[])[0]
    assert engine.pool.free_blocks == 12


@pytest.mark.parametrize("chunk", [12, 20])
def test_optimistic_admission_under_pressure_stays_exact(chunk):
    """Many requests, blocks for a third of them at full length: admitted on their prompts, they grow,
    are preempted (a prompt still prefilling first, else the prefilled ones would be preempted as soon
    as they run: a livelock), prefilled again in ragged calls of fresh and continuing chunks, and still
    answer exactly."""
    model = make_model(n_kv_head=2, max_seq_len=256)
    prompts = _prompts(model, [16] * 24, seed=4)
    per_token = cache_bytes(model.cfg, model.dtype).per_token
    engine = Engine(model, kv_budget_bytes=per_token * 4 * 24, max_len=32, max_seqs=16, block_size=4,
                    prefill_chunk=chunk, admission="optimistic")
    reqs = [engine.submit(Request(p, 16, stop_tokens=frozenset())) for p in prompts]
    for _ in range(1000):                       # bounded: a livelock fails instead of hanging
        if not engine.has_work:
            break
        engine.step()
    assert not engine.has_work and engine.stats.preemptions > 5
    for r, p in zip(reqs, prompts):
        assert r.output == generate(model, [p], 16, stop_tokens=[])[0]
    assert engine.pool.free_blocks == 24


def test_reserve_admission_admits_what_the_planner_predicts_and_never_preempts():
    model = make_model(n_kv_head=2)
    per_token = cache_bytes(model.cfg, model.dtype).per_token
    engine = Engine(model, kv_budget_bytes=per_token * 4 * 30, max_len=64, block_size=4)
    prompts = _prompts(model, [10] * 12, seed=6)
    for p in prompts:
        engine.submit(Request(p, 14, stop_tokens=frozenset()))        # 23 cached tokens: 6 blocks
    engine.step()
    assert len(engine.running) + len(engine.prefilling) == 5 == engine.pool.max_sequences(23)
    engine.run_until_done()
    assert engine.stats.preemptions == 0 and engine.stats.max_running == 5


def test_seeded_sampling_equals_generate_with_the_seed():
    model = make_model(n_kv_head=1)
    prompts = _prompts(model, [7, 13])
    engine = Engine(model, kv_budget_bytes=2**21, max_len=64)
    params = SamplingParams(temperature=0.9, top_k=50, top_p=0.95)
    reqs = [engine.submit(Request(p, 12, params, seed=s, stop_tokens=frozenset())) for p, s in zip(prompts, (5, 6))]
    engine.run_until_done()
    for r, p, s in zip(reqs, prompts, (5, 6)):
        assert r.output == generate(model, [p], 12, temperature=0.9, top_k=50, top_p=0.95, seed=s, stop_tokens=[])[0]


def test_a_smaller_cache_admits_more_sequences_on_the_same_budget():
    admitted = {}
    budget = cache_bytes(make_model(n_kv_head=4).cfg, torch.float32).per_token * 8 * 16   # 16 MHA blocks
    for n_kv in (4, 1):
        model = make_model(n_kv_head=n_kv)
        engine = Engine(model, kv_budget_bytes=budget, max_len=64, block_size=8)
        for p in _prompts(model, [20] * 40):
            engine.submit(Request(p, 4, stop_tokens=frozenset()))
        engine.step()
        engine.step()
        admitted[n_kv] = len(engine.running) + len(engine.prefilling)
        engine.run_until_done()
        assert engine.stats.preemptions == 0
    # 16 blocks of 8 tokens for MHA hold 5 sequences of 20-24 tokens (3 blocks); MQA's 64 hold 21.
    assert admitted == {4: 5, 1: 21}


def test_stop_tokens_cancel_and_events():
    model = make_model(n_kv_head=2)
    p = _prompts(model, [8])[0]
    free_run = generate(model, [p], 10, stop_tokens=[])[0]
    events = []
    engine = Engine(model, kv_budget_bytes=2**21, max_len=64)
    r = engine.submit(Request(p, 10, stop_tokens=frozenset([free_run[3]]), sink=events.append))
    engine.run_until_done()
    assert r.finish_reason == "stop" and r.output == free_run[:free_run.index(free_run[3]) + 1]
    assert events == [("token", t) for t in r.output] + [("finish", "stop")]
    r2 = engine.submit(Request(p, 10))
    engine.step()
    engine.cancel(r2)
    engine.run_until_done()
    assert r2.finish_reason == "cancelled" and len(r2.output) == 2     # prefill + one decode step
    assert engine.pool.free_blocks == engine.pool.num_blocks


def test_admission_limits_and_bad_requests():
    model = make_model(n_kv_head=2)
    engine = Engine(model, kv_budget_bytes=2**21, max_len=64, max_queue=2)
    p = _prompts(model, [5])[0]
    engine.submit(Request(p, 4))
    engine.submit(Request(p, 4))
    with pytest.raises(QueueFull, match="2 requests are waiting"):
        engine.submit(Request(p, 4))
    with pytest.raises(ConfigError, match="maximum context length is 64 tokens"):
        engine.check(p, 60)
    with pytest.raises(ConfigError, match="max_tokens=-1"):
        engine.check(p, -1)
    with pytest.raises(ConfigError, match="outside the vocabulary"):
        engine.check([model.cfg.vocab_size], 1)
    small = Engine(model, kv_budget_bytes=cache_bytes(model.cfg, model.dtype).per_token * 32, max_len=64,
                   block_size=16)
    with pytest.raises(ConfigError, match="raise the KV budget"):
        small.check(p, 40)
    with pytest.raises(ConfigError, match="admission='eager'"):
        Engine(model, kv_budget_bytes=2**21, admission="eager")


@pytest.mark.parametrize("method, kv_quant", [("prefix", None), ("prompt", None), ("lora", None),
                                              ("prefix", "int8/int4"), ("prefix", "fp8")])
def test_adapters_are_served_as_generate_runs_them(method, kv_quant):
    """A prefix goes into each sequence's first blocks — stored in the pool's format, codes and scales
    for a quantized pool — virtual tokens into its first prefill chunk."""
    from kvlab.peft import AdapterSpec, attach

    model = make_model(n_kv_head=2)
    attach(model, AdapterSpec(method, dict(r=4) if method == "lora" else dict(num_virtual_tokens=3)))
    with torch.no_grad():            # trained-looking adapter weights, not their neutral initialisation
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    model.eval()
    _served_as_generate(model, kv_quant, seed=5)


def _served_as_generate(model, kv_quant, seed: int) -> Engine:
    """Three staggered requests through a paged engine (chunked prefill), each equal to generate's."""
    prompts = _prompts(model, [9, 14, 4], seed=seed)
    engine = Engine(model, kv_budget_bytes=2**21, max_len=64, block_size=4, prefill_chunk=5, kv_quant=kv_quant)
    reqs = [Request(p, 10, stop_tokens=frozenset()) for p in prompts]
    _run_staggered(engine, reqs, [0, 1, 3])
    for r, p in zip(reqs, prompts):
        assert r.output == generate(model, [p], 10, stop_tokens=[], kv_quant=kv_quant)[0]
    return engine


@pytest.mark.parametrize("kv_quant", ["int4", "int8/int4", "fp8"])
def test_balanced_keys_are_served_as_generate_runs_them(kv_quant):
    """A model whose keys are balanced (kvlab.convert.balance): the paged pool holds them balanced where
    it keeps integer codes, as generate's cache does, and as projected in fp8."""
    from kvlab.convert.balance import balance_keys

    base = make_model(n_kv_head=2, qkv_bias=True)
    with torch.no_grad():            # keys with an offset, which balance takes out
        for layer in base.layers:
            layer.self_attn.k_proj.bias.add_(3.0)
            layer.self_attn.k_proj.weight.mul_(4.0)
    model = balance_keys(base, [torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(3))]).eval()
    engine = _served_as_generate(model, kv_quant, seed=6)
    assert engine.pool.batch([engine.pool.new_sequence()]).keys_in_codes(0) is (kv_quant != "fp8")


def test_a_failed_step_ends_the_admitted_requests_and_the_engine_goes_on(monkeypatch):
    import threading

    model = make_model(n_kv_head=2)
    engine = Engine(model, kv_budget_bytes=2**21, max_len=64)
    fail_call(monkeypatch, model, 2)
    thread = threading.Thread(target=engine.run_forever, daemon=True)
    thread.start()
    p = _prompts(model, [6])[0]
    r = engine.submit(Request(p, 8, stop_tokens=frozenset()))
    deadline = time.monotonic() + 20
    while r.finish_reason is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert r.finish_reason == "error" and "simulated device failure" in r.error
    r2 = engine.submit(Request(p, 8, stop_tokens=frozenset()))
    while r2.finish_reason is None and time.monotonic() < deadline:
        time.sleep(0.01)
    engine.stop()
    thread.join(10)
    monkeypatch.undo()
    assert r2.finish_reason == "length" and r2.output == generate(model, [p], 8, stop_tokens=[])[0]
    assert engine.pool.free_blocks == engine.pool.num_blocks
