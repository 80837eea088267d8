"""Trainable parameters, memory and step time of every fine-tuning method, against full
fine-tuning measured in the same run (one command):

    python benchmarks/finetune_methods.py                       # SmolLM2-135M, writes results/finetune_methods.json
    python benchmarks/finetune_methods.py --model tiny --steps 3 --seq-len 128 --out /tmp/fm.json
        # checks the script (byte tokens need longer rows)

Each method runs in a fresh process (so peak memory is its own): load the model, attach the adapter
(``full`` trains every weight instead), then ``--steps`` optimizer steps of SFT on the built-in
instruction set (batch ``--batch-size`` × ``--seq-len``), after one warm-up step that is not timed.
Reported: trainable parameters (and the closed form), the bytes of the transformer-block linear
weights (NF4 counted at its real size), the optimizer state, the peak memory while training — CUDA's
peak allocation on a GPU; on a CPU the peak resident set sampled every 2 ms during the steps, minus
the resident set before them — and the median step time, each also as a ratio to ``full``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from datetime import date
from pathlib import Path

METHODS = ("full", "lora", "qlora", "adalora", "prefix", "ptuning", "prompt")
OPTIONS = {
    "lora": dict(r=8, alpha=16.0),
    "qlora": dict(r=8, alpha=16.0),
    "adalora": dict(init_r=12, target_r=8),
    "prefix": dict(num_virtual_tokens=16, reparam_hidden=512),
    "ptuning": dict(num_virtual_tokens=16),
    "prompt": dict(num_virtual_tokens=16),
}


class RssSampler:
    """Peak resident set size (bytes) of this process, sampled in a thread."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        self.peak = self.rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def load_model(name: str, device):
    import torch

    if name == "tiny":
        from kvlab import ModelConfig, Transformer
        from kvlab.io.tokenizer import ByteTokenizer

        torch.manual_seed(0)
        model = Transformer(ModelConfig.from_preset("tiny", d_model=256, n_head=4, d_ff=512))
        model.tokenizer = ByteTokenizer()
        return model.to(device)
    from kvlab.io import load

    return load(name, device=device)


def one(method: str, args) -> dict:
    import torch

    from kvlab.data.chat import ChatBatches
    from kvlab.data.instruct import make_tasks
    from kvlab.peft import AdapterSpec, attach, parameter_count
    from kvlab.peft.nf4 import weight_memory
    from kvlab.recipes.finetune import peak_memory_bytes
    from kvlab.training import IGNORE_INDEX, make_optimizer, trainable_parameters

    device = torch.device(args.device)
    model = load_model(args.model, device)
    tok = model.tokenizer
    row = {"method": method}
    if method == "full":
        params = trainable_parameters(model, "all")
        hooks = None
    else:
        spec = AdapterSpec(method, dict(OPTIONS[method],
                                        **({"total_steps": args.steps + 1} if method == "adalora" else {})))
        attached = attach(model, spec)
        hooks = attached.allocator
        params = trainable_parameters(model, "adapter")
        row["trainable_closed_form"] = parameter_count(model.cfg, spec)
    row["trainable"] = sum(p.numel() for _, p in params)
    row["total_parameters"] = sum(p.numel() for p in model.parameters())
    row["linear_weight_bytes"] = weight_memory(model)["linear_weight_bytes"]
    optimizer = make_optimizer(params, argparse.Namespace(weight_decay=0.0, lr=1e-4))
    batches = ChatBatches(make_tasks(512), tok, args.seq_len, args.batch_size)
    model.train()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else None

    def step(i):
        x, y = (t.to(device) for t in batches.batch(i))
        if autocast is not None:
            with autocast:
                logits = model(x)
        else:
            logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX)
        if hooks is not None:
            loss = loss + hooks.regularizer()
        loss.backward()
        optimizer.step()
        if hooks is not None:
            hooks.after_step(i + 1)
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    step(0)                                          # warm-up: allocations, optimizer state
    row["optimizer_state_bytes"] = sum(t.numel() * t.element_size() for s in optimizer.state.values()
                                       for t in s.values() if isinstance(t, torch.Tensor))
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with RssSampler() as rss:
        base_rss = rss.peak
        for i in range(1, args.steps + 1):
            t = time.perf_counter()
            step(i)
            times.append(time.perf_counter() - t)
    row["peak_memory_bytes"] = peak_memory_bytes(device) if device.type == "cuda" else rss.peak - base_rss
    row["peak_memory_kind"] = "cuda max allocated" if device.type == "cuda" else "RSS growth during steps"
    row["step_seconds"] = statistics.median(times)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="a checkpoint or built-in name, or 'tiny'")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "finetune_methods.json"))
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args)))
        return
    rows = []
    for method in args.methods.split(","):
        cmd = [sys.executable, __file__, "--one", method, "--model", args.model, "--steps", str(args.steps),
               "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--device", args.device]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"{method} failed:\n{done.stderr[-3000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    base = next((r for r in rows if r["method"] == "full"), None)
    if base:
        for r in rows:
            for k in ("trainable", "linear_weight_bytes", "peak_memory_bytes", "step_seconds"):
                r[f"{k}_vs_full"] = r[k] / base[k] if base[k] else None
    import torch

    result = {"command": " ".join(["python", "benchmarks/finetune_methods.py", *sys.argv[1:]]),
              "date": date.today().isoformat(), "machine": platform.processor() or platform.machine(),
              "cpu_count": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "model": args.model, "batch_size": args.batch_size, "seq_len": args.seq_len, "steps": args.steps,
              "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'method':8} {'trainable':>12} {'vs full':>8} {'block weights MB':>16} {'optim MB':>9} "
          f"{'peak MB':>9} {'step s':>8} {'vs full':>8}")
    for r in rows:
        print(f"{r['method']:8} {r['trainable']:12,} {r.get('trainable_vs_full') or 0:8.4f} "
              f"{r['linear_weight_bytes'] / 1e6:16.1f} {r['optimizer_state_bytes'] / 1e6:9.1f} "
              f"{r['peak_memory_bytes'] / 1e6:9.1f} {r['step_seconds']:8.3f} {r.get('step_seconds_vs_full') or 0:8.2f}")


if __name__ == "__main__":
    main()
