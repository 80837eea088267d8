"""``kvlab shrink``: a KV cache N× smaller that keeps the model's quality, within a budget."""

from __future__ import annotations

import argparse
import re
import sys

from kvlab.cli.common import add_overwrite, device_arg, number_list, seed_arg


def add_parser(sub) -> None:
    p = sub.add_parser("shrink", help="a KV cache N times smaller that keeps quality (convert, recover, evaluate)",
                       description="Enumerate the caches that meet a KV budget (fewer KV heads, cross-layer sharing, "
                                   "MLA and low-rank latents, each in the model's precision or quantized, and the "
                                   "original quantized), rank them at alpha=0 on calibration data and by decode "
                                   "speed against the original, recover "
                                   "the best with attention transfer and/or distillation from the original, evaluate "
                                   "on held-out "
                                   "text and chat prompts, and write the chosen model with a report.")
    p.add_argument("model", metavar="MODEL",
                   help="a kvlab or HF checkpoint directory, a .gguf file, or a built-in name")
    p.add_argument("--kv", default="2x", metavar="2x|3x|6x|BYTES",
                   help="the KV budget: a reduction factor or bytes per token in bf16 (default 2x)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--minutes", type=float, metavar="M",
                        help="wall time for the whole run (default 15; recovery gets what loading, ranking and "
                             "evaluation leave)")
    budget.add_argument("--tokens", type=int, metavar="N", help="training tokens over all recovered candidates")
    p.add_argument("--candidates", type=int, default=1, metavar="K",
                   help="how many top-ranked wirings to recover (default 1; each gets an equal share of the time)")
    p.add_argument("--kd-lr", type=float, default=3e-5, metavar="LR",
                   help="distillation's peak learning rate (default 3e-5: the converted model starts close to the "
                        "original, and larger rates undo that in the first steps)")
    p.add_argument("--train", choices=["attention", "all", "lora"], default="attention",
                   help="what distillation trains: the attention, all weights, or the attention plus LoRA on "
                        "the MLPs, merged at the end (attention transfer always trains the attention)")
    p.add_argument("--lora-rank", type=int, default=16, metavar="R", help="--train lora: the adapters' rank")
    p.add_argument("--data", default="builtin", metavar="SPEC",
                   help="the run's text: builtin (the built-in train split, ~270k tokens), library (the "
                        "docstrings of kvlab's dependencies too, ~3.8M tokens), generated (text the original "
                        "model samples: its own distribution, what distillation matches), mixed (builtin and "
                        "generated), or your own: a text file, a directory, a glob, a .jsonl of {\"text\": ...} or "
                        "chat {\"messages\": [...]} records (rendered in the model's chat format); or a weighted "
                        "mix such as notes/:0.7,builtin:0.3. A held-out split of your text is kept for the final "
                        "scores; calibration, ranking and training read the rest")
    p.add_argument("--generated-tokens", type=int, default=65536, metavar="N",
                   help="--data with generated text: tokens to sample (default 65536)")
    # The default is kvlab.recipes.shrink.config.PRECISION_NAMES (a test keeps them equal), written out so
    # that building the parser imports no model code.
    p.add_argument("--precisions", default="none,fp8,int8,int8/int4,int4,int8/int4-h,int4-h,by-layer", metavar="LIST",
                   help="cache precisions to consider, alone and composed with every structure (default "
                        "none,fp8,int8,int8/int4,int4,int8/int4-h,int4-h,by-layer; none: the model's own; "
                        "int8/int4: int8 keys, int4 values; -h: rotated before rounding (the same bytes, less error; "
                        "where the target stores it, the plain twin is left out); by-layer: the original structure "
                        "with a key and a value format per layer, allocated by the loss within the budget)")
    p.add_argument("--context", type=int, metavar="N",
                   help="the context decode speed is measured at (default: the model's trained context, at most "
                        "4096)")
    p.add_argument("--target", choices=["kvlab", "transformers", "vllm", "llama.cpp"], default="kvlab",
                   help="the runtime the model is for: only the caches it executes natively are considered, and "
                        "the chosen model is also written in its format (transformers/vllm: an HF directory in "
                        "OUT/hf; llama.cpp: OUT/model.gguf), with its serve command in the report (default kvlab: "
                        "everything kvlab runs)")
    p.add_argument("--no-balance-keys", dest="balance_keys", action="store_false",
                   help="store quantized keys as projected (by default, for --target kvlab, they are stored centred "
                        "and balanced against the queries: the same outputs, less rounding error)")
    p.add_argument("--allow-slower", action="store_true",
                   help="accept a candidate that decodes slower than the original (by default it is passed over)")
    p.add_argument("--calibration-tokens", type=int, default=8192, metavar="N")
    p.add_argument("--refit", action="store_true",
                   help="refit each recovered candidate's output projections in closed form after converting it "
                        "(a much better start, about a minute on SmolLM2 on 2 cores; after recovery training the "
                        "gain measured so far is small)")
    p.add_argument("--eval-tokens", type=int, default=8192, metavar="N",
                   help="validation tokens scored per model (0: the whole split)")
    p.add_argument("--offdomain-tokens", type=int, default=1024, metavar="N",
                   help="tokens of each off-domain set every recovered model is compared with the original on (0: "
                        "none)")
    p.add_argument("--passkey-lengths", type=number_list(int, "token counts"), default=(1024, 2048), metavar="N,...",
                   help="passkey retrieval at these prompt lengths, depths 0.1, 0.5, 0.9 (an empty string: none)")
    p.add_argument("--task-items", type=int, default=32, metavar="N",
                   help="items of the next-line and recall tasks scored per model (0: none)")
    p.add_argument("--device", default="cpu", type=device_arg, help="cpu (default), cuda, cuda:N or mps")
    p.add_argument("--seed", type=seed_arg, default=0)
    p.add_argument("-o", "--out", metavar="DIR", help="output directory (default: shrink-MODEL-KV, new or empty)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    add_overwrite(p, run=True)
    p.add_argument("--quick", action="store_true", help="a tiny smoke run (seconds): for tests, not for results")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kvlab.cli.common import UsageError
    from kvlab.recipes.shrink import ShrinkConfig, run_shrink

    if args.tokens is not None and args.tokens < 0:
        raise UsageError(f"kvlab shrink: --tokens {args.tokens} must be >= 0")
    common = dict(kv=args.kv, candidates=args.candidates, train=args.train, device=args.device, seed=args.seed,
                  kd_lr=args.kd_lr,
                  data=args.data, generated_tokens=args.generated_tokens, lora_rank=args.lora_rank,
                  refit=args.refit, precisions=tuple(p.strip() for p in args.precisions.split(",")),
                  context=args.context, allow_slower=args.allow_slower, target=args.target,
                  balance_keys=args.balance_keys)
    if args.quick:
        scfg = ShrinkConfig.quick(**common, **({"tokens": args.tokens} if args.tokens is not None else {}))
    else:
        budget = {"tokens": args.tokens, "minutes": None} if args.tokens is not None else {
            "minutes": args.minutes if args.minutes is not None else 15.0}
        scfg = ShrinkConfig(**common, **budget, calibration_tokens=args.calibration_tokens,
                            eval_tokens=args.eval_tokens or None, offdomain_tokens=args.offdomain_tokens,
                            passkey_lengths=args.passkey_lengths, task_items=args.task_items)
    out = args.out or "shrink-" + re.sub(r"[^A-Za-z0-9.]+", "-", f"{args.model}-{args.kv}").strip("-")
    from kvlab.io.atomic import refuse_output_over_input

    refuse_output_over_input(out, [args.model])
    run_shrink(args.model, out, scfg, resume=args.resume, overwrite=args.overwrite,
               log=lambda line: print(line, file=sys.stderr, flush=True))
    return 0
