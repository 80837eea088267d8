"""Decode speed on real weights: kvlab vs transformers ``generate``, SmolLM2-135M fp32, one run.

Each framework generates greedily from the same prompt token ids with EOS disabled; a streaming
callback timestamps every new token, so time to first token (prefill) and decode tokens/s are
separated inside one generate call. Cases: batch 1 with a short chat prompt and 128 new tokens;
batch 16 at a 2,048-token context with 32 new tokens. For batch 16 the KV bytes each decode step
must read are turned into a read rate and compared with a measured device copy bandwidth.

    python benchmarks/decode.py [--cases b1,b16] [--out benchmarks/results/decode.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

import kvlab
from kvlab.io import builtin_model_path


class Stamps:
    """Timestamps of each new token (kvlab: per row callback; HF: streamer put per step)."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value):      # transformers' streamer protocol: the prompt first, then each step
        self.times.append(time.perf_counter())

    def end(self):
        pass


def summarize(start: float, stamps: list[float], batch: int) -> dict:
    first, last = stamps[0], stamps[-1]
    steps = len(stamps) - 1
    return {"ttft_s": first - start, "decode_steps": steps, "decode_s": last - first,
            "decode_tokens_per_s": batch * steps / (last - first), "step_ms": 1e3 * (last - first) / steps}


def run_kvlab(model, prompts, new_tokens):
    stamps: list[float] = []

    def on_token(row, tok):
        if row == 0:
            stamps.append(time.perf_counter())
    start = time.perf_counter()
    out = kvlab.generate(model, prompts, new_tokens, stop_tokens=[], on_token=on_token)
    res = summarize(start, stamps, len(prompts))
    res["total_s"] = time.perf_counter() - start
    return res, out


def run_hf(hf, prompts, new_tokens):
    stamps = Stamps()
    x = torch.tensor(prompts)
    start = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens, min_new_tokens=0,
                          do_sample=False, streamer=stamps)
    res = summarize(start, stamps.times[1:], len(prompts))     # times[0] is the prompt
    res["total_s"] = time.perf_counter() - start
    return res, out[:, x.shape[1]:].tolist()


def copy_bandwidth(nbytes: int) -> float:
    src = torch.empty(nbytes // 4).normal_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best / 1e9     # read + write


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="b1,b16")
    ap.add_argument("--out", default="benchmarks/results/decode.json")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM

    model = kvlab.load("smollm2-135m")
    path = builtin_model_path("smollm2-135m")
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None          # both run the full number of tokens
    hf.generation_config.pad_token_id = 2
    chat = model.tokenizer.apply_chat_template([{"role": "user", "content": "Tell me a long story about a dragon."}])
    g = torch.Generator().manual_seed(0)
    cases = {
        "b1": ("batch 1, chat prompt, 128 new tokens", [chat], 128),
        "b16": ("batch 16, 2,048-token context, 32 new tokens",
                torch.randint(100, 49000, (16, 2048), generator=g).tolist(), 32),
    }
    results = {"meta": {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
                        "processor": platform.processor(), "date": time.strftime("%Y-%m-%d")}}
    for key in args.cases.split(","):
        label, prompts, n = cases[key]
        ours, out_ours = run_kvlab(model, prompts, n)
        theirs, out_hf = run_hf(hf, prompts, n)
        row = {"case": label, "kvlab": ours, "transformers": theirs,
               "same_tokens": out_ours == out_hf,
               "decode_speedup": ours["decode_tokens_per_s"] / theirs["decode_tokens_per_s"],
               "ttft_speedup": theirs["ttft_s"] / ours["ttft_s"]}
        if key == "b16":
            ctx = len(prompts[0]) + n // 2            # average context over the decode steps
            kv = model.cfg.kv_bytes_per_token("fp32") * len(prompts) * ctx
            weights = sum(p.numel() * p.element_size() for p in model.parameters())
            row["kv_bytes_per_step"] = kv
            row["kvlab_kv_read_GBps"] = kv / (ours["step_ms"] / 1e3) / 1e9
            row["kvlab_kv_plus_weights_GBps"] = (kv + weights) / (ours["step_ms"] / 1e3) / 1e9
            row["copy_GBps"] = copy_bandwidth(kv)
        results[key] = row
        print(f"{label}: kvlab {ours['decode_tokens_per_s']:.1f} tok/s (ttft {ours['ttft_s']:.2f} s), transformers "
              f"{theirs['decode_tokens_per_s']:.1f} tok/s (ttft {theirs['ttft_s']:.2f} s); decode x"
              f"{row['decode_speedup']:.2f}, same tokens: {row['same_tokens']}", flush=True)
        if key == "b16":
            print(f"  KV read per step {row['kv_bytes_per_step'] / 1e9:.2f} GB -> {row['kvlab_kv_read_GBps']:.1f} GB/s "
                  f"(with weights {row['kvlab_kv_plus_weights_GBps']:.1f} GB/s); copy bandwidth "
                  f"{row['copy_GBps']:.1f} GB/s", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
