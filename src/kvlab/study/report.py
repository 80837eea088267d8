"""What ``kvlab study`` writes: the Pareto frontier, the plots and ``report.md``."""

from __future__ import annotations

import json
import math
from pathlib import Path

from kvlab.study.results import Entry

ORIGIN_MARKERS = {"pretrained": "*", "loaded": "*", "converted": "x", "uptrained": "o", "continued": "^",
                  "from scratch": "s"}
METHOD_STYLES = {"mean": "-", "first": "--", "random": ":"}


def mark_pareto(entries) -> None:
    """Set ``pareto`` on the models no other model beats on both KV bytes per token and perplexity."""
    for e in entries:
        e.pareto = not any(o is not e and o.kv_bytes_per_token <= e.kv_bytes_per_token and o.val_ppl <= e.val_ppl
                           and (o.kv_bytes_per_token < e.kv_bytes_per_token or o.val_ppl < e.val_ppl)
                           for o in entries)


def _budget(e) -> str:
    if e.alpha is not None:
        return f"α={e.alpha:.0%}" if e.alpha else "α=0"
    return (f"{e.uptrain_tokens:,} tok" if e.origin in ("uptrained", "continued")
            else ("0 tok" if e.origin == "converted" else ""))


def _how(e) -> str:
    return e.origin + (f" ({e.method})" if e.method else "") + (f", params matched ({e.matched})" if e.matched else "")


def _ppl_cell(e) -> str:
    """Perplexity, with ± the standard deviation over seeds when there are several."""
    return _fmt_ppl(e.val_ppl) + (f" ± {_fmt_ppl(e.val_ppl_std)}" if e.n_seeds > 1 else "")


def _variant_colors(entries) -> dict:
    import matplotlib

    order = sorted({e.variant for e in entries}, key=lambda v: -max(x.kv_bytes_per_token for x in entries
                                                                    if x.variant == v))
    cmap = matplotlib.colormaps["tab10"]
    return {v: cmap(i % 10) for i, v in enumerate(order)}


def write_plots(entries, out: Path, meta: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    colors = _variant_colors(entries)
    title = "kvlab study" + (f": {meta['config']['model']}" if meta["config"].get("model") else "")

    # pareto.png: perplexity against KV bytes per token, both log scale.
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for e in entries:
        ax.scatter(e.kv_bytes_per_token, e.val_ppl, marker=ORIGIN_MARKERS[e.origin], s=90 if e.origin in (
            "pretrained", "loaded") else 45, color=colors[e.variant], zorder=3)
        if e.n_seeds > 1:                        # ± one standard deviation over the seeds
            ax.errorbar(e.kv_bytes_per_token, e.val_ppl, yerr=e.val_ppl_std, color=colors[e.variant], capsize=3,
                        lw=1, zorder=3)
    front = sorted((e for e in entries if e.pareto), key=lambda e: e.kv_bytes_per_token)
    if front:
        xs, ys = [], []
        for e in front:                          # a staircase: best perplexity reachable at each KV size
            if xs:
                xs.append(e.kv_bytes_per_token)
                ys.append(ys[-1])
            xs.append(e.kv_bytes_per_token)
            ys.append(e.val_ppl)
        ax.plot(xs, ys, color="black", lw=1.2, alpha=0.6, zorder=2, label="Pareto frontier")
        for e in front:
            ax.annotate(f"{e.variant} {_budget(e) or e.origin}", (e.kv_bytes_per_token, e.val_ppl), fontsize=7,
                        xytext=(4, 4), textcoords="offset points")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("KV cache bytes per token (bf16, log scale)")
    ax.set_ylabel("validation perplexity (log scale)")
    ax.set_title(title + ": quality vs KV cache size")
    handles = [Line2D([], [], marker=m, ls="", color="gray", label=o) for o, m in ORIGIN_MARKERS.items()
               if any(e.origin == o for e in entries)]
    handles += [Line2D([], [], marker="o", ls="", color=c, label=v) for v, c in colors.items()]
    handles.append(Line2D([], [], color="black", alpha=0.6, label="Pareto frontier"))
    ax.legend(handles=handles, fontsize=8, loc="upper right", ncol=2)
    ax.grid(True, which="both", alpha=0.25)
    fig.tight_layout()
    fig.savefig(out / "pareto.png", dpi=120)
    plt.close(fig)

    # uptraining.png: perplexity against the uptraining budget, one line per conversion.
    fig, ax = plt.subplots(figsize=(8, 5.5))
    by_alpha = meta["config"].get("model") is None
    base = next((e for e in entries if e.origin in ("pretrained", "loaded")), None)
    for (variant, method) in sorted({(e.variant, e.method) for e in entries if e.method}):
        pts = sorted(((e.alpha if by_alpha else e.uptrain_tokens), e.val_ppl, e.val_ppl_std) for e in entries
                     if e.variant == variant and e.method == method)
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts],
                    fmt=METHOD_STYLES.get(method, "-"), marker="o", capsize=3, color=colors[variant],
                    label=f"{variant} ({method})")
    if base is not None:                         # the control: no conversion, same training tokens
        pts = sorted([(0.0 if by_alpha else 0, base.val_ppl)]
                     + [((e.alpha if by_alpha else e.uptrain_tokens), e.val_ppl)
                        for e in entries if e.origin == "continued"])
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "--", marker="^", color="black", lw=1,
                label=f"{base.variant} not converted (control)")
    ax.set_yscale("log")
    ax.set_xlabel("uptraining budget α (fraction of pretraining tokens)" if by_alpha else "uptraining tokens")
    ax.set_ylabel("validation perplexity (log scale)")
    ax.set_title(title + ": recovery by uptraining")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.25)
    fig.tight_layout()
    fig.savefig(out / "uptraining.png", dpi=120)
    plt.close(fig)

    # loss_curves.png: training (and validation) loss of every training run.
    runs = [(e, _read_metrics(out / e.metrics)) for e in entries if e.metrics]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, origins, name in ((axes[0], ("pretrained", "from scratch"), "pretraining / from scratch"),
                              (axes[1], ("uptrained",), "uptraining")):
        for e, rows in runs:
            if e.origin not in origins and not (e.origin == "continued" and "uptrained" in origins):
                continue
            label = f"{e.variant}" + (f" ({e.method or 'control'}, {_budget(e)})"
                                      if e.origin in ("uptrained", "continued")
                                      else f" {e.origin}")
            line, = ax.plot([r["tokens"] for r in rows], [r["loss"] for r in rows], lw=1, alpha=0.8,
                            color=colors[e.variant], ls=METHOD_STYLES.get(e.method or "mean", "-"), label=label)
            val = [(r["tokens"], r["val_loss"]) for r in rows if "val_loss" in r]
            if val:
                ax.plot(*zip(*val), "o", ms=3, color=line.get_color())
        ax.set_xlabel("training tokens")
        ax.set_ylabel("loss (nats/token; dots: validation)")
        ax.set_title(name)
        ax.grid(True, alpha=0.25)
        if ax.lines:
            ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=110)
    plt.close(fig)


def _read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _fmt_ppl(x: float) -> str:
    return f"{x:,.0f}" if x >= 1000 else f"{x:,.2f}" if x >= 10 else f"{x:.3f}"


def table_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    """The summary table (report.md and the console print the same rows)."""
    m = results["meta"]
    head = ["model", "variant", "how", "budget", "KV B/token", "val ppl", "bits/byte",
            f"max batch ({m['plan']['memory']} @ {m['plan']['context']:,})",
            f"decode tok/s (B{m['decode']['batch']} @ {m['decode']['context']:,})", "Pareto"]
    rows = []
    for e in results["models"]:
        e = _entry(e)
        rows.append([e.name, e.variant, _how(e), _budget(e), f"{e.kv_bytes_per_token:,}", _ppl_cell(e),
                     f"{e.val_bits_per_byte:.3f}", f"{e.max_batch:,}", f"{e.decode_tokens_per_s:,.0f}",
                     "yes" if e.pareto else ""])
    return head, rows


def _entry(d: dict):
    """A results.json model row as the :class:`kvlab.study.protocol.Entry` it was written from."""
    return Entry(**d)


def _md_table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _change(a: float, b: float) -> str:
    """``a`` relative to ``b``: a percentage when close, a factor when far apart."""
    r = a / b
    return f"{r - 1:+.1%}" if 0.5 <= r <= 2 else f"{r:.1f}×"


def reading(results: dict) -> list[str]:
    """Sentences computed from the numbers: the questions the study exists to answer."""
    models = [_entry(e) for e in results["models"]]
    base = next((e for e in models if e.origin in ("pretrained", "loaded")), None)
    if base is None:
        return []
    out = []
    budget_key = lambda e: (e.alpha or 0.0, e.uptrain_tokens)              # noqa: E731

    # 1. Conversion methods for MQA (mean / first / random), at α = 0 and after each budget.
    mqa = [e for e in models if e.method and e.n_kv_head == 1 and e.n_kv_layers == base.n_kv_layers]
    for key in sorted({budget_key(e) for e in mqa}):
        pts = {e.method: e for e in mqa if budget_key(e) == key}
        if len(pts) > 1:
            best = min(pts, key=lambda k: pts[k].val_ppl)
            out.append(f"MQA conversion at {_budget(next(iter(pts.values())))}: "
                       + ", ".join(f"{k} {_fmt_ppl(e.val_ppl)}" for k, e in pts.items()) + f" — {best} is best"
                       + (" (as in the GQA paper)." if best == "mean" else " (the GQA paper found mean best)."))

    # 2. Recovery by uptraining (mean conversions), against the control and the from-scratch model.
    for v in sorted({e.variant for e in models if e.method == "mean"},
                    key=lambda v: -next(e for e in models if e.variant == v).kv_bytes_per_token):
        conv = sorted((e for e in models if e.variant == v and e.method == "mean"), key=budget_key)
        if len(conv) < 2:
            continue
        first, last = conv[0], conv[-1]
        gap = math.log(first.val_ppl / base.val_ppl)
        closed = math.log(first.val_ppl / last.val_ppl) / gap if gap > 0 else float("nan")
        if gap <= 0:                             # the conversion lost nothing: there is no gap to close
            outcome = f"the conversion already matched the {base.origin} {base.variant} ({_fmt_ppl(base.val_ppl)})"
        elif closed >= 0:
            outcome = (f"{closed:.0%} of the log-perplexity gap to the {base.origin} {base.variant} "
                       f"({_fmt_ppl(base.val_ppl)}) closed")
        else:
            outcome = "worse than before uptraining"
        text = (f"{v} (mean): perplexity {_fmt_ppl(first.val_ppl)} at {_budget(first)} → "
                f"{_fmt_ppl(last.val_ppl)} after {_budget(last)}, {outcome}")
        control = [e for e in models if e.origin == "continued" and e.uptrain_tokens == last.uptrain_tokens]
        if control:
            text += (f"; the unconverted model trained on the same tokens reaches {_fmt_ppl(control[0].val_ppl)} "
                     f"(the conversion: {_change(last.val_ppl, control[0].val_ppl)})")
        scratch = [e for e in models if e.variant == v and e.origin == "from scratch"]
        if scratch:
            text += (f"; trained from scratch on the full budget: {_fmt_ppl(scratch[0].val_ppl)} (uptrained: "
                     f"{_change(last.val_ppl, scratch[0].val_ppl)})")
        out.append(text + ".")

    # 3. Same KV size, different wiring; CLA against the next larger non-CLA cache. Compared among
    # fully trained models: from scratch (pretraining path), else the largest uptraining budget.
    if any(e.origin == "from scratch" for e in models):
        final, how = [e for e in models if e.origin in ("pretrained", "from scratch")], "trained from scratch"
    else:
        top = max((e.uptrain_tokens for e in models), default=0)
        final = [e for e in models if e.uptrain_tokens == top and e.method in (None, "mean")
                 and e.origin in ("uptrained", "continued")]
        how = f"after {top:,} tokens of uptraining"
    sizes: dict[int, list] = {}
    for e in final:
        sizes.setdefault(e.kv_bytes_per_token, []).append(e)
    for size, group in sorted(sizes.items(), reverse=True):
        if len({e.variant for e in group}) > 1:
            out.append(f"Same KV size ({size:,} B/token), {how}: " + ", ".join(
                f"{e.variant} {_fmt_ppl(e.val_ppl)}" for e in sorted(group, key=lambda e: e.val_ppl)) + ".")
    for e in sorted(final, key=lambda e: -e.kv_bytes_per_token):
        bigger = [o for o in final if o.kv_bytes_per_token > e.kv_bytes_per_token and "CLA" not in o.variant]
        if "CLA" in e.variant and bigger:
            o = min(bigger, key=lambda o: o.kv_bytes_per_token)
            out.append(f"{e.variant} stores {o.kv_bytes_per_token / e.kv_bytes_per_token:.0f}× less KV than "
                       f"{o.variant} ({how}): perplexity {_fmt_ppl(e.val_ppl)} vs {_fmt_ppl(o.val_ppl)} "
                       f"({_change(e.val_ppl, o.val_ppl)}); {'on' if e.pareto else 'off'} the Pareto frontier.")

    # 4. Other kinds and blocks trained from scratch, against the MHA model trained on the same
    # tokens: quality and training speed (the parallel block's claim is speed).
    if base.origin == "pretrained":
        for e in models:
            if e.origin != "from scratch" or not e.train_seconds or not base.train_seconds:
                continue
            speed, base_speed = e.train_tokens / e.train_seconds, base.train_tokens / base.train_seconds
            spread = (f" (± {_fmt_ppl(e.val_ppl_std)} and ± {_fmt_ppl(base.val_ppl_std)} over {e.n_seeds} seeds)"
                      if e.n_seeds > 1 else "")
            out.append(f"{e.variant} from scratch{', params matched (' + e.matched + ')' if e.matched else ''}: "
                       f"perplexity {_fmt_ppl(e.val_ppl)} vs {_fmt_ppl(base.val_ppl)} for {base.variant} "
                       f"({_change(e.val_ppl, base.val_ppl)}){spread}; {e.params:,} vs {base.params:,} parameters; "
                       f"training {speed:,.0f} vs {base_speed:,.0f} tokens/s ({speed / base_speed - 1:+.0%}).")

    # 5. Decode speed and capacity relative to the base model.
    fastest = max(models, key=lambda e: e.decode_tokens_per_s)
    d = results["meta"]["decode"]
    out.append(f"Decode at batch {d['batch']} with {d['context']:,} tokens cached: {base.variant} "
               f"{base.decode_tokens_per_s:,.0f} tok/s, fastest {fastest.variant} {fastest.decode_tokens_per_s:,.0f} "
               f"tok/s ({fastest.decode_tokens_per_s / base.decode_tokens_per_s:.2f}×) with "
               f"{base.kv_bytes_per_token / fastest.kv_bytes_per_token:.0f}× less KV per token and a "
               f"{fastest.max_batch / max(base.max_batch, 1):.0f}× larger batch in the memory budget.")
    return out


def write_report(results: dict, out: Path) -> None:
    m, c = results["meta"], results["meta"]["config"]
    head, rows = table_rows(results)
    if c.get("model"):
        setup = (f"Model: `{c['model']}`; uptraining budgets {', '.join(f'{t:,}' for t in c['uptrain_tokens'])} tokens "
                 f"of the built-in corpus (sequences of {c['seq_len']}, batch {c['batch_size']}).")
    else:
        setup = (f"Pretrained MHA model: d_model {c['d_model']}, {c['n_layer']} layers, {c['n_head']} heads, d_ff "
                 f"{c['d_ff']}, byte-level; P = {c['pretrain_tokens']:,} tokens of the built-in corpus "
                 f"({m['train_corpus_tokens']:,} tokens in its train split), sequences of {c['seq_len']}, batch "
                 f"{c['batch_size']}, peak lr {c['lr']}. Uptraining α = {', '.join(f'{a:.0%}' for a in c['alphas'])} "
                 f"(MQA: {', '.join(f'{a:.0%}' for a in c['mqa_alphas'])}) of P.")
    up_rows = []
    up = [e for e in results["models"] if e["method"]]
    control = [e for e in results["models"] if e["origin"] == "continued"]
    order = {_budget(_entry(e)): (e["alpha"] if e["alpha"] is not None else e["uptrain_tokens"]) for e in up}
    budgets = sorted(order, key=order.get)
    for v, meth in sorted({(e["variant"], e["method"]) for e in up}, key=lambda x: (x[0], x[1])):
        cells = {_budget(_entry(e)): _fmt_ppl(e["val_ppl"]) for e in up if e["variant"] == v and e["method"] == meth}
        scratch = [e for e in results["models"] if e["variant"] == v and e["origin"] == "from scratch"]
        up_rows.append([f"{v} ({meth})", *[cells.get(b, "") for b in budgets],
                        _fmt_ppl(scratch[0]["val_ppl"]) if scratch else ""])
    if control:
        base = next(e for e in results["models"] if e["origin"] in ("pretrained", "loaded"))
        cells = {_budget(_entry(e)): _fmt_ppl(e["val_ppl"]) for e in control}
        up_rows.insert(0, [f"{base['variant']}, not converted (control)", _fmt_ppl(base["val_ppl"]),
                           *[cells.get(b, "") for b in budgets[1:]], ""])
    text = [f"# kvlab study — {m['date']}", "",
            f"{setup} Validation: {results['models'][0]['val_tokens']:,} tokens of the built-in validation split. "
            f"KV bytes per token in bf16. Max batch: (memory − bf16 weights) // KV per sequence. Decode: median step "
            f"with the cache filled to the context, models of the same wiring measured once.", "",
            f"Machine: {m['machine']}, {m['device']}, {m['cpu_threads']} CPU threads, torch {m['torch']}; "
            f"the whole study took {m['seconds']:,.0f} s."
            + (f" Every training run repeated with {c['seeds']} seeds ({c['seed']}–{c['seed'] + c['seeds'] - 1}): "
               f"perplexities are means ± sample standard deviations, plots show them as error bars, "
               f"`results.json` holds each seed's run under `runs`." if c.get("seeds", 1) > 1 else ""), "",
            "## Every model", "", _md_table(head, rows), "",
            "## Uptraining: validation perplexity by budget", "",
            _md_table(["conversion", *budgets, "from scratch"], up_rows), "",
            "## Reading", "", *[f"- {s}" for s in reading(results)], "",
            "## Files", "",
            "`results.json` (every number above), `pareto.png`, `uptraining.png`, `loss_curves.png`, "
            "`runs/<run>/metrics.jsonl` (per-step losses)"
            + ("" if c.get("model") else ", `pretrained-mha/` (the pretrained model, a kvlab checkpoint)") + ".", ""]
    (out / "report.md").write_text("\n".join(text))


def rerender(out: str | Path) -> dict:
    """Rewrite the plots and report.md of a finished study from its results.json."""
    from kvlab.errors import ConfigError
    out = Path(out)
    path = out / "results.json"
    if not path.is_file():
        raise ConfigError(f"{path} does not exist; --replot takes the directory of a finished study")
    results = json.loads(path.read_text())
    entries = [_entry(m) for m in results["models"]]
    write_plots(entries, out, results["meta"])
    write_report(results, out)
    return results
