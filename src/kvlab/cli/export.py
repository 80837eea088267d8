"""``kvlab export``: a model as a HF or kvlab checkpoint."""

from __future__ import annotations

import argparse

from kvlab.cli.common import add_overwrite, load_model, model_args
from kvlab.io import save_checkpoint


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="write a model as a HF or kvlab checkpoint",
                       description="Export to HF transformers (LlamaForCausalLM; Qwen2/Mistral when biases or "
                                   "a sliding window need it) or to the kvlab format.")
    model_args(p)
    p.add_argument("--format", choices=["hf", "kvlab"], default="hf")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="dtype of the written weights")
    p.add_argument("-o", "--output", required=True, metavar="DIR")
    add_overwrite(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kvlab.dtypes import parse_dtype
    from kvlab.io import load_config
    from kvlab.io.atomic import check_output, refuse_output_over_input
    from kvlab.io.hf import config_to_hf, export_hf

    check_output(args.output, f"{args.format}-checkpoint", overwrite=args.overwrite)     # before any work
    refuse_output_over_input(args.output, [args.model])
    if args.format == "hf":  # fail on an unexportable architecture before loading any weights
        config_to_hf(load_config(args.model), parse_dtype(args.dtype or "fp32"))
    model = load_model(args)
    if args.format == "hf":
        export_hf(model, args.output, dtype=parse_dtype(args.dtype) if args.dtype else None,
                  overwrite=args.overwrite)
    else:
        if args.dtype:
            model = model.to(parse_dtype(args.dtype))
        save_checkpoint(model, args.output, overwrite=args.overwrite)
    print(f"wrote {args.format} checkpoint {args.output}")
    return 0
