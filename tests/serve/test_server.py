"""``kvlab serve`` through the official ``openai`` client: a server started in the test (tiny byte-level
model, loopback only) answers completions and chat, streamed and not, with what ``generate`` gives
each prompt alone (greedy), honours stop strings and cancellation, and answers malformed requests
with a 4xx and one clear message while it keeps serving."""

import copy
import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx2 as httpx
import openai
import pytest
import torch

from kvlab.inference.engine import Engine
from kvlab.inference.generation import generate
from kvlab.io.tokenizer import ByteTokenizer
from kvlab.serve.server import BackgroundServer

NAME = "tiny-test"
PROMPTS = ["The cat ", "def main(", "In the beginning", "x", "import os\nimport ", "Once upon a time, there"]


@pytest.fixture(scope="module")
def model(trained_mha):
    m = copy.deepcopy(trained_mha[0]).eval()
    m.tokenizer = ByteTokenizer()
    return m


def _engine(model, **kw):
    kw = {"kv_budget_bytes": 2**22, "max_len": 256, "block_size": 16, "prefill_chunk": 8} | kw
    return Engine(model, **kw)


@pytest.fixture(scope="module")
def server(model):
    engine = _engine(model)
    with BackgroundServer(engine, model.tokenizer, NAME) as url:
        yield url, engine


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="none", max_retries=0, timeout=60)


def _alone(model, prompt_ids, n):
    out = generate(model, [prompt_ids], n)[0]
    return model.tokenizer.decode(out, skip_special_tokens=True), out


def test_models_health_and_metrics(server, client):
    url, engine = server
    assert [m.id for m in client.models.list().data] == [NAME]
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    text = httpx.get(url + "/metrics").text
    assert f"kvlab_kv_blocks_total {float(engine.pool.num_blocks)}" in text
    assert "kvlab_queue_length" in text and "kvlab_time_to_first_token_seconds_bucket" in text


def test_concurrent_completions_equal_generate_alone(model, server, client):
    tok = model.tokenizer
    lengths = [40, 7, 25, 60, 13, 33]

    def ask(i):
        return client.completions.create(model=NAME, prompt=PROMPTS[i], max_tokens=lengths[i], temperature=0)

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        answers = list(pool.map(ask, range(len(PROMPTS))))
    for i, a in enumerate(answers):
        ids = tok.encode(PROMPTS[i])
        text, out = _alone(model, ids, lengths[i])
        assert a.choices[0].text == text
        assert a.choices[0].finish_reason == ("stop" if out[-1] == tok.eos_token_id else "length")
        assert (a.usage.prompt_tokens, a.usage.completion_tokens) == (len(ids), len(out))
    assert server[1].stats.max_running >= 2          # they did share the batch


def test_streaming_equals_the_whole_answer(model, client):
    whole = client.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=30, temperature=0)
    chunks = list(client.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=30, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_chat_uses_the_template_streamed_and_not(model, client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    text, _ = _alone(model, model.tokenizer.apply_chat_template(messages), 24)
    a = client.chat.completions.create(model=NAME, messages=messages, max_tokens=24, temperature=0)
    assert a.choices[0].message.role == "assistant" and a.choices[0].message.content == text
    chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=24, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text


def test_stop_strings_cut_the_text_before_them(model, client):
    full = client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=60, temperature=0).choices[0].text
    stop = full[12:15]
    assert len(stop) == 3 and stop in full
    want = full[:full.index(stop)]
    a = client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=60, temperature=0, stop=[stop, "@@@@"])
    assert (a.choices[0].text, a.choices[0].finish_reason) == (want, "stop")
    chunks = list(client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=60, temperature=0, stop=stop,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_ignore_eos_generates_exactly_max_tokens(model, client):
    """vLLM's extension: the answer runs past EOS, as generate with no stop tokens does."""
    ids = model.tokenizer.encode(PROMPTS[3])
    a = client.completions.create(model=NAME, prompt=PROMPTS[3], max_tokens=20, temperature=0,
                                  extra_body={"ignore_eos": True})
    out = generate(model, [ids], 20, stop_tokens=[])[0]
    assert a.usage.completion_tokens == 20 and a.choices[0].finish_reason == "length"
    assert a.choices[0].text == model.tokenizer.decode(out, skip_special_tokens=True)


def test_seeded_sampling_is_reproducible_and_n_gives_choices(client):
    kw = dict(model=NAME, prompt=PROMPTS[2], max_tokens=20, temperature=0.8, seed=7, n=3)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert [c.index for c in a.choices] == [0, 1, 2] and len({c.text for c in a.choices}) > 1


def _wait(predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_a_client_that_goes_away_is_cancelled(model):
    """Streaming or not, a client that closes its connection ends its request at once (2,000 tokens
    would take several seconds) and its KV blocks return to the pool."""
    engine = _engine(model, max_len=2048)
    body = {"model": NAME, "max_tokens": 2000, "temperature": 0, "stop": []}
    with BackgroundServer(engine, model.tokenizer, NAME) as url:
        with httpx.stream("POST", url + "/v1/completions", json=body | {"prompt": "a", "stream": True}) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
        assert _wait(lambda: engine.stats.requests_finished.get("cancelled") == 1)
        with pytest.raises(httpx.TimeoutException):
            httpx.post(url + "/v1/completions", json=body | {"prompt": "b"}, timeout=0.3)
        assert _wait(lambda: engine.stats.requests_finished.get("cancelled") == 2)
        assert _wait(lambda: engine.pool.free_blocks == engine.pool.num_blocks)
        assert engine.stats.generated_tokens < 2000 and "length" not in engine.stats.requests_finished
        c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        assert c.completions.create(model=NAME, prompt="c", max_tokens=3, temperature=0).usage.completion_tokens == 3


@pytest.mark.parametrize("body, status, message", [
    ("{not json", 400, "not valid JSON"),
    ('["a list"]', 400, "must be a JSON object"),
    (json.dumps({"model": "gpt-4", "prompt": "hi"}), 404, "`gpt-4` does not exist"),
    (json.dumps({"model": NAME, "prompt": "hi", "max_tokens": -3}), 400, "max_tokens: Input should be greater"),
    (json.dumps({"model": NAME, "prompt": "hi", "temperature": "hot"}), 400, "temperature"),
    (json.dumps({"model": NAME}), 400, "prompt: Field required"),
    (json.dumps({"model": NAME, "prompt": "x" * 300}), 400, "maximum context length is 256 tokens"),
    (json.dumps({"model": NAME, "prompt": "hi", "max_tokens": 256}), 400, "maximum context length"),
    (json.dumps({"model": NAME, "prompt": [1, 2, 99999]}), 400, "outside the vocabulary"),
    (json.dumps({"model": NAME, "prompt": "hi", "presence_penalty": 1}), 400, "not supported"),
])
def test_malformed_requests_get_a_4xx_and_the_server_keeps_serving(server, client, body, status, message):
    url, _ = server
    r = httpx.post(url + "/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status
    error = r.json()["error"]
    assert message in error["message"] and "\n" not in error["message"]
    assert client.completions.create(model=NAME, prompt="ok", max_tokens=2, temperature=0).choices


def test_the_openai_client_sees_the_errors(client):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="nope", prompt="hi")
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=-1)
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model=NAME, messages=[])


def test_a_full_queue_is_answered_429(model):
    with BackgroundServer(_engine(model, max_queue=0), model.tokenizer, NAME) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        with pytest.raises(openai.RateLimitError, match="requests are waiting"):
            c.completions.create(model=NAME, prompt="hi", max_tokens=2)
        with pytest.raises(openai.RateLimitError):
            list(c.completions.create(model=NAME, prompt="hi", max_tokens=2, stream=True))


def test_a_budget_too_small_for_all_requests_preempts_and_keeps_them_exact(model):
    """16 blocks of 16 tokens, 8 requests growing to 61 tokens (4 blocks): they cannot all run to the end
    at once, so some are preempted and recomputed, and every answer is still ``generate``'s."""
    from kvlab.config.accounting import cache_bytes

    engine = _engine(model, kv_budget_bytes=cache_bytes(model.cfg, torch.float32).per_token * 16 * 16,
                     admission="optimistic")
    prompts = [PROMPTS[i % 6] + "abcdefghijklmnopqrst"[:20 - len(PROMPTS[i % 6]) % 20] for i in range(8)]
    with BackgroundServer(engine, model.tokenizer, NAME) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        with ThreadPoolExecutor(8) as pool:
            outs = list(pool.map(lambda p: c.completions.create(model=NAME, prompt=p, max_tokens=40, temperature=0,
                                                                stop=[]), prompts))
    assert engine.stats.preemptions > 0 and engine.pool.free_blocks == engine.pool.num_blocks == 16
    for p, o in zip(prompts, outs):
        assert o.choices[0].text == _alone(model, model.tokenizer.encode(p), 40)[0]


def test_a_failed_generation_is_a_500_and_the_server_keeps_serving(monkeypatch):
    from conftest import fail_call, make_model

    model = make_model(n_kv_head=2)
    model.tokenizer = ByteTokenizer()
    fail_call(monkeypatch, model, 1)
    with BackgroundServer(_engine(model), model.tokenizer, NAME) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        with pytest.raises(openai.InternalServerError, match="simulated device failure"):
            c.completions.create(model=NAME, prompt="hi", max_tokens=4)
        assert c.completions.create(model=NAME, prompt="hi", max_tokens=4, temperature=0).usage.completion_tokens >= 1


def test_a_generation_failing_mid_stream_ends_with_an_error_event(model, monkeypatch):
    """Text was sent already, so the status stays 200: the stream ends with an error event, as vLLM's."""
    from conftest import fail_call

    fail_call(monkeypatch, model, 8)                 # the prefill and six decode steps work
    with BackgroundServer(_engine(model), model.tokenizer, NAME) as url:
        body = {"model": NAME, "prompt": PROMPTS[0], "max_tokens": 20, "temperature": 0, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body) as r:
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert r.status_code == 200 and events[-1] == "[DONE]"
        assert json.loads(events[-2])["error"]["message"] == "generation failed: RuntimeError: simulated device failure"
        assert json.loads(events[0])["choices"][0]["finish_reason"] is None
