"""SFT data (chat templates, assistant-only labels, packing), the instruction set, and the
``kvlab finetune`` / ``kvlab tasks`` / ``--adapter`` command line."""

import json

import pytest
import torch

from kvlab.cli import main
from kvlab.data.chat import IGNORE_INDEX, ChatBatches, encode_chat, read_chat_data, read_chat_jsonl
from kvlab.data.instruct import TASKS, make_tasks
from kvlab.errors import ConfigError
from kvlab.io import save_checkpoint
from kvlab.io.tokenizer import ByteTokenizer
from kvlab.peft import AdapterSpec, attach
from kvlab.training import TrainConfig, train

from conftest import make_model

MULTI_TURN = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
              {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"},
              {"role": "assistant", "content": "6 it is"}]


def learned_text(tok, ids, learn):
    """The learned tokens as one string per contiguous run."""
    runs, current = [], []
    for t, flag in zip(ids, learn):
        if flag:
            current.append(t)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return runs


def test_byte_chat_labels_are_exactly_the_assistant_turns():
    tok = ByteTokenizer()
    ids, learn = encode_chat(tok, MULTI_TURN)
    runs = learned_text(tok, ids, learn)
    # Each assistant turn: its content then EOS (the stop token generation must learn to emit).
    assert runs == [[*b"4", tok.eos_token_id], [*b"6 it is", tok.eos_token_id]]
    text = tok.decode(ids)
    assert text.startswith("<|system|>\nBe brief.\n<|user|>\n2+2?\n<|assistant|>\n4")


def test_smollm2_chat_labels_match_its_template(smollm2, hf_smollm2):
    tok = smollm2.tokenizer
    _, hf_tok = hf_smollm2
    ids, learn = encode_chat(tok, MULTI_TURN)
    # The rendering is transformers' own, token for token.
    assert ids == list(hf_tok.apply_chat_template(MULTI_TURN, tokenize=True, return_dict=False))
    runs = [tok.decode(r) for r in learned_text(tok, ids, learn)]
    assert runs == ["4<|im_end|>\n", "6 it is<|im_end|>\n"]


class ReversedTemplate(ByteTokenizer):
    """A template that renders the last message first: not prefix-stable."""

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=True, **extra):
        return super().apply_chat_template(list(reversed(messages)), add_generation_prompt, tokenize)


def test_a_template_that_is_not_prefix_stable_is_refused():
    with pytest.raises(ConfigError, match="prefix-stable"):
        encode_chat(ReversedTemplate(), MULTI_TURN)


def test_rows_shift_targets_and_count_only_assistant_tokens():
    tok = ByteTokenizer()
    convs = make_tasks(10)
    batches = ChatBatches(convs, tok, seq_len=128, batch_size=4)
    x, y = batches.batch(0)
    assert x.shape == y.shape == (4, 128)
    for row_x, row_y, r in zip(x, y, batches.indices(0)):
        ids, learn = encode_chat(tok, convs[r])
        n = len(ids) - 1
        assert row_x[:n].tolist() == ids[:-1] and (row_x[n:] == tok.pad_token_id).all()
        counted = row_y != IGNORE_INDEX
        assert counted.sum() == sum(learn[1:])
        assert row_y[counted].tolist() == [t for t, f in zip(ids[1:], learn[1:]) if f]
    assert batches.stats["assistant_tokens"] == sum(sum(encode_chat(tok, c)[1][1:]) for c in convs)


def test_batches_are_a_pure_function_of_the_step_and_cover_each_epoch():
    convs = make_tasks(13)
    a = ChatBatches(convs, ByteTokenizer(), seq_len=128, batch_size=4, seed=3)
    b = ChatBatches(convs, ByteTokenizer(), seq_len=128, batch_size=4, seed=3)
    assert all(torch.equal(a.batch(i)[0], b.batch(i)[0]) for i in range(5))
    first_epoch = [int(r) for i in range(13) for r in a.indices(i)][:13]
    assert sorted(first_epoch) == list(range(13))


def test_packing_places_every_conversation_once_and_within_the_row():
    tok = ByteTokenizer()
    convs = make_tasks(40)
    packed = ChatBatches(convs, tok, seq_len=256, batch_size=2, pack=True)
    assert packed.stats["rows"] < len(convs) / 2
    seen = []
    for row in packed.rows:
        assert sum(len(px) for px, _ in row) <= 256
        seen += [tuple(px.tolist()) for px, _ in row]
    assert sorted(seen) == sorted(tuple(encode_chat(tok, c)[0][:-1]) for c in convs)
    x, y, seg = packed.batch(0)
    assert seg.shape == x.shape and int(seg.max()) >= 2 and ((seg == 0) <= (y == IGNORE_INDEX)).all()


@pytest.mark.parametrize("backend", ["reference", "flash"])
@pytest.mark.parametrize("overrides", [dict(n_kv_head=2), dict(n_kv_head=1, cla=2), dict(pos="learned"),
                                       dict(sliding_window=7)], ids=["gqa", "mqa-cla2", "learned-pos", "window"])
def test_packed_forward_equals_each_conversation_alone(overrides, backend):
    model = make_model(**overrides)
    packed = ChatBatches(make_tasks(12), ByteTokenizer(), seq_len=200, batch_size=2, pack=True)
    x, _, seg = packed.batch(0)
    logits = model(x, segment_ids=seg, backend=backend)
    for b in range(x.shape[0]):
        for s in range(1, int(seg[b].max()) + 1):
            cols = (seg[b] == s).nonzero().flatten()
            alone = model(x[b:b + 1, cols], backend="reference")[0]
            assert (logits[b, cols] - alone).abs().max() < 1e-5


def test_truncation_keeps_or_drops_by_assistant_tokens():
    long_prompt = [{"role": "user", "content": "x" * 300}, {"role": "assistant", "content": "ok"}]
    short = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "y" * 300}]
    batches = ChatBatches([long_prompt, short], ByteTokenizer(), seq_len=64, batch_size=1)
    assert batches.stats["dropped"] == 1 and batches.stats["truncated"] == 2 and batches.stats["used"] == 1
    with pytest.raises(ConfigError, match="raise --seq-len"):
        ChatBatches([long_prompt], ByteTokenizer(), seq_len=64, batch_size=1)


@pytest.mark.parametrize("line, message", [
    ("{not json", "is not valid JSON"),
    ('{"text": "hi"}', 'has no "messages" list'),
    ('{"messages": [{"role": "robot", "content": "hi"}]}', "needs a role in"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant message"),
])
def test_chat_jsonl_errors_name_the_line(tmp_path, line, message):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": MULTI_TURN}) + "\n" + line + "\n")
    with pytest.raises(ConfigError, match=f"chat.jsonl:2.*{message}|{message}"):
        read_chat_jsonl(path)


def test_instruction_set_is_deterministic_and_checkable():
    a, b = make_tasks(50, seed=4), make_tasks(50, seed=4)
    assert a == b and make_tasks(50, seed=5) != a
    by_kind = {}
    for conv in a:
        by_kind.setdefault(conv[1]["content"].split()[0], []).append(conv)
    assert len(by_kind) == len(TASKS)
    for conv in a:                               # every answer is right, recomputed independently
        q, ans = conv[1]["content"], conv[2]["content"]
        if q.startswith("What is"):
            x, y = q.removeprefix("What is ").rstrip("?").split(" + ")
            assert int(ans) == int(x) + int(y)
        elif q.startswith("Which"):
            assert int(ans) == max(int(v) for v in q.split(": ")[1].rstrip("?").split(", "))
        elif q.startswith("Sort"):
            assert ans == ", ".join(sorted(q.split(": ")[1].split(", "), key=int))
        elif q.startswith("Write"):
            assert ans == q.split("'")[1].upper()
        else:
            y, m, d = q.split("date ")[1].split(" as")[0].split("-")
            assert ans == f"{d}/{m}/{y}"


def test_adapter_resume_reproduces_the_uninterrupted_run(tmp_path):
    """AdaLoRA carries training state beyond its weights (importance scores): a resumed run must
    reproduce the uninterrupted one exactly."""
    import shutil

    spec = AdapterSpec("adalora", dict(init_r=4, target_r=2, total_steps=8, init_warmup=1, final_warmup=2,
                                       mask_interval=2))
    batches = ChatBatches(make_tasks(16), ByteTokenizer(), seq_len=96, batch_size=4)

    def run(out, resume=False):
        torch.manual_seed(0)
        model = make_model(n_kv_head=1, cla=2)
        attached = attach(model, spec)
        cfg = TrainConfig(out_dir=str(out), max_steps=8, batch_size=4, seq_len=96, lr=1e-2, warmup_steps=1,
                          save_every=4, keep_last=5, log_every=100, train_only="adapter")
        train(model, batches, None, cfg, resume=resume, quiet=True, hooks=attached.allocator)
        return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()], model

    full, model_a = run(tmp_path / "a")
    run(tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step_0000008")      # as if killed after step 4
    resumed, model_b = run(tmp_path / "b", resume=True)
    assert resumed == full
    for (n, p), (_, q) in zip(model_a.named_parameters(), model_b.named_parameters()):
        assert torch.equal(p, q), n


# ------------------------------------------------------------------------------ command line
@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    model = make_model(n_kv_head=2, qkv_bias=False, o_bias=False)
    model.tokenizer = ByteTokenizer()
    save_checkpoint(model, root / "base")
    assert main(["tasks", str(root / "data"), "--train", "64", "--test", "10"]) == 0
    return root


def test_finetune_cli_writes_adapter_peft_merged_and_summary(tiny_checkpoint, tmp_path, capsys):
    root = tiny_checkpoint
    out = tmp_path / "run"
    rc = main(["finetune", str(root / "base"), "--method", "lora", "--data", str(root / "data" / "train.jsonl"),
               "--eval-data", str(root / "data" / "test.jsonl"), "--out", str(out), "--max-steps", "6",
               "--batch-size", "4", "--seq-len", "96", "--lr", "1e-2", "--merge", "--pack", "--save-every", "3"])
    assert rc == 0
    brief = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    summary = json.loads((out / "summary.json").read_text())
    assert brief["trainable_parameters"] == summary["trainable_parameters_closed_form"] == 4 * 8 * (64 + 64) * 2 \
        + 4 * 8 * (64 + 32) * 2
    assert {"accuracy_before", "accuracy_after", "seconds_per_step", "peak_memory_bytes"} <= summary.keys()
    assert (out / "adapter" / "adapter.safetensors").is_file()
    assert json.loads((out / "peft" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert [d.name for d in sorted((out / "checkpoints").iterdir())] == ["step_0000003", "step_0000006"]
    # The adapter applied at generation time and the merged checkpoint generate the same text.
    args = ["--prompt", "<|user|>\nWhat is 1 + 2?\n<|assistant|>\n", "--max-new-tokens", "12", "--json"]
    assert main(["generate", str(root / "base"), "--adapter", str(out / "adapter"), *args]) == 0
    with_adapter = json.loads(capsys.readouterr().out)
    assert main(["generate", str(out / "merged"), *args]) == 0
    assert json.loads(capsys.readouterr().out) == with_adapter
    assert main(["generate", str(root / "base"), *args]) == 0
    assert json.loads(capsys.readouterr().out) != with_adapter


def test_adapter_option_only_where_the_model_is_run(tiny_checkpoint, capsys):
    """--adapter belongs to generate/eval; finetune, convert and export reject it instead of ignoring it."""
    root = tiny_checkpoint
    for cmd in (["finetune", "--method", "lora", "--data", "x", "--out", "y"],
                ["convert", "--kv-heads", "1", "-o", "y"],
                ["export", "-o", "z"]):
        assert main([cmd[0], str(root / "base"), *cmd[1:], "--adapter", str(root / "base")]) == 2
        assert "unrecognized arguments: --adapter" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--method", "prefix", "--pack"], "without --pack"),
    (["--method", "qlora", "--merge"], "nothing to merge into a 4-bit base"),
    (["--method", "lora", "--r", "0"], "r=0"),
    (["--method", "lora"], "give one budget, --max-steps N or --epochs E"),
])
def test_finetune_usage_errors_write_nothing(tiny_checkpoint, tmp_path, capsys, extra, message):
    root = tiny_checkpoint
    out = tmp_path / "run"
    budget = [] if message.startswith("give") else ["--max-steps", "2"]
    rc = main(["finetune", str(root / "base"), "--data", str(root / "data" / "train.jsonl"), "--out", str(out),
               "--seq-len", "96", *budget, *extra])
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


def test_finetune_data_takes_directories_globs_and_weighted_mixes_of_chat_files(tmp_path):
    def conv(text):
        return {"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": text.upper()}]}

    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "a.jsonl").write_text("".join(json.dumps(conv(f"a{i}")) + "\n" for i in range(6)))
    (tmp_path / "sft" / "b.jsonl").write_text("".join(json.dumps(conv(f"b{i}")) + "\n" for i in range(2)))
    (tmp_path / "sft" / "notes.txt").write_text("not chat")
    (tmp_path / "extra.jsonl").write_text(json.dumps(conv("x0")) + "\n")
    whole = read_chat_data(str(tmp_path / "sft"))
    assert [c[0]["content"] for c in whole] == [f"a{i}" for i in range(6)] + ["b0", "b1"]     # .jsonl, path order
    assert read_chat_data(str(tmp_path / "sft" / "*.jsonl")) == whole
    mix = read_chat_data(f"{tmp_path / 'sft'}:0.75,{tmp_path / 'extra.jsonl'}:0.25", seed=1)
    firsts = [c[0]["content"] for c in mix]
    # 9 conversations in all: 0.25 of them (2) from the one-line file, repeated; 0.75 (7) of the 8 sampled
    assert len(mix) == 9 and firsts.count("x0") == 2 and len(set(firsts) - {"x0"}) == 7
    assert mix == read_chat_data(f"{tmp_path / 'sft'}:0.75,{tmp_path / 'extra.jsonl'}:0.25", seed=1)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "n.txt").write_text("text only")
    with pytest.raises(ConfigError, match="holds no .jsonl file"):
        read_chat_data(str(tmp_path / "empty"))
