"""``kvlab serve MODEL`` as a user runs it: a subprocess on a free port, whose greedy answers equal
``kvlab generate``'s on the same checkpoint, and which stops cleanly on SIGINT (bad flags: the
catalogue, tests/cli/test_bad_inputs.py)."""

import json
import os
import signal
import subprocess
import sys

import openai
import pytest

from kvlab.cli import main
from kvlab.io import save_checkpoint
from kvlab.io.tokenizer import ByteTokenizer

from conftest import make_model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("serve") / "ckpt"
    save_checkpoint(make_model(n_kv_head=1, max_seq_len=512), path, tokenizer=ByteTokenizer())
    return path


@pytest.mark.parametrize("kv_quant", ["none", "int4"])
def test_kvlab_serve_answers_as_kvlab_generate(checkpoint, capsys, kv_quant):
    prompts = ["hello", "The quick brown fox"]
    assert main(["generate", str(checkpoint), *[a for p in prompts for a in ("--prompt", p)], "--max-new-tokens",
                 "12", "--json", "--kv-quant", kv_quant]) == 0
    want = [ByteTokenizer().decode(o["new_ids"], skip_special_tokens=True) for o in json.loads(capsys.readouterr().out)]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "kvlab", "serve", str(checkpoint), "--port", "0",
                             "--kv-budget", "8MiB", "--served-model-name", "ckpt", "--kv-quant", kv_quant],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        banner = proc.stdout.readline()
        assert "kvlab serve: ckpt on http://127.0.0.1:" in banner and "blocks of 16 tokens" in banner
        url = banner.split(" on ")[1].split()[0]
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=2, timeout=60)
        for p, w in zip(prompts, want):
            assert client.completions.create(model="ckpt", prompt=p, max_tokens=12, temperature=0).choices[0].text == w
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode in (0, 130), err
