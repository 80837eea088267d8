"""The verbs on an encoder–decoder, end to end: train from a preset on the built-in tasks, info and
plan, convert the decoder (GQA/MQA and cross-attention sharing), uptrain the converted model,
generate (greedy and beam), eval, and export to transformers' T5."""

from __future__ import annotations

import json

import pytest
import torch

import kvlab
from kvlab.cli import main
from kvlab.convert.heads import convert
from kvlab.data.seq2seq import encode_text
from kvlab.inference.seq2seq import generate_seq2seq


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 0, err[-2000:]
    return out


def test_seq2seq_pipeline(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = run(capsys, "train", "--preset", "t5-tiny", "--out", tmp_path / "run", "--max-steps", "12",
              "--batch-size", "8", "--seq-len", "48", "--eval-every", "6", "--log-every", "6")
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["validation"]["n"] == 200 and summary["data"]["pairs"] == 4000
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    mha = tmp_path / "run" / "final"
    model = kvlab.load(mha)
    assert isinstance(model, kvlab.EncoderDecoder) and model.cfg.decoder_start_token_id == 258

    info = json.loads(run(capsys, "info", mha, "--json"))
    assert info["cross_bytes_per_source_token"] == 2 * 2 * 4 * 16 * 2 and info["n_encoder_layer"] == 2
    plan = json.loads(run(capsys, "plan", mha, "--context", "64", "--source-len", "128", "--json"))
    mqa = next(v for v in plan["variants"] if v["variant"] == "MQA")
    assert mqa["kv_bytes_per_sequence"] == 64 * 2 * 2 * 1 * 16 * 2 + 128 * 2 * 2 * 1 * 16 * 2

    # The CLI's conversion is the Python API's.
    run(capsys, "convert", mha, "--mqa", "--cross-kv-heads", "1", "--cross-cla", "2", "-o", tmp_path / "mqa")
    converted = kvlab.load(tmp_path / "mqa")
    expected = convert(model, n_kv_head=1, cross_n_kv_head=1, cross_cla=2)
    assert converted.cfg == expected.cfg
    for name, t in expected.state_dict().items():
        assert torch.equal(converted.state_dict()[name], t), name

    # Uptraining the converted model keeps its wiring.
    run(capsys, "train", "--init", tmp_path / "mqa", "--out", tmp_path / "up", "--max-steps", "3", "--batch-size",
        "8", "--seq-len", "48", "--eval-every", "3")
    up = kvlab.load(tmp_path / "up" / "final")
    assert (up.cfg.n_kv_head, up.cfg.cross_n_kv_head, up.cfg.cross_cla) == (1, 1, 2)

    # generate: greedy and beam search, as the Python API does them.
    out = json.loads(run(capsys, "generate", tmp_path / "up" / "final", "--prompt", "What is 12 + 30?",
                         "--prompt", "Sort from smallest to largest: 5, 3, 9", "--max-new-tokens", "6",
                         "--num-beams", "3", "--json"))
    sources = [encode_text(up.tokenizer, s) for s in ("What is 12 + 30?", "Sort from smallest to largest: 5, 3, 9")]
    assert [o["new_ids"] for o in out] == generate_seq2seq(up, sources, 6, num_beams=3)
    assert [o["prompt_ids"] for o in out] == sources

    result = json.loads(run(capsys, "eval", tmp_path / "up" / "final", "--max-tokens", "320", "--json"))
    assert result["pairs"] == 10 and 0 <= result["accuracy"] <= 1 and result["perplexity"] > 1
    assert result["cross_bytes_per_source_token_bf16"] == 2 * 1 * 1 * 16 * 2

    pytest.importorskip("transformers")
    import transformers

    with pytest.warns(UserWarning, match="MHA in every layer"):
        run(capsys, "export", tmp_path / "up" / "final", "--format", "hf", "-o", tmp_path / "hf")
    theirs = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    src, tgt = torch.randint(0, 256, (2, 9)), torch.randint(0, 256, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=src, decoder_input_ids=tgt).logits, up(src, tgt),
                                   rtol=1e-4, atol=1e-4)
