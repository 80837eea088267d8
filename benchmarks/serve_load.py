"""Serving under load: ``kvlab serve`` against transformers' continuous batching, one KV budget.

SmolLM2-135M (GQA, 3 KV heads) and its shrunk variants (MQA: KV/3; MQA + CLA2: KV/6; converted by
mean pooling — quality does not matter for speed) are each served with the same KV memory budget.
For each number of concurrent clients (1..64) a fixed number of requests is sent (each client sends
its next request when its last one is answered; the run stops by itself), every request with a
distinct prompt of ``--prompt-tokens`` tokens from the built-in corpus and exactly ``--max-tokens``
new tokens (EOS ignored), greedy. Reported per level: output tokens/s over the level's wall time,
p50/p99 time to first token (TTFT), p50/p99 time per output token after the first (TPOT, as vLLM's
benchmark defines it), the most sequences the server ran at once and the planner's prediction for
the budget (``PagedKVPool.max_sequences(prompt + max_tokens)``).

kvlab is measured through HTTP (``kvlab serve`` in a process of its own, the OpenAI-compatible API
with SSE over loopback; its peak running sequences and preemptions read from ``/metrics``);
transformers' ``ContinuousBatchingManager`` (``model.init_continuous_batching``: paged cache,
``page_size`` 16, ``num_blocks`` set to the same byte budget) in-process with no HTTP, so its
numbers exclude the HTTP and tokenization costs that kvlab's include. CLA has no transformers
architecture, so transformers runs GQA-3 and MQA (MQA exported by ``kvlab export --format hf``).

A variant may name a quantized cache after ``@`` (``gqa3@fp8``, ``mqa@int8``): ``kvlab serve
--kv-quant``, the same model with its cache stored in that precision (kvlab only).

    python benchmarks/serve_load.py [--variants gqa3,mqa,mqa-cla2,gqa3@fp8] [--clients 1,4,16,64]
        [--kv-budget 96MiB] [--prompt-tokens 64] [--max-tokens 64] [--no-transformers]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

import kvlab
from kvlab.config.accounting import cache_bytes
from kvlab.convert import convert
from kvlab.data.corpus import builtin_corpus
from kvlab.eval.plan import parse_size

VARIANTS = {"gqa3": {}, "mqa": {"n_kv_head": 1}, "mqa-cla2": {"n_kv_head": 1, "cla": 2}}


def prompts_from_corpus(tok, n: int, length: int) -> list[list[int]]:
    """``n`` distinct prompts of ``length`` tokens: consecutive slices of the validation text."""
    ids: list[int] = []
    for doc in builtin_corpus("validation"):
        ids += tok.encode(doc.text, add_special_tokens=False)
        if len(ids) >= n * length:
            break
    if len(ids) < n * length:
        raise SystemExit(f"the corpus has {len(ids)} tokens, fewer than {n} prompts of {length}")
    return [ids[i * length:(i + 1) * length] for i in range(n)]


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def summarize(records: list[tuple[float, float, int]], wall: float) -> dict:
    """records: (ttft s, tpot s, output tokens) per request."""
    ttft = [r[0] for r in records]
    tpot = [r[1] for r in records if r[2] > 1]
    return {"requests": len(records), "output_tokens": sum(r[2] for r in records), "wall_s": wall,
            "tokens_per_s": sum(r[2] for r in records) / wall,
            "ttft_p50_ms": 1e3 * pct(ttft, 50), "ttft_p99_ms": 1e3 * pct(ttft, 99),
            "tpot_p50_ms": 1e3 * pct(tpot, 50), "tpot_p99_ms": 1e3 * pct(tpot, 99),
            "ttft_mean_ms": 1e3 * statistics.fmean(ttft)}


# ----------------------------------------------------------------------------------- kvlab
async def kvlab_level(url: str, name: str, prompts: list[list[int]], clients: int, max_tokens: int) -> dict:
    import httpx2 as httpx

    queue = list(prompts)
    records: list[tuple[float, float, int]] = []

    async def one(http, prompt):
        body = {"model": name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}
        start = time.perf_counter()
        first = last = None
        tokens = 0
        async with http.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {await r.aread()}")
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                now = time.perf_counter()
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                elif chunk["choices"] and (chunk["choices"][0]["text"] or chunk["choices"][0]["finish_reason"]):
                    first = first or now
                    last = now
        records.append((first - start, (last - first) / max(tokens - 1, 1), tokens))

    async def client(http):
        while queue:
            await one(http, queue.pop())

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        wall = time.perf_counter() - t0
    return summarize(records, wall)


def scrape(url: str) -> dict[str, float]:
    import httpx2 as httpx

    out = {}
    for line in httpx.get(url.removesuffix("/v1") + "/metrics").text.splitlines():
        if line.startswith("kvlab_") and " " in line and "{" not in line:
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def run_kvlab(model_dir, name, prompts_per_level, args, budget, per_token) -> list[dict]:
    """``kvlab serve`` in a process of its own (as a user runs it), one fresh server per level."""
    rows = []
    for clients, prompts in prompts_per_level:
        cmd = [sys.executable, "-m", "kvlab", "serve", str(model_dir), "--port", "0", "--served-model-name", name,
               "--kv-budget", str(budget), "--max-len", str(args.prompt_tokens + args.max_tokens),
               "--max-seqs", str(max(64, clients)), "--max-queue", "1024", "--prefill-chunk", str(args.prefill_chunk)]
        if "@" in name:
            cmd += ["--kv-quant", name.split("@")[1]]
        log = open(Path(tempfile.gettempdir()) / f"serve_load-{name}-{clients}.log", "w")     # the server's log
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
        try:
            banner = proc.stdout.readline()
            url = banner.split(" on ")[1].split()[0]
            row = asyncio.run(kvlab_level(url.removesuffix("/v1"), name, prompts, clients, args.max_tokens))
            m = scrape(url)
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(60)
            log.close()
        # The planner's answer for this budget: whole blocks per sequence, as the pool allocates them.
        length = args.prompt_tokens + args.max_tokens
        predicted = budget // (per_token * 16) // -(-length // 16)
        row |= {"framework": "kvlab serve (HTTP, own process)", "clients": clients,
                "max_running": int(m["kvlab_peak_running_sequences"]), "planner_max_sequences": predicted,
                "preemptions": int(m["kvlab_preemptions"]),
                "kv_pool_bytes": int(m["kvlab_kv_blocks_total"] * m["kvlab_kv_block_bytes"])}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------- transformers
def run_transformers(hf_dir_or_gguf, prompts_per_level, args, budget, per_token) -> list[dict]:
    from transformers import AutoModelForCausalLM, GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    path = Path(hf_dir_or_gguf)
    if path.suffix == ".gguf":
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    model.eval()
    rows = []
    for clients, prompts in prompts_per_level:
        num_blocks = budget // (per_token * 16)
        gen = GenerationConfig(max_new_tokens=args.max_tokens, do_sample=False, eos_token_id=-1,
                               pad_token_id=0)
        cb = ContinuousBatchingConfig(page_size=16, num_blocks=num_blocks, max_requests_per_batch=max(64, clients),
                                      max_batch_tokens=args.prefill_chunk + max(64, clients))
        manager = model.init_continuous_batching(generation_config=gen, continuous_batching_config=cb)
        manager.start()
        queue = list(prompts)
        records: list[tuple[float, float, int]] = []
        lock = threading.Lock()

        def client():
            while True:
                with lock:
                    if not queue:
                        return
                    prompt = queue.pop()
                start = time.perf_counter()
                rid = manager.add_request(prompt, max_new_tokens=args.max_tokens, streaming=True,
                                          record_timestamps=True)
                first = last = None
                out = None
                for out in manager.request_id_iter(rid):
                    now = time.perf_counter()
                    if out.generated_tokens:
                        first = first or now
                        last = now
                n = len(out.generated_tokens)
                with lock:
                    records.append((first - start, (last - first) / max(n - 1, 1), n))

        t0 = time.perf_counter()
        threads = [threading.Thread(target=client) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        manager.stop(block=True)
        if hasattr(model, "destroy_cached_continuous_batching_manager"):
            model.destroy_cached_continuous_batching_manager()
        row = summarize(records, wall) | {"framework": "transformers CB (in-process)", "clients": clients,
                                          "num_blocks": num_blocks}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default="gqa3,mqa,mqa-cla2")
    p.add_argument("--clients", default="1,4,16,64")
    p.add_argument("--kv-budget", default="96MiB")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--requests", type=int, default=0, help="requests per level (default: max(8, 2 x clients))")
    p.add_argument("--prefill-chunk", type=int, default=256)
    p.add_argument("--no-transformers", action="store_true")
    p.add_argument("--out", default="benchmarks/results/serve_load.json")
    args = p.parse_args()
    budget = parse_size(args.kv_budget)
    levels = [int(c) for c in args.clients.split(",")]
    base = kvlab.load("smollm2-135m")
    n_requests = {c: args.requests or max(8, 2 * c) for c in levels}
    all_prompts = prompts_from_corpus(base.tokenizer, sum(n_requests.values()), args.prompt_tokens)
    per_level, i = [], 0
    for c in levels:
        per_level.append((c, all_prompts[i:i + n_requests[c]]))
        i += n_requests[c]

    results = {"machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                           "threads": torch.get_num_threads()},
               "date": time.strftime("%Y-%m-%d"), "kv_budget_bytes": budget, "prompt_tokens": args.prompt_tokens,
               "max_tokens": args.max_tokens, "variants": {}}
    out = Path(args.out)
    for name in args.variants.split(","):
        structure, _, precision = name.partition("@")
        model = convert(base, **VARIANTS[structure]) if VARIANTS[structure] else base
        model.tokenizer = base.tokenizer
        per_token = cache_bytes(model.cfg, torch.float32, kv_quant=precision or None).per_token
        print(f"== {name}: {per_token:,} KV bytes/token", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            kvlab.save(model, Path(tmp) / name)
            entry = {"kv_bytes_per_token": per_token,
                     "kvlab": run_kvlab(Path(tmp) / name, name, per_level, args, budget, per_token)}
        if not args.no_transformers and "cla" not in VARIANTS[structure] and not precision:
            if name == "gqa3":
                from kvlab.io import builtin_model_path

                source = builtin_model_path("smollm2-135m")
                entry["transformers"] = run_transformers(source, per_level, args, budget, per_token)
            else:
                from kvlab.io.hf import export_hf

                with tempfile.TemporaryDirectory() as tmp:
                    export_hf(model, Path(tmp) / "hf")
                    entry["transformers"] = run_transformers(Path(tmp) / "hf", per_level, args, budget, per_token)
        results["variants"][name] = entry
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
