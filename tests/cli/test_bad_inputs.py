"""The catalogue of bad and hostile inputs, across every verb.

Each case runs ``kvlab`` on a workspace that holds a small model, the user's own files and damaged
files of every kind kvlab reads, and asserts: the exit code (2 usage, 1 failure), one line of
message and no traceback, that the message names the offending value, and that nothing in the
workspace changed — no file of the user's touched, no partial output left behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from kvlab import EncoderDecoder, ModelConfig
from kvlab.cli import main
from kvlab.io import save_checkpoint
from kvlab.io.tokenizer import ByteTokenizer
from kvlab.peft import AdapterSpec, attach, save_adapter

from conftest import make_model


def _write(path: Path, data: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data, encoding="utf-8")


def _damaged_checkpoint(ws: Path, name: str, good: Path, change) -> None:
    target = ws / name
    shutil.copytree(good, target)
    change(target)


def _edit_config(edit):
    def change(d: Path) -> None:
        data = json.loads((d / "config.json").read_text())
        edit(data)
        (d / "config.json").write_text(json.dumps(data))
    return change


CHAT_LINE = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    ws = tmp_path_factory.mktemp("catalogue")
    model = make_model(seed=0, max_seq_len=256)
    model.tokenizer = ByteTokenizer()
    save_checkpoint(model, ws / "model")
    good = ws / "model"
    # The user's own files, which no failing command may touch.
    _write(ws / "user" / "notes.txt", "my notes")
    _write(ws / "userfile.txt", "my file")
    _write(ws / "hfdir" / "config.json", json.dumps({"model_type": "llama"}))
    # Text data.
    _write(ws / "data" / "good.txt", "Some text to read. " * 20)
    _write(ws / "data" / "bin.txt", bytes(range(256)) * 4)
    _write(ws / "data" / "empty.txt", "")
    _write(ws / "data" / "blank.txt", "  \n\n \t\n")
    _write(ws / "data" / "latin1.txt", "caf\xe9 cr\xe8me".encode("latin-1"))
    _write(ws / "data" / "notjson.jsonl", "{this is not json}\n")
    _write(ws / "data" / "nofield.jsonl", json.dumps({"body": "text"}) + "\n")
    _write(ws / "data" / "numfield.jsonl", json.dumps({"text": 42}) + "\n")
    _write(ws / "data" / "list.jsonl", "[1, 2, 3]\n")
    (ws / "data" / "emptydir").mkdir()
    # Chat data.
    _write(ws / "chat" / "good.jsonl", (CHAT_LINE + "\n") * 8)
    _write(ws / "chat" / "notjson.jsonl", "nope\n")
    _write(ws / "chat" / "nomessages.jsonl", json.dumps({"text": "hi"}) + "\n")
    _write(ws / "chat" / "noassistant.jsonl", json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    _write(ws / "chat" / "badrole.jsonl", json.dumps({"messages": [{"role": "wizard", "content": "hi"}]}) + "\n")
    _write(ws / "chat" / "empty.jsonl", "")
    _write(ws / "chat" / "binary.jsonl", b"\xff\xfe\x00\x01" * 10)
    # Damaged checkpoints.
    _damaged_checkpoint(ws, "ck_truncated", good, lambda d: (d / "model.safetensors").write_bytes(
        (good / "model.safetensors").read_bytes()[:1000]))
    _damaged_checkpoint(ws, "ck_random", good, lambda d: (d / "model.safetensors").write_bytes(os.urandom(4096)))
    _damaged_checkpoint(ws, "ck_noweights", good, lambda d: (d / "model.safetensors").unlink())
    _damaged_checkpoint(ws, "ck_badjson", good, lambda d: (d / "config.json").write_text("{not json"))
    _damaged_checkpoint(ws, "ck_list", good, lambda d: (d / "config.json").write_text("[1, 2]"))
    _damaged_checkpoint(ws, "ck_nomodel", good, _edit_config(lambda c: c.pop("model")))
    _damaged_checkpoint(ws, "ck_nomaxseq", good, _edit_config(lambda c: c["model"].pop("max_seq_len")))
    _damaged_checkpoint(ws, "ck_novocab", good, _edit_config(lambda c: c["model"].pop("vocab_size")))
    _damaged_checkpoint(ws, "ck_unknown", good, _edit_config(lambda c: c["model"].update(flux_capacitor=1)))
    _damaged_checkpoint(ws, "ck_negative", good, _edit_config(lambda c: c["model"].update(n_layer=-1)))
    _damaged_checkpoint(ws, "ck_schema", good, _edit_config(lambda c: c.update(schema_version=99)))
    _damaged_checkpoint(ws, "ck_shapes", good, lambda d: save_file(
        {k: torch.zeros(3, 3) for k in make_model().state_dict()}, str(d / "model.safetensors")))
    _damaged_checkpoint(ws, "ck_dtype", good, lambda d: save_file(
        {k: v.to(torch.int32) for k, v in make_model().state_dict().items() if k != "lm_head.weight"},
        str(d / "model.safetensors")))
    (ws / "ck_empty").mkdir()
    _write(ws / "random.gguf", os.urandom(2048))
    _write(ws / "empty.gguf", b"")
    _write(ws / "fake_hf" / "config.json", json.dumps({"model_type": "gpt2", "n_embd": 8}))
    _write(ws / "hf_novocab" / "config.json", json.dumps({"model_type": "llama", "hidden_size": 64}))
    # Adapters: one good, one truncated, one from another model of the same shape.
    for name, seed in (("adapter", 0), ("adapter_other", 1)):
        base = make_model(seed=seed, max_seq_len=128)
        attach(base, AdapterSpec("lora", {"r": 2}))
        save_adapter(base, ws / name)
    shutil.copytree(ws / "adapter", ws / "adapter_truncated")
    weights = next((ws / "adapter_truncated").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    _write(ws / "adapter_badcfg" / "kvlab_adapter.json", json.dumps({"format": "kvlab-adapter"}))
    # Model configs for --config.
    _write(ws / "cfg" / "bad.json", "{")
    _write(ws / "cfg" / "unknown.json", json.dumps({"d_model": 64, "warp": 9}))
    _write(ws / "cfg" / "list.json", "[]")
    _write(ws / "cfg" / "heads.json", json.dumps({"d_model": 64, "n_head": 3}))
    _write(ws / "cfg" / "strint.json", json.dumps({"n_layer": "4"}))
    _write(ws / "cfg" / "floatint.json", json.dumps({"n_layer": 4.5}))
    _write(ws / "cfg" / "booltext.json", json.dumps({"tie_embeddings": "yes"}))
    os.symlink(ws / "nowhere", ws / "dangling")
    # An encoder–decoder (T5-shaped, byte-level).
    torch.manual_seed(0)
    s2s = EncoderDecoder(ModelConfig.from_preset("t5-tiny"))
    s2s.tokenizer = ByteTokenizer()
    save_checkpoint(s2s, ws / "s2s")
    return ws


def _snapshot(root: Path) -> dict[str, tuple]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = ("dir",)
        for f in filenames:
            path = os.path.join(dirpath, f)
            st = os.lstat(path)
            body = os.readlink(path).encode() if os.path.islink(path) else Path(path).read_bytes()
            out[os.path.relpath(path, root)] = (st.st_size, st.st_mtime_ns, st.st_mode, hashlib.sha1(body).hexdigest())
    return out


M = "{ws}/model"
S = "{ws}/s2s"
TR = ["train", "--preset", "tiny", "--out", "{ws}/o"]
LONG = "x" * 300
# (id, argv with {ws} for the workspace, exit code, what the message must name)
CASES = [
    # ---- arguments
    ("no-verb", [], 2, "VERB"),
    ("unknown-verb", ["frobnicate"], 2, "frobnicate"),
    ("unknown-flag", ["eval", M, "--frob"], 2, "--frob"),
    ("int-flag-text", ["eval", M, "--seq-len", "long"], 2, "long"),
    ("eval-seq-len-1", ["eval", M, "--seq-len", "1"], 2, "seq_len=1"),
    ("eval-stride-0", ["eval", M, "--stride", "0"], 2, "stride=0"),
    ("eval-stride-negative", ["eval", M, "--stride", "-5"], 2, "stride=-5"),
    ("eval-stride-over", ["eval", M, "--seq-len", "16", "--stride", "32"], 2, "stride=32"),
    ("eval-max-tokens-0", ["eval", M, "--max-tokens", "0"], 2, "max_tokens=0"),
    ("eval-backend", ["eval", M, "--backend", "warp"], 2, "warp"),
    ("device-banana", ["eval", M, "--device", "banana"], 2, "banana"),
    ("device-cuda-here", ["eval", M, "--device", "cuda:7"], 2, "cuda:7"),
    ("device-train", ["train", "--preset", "tiny", "--max-steps", "1", "--out", "{ws}/o", "--device", "tpu"], 2,
     "tpu"),
    ("model-dtype", ["eval", M, "--model-dtype", "fp4"], 2, "fp4"),
    ("generate-nothing", ["generate", M], 2, "--prompt"),
    ("generate-both", ["generate", M, "--prompt", "hi", "--prompt-ids", "1,2"], 2, "not both"),
    ("generate-ids-text", ["generate", M, "--prompt-ids", "1,two"], 2, "1,two"),
    ("generate-ids-range", ["generate", M, "--prompt-ids", "1,99999"], 2, "99999"),
    ("generate-max-new", ["generate", M, "--prompt-ids", "1", "--max-new-tokens", "-3"], 2, "-3"),
    ("generate-learned-too-long", ["generate", "{ws}/model", "--prompt-ids", ",".join(["1"] * 10),
                                   "--max-new-tokens", "500"], None, None),     # filled below
    ("info-nothing", ["info"], 2, "MODEL"),
    ("info-two-sources", ["info", M, "--preset", "tiny"], 2, "exactly one"),
    ("info-preset", ["info", "--preset", "gpt5"], 2, "gpt5"),
    ("info-heads", ["info", "--preset", "tiny", "--n-kv-head", "3"], 2, "n_kv_head=3"),
    ("info-cla", ["info", "--preset", "tiny", "--cla", "9"], 2, "cla=9"),
    ("plan-memory", ["plan", "--preset", "tiny", "--memory", "lots"], 2, "lots"),
    ("plan-context", ["plan", "--preset", "tiny", "--context", "0"], 2, "context=0"),
    ("convert-nothing", ["convert", M, "-o", "{ws}/o"], 2, "--kv-heads"),
    ("convert-heads", ["convert", M, "--kv-heads", "3", "-o", "{ws}/o"], 2, "3"),
    ("convert-both", ["convert", M, "--kv-heads", "1", "--mqa", "-o", "{ws}/o"], 2, "not both"),
    ("convert-mla-and-mqa", ["convert", M, "--mla", "8", "--mqa", "-o", "{ws}/o"], 2, "--mla"),
    ("convert-rope-dim", ["convert", M, "--rope-dim", "4", "--mqa", "-o", "{ws}/o"], 2, "--rope-dim"),
    ("convert-method", ["convert", M, "--mqa", "--method", "pca", "-o", "{ws}/o"], 2, "pca"),
    ("convert-mla-method", ["convert", M, "--mla", "8", "--method", "mean", "-o", "{ws}/o"], 2, "mean"),
    ("convert-mla-rank", ["convert", M, "--mla", "0", "-o", "{ws}/o"], 2, "0"),
    ("convert-lowrank-half", ["convert", M, "--k-rank", "8", "-o", "{ws}/o"], 2, "--v-rank"),
    ("convert-lowrank-and-mqa", ["convert", M, "--k-rank", "8", "--v-rank", "8", "--mqa", "-o", "{ws}/o"], 2,
     "--mqa"),
    ("convert-lowrank-rank", ["convert", M, "--k-rank", "8", "--v-rank", "999", "-o", "{ws}/o"], 2, "v_rank=999"),
    ("convert-lowrank-method", ["convert", M, "--k-rank", "8", "--v-rank", "8", "--method", "mean", "-o", "{ws}/o"],
     2, "mean"),
    ("convert-channels-and-ranks", ["convert", M, "--latent-channels", "8", "--k-rank", "4", "-o", "{ws}/o"], 2,
     "not both"),
    ("convert-channels-pca", ["convert", M, "--latent-channels", "8", "--method", "pca", "-o", "{ws}/o"], 2,
     "--method fisher"),
    ("convert-channels-range", ["convert", M, "--latent-channels", "999", "-o", "{ws}/o"], 2,
     "channels=999 must be in"),
    ("convert-fisher-heads", ["convert", M, "--mqa", "--method", "fisher", "-o", "{ws}/o"], 2, "fisher"),
    ("train-no-source", ["train", "--max-steps", "1", "--out", "{ws}/o"], 2, "--preset"),
    ("train-no-budget", ["train", "--preset", "tiny", "--out", "{ws}/o"], 2, "budget"),
    ("train-two-budgets", ["train", "--preset", "tiny", "--max-steps", "1", "--tokens", "9", "--out", "{ws}/o"], 2,
     "--tokens"),
    ("train-alpha-alone", ["train", "--preset", "tiny", "--alpha", "0.1", "--out", "{ws}/o"], 2, "--reference-tokens"),
    ("train-init-heads", ["train", "--init", M, "--n-kv-head", "1", "--max-steps", "1", "--out", "{ws}/o"], 2,
     "--n-kv-head"),
    ("train-seq-len", ["train", "--init", M, "--seq-len", "100000", "--max-steps", "1", "--out", "{ws}/o"], 2,
     "100000"),
    ("train-lr", ["train", "--preset", "tiny", "--max-steps", "1", "--lr", "0", "--out", "{ws}/o"], 2, "lr=0"),
    ("train-batch", ["train", "--preset", "tiny", "--max-steps", "1", "--batch-size", "0", "--out", "{ws}/o"], 2,
     "batch_size=0"),
    ("train-accum", ["train", "--preset", "tiny", "--max-steps", "1", "--batch-size", "3", "--grad-accum", "2",
                     "--out", "{ws}/o"], 2, "grad_accum=2"),
    ("train-resume-nothing", ["train", "--preset", "tiny", "--max-steps", "1", "--resume", "--out", "{ws}/o"], 2,
     "{ws}/o"),
    ("finetune-budget", ["finetune", M, "--method", "lora", "--data", "{ws}/chat/good.jsonl", "--out", "{ws}/o"], 2,
     "--max-steps"),
    ("finetune-method", ["finetune", M, "--method", "dora", "--data", "{ws}/chat/good.jsonl", "--out", "{ws}/o"], 2,
     "dora"),
    ("finetune-r", ["finetune", M, "--method", "lora", "--r", "0", "--max-steps", "1", "--data",
                    "{ws}/chat/good.jsonl", "--out", "{ws}/o"], 2, "r=0"),
    ("finetune-targets", ["finetune", M, "--method", "lora", "--target-modules", "nope_proj", "--max-steps", "1",
                          "--data", "{ws}/chat/good.jsonl", "--out", "{ws}/o"], 2, "nope_proj"),
    ("finetune-merge-prefix", ["finetune", M, "--method", "prefix", "--merge", "--max-steps", "1", "--data",
                               "{ws}/chat/good.jsonl", "--out", "{ws}/o"], 2, "prefix"),
    ("finetune-seq-len", ["finetune", M, "--method", "lora", "--seq-len", "5000", "--max-steps", "1", "--data",
                          "{ws}/chat/good.jsonl", "--out", "{ws}/o"], 2, "5000"),
    ("shrink-kv", ["shrink", M, "--kv", "lots", "--quick", "-o", "{ws}/o"], 2, "lots"),
    ("shrink-kv-1x", ["shrink", M, "--kv", "1x", "--quick", "-o", "{ws}/o"], 2, "1x"),
    ("shrink-minutes", ["shrink", M, "--kv", "2x", "--minutes", "-1", "-o", "{ws}/o"], 2, "-1"),
    ("shrink-candidates", ["shrink", M, "--kv", "2x", "--candidates", "0", "--quick", "-o", "{ws}/o"], 2, "0"),
    ("shrink-kd-lr", ["shrink", M, "--kd-lr", "0", "--quick", "-o", "{ws}/o"], 2, "--kd-lr 0.0 must be positive"),
    ("shrink-precisions", ["shrink", M, "--precisions", "none,fp16", "--quick", "-o", "{ws}/o"], 2,
     "--precisions 'none,fp16': give some of none, fp8, int8, int8/int4, int4"),
    ("shrink-context", ["shrink", M, "--context", "0", "--quick", "-o", "{ws}/o"], 2, "--context 0 must be a positive"),
    ("shrink-data-missing", ["shrink", M, "--data", "{ws}/data/none.txt", "--quick", "-o", "{ws}/o"], 2, "none.txt"),
    ("shrink-data-glob", ["shrink", M, "--data", "{ws}/data/*.md", "--quick", "-o", "{ws}/o"], 2, "matches no files"),
    ("shrink-data-empty-dir", ["shrink", M, "--data", "{ws}/data/emptydir", "--quick", "-o", "{ws}/o"], 2,
     "emptydir"),
    ("shrink-data-unweighted-part", ["shrink", M, "--data", "{ws}/data/good.txt:0.7,builtin", "--quick", "-o",
                                     "{ws}/o"], 2, "'builtin' has none"),
    ("shrink-data-zero-weight", ["shrink", M, "--data", "{ws}/data/good.txt:0,builtin:1", "--quick", "-o",
                                 "{ws}/o"], 2, "must be a positive number"),
    ("shrink-data-twice", ["shrink", M, "--data", "builtin:0.5,builtin:0.5", "--quick", "-o", "{ws}/o"], 2,
     "'builtin' twice"),
    ("shrink-data-too-little", ["shrink", M, "--data", "{ws}/data/good.txt", "--quick", "-o", "{ws}/o"], 2,
     "held-out split has"),
    ("study-alpha", ["study", "--quick", "--alphas", "2", "--out", "{ws}/o"], 2, "alpha=2"),
    ("study-alphas-text", ["study", "--quick", "--alphas", "x,y", "--out", "{ws}/o"], 2, "x,y"),
    ("tasks-count", ["tasks", "{ws}/o", "--train", "x"], 2, "x"),
    ("export-format", ["export", M, "--format", "onnx", "-o", "{ws}/o"], 2, "onnx"),
    # ---- files
    ("model-missing", ["eval", "{ws}/nosuch"], 1, "nosuch"),
    ("ck-empty-dir", ["eval", "{ws}/ck_empty"], 1, "ck_empty"),
    ("ck-truncated", ["eval", "{ws}/ck_truncated"], 1, "ck_truncated"),
    ("ck-random-bytes", ["eval", "{ws}/ck_random"], 1, "ck_random"),
    ("ck-no-weights", ["eval", "{ws}/ck_noweights"], 1, "model.safetensors"),
    ("ck-config-not-json", ["eval", "{ws}/ck_badjson"], 1, "ck_badjson"),
    ("ck-config-list", ["eval", "{ws}/ck_list"], 1, "ck_list"),
    ("ck-no-model-key", ["eval", "{ws}/ck_nomodel"], 1, '"model"'),
    ("ck-no-max-seq-len", ["eval", "{ws}/ck_nomaxseq"], 1, "max_seq_len"),
    ("ck-no-vocab", ["generate", "{ws}/ck_novocab", "--prompt-ids", "1"], 1, "vocab_size"),
    ("ck-unknown-field", ["eval", "{ws}/ck_unknown"], 1, "flux_capacitor"),
    ("ck-negative-layers", ["eval", "{ws}/ck_negative"], 1, "n_layer=-1"),
    ("ck-schema", ["eval", "{ws}/ck_schema"], 1, "schema_version=99"),
    ("ck-wrong-shapes", ["eval", "{ws}/ck_shapes"], 1, "ck_shapes"),
    ("ck-wrong-dtype", ["eval", "{ws}/ck_dtype"], 1, "ck_dtype"),
    ("gguf-random", ["info", "{ws}/random.gguf"], 1, "random.gguf"),
    ("gguf-empty", ["eval", "{ws}/empty.gguf"], 1, "empty.gguf"),
    ("hf-unsupported", ["eval", "{ws}/fake_hf"], 1, "gpt2"),
    ("hf-no-vocab", ["info", "{ws}/hf_novocab"], 1, "vocab_size"),
    ("config-not-json", ["info", "--config", "{ws}/cfg/bad.json"], 2, "bad.json"),
    ("config-unknown-field", ["info", "--config", "{ws}/cfg/unknown.json"], 2, "warp"),
    ("config-list", ["info", "--config", "{ws}/cfg/list.json"], 2, "list.json"),
    ("config-heads", ["info", "--config", "{ws}/cfg/heads.json"], 2, "n_head=3"),
    ("config-missing", ["info", "--config", "{ws}/cfg/none.json"], 2, "none.json"),
    ("data-missing", ["eval", M, "--data", "{ws}/data/none.txt"], 2, "none.txt"),
    ("eval-original-missing", ["eval", M, "--original", "{ws}/nomodel"], 1, "nomodel"),
    ("data-binary", ["eval", M, "--data", "{ws}/data/bin.txt"], 2, "bin.txt"),
    ("data-latin1", ["eval", M, "--data", "{ws}/data/latin1.txt"], 2, "latin1.txt"),
    ("data-empty", ["eval", M, "--data", "{ws}/data/empty.txt"], 2, "empty.txt"),
    ("data-blank", ["eval", M, "--data", "{ws}/data/blank.txt"], 2, "blank.txt"),
    ("data-jsonl-not-json", ["eval", M, "--data", "{ws}/data/notjson.jsonl"], 2, "notjson.jsonl:1"),
    ("data-jsonl-no-field", ["eval", M, "--data", "{ws}/data/nofield.jsonl"], 2, "'text'"),
    ("data-jsonl-number", ["eval", M, "--data", "{ws}/data/numfield.jsonl"], 2, "numfield.jsonl:1"),
    ("data-jsonl-list", ["eval", M, "--data", "{ws}/data/list.jsonl"], 2, "list.jsonl:1"),
    ("data-empty-dir", ["eval", M, "--data", "{ws}/data/emptydir"], 2, "emptydir"),
    ("train-data-binary", ["train", "--init", M, "--max-steps", "1", "--data", "{ws}/data/bin.txt", "--out",
                           "{ws}/o"], 2, "bin.txt"),
    ("chat-missing", ["finetune", M, "--method", "lora", "--max-steps", "1", "--data", "{ws}/chat/none.jsonl",
                      "--out", "{ws}/o"], 2, "none.jsonl"),
    ("chat-not-json", ["finetune", M, "--method", "lora", "--max-steps", "1", "--data", "{ws}/chat/notjson.jsonl",
                       "--out", "{ws}/o"], 2, "notjson.jsonl:1"),
    ("chat-no-messages", ["finetune", M, "--method", "lora", "--max-steps", "1", "--data",
                          "{ws}/chat/nomessages.jsonl", "--out", "{ws}/o"], 2, "nomessages.jsonl:1"),
    ("chat-no-assistant", ["finetune", M, "--method", "lora", "--max-steps", "1", "--data",
                           "{ws}/chat/noassistant.jsonl", "--out", "{ws}/o"], 2, "noassistant.jsonl:1"),
    ("chat-bad-role", ["finetune", M, "--method", "lora", "--max-steps", "1", "--data", "{ws}/chat/badrole.jsonl",
                       "--out", "{ws}/o"], 2, "wizard"),
    ("chat-empty", ["finetune", M, "--method", "lora", "--max-steps", "1", "--data", "{ws}/chat/empty.jsonl",
                    "--out", "{ws}/o"], 2, "empty.jsonl"),
    ("chat-binary", ["finetune", M, "--method", "lora", "--max-steps", "1", "--data", "{ws}/chat/binary.jsonl",
                     "--out", "{ws}/o"], 2, "binary.jsonl"),
    ("adapter-missing", ["generate", M, "--adapter", "{ws}/nosuch_adapter", "--prompt-ids", "1"], 1,
     "nosuch_adapter"),
    ("adapter-truncated", ["generate", M, "--adapter", "{ws}/adapter_truncated", "--prompt-ids", "1"], 1,
     "adapter_truncated"),
    ("adapter-other-model", ["generate", M, "--adapter", "{ws}/adapter_other", "--prompt-ids", "1"], 1,
     "another model"),
    ("adapter-bad-config", ["generate", M, "--adapter", "{ws}/adapter_badcfg", "--prompt-ids", "1"], 1,
     "lacks method, options, base_shape"),
    ("adapter-is-a-model", ["generate", M, "--adapter", "{ws}/model", "--prompt-ids", "1"], 1, "model"),
    # ---- paths
    ("convert-into-user-dir", ["convert", M, "--mqa", "-o", "{ws}/user"], 2, "notes.txt"),
    ("convert-onto-user-file", ["convert", M, "--mqa", "-o", "{ws}/userfile.txt"], 2, "userfile.txt"),
    ("convert-into-hf-dir", ["convert", M, "--mqa", "-o", "{ws}/hfdir"], 2, "hfdir"),
    ("convert-onto-adapter", ["convert", M, "--mqa", "-o", "{ws}/adapter"], 2, "kvlab adapter"),
    ("convert-under-a-file", ["convert", M, "--mqa", "-o", "{ws}/userfile.txt/sub/out"], 2,
     "userfile.txt is a file"),
    ("convert-name-too-long", ["convert", M, "--mqa", "-o", "{ws}/" + LONG], 1, "xxxx"),
    ("convert-into-proc", ["convert", M, "--mqa", "-o", "/proc/kvlab-catalogue/out"], 1, "/proc"),
    ("export-into-user-dir", ["export", M, "-o", "{ws}/user"], 2, "notes.txt"),
    ("export-onto-user-file", ["export", M, "-o", "{ws}/userfile.txt"], 2, "userfile.txt"),
    ("export-hf-over-kvlab", ["export", M, "-o", "{ws}/model"], 2, "kvlab checkpoint"),
    ("export-kvlab-into-hf-dir", ["export", M, "--format", "kvlab", "-o", "{ws}/hfdir"], 2, "hfdir"),
    ("export-gguf-onto-user-file", ["export", M, "--format", "gguf", "-o", "{ws}/userfile.txt"], 2, "did not write"),
    ("export-gguf-dtype", ["export", M, "--format", "gguf", "--dtype", "fp16", "-o", "{ws}/m.gguf"], 2, "--gguf-type"),
    ("export-gguf-no-tokenizer", ["export", M, "--format", "gguf", "-o", "{ws}/m.gguf"], 2, "no HF tokenizer"),
    ("export-hf-gguf-type", ["export", M, "--gguf-type", "f16", "-o", "{ws}/h"], 2, "--gguf-type"),
    ("serve-kv-budget-text", ["serve", M, "--kv-budget", "lots"], 2, "'lots'"),
    ("serve-kv-budget-too-small", ["serve", M, "--kv-budget", "10"], 2, "holds no block"),
    ("serve-port-out-of-range", ["serve", M, "--port", "70000"], 2, "--port 70000"),
    ("serve-max-seqs-0", ["serve", M, "--max-seqs", "0"], 2, "must be at least 1"),
    ("serve-missing-model", ["serve", "{ws}/nothing-here", "--port", "0"], 1, "not found"),
    ("generate-kv-quant-int3", ["generate", M, "--prompt", "hi", "--kv-quant", "int3"], 2, "int3"),
    ("plan-kv-quant-fp4", ["plan", M, "--kv-quant", "fp4"], 2, "fp4"),
    ("train-into-user-dir", ["train", "--preset", "tiny", "--max-steps", "1", "--out", "{ws}/user"], 2, "notes.txt"),
    ("train-onto-user-file", ["train", "--preset", "tiny", "--max-steps", "1", "--out", "{ws}/userfile.txt"], 2,
     "userfile.txt"),
    ("train-into-checkpoint", ["train", "--preset", "tiny", "--max-steps", "1", "--out", "{ws}/model"], 2,
     "holds a kvlab checkpoint"),
    ("train-under-a-file", ["train", "--preset", "tiny", "--max-steps", "1", "--out", "{ws}/userfile.txt/run"], 2,
     "userfile.txt is a file"),
    ("finetune-into-user-dir", ["finetune", M, "--method", "lora", "--max-steps", "1", "--data",
                                "{ws}/chat/good.jsonl", "--out", "{ws}/user"], 2, "notes.txt"),
    ("shrink-into-user-dir", ["shrink", M, "--kv", "2x", "--quick", "-o", "{ws}/user"], 2, "notes.txt"),
    ("shrink-resume-nothing", ["shrink", M, "--kv", "2x", "--quick", "--resume", "-o", "{ws}/o"], 2, "{ws}/o"),
    ("study-into-user-dir", ["study", "--quick", "--out", "{ws}/user"], 2, "notes.txt"),
    ("tasks-into-user-dir", ["tasks", "{ws}/user"], 2, "notes.txt"),
    ("tasks-into-model", ["tasks", "{ws}/model"], 2, "kvlab checkpoint"),
    ("tasks-onto-user-file", ["tasks", "{ws}/userfile.txt"], 2, "userfile.txt"),
    # ---- --overwrite never reaches a user's files; no command writes over its input
    ("convert-overwrite-user-dir", ["convert", M, "--mqa", "-o", "{ws}/user", "--overwrite"], 2, "notes.txt"),
    ("export-overwrite-user-file", ["export", M, "-o", "{ws}/userfile.txt", "--overwrite"], 2, "userfile.txt"),
    ("tasks-overwrite-user-dir", ["tasks", "{ws}/user", "--overwrite"], 2, "notes.txt"),
    ("convert-onto-input", ["convert", M, "--mqa", "-o", M, "--overwrite"], 2, "is the model it reads"),
    ("convert-into-input", ["convert", M, "--mqa", "-o", M + "/sub"], 2, "lies inside the model it reads"),
    ("export-onto-input", ["export", M, "--format", "kvlab", "--dtype", "fp16", "-o", M], 2, "the model it reads"),
    ("convert-dangling-link", ["convert", M, "--mqa", "-o", "{ws}/dangling"], 2, "symbolic link (dangling)"),
    ("convert-onto-cwd", ["convert", M, "--mqa", "-o", ".", "--overwrite"], 2, "current directory"),
    ("train-link-out", ["train", "--preset", "tiny", "--max-steps", "1", "--out", "{ws}/dangling"], 2,
     "symbolic link"),
    # ---- numbers that make no sense
    ("train-seed-negative", [*TR, "--max-steps", "1", "--seed", "-1"], 2, "--seed -1"),
    ("finetune-seed-negative", ["finetune", M, "--method", "lora", "--max-steps", "1", "--data", "{ws}/chat/good.jsonl",
                                "--out", "{ws}/o", "--seed", "-1"], 2, "--seed -1"),
    ("train-alpha-nan", [*TR, "--alpha", "nan", "--reference-tokens", "100"], 2, "--alpha nan"),
    ("train-alpha-inf", [*TR, "--alpha", "inf", "--reference-tokens", "100"], 2, "--alpha inf"),
    ("train-alpha-negative", [*TR, "--alpha", "-1", "--reference-tokens", "100"], 2, "--alpha -1"),
    ("train-tokens-negative", [*TR, "--tokens", "-100"], 2, "-100 tokens"),
    ("train-lr-inf", [*TR, "--max-steps", "1", "--lr", "inf"], 2, "lr=inf"),
    ("train-warmup-negative", [*TR, "--max-steps", "1", "--warmup-steps", "-5"], 2, "warmup_steps=-5"),
    ("train-reference-without-alpha", [*TR, "--max-steps", "1", "--reference-tokens", "100"], 2,
     "--reference-tokens goes with --alpha"),
    ("train-data-empty", [*TR, "--max-steps", "1", "--data", ""], 2, "--data is empty"),
    ("train-data-generated", [*TR, "--max-steps", "1", "--data", "builtin:0.5,generated:0.5"], 2,
     "'generated' is not a source here"),
    ("train-mix-in-order", [*TR, "--max-steps", "1", "--data", "{ws}/data/good.txt:0.5,builtin:0.5", "--data-mode",
                            "sequential"], 2, "draws its windows at random"),
    ("finetune-epochs-and-steps", ["finetune", M, "--method", "lora", "--max-steps", "1", "--epochs", "1", "--data",
                                   "{ws}/chat/good.jsonl", "--out", "{ws}/o"], 2, "not both"),
    ("finetune-epochs-zero", ["finetune", M, "--method", "lora", "--epochs", "0", "--data", "{ws}/chat/good.jsonl",
                              "--out", "{ws}/o"], 2, "--epochs 0"),
    ("finetune-virtual-tokens-huge", ["finetune", M, "--method", "prompt", "--virtual-tokens", "100000", "--max-steps",
                                      "1", "--data", "{ws}/chat/good.jsonl", "--out", "{ws}/o"], 2, "100000"),
    # a directory of chat files is data now: its bad file is named, with the line
    ("finetune-data-directory", ["finetune", M, "--method", "lora", "--max-steps", "1", "--data", "{ws}/chat",
                                 "--out", "{ws}/o"], 2, "chat/badrole.jsonl:1: message"),
    ("eval-batch-size-0", ["eval", M, "--batch-size", "0"], 2, "0 must be at least 1"),
    ("generate-max-new-huge", ["generate", M, "--prompt-ids", "1,2", "--max-new-tokens", "100000000000"], 2,
     "GiB of memory"),
    ("generate-stop-token-negative", ["generate", M, "--prompt-ids", "1,2", "--stop-token", "-1"], 2, "token id -1"),
    ("generate-stop-token-range", ["generate", M, "--prompt-ids", "1,2", "--stop-token", "99999"], 2,
     "token id 99999"),
    ("device-cpu-index", ["eval", M, "--device", "cpu:7"], 2, "cpu:7"),
    ("info-config-string-int", ["info", "--config", "{ws}/cfg/strint.json"], 2, "n_layer='4' must be an integer"),
    ("info-config-float-int", ["info", "--config", "{ws}/cfg/floatint.json"], 2, "n_layer=4.5"),
    ("info-config-bool-text", ["info", "--config", "{ws}/cfg/booltext.json"], 2, "tie_embeddings='yes'"),
    ("eval-adapter-is-a-file", ["eval", M, "--adapter", "{ws}/chat/good.jsonl"], 1, "is a file, not a directory"),
    ("finetune-loss-type-of-another-objective", ["finetune", M, "--method", "lora", "--objective", "grpo",
                                                 "--loss-type", "ipo", "--max-steps", "1", "--data",
                                                 "{ws}/chat/good.jsonl", "--out", "{ws}/o"], 2, "--loss-type ipo"),
    ("finetune-reward-model-with-sft", ["finetune", M, "--method", "lora", "--reward-model", M, "--max-steps", "1",
                                        "--data", "{ws}/chat/good.jsonl", "--out", "{ws}/o"], 2, "--reward-model"),
    ("finetune-dpo-beta-negative", ["finetune", M, "--method", "lora", "--objective", "dpo", "--beta", "-1",
                                    "--max-steps", "1", "--data", "{ws}/chat/good.jsonl", "--out", "{ws}/o"], 2,
     "--beta -1"),
    ("finetune-dpo-on-chat-data", ["finetune", M, "--method", "lora", "--objective", "dpo", "--max-steps", "1",
                                   "--data", "{ws}/chat/good.jsonl", "--out", "{ws}/o"], 2, "needs \"chosen\""),
    ("finetune-grpo-one-generation", ["finetune", M, "--method", "lora", "--objective", "grpo", "--num-generations",
                                      "1", "--max-steps", "1", "--data", "{ws}/chat/good.jsonl", "--out", "{ws}/o"], 2,
     "at least 2"),
    ("finetune-grpo-mini-batches-uneven", ["finetune", M, "--method", "lora", "--objective", "grpo", "--batch-size",
                                           "3", "--num-generations", "2", "--mini-batches", "4", "--max-steps", "1",
                                           "--data", "{ws}/chat/good.jsonl", "--out", "{ws}/o"], 2,
     "--mini-batches 4"),
    ("finetune-num-iterations-with-sft", ["finetune", M, "--method", "lora", "--num-iterations", "2", "--max-steps",
                                          "1", "--data", "{ws}/chat/good.jsonl", "--out", "{ws}/o"], 2,
     "--num-iterations"),
    ("generate-sinks-without-window", ["generate", M, "--prompt-ids", "1,2", "--sinks", "4"], 2, "--window W"),
    ("generate-window-0", ["generate", M, "--prompt-ids", "1,2", "--window", "0"], 2, "0 must be at least 1"),
    ("eval-sinks-negative", ["eval", M, "--window", "8", "--sinks", "-1"], 2, "-1 must be at least 0"),
    ("eval-sink-positions-unknown", ["eval", M, "--window", "8", "--sinks", "2", "--sink-positions", "middle"], 2,
     "middle"),
    # Encoder–decoders.
    ("convert-cross-on-decoder-only", ["convert", M, "--cross-kv-heads", "1", "-o", "{ws}/o"], 2, "decoder-only"),
    ("convert-cross-heads-not-divisor", ["convert", S, "--cross-kv-heads", "3", "-o", "{ws}/o"], 2,
     "cannot pool cross_n_kv_head=4 into 3"),
    ("convert-s2s-calibration-text", ["convert", S, "--mqa", "--method", "calibrated", "--calibration-data",
                                      "{ws}/data/good.txt", "-o", "{ws}/o"], 2, "reads source/target pairs"),
    ("convert-s2s-refit", ["convert", S, "--mqa", "--refit", "-o", "{ws}/o"], 2, "--refit"),
    ("convert-s2s-cross-with-mla", ["convert", S, "--mla", "8", "--cross-cla", "2", "-o", "{ws}/o"], 2,
     "--cross-kv-heads/--cross-cla"),
    ("generate-beams-decoder-only", ["generate", M, "--prompt-ids", "1,2", "--num-beams", "2"], 2, "--num-beams"),
    ("generate-s2s-chat", ["generate", S, "--prompt", "hi", "--chat"], 2, "--chat"),
    ("generate-s2s-beams-sampling", ["generate", S, "--prompt", "hi", "--num-beams", "2", "--temperature", "0.5"], 2,
     "temperature=0 with num_beams"),
    ("eval-beams-decoder-only", ["eval", M, "--num-beams", "2"], 2, "--num-beams"),
    ("eval-s2s-text-data", ["eval", S, "--data", "{ws}/data/good.txt"], 2, "reads source/target pairs"),
    ("train-s2s-text-data", ["train", "--preset", "t5-tiny", "--data", "{ws}/data/good.txt", "--max-steps", "1",
                             "--out", "{ws}/o"], 2, "reads source/target pairs"),
    ("train-s2s-no-fields", ["train", "--preset", "t5-tiny", "--data", "{ws}/data/nofield.jsonl", "--max-steps", "1",
                             "--out", "{ws}/o"], 2, "nofield.jsonl:1"),
    ("train-s2s-cross-on-init", ["train", "--init", S, "--cross-cla", "2", "--max-steps", "1", "--out", "{ws}/o"], 2,
     "--cross-cla"),
    ("serve-s2s", ["serve", S, "--port", "0"], 2, "is an encoder–decoder"),
    ("finetune-s2s", ["finetune", S, "--method", "lora", "--max-steps", "1", "--data", "{ws}/chat/good.jsonl",
                      "--out", "{ws}/o"], 2, "is an encoder–decoder"),
    ("shrink-s2s", ["shrink", S, "--kv", "2x", "--quick", "--out", "{ws}/o"], 2, "works on decoder-only models"),
    ("export-s2s-gguf", ["export", S, "--format", "gguf", "-o", "{ws}/o.gguf"], 2, "an encoder–decoder"),
    ("plan-source-len-decoder-only", ["plan", "--preset", "tiny", "--source-len", "64"], 2, "--source-len"),
    ("info-cross-on-decoder-only", ["info", "--preset", "tiny", "--cross-cla", "2"], 2, "n_encoder_layer=0"),
    ("generate-cache-sinks-learned", ["generate", "{ws}/ck_learned", "--prompt-ids", "1,2", "--window", "8",
                                      "--sinks", "2", "--sink-positions", "cache"], 2, "sink_positions='cache'"),
]
CASES[[c[0] for c in CASES].index("generate-learned-too-long")] = (
    "generate-learned-too-long", ["generate", "{ws}/ck_learned", "--prompt-ids", "1,2,3", "--max-new-tokens", "500"],
    2, "max_seq_len=128")


@pytest.fixture(scope="module")
def learned(ws):
    """A model with learned positions (no positions past max_seq_len exist)."""
    model = make_model(seed=0, pos="learned", max_seq_len=128)
    model.tokenizer = ByteTokenizer()
    save_checkpoint(model, ws / "ck_learned")


def test_the_catalogue_is_large():
    assert len(CASES) >= 80 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, ws, learned, capsys, monkeypatch, tmp_path):
    name, argv, code, needle = case
    monkeypatch.setenv("KVLAB_CACHE", str(tmp_path / "cache"))      # outside the workspace
    monkeypatch.chdir(tmp_path)
    argv = [a.replace("{ws}", str(ws)) for a in argv]
    before = _snapshot(ws)
    got = main(argv)
    out, err = capsys.readouterr()
    assert got == code, f"{name}: exit {got}, expected {code}; stderr: {err[-500:]}"
    assert "Traceback" not in err + out
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"{name}: expected one line, got {lines}"
    assert needle.replace("{ws}", str(ws)) in lines[0], f"{name}: {needle!r} not in {lines[0]!r}"
    assert "internal error" not in lines[0]
    assert _snapshot(ws) == before, f"{name}: the workspace changed"
    assert not list(tmp_path.iterdir()) or [p.name for p in tmp_path.iterdir()] == ["cache"]
