"""``kvlab study``: the papers' KV-cache study (:mod:`kvlab.study`)."""

from __future__ import annotations

import argparse
import sys

from kvlab.cli.common import add_overwrite, device_arg, make_console, number_list, seed_arg


def add_parser(sub) -> None:
    p = sub.add_parser("study", help="the KV-cache study: pretrain, convert, uptrain, compare (the papers' "
                                     "reproduction)",
                       description="Pretrain a small MHA model on the built-in corpus, convert it to GQA/MQA/CLA2/"
                                   "MQA-CLA2 (mean; MQA also first/random), evaluate at alpha=0 and after "
                                   "uptraining, train every variant from scratch, and measure perplexity, KV "
                                   "bytes, max batch and decode speed. With --model: conversions and uptraining "
                                   "of that checkpoint. Writes results.json, report.md and plots. Defaults take "
                                   "about 15 minutes on 2 CPU cores; --quick about 2.")
    p.add_argument("--model", help="study this checkpoint or built-in model (e.g. smollm2-135m) instead of "
                                   "pretraining one")
    p.add_argument("--quick", action="store_true", help="tiny sizes and budgets (every step, a few minutes)")
    p.add_argument("--out", dest="out_dir", metavar="DIR", help="output directory (default runs/study-<time>)")
    p.add_argument("--replot", metavar="DIR", help="only rewrite the plots and report.md of a finished study")
    add_overwrite(p, run=True)
    g = p.add_argument_group("the pretrained model (without --model)")
    for flag in ("d-model", "n-layer", "n-head", "d-ff"):
        g.add_argument(f"--{flag}", type=int)
    g.add_argument("--pretrain-tokens", type=int, help="P: the pretraining and from-scratch budget")
    g.add_argument("--lr", type=float, help="peak learning rate of pretraining (default 3e-3)")
    g.add_argument("--gqa-heads", type=number_list(int, "head counts"), help="GQA targets, e.g. 4,2")
    g.add_argument("--alphas", type=number_list(float, "fractions"), help="uptraining budgets, fractions of P "
                                                                       "(default 0.05)")
    g.add_argument("--mqa-alphas", type=number_list(float, "fractions"), help="MQA's budgets (default 0.05,0.1)")
    g.add_argument("--no-from-scratch", dest="from_scratch", action="store_false", default=None,
                   help="skip step 3 (training every variant from scratch)")
    g.add_argument("--variants", type=number_list(str, "names"),
                   help="attention kinds and blocks to train from scratch too: alibi, window, window-sinks, "
                        "block-sparse, compressed, linear, linear-hybrid, mla, parallel (comma-separated)")
    g = p.add_argument_group("uptraining and measurement")
    g.add_argument("--uptrain-tokens", type=number_list(int, "token counts"),
                   help="with --model: uptraining budgets in tokens (default 4096)")
    g.add_argument("--uptrain-lr", type=float, help="peak lr of uptraining (default: --lr / 3, or 1e-4 with --model)")
    g.add_argument("--ablation-uptrain", action="store_true", default=None,
                   help="uptrain the MQA first/random conversions too (default without --model)")
    g.add_argument("--seq-len", type=int)
    g.add_argument("--batch-size", type=int)
    g.add_argument("--eval-tokens", type=int, help="validation tokens scored per model")
    g.add_argument("--decode-batch", type=int)
    g.add_argument("--decode-context", type=int)
    g.add_argument("--decode-steps", type=int)
    g.add_argument("--plan-memory", help="memory budget of the max-batch column (default 24GiB)")
    g.add_argument("--plan-context", type=int, help="context of the max-batch column (default 8192)")
    p.add_argument("--device", type=device_arg, help="cpu (default), cuda or cuda:N")
    p.add_argument("--seed", type=seed_arg)
    p.add_argument("--seeds", type=int, metavar="N",
                   help="repeat every training run with N seeds (--seed, --seed+1, ...): mean ± std in the report, "
                        "error bars in the plots (default 1)")
    p.add_argument("--match-params", choices=["ffn", "width"],
                   help="train the from-scratch variants with MHA's parameter count: widen the MLP (ffn) or d_model "
                        "(width), as Falcon and ChatGLM2 did for MQA")
    p.add_argument("--keep-checkpoints", action="store_true", default=None,
                   help="keep every run's final checkpoint (default: only the pretrained model)")
    p.add_argument("--verbose", action="store_true", default=None, help="training progress lines")
    p.add_argument("--cache-dir", help="where tokenized data is cached")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from kvlab.study.protocol import StudyConfig, run_study
    from kvlab.study.report import table_rows

    if args.replot:
        from kvlab.study.report import rerender

        results = rerender(args.replot)
    else:
        given = {f.name: getattr(args, f.name) for f in fields(StudyConfig)
                 if getattr(args, f.name, None) is not None}
        cfg = StudyConfig.make(quick=args.quick, **given)
        results = run_study(cfg, log=lambda line: print(line, file=sys.stderr, flush=True), overwrite=args.overwrite)
    from rich.table import Table

    head, rows = table_rows(results)
    table = Table(title=f"kvlab study ({results['meta']['seconds']:,.0f} s)")
    for i, col in enumerate(head):
        table.add_column(col, justify="left" if i < 4 else "right")
    for r in rows:
        table.add_row(*r)
    console = make_console()
    console.print(table)
    out = results["meta"]["out_dir"]
    console.print(f"report: {out}/report.md   plots: {out}/pareto.png, {out}/uptraining.png, "
                  f"{out}/loss_curves.png   data: {out}/results.json")
    return 0
