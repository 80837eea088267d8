"""``kvlab export``: a model as a HF or kvlab checkpoint, or as a GGUF file for llama.cpp."""

from __future__ import annotations

import argparse

from kvlab.cli.common import UsageError, add_overwrite, load_model, model_args
from kvlab.io import save_checkpoint


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="write a model as a HF or kvlab checkpoint, or a GGUF file",
                       description="Export to HF transformers (LlamaForCausalLM; Qwen2/Mistral when biases or "
                                   "a sliding window need it; *ForSequenceClassification for a reward model), "
                                   "to the kvlab format, or to one GGUF file that llama.cpp and Ollama run "
                                   "(GQA/MQA models as the llama architecture, MLA models as deepseek2; a "
                                   "byte-level BPE tokenizer).")
    model_args(p)
    p.add_argument("--format", choices=["hf", "kvlab", "gguf"], default="hf")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="hf/kvlab: dtype of the written weights")
    p.add_argument("--gguf-type", choices=["f32", "f16", "q8_0"],
                   help="gguf: type of the matrices (default f16; norms and biases stay f32, as in llama.cpp)")
    p.add_argument("-o", "--output", required=True, metavar="PATH", help="a directory (hf, kvlab) or a file (gguf)")
    add_overwrite(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kvlab.dtypes import parse_dtype
    from kvlab.io import load_config
    from kvlab.io.atomic import check_output, refuse_output_over_input
    from kvlab.io.hf import config_to_hf, export_hf

    if args.format == "gguf":
        return _gguf(args)
    if args.gguf_type:
        raise UsageError(f"kvlab export: --gguf-type is for --format gguf, not {args.format}; use --dtype")
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


def _gguf(args: argparse.Namespace) -> int:
    from pathlib import Path

    from kvlab.io import load_config
    from kvlab.io.atomic import refuse_output_over_input
    from kvlab.io.gguf_export import check_gguf_exportable, check_gguf_target, export_gguf, gguf_notes

    if args.dtype:
        raise UsageError("kvlab export: --dtype is for hf and kvlab; a GGUF file's type is --gguf-type f32|f16|q8_0")
    check_gguf_target(Path(args.output))                           # before any work
    refuse_output_over_input(args.output, [args.model])
    check_gguf_exportable(load_config(args.model))                 # before loading any weights
    model = load_model(args)
    path = export_gguf(model, args.output, gguf_type=args.gguf_type or "f16")
    print(f"wrote GGUF file {path} ({args.gguf_type or 'f16'})")
    for note in gguf_notes(model.cfg):
        print(f"note: {note}")
    return 0
