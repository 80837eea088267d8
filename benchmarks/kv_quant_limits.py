"""Two levers measured on SmolLM2-135M and dropped: the key balance carried in the weights (for other
runtimes' integer caches), and int4 with static per-channel steps (exactly 4 bits: a 4× cache).

1. ``--part weights``: the key balance (:mod:`kvlab.convert.balance`) carried in the weights, so
   that every runtime's integer cache would get it. Its per-channel scale folds into ``q_proj`` and
   ``k_proj`` exactly when both channels of a RoPE pair share it (a rotation commutes with a scale of
   its pair). Its centring cannot: the keys' mean is taken after RoPE, and a bias on ``k_proj`` acts
   before it, changing each score by ``q · R(Δ) b``, which depends on the distance ``Δ``. The bias is
   put only on the pairs that rotate by at most ``τ`` radians over a context, where ``R(Δ) ≈ 1``.
2. ``--part static``: int4 codes with one step per channel, calibrated (the mean subtracted, the step
   chosen per channel by least squares over a grid of clipping ranges), and no per-token parameters:
   exactly 4 bits a value, 5,760 B/token — 4×, which every format with per-group scales misses
   (int4 with llama.cpp's q4_1 parameters is 5 bits, 7,200 B). Simulated: every attention call's keys
   or values rounded so (the values' mean added back after attention is exact, as the weights sum to 1).

Perplexity on 8,192 validation tokens in 1,024-token windows (stride 1,024); statistics and steps from
8,192 train-split tokens in 1,024-token windows.

    python benchmarks/kv_quant_limits.py [--part weights,static]
        [--out benchmarks/results/precision/kv_quant_limits.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

import kvlab
import kvlab.attention.gqa as gqa
from kvlab.convert.balance import BALANCE_WINDOW, balance_keys, balance_vectors, key_statistics
from kvlab.convert.finish import finish_conversion, source_state
from kvlab.data.corpus import builtin_corpus
from kvlab.data.windows import calibration_batches
from kvlab.eval.perplexity import evaluate

MAX_TOKENS = 8192


def perplexity(model, kv_quant=None) -> float:
    with torch.no_grad():
        return evaluate(model, model.tokenizer, builtin_corpus("validation"), seq_len=1024, stride=1024,
                        max_tokens=MAX_TOKENS, batch_size=4, progress=False, kv_quant=kv_quant).perplexity


def key_means_before_rope(model, batches) -> dict[int, torch.Tensor]:
    """Per layer, the mean of ``k_proj``'s output ``(n_kv_head, head_dim)`` over ``batches``."""
    cfg = model.cfg
    sums, hooks = {}, []
    for i in range(cfg.n_layer):
        def hook(module, inputs, out, i=i):
            o = out.detach().double().reshape(-1, cfg.n_kv_head, cfg.head_dim)
            n, s = sums.get(i, (0, 0.0))
            sums[i] = (n + o.shape[0], s + o.sum(0))
        hooks.append(model.layers[i].self_attn.k_proj.register_forward_hook(hook))
    try:
        with torch.no_grad():
            for tokens in batches:
                model(tokens)
    finally:
        for h in hooks:
            h.remove()
    return {i: s / n for i, (n, s) in sums.items()}


def balanced_in_weights(model, vectors, pre_means, tau: float | None, context: int, scale: bool = True):
    """``model`` with the balance's pair-equal scale folded into q/k (if ``scale``) and a ``k_proj`` bias
    removing the mean before RoPE on the pairs rotating at most ``tau`` radians over ``context`` tokens
    (every pair when ``tau`` is None); biases on q/v are zero (a qwen2-style model)."""
    cfg = model.cfg
    D, H, G = cfg.head_dim, cfg.n_kv_head, cfg.q_per_kv
    theta = cfg.rope_theta ** (-2 * torch.arange(D // 2, dtype=torch.float64) / D)
    slow = torch.ones(D // 2, dtype=torch.bool) if tau is None else theta * context <= tau
    slow = torch.cat([slow, slow])                                   # both channels of a pair (half layout)
    state = source_state(model)
    dtype = state["embed_tokens.weight"].dtype
    for i in range(cfg.n_layer):
        pre = f"layers.{i}.self_attn"
        s = vectors[i][1]
        pair = (s[:, :D // 2] * s[:, D // 2:]).sqrt()               # one scale per pair commutes with RoPE
        s = torch.cat([pair, pair], 1) if scale else torch.ones_like(s)
        wk, wq = state[f"{pre}.k_proj.weight"].double(), state[f"{pre}.q_proj.weight"].double()
        bias = torch.zeros(H * D, dtype=torch.float64)
        for g in range(H):
            wk[g * D:(g + 1) * D] /= s[g][:, None]
            bias[g * D:(g + 1) * D] = torch.where(slow, -pre_means[i][g] / s[g], 0.0)
            for h in range(g * G, (g + 1) * G):
                wq[h * D:(h + 1) * D] *= s[g][:, None]
        state[f"{pre}.k_proj.weight"], state[f"{pre}.q_proj.weight"] = wk.to(dtype), wq.to(dtype)
        state[f"{pre}.k_proj.bias"] = bias.to(dtype)
        state[f"{pre}.q_proj.bias"] = torch.zeros(cfg.n_head * D, dtype=dtype)
        state[f"{pre}.v_proj.bias"] = torch.zeros(H * D, dtype=dtype)
    return finish_conversion(model, cfg.replace(qkv_bias=True), state, {"method": "balance-in-weights"})


def part_weights(model, batches) -> list[dict]:
    vectors = balance_vectors(key_statistics(model, batches))
    means = key_means_before_rope(model, batches)
    ctx = model.cfg.max_seq_len
    variants = [("original", lambda: model, ("none", "int4", "int4-h")),
                ("balanced (kvlab's buffers)", lambda: balance_keys(model, batches), ("int4", "int4-h")),
                ("weights: pair scale", lambda: balanced_in_weights(model, vectors, means, 0.0, ctx),
                 ("none", "int4", "int4-h")),
                (f"weights: pair scale + bias on pairs turning <= 0.5 rad in {ctx} tokens",
                 lambda: balanced_in_weights(model, vectors, means, 0.5, ctx), ("none", "int4", "int4-h")),
                ("weights: pair scale + bias on pairs turning <= 1 rad in 1024 tokens",
                 lambda: balanced_in_weights(model, vectors, means, 1.0, 1024), ("none",)),
                ("weights: bias on every pair", lambda: balanced_in_weights(model, vectors, means, None, ctx, False),
                 ("none",))]
    rows = []
    for name, make, quants in variants:
        m = make()
        for q in quants:
            rows.append({"part": "weights", "variant": name, "kv_quant": q,
                         "perplexity": perplexity(m, None if q == "none" else q)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def part_static(model, batches) -> list[dict]:
    """Both calibrations: documents from their start, as evaluation reads them (the first token, which
    attention uses as a sink, has keys and values far from the rest), and random windows (calibration
    text as kvlab's conversions read it, which rarely starts a document)."""
    from kvlab.data.corpus import builtin_corpus

    def documents():       # the train split read as evaluation reads text: each document from its start
        evaluate(model, model.tokenizer, builtin_corpus("train"), seq_len=1024, stride=1024, max_tokens=8192,
                 batch_size=4, progress=False)

    rows = _static(model, documents, "documents from their start",
                   ((4, None), (None, 4), (4, 4), (3, 4), (4, 3)))
    rows += _static(model, lambda: [model(tokens) for tokens in batches], "random windows", ((4, None), (4, 4)))
    return rows


def _static(model, calibrate, calibration: str, combos) -> list[dict]:
    L = model.cfg.n_layer
    inner = gqa.attention
    state = {"mode": "calibrate", "calls": 0, "params": {}}
    samples: dict[int, dict[str, list]] = {}

    def fit(x: torch.Tensor, bits: int):                 # x (heads, tokens, channels) -> mean, step
        mean = x.mean(1)
        centred = x - mean[:, None]
        spread = centred.std(1).clamp(min=1e-8)
        half = 2 ** bits // 2
        best = step = None
        for clip in (1.5, 2, 2.5, 3, 3.5, 4, 5, 6, 8):
            s = clip * spread / half
            codes = torch.floor(centred / s[:, None]).clamp(-half, half - 1)
            err = ((codes + 0.5) * s[:, None] - centred).pow(2).mean(1)
            better = err < best if best is not None else torch.ones_like(err, dtype=torch.bool)
            best = err if best is None else torch.where(better, err, best)
            step = s if step is None else torch.where(better, s, step)
        return mean, step

    def rounded(x, mean, step, bits):
        half = 2 ** bits // 2
        mean, step = mean[None, :, None].to(x.dtype), step[None, :, None].to(x.dtype)
        return (torch.floor((x - mean) / step).clamp(-half, half - 1) + 0.5) * step + mean

    def attention(q, k, v, mask, **kw):
        layer = state["calls"] % L
        state["calls"] += 1
        if state["mode"] == "calibrate":
            s = samples.setdefault(layer, {"k": [], "v": []})
            s["k"].append(k.detach().float().transpose(0, 1).flatten(1, 2))
            s["v"].append(v.detach().float().transpose(0, 1).flatten(1, 2))
        elif state["mode"]:
            kb, vb = state["mode"]
            p = state["params"][layer]
            k = rounded(k, *p["k"], kb) if kb else k
            v = rounded(v, *p["v"], vb) if vb else v
        return inner(q, k, v, mask, **kw)

    gqa.attention = attention
    rows = []
    try:
        with torch.no_grad():
            calibrate()                     # every forward makes L attention calls, in layer order
        for kb, vb in combos:
            state["params"] = {i: {"k": fit(torch.cat(s["k"], 1), kb or 4), "v": fit(torch.cat(s["v"], 1), vb or 4)}
                               for i, s in samples.items()}
            state["mode"], state["calls"] = (kb, vb), 0
            rows.append({"part": "static", "calibration": calibration, "key_bits": kb, "value_bits": vb,
                         "perplexity": perplexity(model)})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        gqa.attention = inner
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", default="weights,static")
    ap.add_argument("--out", default="benchmarks/results/precision/kv_quant_limits.json")
    args = ap.parse_args()
    model = kvlab.load("smollm2-135m")
    window = min(model.cfg.max_seq_len, BALANCE_WINDOW)
    batches = calibration_batches(model.tokenizer, 8192, seq_len=window, batch_size=max(1, 4096 // window))
    out = Path(args.out)
    parts = args.part.split(",")
    # rows of the parts not run now are kept from the file's last run
    rows = [r for r in json.loads(out.read_text())["rows"] if r["part"] not in parts] if out.is_file() else []
    if "weights" in parts:
        rows += part_weights(model, batches)
    if "static" in parts:
        rows += part_static(model, batches)
    meta = {"model": "smollm2-135m", "max_tokens": MAX_TOKENS, "torch": torch.__version__,
            "python": platform.python_version(), "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d")}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
