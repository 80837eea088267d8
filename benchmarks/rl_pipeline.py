"""The post-training pipeline on SmolLM2-135M: SFT with LoRA -> reward model -> DPO and GRPO, with
exact-match accuracy on held-out instruction tasks at each stage, and rollout throughput of the
original GQA-3 model against its MQA conversion at the same batch.

Stages (each from the merged SFT model, LoRA r 8 on q/k/v/o, the built-in tasks of `kvlab tasks`):

1. SFT on chat (``--sft-steps``), merged into the weights: the starting point of the rest;
2. a reward model (score head + LoRA, Bradley-Terry) on preference pairs; pairwise accuracy on
   held-out pairs;
3. DPO (beta 0.1) on the same pairs, the adapter-free SFT model as reference, and the same with
   RPO's NLL term on the chosen answers (``sft_weight=1``);
4. GRPO with the exact-match reward (``--grpo-prompts`` prompts x ``--generations`` per step).

Then rollouts: ``--rollout-batch`` task prompts, ``--rollout-tokens`` new tokens each (sampling,
no stop), generated with the KV cache by the GQA-3 model and by its MQA conversion (mean pooling;
its quality is not the point here), timed, with the KV cache's bytes.

    python benchmarks/rl_pipeline.py [--out benchmarks/results/rl_pipeline.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from kvlab.convert.heads import convert
from kvlab.data.chat import ChatBatches
from kvlab.data.instruct import make_preference_tasks, make_tasks
from kvlab.data.preferences import PreferenceBatches, encode_preference
from kvlab.eval.tasks import task_accuracy
from kvlab.inference.generation import generate
from kvlab.io import load, save_checkpoint
from kvlab.models.heads import add_score_head
from kvlab.peft import AdapterSpec
from kvlab.peft.lora import merge_and_unload
from kvlab.recipes.finetune import finetune
from kvlab.training import TrainConfig
from kvlab.training.preference import DPOLoss, Reference, RewardLoss
from kvlab.training.rl import ExactMatchReward, GRPOLoss, PromptBatches, prompts_from_conversations

LORA = AdapterSpec("lora", {"r": 8, "alpha": 16.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]})


def _cfg(out: Path, steps: int, batch: int, lr: float, seq_len: int = 64) -> TrainConfig:
    return TrainConfig(out_dir=str(out), max_steps=steps, batch_size=batch, seq_len=seq_len, lr=lr, warmup_steps=5,
                       weight_decay=0.0, eval_every=steps, save_every=steps, log_every=10, seed=0,
                       train_only="adapter")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--test", type=int, default=100)
    ap.add_argument("--sft-steps", type=int, default=80)
    ap.add_argument("--rm-steps", type=int, default=60)
    ap.add_argument("--dpo-steps", type=int, default=60)
    ap.add_argument("--grpo-steps", type=int, default=40)
    ap.add_argument("--grpo-prompts", type=int, default=4)
    ap.add_argument("--generations", type=int, default=8)
    ap.add_argument("--grpo-lr", type=float, default=1e-4)
    ap.add_argument("--grpo-iterations", type=int, default=1, help="GRPO's passes over each batch of rollouts")
    ap.add_argument("--grpo-mini-batches", type=int, default=1, help="GRPO's updates per pass")
    ap.add_argument("--sft-model", help="a merged SFT model saved by an earlier run (its work folder's sft-model): "
                    "skip the SFT stage and start the others from it")
    ap.add_argument("--stages", default="rm,dpo,rpo,grpo",
                    help="comma-separated stages after SFT to run (rm, dpo, rpo, grpo); the JSON at --out keeps "
                         "the stages not run")
    ap.add_argument("--rollout-batch", type=int, default=64)
    ap.add_argument("--rollout-tokens", type=int, default=128)
    ap.add_argument("--rollouts-only", action="store_true",
                    help="measure only the rollout throughput (on a quiet machine) and update --out's rollouts")
    ap.add_argument("--out", default="benchmarks/results/rl_pipeline.json")
    args = ap.parse_args()
    if args.rollouts_only:
        results = json.loads(Path(args.out).read_text()) if Path(args.out).is_file() else {}
        results["rollouts"] = rollouts(args)
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
        return

    work = Path(tempfile.mkdtemp(prefix="kvlab-rl-"))
    train_convs, test_convs = make_tasks(2000, 0), make_tasks(args.test, 1_000_003)
    train_prefs, test_prefs = make_preference_tasks(2000, 0), make_preference_tasks(args.test, 1_000_003)
    stages = set(args.stages.split(","))
    if not stages <= {"rm", "dpo", "rpo", "grpo"}:
        ap.error(f"--stages {args.stages}: choose from rm, dpo, rpo, grpo")
    results: dict = {"stages": {}}
    if args.sft_model and Path(args.out).is_file():
        results = json.loads(Path(args.out).read_text())

    def stage(name: str, summary: dict, seconds: float, **extra) -> None:
        row = {"seconds": round(seconds, 1), "first_loss": summary.get("first_loss"),
               "final_loss": summary.get("final_loss"), **extra}
        for k in ("accuracy_after", "pairwise_accuracy_before", "pairwise_accuracy_after"):
            if k in summary:
                row[k] = summary[k]["accuracy"]
        if "accuracy_after" in summary:
            row["per_task"] = summary["accuracy_after"]["per_task"]
        for k in ("first_reward", "final_reward", "rollout_tokens_per_s"):
            if k in summary:
                row[k] = summary[k]
        results["stages"][name] = row
        print(name, json.dumps(row), flush=True)

    base = load(args.model)
    tok = base.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    sft_model = Path(args.sft_model) if args.sft_model else work / "sft-model"
    if not args.sft_model:
        results["original_accuracy"] = task_accuracy(base, tok, test_convs)["accuracy"]
        t0 = time.perf_counter()
        s = finetune(base, tok, LORA, ChatBatches(train_convs, tok, 64, 16),
                     _cfg(work / "sft", args.sft_steps, 16, 2e-4), eval_conversations=test_convs, quiet=True)
        sft = merge_and_unload(base)
        sft.tokenizer = tok
        save_checkpoint(sft, sft_model)
        stage("sft", s, time.perf_counter() - t0)
    pairs = [encode_preference(tok, r) for r in train_prefs]

    if "rm" in stages:
        reward_model_stage(args, work, sft_model, tok, pad, pairs, test_prefs, stage)
    if "dpo" in stages:
        t0 = time.perf_counter()
        s = finetune(load(sft_model), tok, LORA, PreferenceBatches(pairs, pad, 64, 8),
                     _cfg(work / "dpo", args.dpo_steps, 8, 2e-4), objective=DPOLoss(Reference(), beta=0.1),
                     eval_conversations=test_convs, quiet=True)
        stage("dpo", s, time.perf_counter() - t0)
    if "rpo" in stages:
        t0 = time.perf_counter()        # DPO with RPO's NLL term on the chosen answers
        s = finetune(load(sft_model), tok, LORA, PreferenceBatches(pairs, pad, 64, 8),
                     _cfg(work / "dpo-rpo", args.dpo_steps, 8, 2e-4),
                     objective=DPOLoss(Reference(), beta=0.1, sft_weight=1.0), eval_conversations=test_convs,
                     quiet=True)
        stage("dpo + sft term (RPO, weight 1)", s, time.perf_counter() - t0)
    if "grpo" in stages:
        t0 = time.perf_counter()
        prompts, answers = prompts_from_conversations(tok, train_convs)
        stop = [t for t in {tok.eos_token_id, base.cfg.eos_token_id} if t is not None]
        objective = GRPOLoss(ExactMatchReward(tok, answers, stop), num_generations=args.generations,
                             max_new_tokens=12, temperature=1.0, stop_tokens=stop, pad_id=pad, seed=0,
                             num_iterations=args.grpo_iterations, mini_batches=args.grpo_mini_batches)
        s = finetune(load(sft_model), tok, LORA, PromptBatches(prompts, pad, args.grpo_prompts),
                     _cfg(work / "grpo", args.grpo_steps, args.grpo_prompts, args.grpo_lr), objective=objective,
                     eval_conversations=test_convs, quiet=True)
        reuse = (args.grpo_iterations, args.grpo_mini_batches)
        default = (args.grpo_steps, args.grpo_prompts, args.generations, args.grpo_lr, *reuse) == (40, 4, 8, 1e-4, 1, 1)
        name = "grpo" if default else (f"grpo {args.grpo_steps} steps x {args.grpo_prompts} prompts x "
                                       f"{args.generations}, lr {args.grpo_lr:g}"
                                       + (f", {reuse[0]} passes x {reuse[1]} updates" if reuse != (1, 1) else ""))
        stage(name, s, time.perf_counter() - t0, steps=args.grpo_steps, prompts=args.grpo_prompts,
              generations=args.generations, lr=args.grpo_lr, iterations=reuse[0], mini_batches=reuse[1],
              date=time.strftime("%Y-%m-%d"), threads=torch.get_num_threads())

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    if args.sft_model:      # a partial run: its rows say their own settings; the full run's meta stays
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
        return
    results["rollouts"] = rollouts(args)
    results["meta"] = {k: v for k, v in vars(args).items()} | {
        "torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


def reward_model_stage(args, work, sft_model, tok, pad, pairs, test_prefs, stage) -> None:
    t0 = time.perf_counter()
    rm = add_score_head(load(sft_model), seed=0)
    held = PreferenceBatches([encode_preference(tok, r) for r in test_prefs], pad, 64, 16)
    s = finetune(rm, tok, LORA, PreferenceBatches(pairs, pad, 64, 16), _cfg(work / "rm", args.rm_steps, 16, 1e-3),
                 objective=RewardLoss(), eval_pairs=held, quiet=True)
    stage("reward model", s, time.perf_counter() - t0)


def rollouts(args) -> dict:
    """The same task prompts and batch through GQA-3 and its MQA conversion, each in a process of
    its own: new tokens per second (best of two), the KV cache's bytes, and the process's peak
    resident memory while generating (Linux: the peak is reset after loading, /proc/self/clear_refs)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    rows = []
    for name, kv_heads in (("GQA-3 (original)", None), ("MQA (converted)", 1)):
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            rows.append(pool.submit(_rollout_row, name, kv_heads, args.model, args.rollout_batch,
                                    args.rollout_tokens, torch.get_num_threads()).result())
        print(json.dumps(rows[-1]), flush=True)
    return {"batch": args.rollout_batch, "new_tokens": args.rollout_tokens, "threads": torch.get_num_threads(),
            "rows": rows}


def _proc_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _rollout_row(name: str, kv_heads: int | None, source: str, batch: int, new_tokens: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    model = load(source).eval()
    tok = model.tokenizer
    if kv_heads is not None:
        model = convert(model, n_kv_head=kv_heads)
    prompts = [tok.apply_chat_template(c[:-1], add_generation_prompt=True) for c in make_tasks(batch, 0)]
    cache_bytes = model.new_cache(batch, max(map(len, prompts)) + new_tokens).nbytes
    # What loading and converting freed goes back to the system first, so that the allocator cannot
    # serve the rollouts from it and hide their memory (glibc: malloc_trim).
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    loaded = _proc_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")          # reset the peak (VmHWM) to the current RSS
    times = []
    for rep in range(2):
        t = time.perf_counter()
        generate(model, prompts, new_tokens, temperature=1.0, seed=rep, stop_tokens=[])
        times.append(time.perf_counter() - t)
    peak = _proc_kib("VmHWM")
    return {"model": name, "kv_bytes_per_token": model.cfg.kv_bytes_per_token("fp32"), "kv_cache_bytes": cache_bytes,
            "seconds": min(times), "tokens_per_s": batch * new_tokens / min(times),
            "rss_after_load_bytes": loaded * 1024, "peak_rss_bytes": peak * 1024,
            "generation_peak_over_load_bytes": (peak - loaded) * 1024}


if __name__ == "__main__":
    main()
