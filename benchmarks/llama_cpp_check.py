"""llama.cpp on kvlab's GGUF exports: the same next tokens and logits as kvlab on the same file, and
llama.cpp's own decode speed per KV cache type — what ``kvlab shrink --target llama.cpp`` promises.

    python benchmarks/llama_cpp_check.py --gguf runs/shrink-4x-llama/model.gguf --caches f16,q8_0,q8_0/q4_1 \\
        --contexts 512,2048 --out benchmarks/results/llama_cpp/check.json

With ``--original`` the built-in SmolLM2 is exported the same way (f16 weights) and measured beside it,
in the same process, so the two speeds compare.

llama.cpp comes from ``llama-cpp-python``, built from the registry's source distribution (about 40
minutes on a 2-core machine) the first time; the wheel is cached in ``$KVLAB_WHEEL_CACHE`` (default
``~/.cache/kvlab/wheels``) and installed from there afterwards. Kept out of the test suite for that
reason.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from kvlab.recipes.shrink.targets import LLAMA_CPP_CACHE

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
GGML_TYPES = {"f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 8}
# llama.cpp's cache type -> kvlab's format (the same layouts; q4_0 has none in kvlab), from the one table
KVLAB_CACHE = {v: k for k, v in LLAMA_CPP_CACHE.items()}


def _types(cache: str) -> tuple[str, str]:
    """``q8_0`` -> (q8_0, q8_0); keys and values apart: ``q8_0/q4_1`` -> (q8_0, q4_1), -ctk and -ctv."""
    key, _, value = cache.partition("/")
    return key, value or key


def _kvlab_cache(cache: str) -> str | None:
    """kvlab's precision for a llama.cpp cache spec: q8_0 -> int8, q8_0/q4_1 -> int8/int4 (f16 -> None)."""
    key, value = (KVLAB_CACHE[t] for t in _types(cache))
    if key is None or value is None:
        if key != value:
            raise SystemExit(f"--caches {cache}: kvlab has no cache float for only one of keys and values")
        return None
    return key if key == value else f"{key}/{value}"


def ensure_llama_cpp():
    try:
        import llama_cpp
        return llama_cpp
    except ImportError:
        pass
    cache = Path(os.environ.get("KVLAB_WHEEL_CACHE", Path.home() / ".cache" / "kvlab" / "wheels"))
    cache.mkdir(parents=True, exist_ok=True)
    if not list(cache.glob("llama_cpp_python-*.whl")):
        print(f"building {LLAMA_CPP_PYTHON} from source into {cache} (about 40 minutes on 2 cores)...", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-binary", "llama-cpp-python",
                        LLAMA_CPP_PYTHON, "-w", str(cache)], check=True)
    wheel = sorted(cache.glob("llama_cpp_python-*.whl"))[-1]
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", str(wheel), "diskcache", "jinja2", "numpy",
                    "typing-extensions"], check=True)
    import llama_cpp
    return llama_cpp


FLASH_ATTN = {"always": False}      # --flash-attn: also for f16 caches (a quantized V cache needs it anyway)


def _llama(path: Path, cache: str, n_ctx: int, logits_all: bool):
    from llama_cpp import Llama

    key, value = (GGML_TYPES[t] for t in _types(cache))
    return Llama(model_path=str(path), n_ctx=n_ctx, n_batch=512, n_threads=1, n_threads_batch=2,
                 logits_all=logits_all, type_k=key, type_v=value,
                 flash_attn=FLASH_ATTN["always"] or cache != "f16", verbose=False)


def _kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    p, q = p_logits.log_softmax(-1), q_logits.log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1).mean().item()


def _kvlab_model(path: Path):
    """kvlab's model for a GGUF it wrote: read back from the file (llama architecture), or for a
    deepseek2 file, which kvlab writes but does not read, the kvlab checkpoint beside it (``model/``,
    as ``kvlab shrink`` writes both; ``<name>.kvlab/`` otherwise)."""
    from gguf import GGUFReader

    import kvlab

    field = GGUFReader(str(path)).fields["general.architecture"]
    if bytes(field.parts[field.data[0]]).decode() == "llama":
        return kvlab.load(path)
    for beside in (path.parent / "model", path.with_suffix(".kvlab")):
        if beside.exists():
            return kvlab.load(beside)
    raise SystemExit(f"{path}: a deepseek2 GGUF; put the kvlab checkpoint it came from at {path.parent / 'model'} "
                     f"or {path.with_suffix('.kvlab')}")


def agreement(path: Path, cache: str, tokens: list[int]) -> dict:
    """llama.cpp's logits over ``tokens`` against kvlab's on the same file, each with its cache in the
    same quantization (kvlab's int8 is q8_0's, its int4 q4_1's; f16 against kvlab's float cache): top-1
    agreement, the mean KL(kvlab || llama.cpp) per token and the largest logit difference. Beside them,
    what each quantized cache costs against kvlab's float cache (mean KL), so the two runtimes'
    quantizations compare."""
    model = _kvlab_model(path)
    batch = torch.tensor([tokens])
    with torch.inference_mode():
        exact = model(batch).double()[0]
        ours = model(batch, cache=model.new_cache(1, len(tokens) + 1, kv_quant=_kvlab_cache(cache))).double()[0]
    llm = _llama(path, cache, n_ctx=len(tokens) + 8, logits_all=True)
    llm.eval(tokens)
    theirs = torch.tensor(np.array(llm.scores[:len(tokens)]), dtype=torch.float64)
    return {"cache": cache, "tokens": len(tokens),
            "top1_agreement": (ours.argmax(-1) == theirs.argmax(-1)).double().mean().item(),
            "mean_kl": _kl(ours, theirs), "max_abs_logit_diff": (ours - theirs).abs().max().item(),
            "kvlab_kl_vs_float": _kl(exact, ours), "llama_cpp_kl_vs_float": _kl(exact, theirs)}


def decode_ms(path: Path, cache: str, context: int, steps: int = 32) -> float:
    """llama.cpp's decode step at ``context`` cached tokens, one thread, batch 1 (process CPU ms)."""
    llm = _llama(path, cache, n_ctx=context + steps + 8, logits_all=False)
    rng = np.random.default_rng(0)
    llm.eval(rng.integers(100, 20000, context).tolist())
    t = time.process_time()
    for tok in rng.integers(100, 20000, steps).tolist():
        llm.eval([tok])
    return 1e3 * (time.process_time() - t) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", action="append", default=[], help="a GGUF file kvlab wrote (repeatable)")
    ap.add_argument("--original", action="store_true", help="also the built-in SmolLM2, exported as f16")
    ap.add_argument("--caches", default="f16,q8_0",
                    help="llama.cpp cache types, comma-separated; keys/values apart as q8_0/q4_1 (-ctk/-ctv)")
    ap.add_argument("--contexts", default="512,2048")
    ap.add_argument("--tokens", type=int, default=300, help="validation tokens compared")
    ap.add_argument("--flash-attn", action="store_true", help="flash attention for f16 caches too (llama.cpp's -fa on)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    FLASH_ATTN["always"] = args.flash_attn
    ensure_llama_cpp()
    import kvlab
    from kvlab.data.corpus import builtin_corpus
    from kvlab.io.gguf_export import export_gguf

    paths = [Path(p) for p in args.gguf]
    if args.original:
        original = Path(os.environ.get("TMPDIR", "/tmp")) / "kvlab-smollm2-f16.gguf"
        if not original.exists():
            export_gguf(kvlab.load("smollm2-135m"), original, gguf_type="f16")
        paths.insert(0, original)
    tok = _kvlab_model(paths[0]).tokenizer
    text = "\n".join(d.text for d in builtin_corpus("validation"))
    tokens = tok.encode(text)[:args.tokens]
    rows = []
    for path in paths:
        for cache in args.caches.split(","):
            row = {"gguf": str(path), "flash_attn": args.flash_attn or cache != "f16", **agreement(path, cache, tokens)}
            row["decode_ms"] = {c: decode_ms(path, cache, int(c)) for c in args.contexts.split(",")}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"llama_cpp_python": LLAMA_CPP_PYTHON, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
