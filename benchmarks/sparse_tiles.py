"""Do windows and block-sparse layouts cost their visible tiles, not T²? CPU time of the ``flash``
backend (tiled PyTorch; the Triton kernels use the same tile map on a GPU) for causal attention at
growing lengths: dense, a sliding window, and block-sparse layouts (local blocks + a global block,
with and without a stride), prefill forward and forward + backward. Beside each time, the number of
tiles the mask's tile map leaves visible, and ``sdpa`` with the same mask as a dense boolean tensor
(what a backend without tile skipping pays).

    python benchmarks/sparse_tiles.py [--min-run-time 1] [--out benchmarks/results/sparse_tiles.json]
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch
from torch.utils.benchmark import Timer

from kvlab.attention import AttentionMask, BlockSparse, attention
from kvlab.attention.kernels.flash import DEFAULT_BLOCK_K, DEFAULT_BLOCK_Q

PATTERNS = {
    "dense causal": dict(),
    "window 512": dict(window=512),
    "sparse local 2 + global 1 (block 128)": dict(sparse=BlockSparse(128, local=2, global_blocks=1)),
    "sparse local 2 + global 1 + stride 4 (block 128)": dict(sparse=BlockSparse(128, local=2, global_blocks=1,
                                                                                stride=4)),
}


def median_ms(fn, min_run_time: float) -> float:
    fn()
    return 1e3 * Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=min_run_time).median


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="1024,2048,4096,8192")
    ap.add_argument("--min-run-time", type=float, default=1.0)
    ap.add_argument("--out", default="benchmarks/results/sparse_tiles.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    for T in (int(t) for t in args.lengths.split(",")):
        # SmolLM2-like heads: 9 query heads reading 3 KV heads, head_dim 64, batch 1.
        q = torch.randn(1, 9, T, 64, requires_grad=True)
        k = torch.randn(1, 3, T, 64, requires_grad=True)
        v = torch.randn(1, 3, T, 64, requires_grad=True)
        pos = torch.arange(T)[None]
        for name, rule in PATTERNS.items():
            mask = AttentionMask(pos, pos, plain_causal=not rule, **rule)
            tiles = mask.tile_map(DEFAULT_BLOCK_Q, DEFAULT_BLOCK_K)
            row = {"T": T, "pattern": name, "visible_tiles": int(tiles.sum()), "tiles": tiles.numel(),
                   "visible_pairs": float(mask.dense().float().mean())}

            def fwd(backend):
                with torch.no_grad():
                    attention(q, k, v, mask, backend=backend)

            def fwd_bwd():
                attention(q, k, v, mask, backend="flash").sum().backward()

            row["flash_forward_ms"] = median_ms(lambda: fwd("flash"), args.min_run_time)
            row["flash_forward_backward_ms"] = median_ms(fwd_bwd, args.min_run_time)
            # sdpa with a dense boolean mask: no tile is skipped (the plain causal case uses its
            # built-in causal path, which does skip).
            row["sdpa_forward_ms"] = median_ms(lambda: fwd("sdpa"), args.min_run_time)
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": platform.processor() or platform.machine(),
                               "threads": torch.get_num_threads(), "torch": torch.__version__,
                               "tile": [DEFAULT_BLOCK_Q, DEFAULT_BLOCK_K], "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
