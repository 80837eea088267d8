"""What rounding the keys and the values costs, apart, and what other quantizers would recover: KIVI's
per-channel keys, a Hadamard rotation before rounding (QuaRot; llama.cpp's rotated caches), 2-3 bits.

This simulates the rounding (quantize, then dequantize at once, inside every attention call of
SmolLM2-135M, prefill included) to rank quantizer designs before building one into the cache; the
formats kvlab stores are measured through the cache itself by ``benchmarks/kv_quant.py``. Every
variant is asymmetric (a scale and a minimum per group of 32, float16-free):

- per token: groups of 32 channels of one token's key or value (kvlab's int4, llama.cpp's q4_1);
- per channel (``kchan``, keys only): groups of 32 consecutive tokens of one channel (KIVI), the last
  group shorter; KIVI keeps the newest group in full precision, which this leaves out (pessimistic);
- ``rot``: keys and queries (and values, undone on the output) multiplied by a 64×64 Hadamard matrix
  before rounding, which leaves attention unchanged in exact arithmetic.

    OMP_NUM_THREADS=2 python benchmarks/kv_rounding_ablation.py [--tokens 8192] \\
        [--out benchmarks/results/precision/kv_rounding_ablation.json]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch

import kvlab
import kvlab.attention.gqa as gqa
from kvlab.data.corpus import builtin_corpus
from kvlab.eval.perplexity import evaluate

# (label, key bits, value bits, keys per channel, rotate); None: left as it is
VARIANTS = [
    ("keys int4 + values int4 (per token)", 4, 4, False, False),
    ("keys int4 only", 4, None, False, False),
    ("values int4 only", None, 4, False, False),
    ("keys int8 + values int4", 8, 4, False, False),
    ("keys int4 + values int4, Hadamard", 4, 4, False, True),
    ("keys int8 + values int4, Hadamard", 8, 4, False, True),
    ("keys int4 per channel only (KIVI)", 4, None, True, False),
    ("keys int4 per channel + values int4 (KIVI-4)", 4, 4, True, False),
    ("keys int4 per channel + values int3", 4, 3, True, False),
    ("keys int3 per channel + values int3", 3, 3, True, False),
    ("keys int4 per channel + values int2", 4, 2, True, False),
    ("keys int2 per channel + values int2 (KIVI-2)", 2, 2, True, False),
    ("values int3 only", None, 3, False, False),
    ("values int2 only", None, 2, False, False),
]
GROUP = 32


def hadamard(n: int) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


def round_per_token(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Asymmetric rounding in groups of GROUP channels of each vector (the last dimension)."""
    shape = x.shape
    g = x.reshape(*shape[:-1], shape[-1] // GROUP, GROUP)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    levels = 2 ** bits - 1
    step = ((hi - lo) / levels).clamp(min=1e-8)
    return (torch.round((g - lo) / step).clamp(0, levels) * step + lo).reshape(shape)


def round_per_channel(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Asymmetric rounding of each channel in groups of GROUP consecutive tokens (x: B, H, T, D)."""
    xt = x.transpose(-1, -2)
    T = xt.shape[-1]
    pad = (-T) % GROUP
    if pad:                      # a short last group: repeat its last token, which changes no min/max
        xt = torch.cat([xt, xt[..., -1:].expand(*xt.shape[:-1], pad)], -1)
    return round_per_token(xt, bits)[..., :T].transpose(-1, -2).contiguous()


def rounding_attention(setting: dict, inner):
    """``inner`` (kvlab's attention function) with the keys and values rounded as ``setting`` says."""
    H = hadamard(64)

    def attention(q, k, v, mask, **kw):
        kb, vb = setting.get("k"), setting.get("v")
        rotate = setting.get("rot")
        if rotate:
            R = H.to(k.dtype)
            if kb:
                k, q = k @ R, q @ R
            if vb:
                v = v @ R
        if kb:
            k = round_per_channel(k, kb) if setting.get("kchan") else round_per_token(k, kb)
        if vb:
            v = round_per_token(v, vb)
        out = inner(q, k, v, mask, **kw)
        return out @ H.to(out.dtype).T if rotate and vb else out

    return attention


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--out", default="benchmarks/results/precision/kv_rounding_ablation.json")
    args = ap.parse_args()
    model = kvlab.load("smollm2-135m")
    docs = builtin_corpus("validation")
    setting: dict = {}
    gqa.attention = rounding_attention(setting, gqa.attention)
    rows = []
    for label, kb, vb, kchan, rot in [("original (float)", None, None, False, False)] + VARIANTS:
        setting.clear()
        setting.update(k=kb, v=vb, kchan=kchan, rot=rot)
        t0 = time.perf_counter()
        r = evaluate(model, model.tokenizer, docs, seq_len=args.seq_len, stride=args.seq_len,
                     max_tokens=args.tokens, batch_size=4, progress=False)
        row = {"variant": label, "key_bits": kb, "value_bits": vb, "keys_per_channel": kchan, "hadamard": rot,
               "perplexity": r.perplexity, "seconds": time.perf_counter() - t0}
        rows.append(row)
        print(json.dumps(row), flush=True)
    for row in rows:
        row["change_pct"] = 100 * (row["perplexity"] / rows[0]["perplexity"] - 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": platform.platform(), "torch": torch.__version__,
                               "date": time.strftime("%Y-%m-%d"), "args": vars(args), "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
