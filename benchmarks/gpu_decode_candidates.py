"""Decode step of shrink's candidates against the original at SmolLM2-135M's shapes, on the run's
device: the issue's GPU target "decode faster than the original from 4k tokens" (and the CPU numbers
beside it with ``--device cpu``).

Speed does not depend on the weights, so every model is a random one of the candidate's shapes
(``plan_candidate`` of the candidates ``kvlab shrink`` enumerates at each budget), in bf16 on a GPU,
and the cache is filled to the context directly; each ratio is
:func:`kvlab.recipes.shrink.speed.decode_ratio` (both models in one process, interleaved rounds, wall
time between synchronisations on a GPU, process CPU time on one thread on a CPU). The candidates: for
each budget the best structural start of each family (the α = 0 rankings in BENCHMARKS) and the
quantized caches of the original.

    python benchmarks/gpu_decode_candidates.py [--device cuda] [--contexts 1024,4096,16384] [--batch 16]
        [--out benchmarks/results/gpu/decode_candidates.json]
    python benchmarks/gpu_decode_candidates.py --smoke        # tiny shapes on a CPU: checks the script
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from kvlab import ModelConfig
from kvlab.models.decoder import Transformer
from kvlab.recipes.shrink.candidates import Candidate, plan_candidate
from kvlab.recipes.shrink.speed import decode_ratio

# (label, family, change, cache precision): SmolLM2-135M's candidates at 4x and 8x (BENCHMARKS, the
# shrink runs), and the quantized caches of the original (2x-3.2x).
CANDIDATES = [
    ("int8/int4 cache (2.4x)", "cache", {}, "int8/int4"),
    ("int4 cache (3.2x)", "cache", {}, "int4"),
    ("by-layer cache at 3x", "cache", {}, "int4+fp8/int4@1,12+int8/int4@10,13,16,19"),
    ("MLA 128+32 x int8 (4x)", "mla", {"kv_lora_rank": 128, "qk_rope_head_dim": 32}, "int8"),
    ("MLA 64+32 (4x)", "mla", {"kv_lora_rank": 64, "qk_rope_head_dim": 32}, None),
    ("Low-rank K96+V192 x int4 (4x)", "lowrank", {"k_rank": 96, "v_rank": 192}, "int4"),
    ("MQA x int8 (5.6x)", "heads", {"n_kv_head": 1, "cla": 1}, "int8"),
    ("MLA 96+32 x int4 (8x)", "mla", {"kv_lora_rank": 96, "qk_rope_head_dim": 32}, "int4"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--contexts", default="1024,4096,16384")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--smoke", action="store_true", help="two layers, short contexts: checks the script on a CPU")
    ap.add_argument("--out", default="benchmarks/results/gpu/decode_candidates.json")
    args = ap.parse_args()
    cfg = ModelConfig.from_preset("smollm2-135m", max_seq_len=16384)
    contexts = [int(c) for c in args.contexts.split(",")]
    if args.smoke:
        cfg, contexts, args.batch, args.rounds = cfg.replace(n_layer=2), [64], 2, 2
        cfg = cfg.replace(max_seq_len=128)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(args.device):
        original = Transformer(cfg).to(dtype).eval()
    rows = []
    for label, family, change, precision in CANDIDATES:
        cand = Candidate(label, family, "", change, 0, precision)
        try:
            planned = plan_candidate(cfg, cand)
            kv_quant = cand.kv_quant
            if kv_quant is not None:
                from kvlab.config.accounting import layer_kv_quant

                for i in range(planned.n_layer):
                    layer_kv_quant(planned, i, kv_quant)   # a layer the smoke model lacks is refused here
        except Exception as e:                             # noqa: BLE001 - a row that cannot run says why
            rows.append({"candidate": label, "skipped": str(e)})
            print(json.dumps(rows[-1]), flush=True)
            continue
        with torch.device(args.device):
            model = Transformer(planned).to(dtype).eval() if cand.restructured else original
        for context in contexts:
            r = decode_ratio(original, model, kv_quant, batch=args.batch, context=context, rounds=args.rounds)
            rows.append({"candidate": label, "kv_bytes_per_token": planned.kv_bytes_per_token("bf16", kv_quant),
                         **r.to_dict()})
            print(json.dumps(rows[-1]), flush=True)
        del model
        if args.device == "cuda":
            torch.cuda.empty_cache()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    out.write_text(json.dumps({"machine": platform.platform(), "device": device, "torch": torch.__version__,
                               "date": time.strftime("%Y-%m-%d"), "args": vars(args), "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
