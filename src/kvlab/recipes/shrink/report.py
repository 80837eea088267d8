"""What ``kvlab shrink`` writes for people: ``report.md``, ``pareto.png`` and ``recovery.png``, from
its ``results.json`` content (:func:`kvlab.recipes.shrink.run_shrink`)."""

from __future__ import annotations

from pathlib import Path


def _pct(value: float, ref: float) -> str:
    return f"{100 * (value / ref - 1):+.1f} %"


def plot_pareto(results: dict, path: Path) -> None:
    """Perplexity against KV bytes per token: the original, every candidate at α = 0 and the
    recovered ones (held-out proxy perplexity, the measure the ranking used)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    orig = results["original"]
    ax.scatter([orig["kv_bytes"]], [orig["proxy_ppl"]], marker="*", s=200, color="black", label="original", zorder=3)
    # one colour per attention kind of the candidates, in the order they were enumerated
    kinds = list(dict.fromkeys(r["kind"] for r in results["ranking"]))
    colour = {kind: f"C{i}" for i, kind in enumerate(kinds)}
    for r in results["ranking"]:
        ax.scatter([r["kv_bytes"]], [r["alpha0_proxy_ppl"]], facecolors="none", edgecolors=colour[r["kind"]], s=50)
        ax.annotate(r["name"], (r["kv_bytes"], r["alpha0_proxy_ppl"]), fontsize=7, xytext=(4, 2),
                    textcoords="offset points")
    for r in results["recovered"]:
        ax.scatter([r["kv_bytes"]], [r["proxy_ppl"]], color=colour[r["kind"]], s=50)
    for kind in kinds:
        ax.scatter([], [], color=colour[kind], label=kind)
    ax.scatter([], [], facecolors="none", edgecolors="gray", label="converted, α = 0")
    ax.scatter([], [], color="gray", label="recovered")
    ax.axvline(results["budget_bytes_per_token"], color="gray", ls=":", lw=1, label="budget")
    ax.set_xlabel("KV cache bytes per token (bf16)")
    ax.set_ylabel("perplexity (held-out train-split windows)")
    ax.set_yscale("log")
    ax.set_title(f"{results['model']}: candidates by attention kind")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_recovery(results: dict, path: Path) -> None:
    """Proxy perplexity against training tokens, one line per recovered candidate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results["recovered"]:
        xs, ys = zip(*r["curve"])
        line, = ax.plot(xs, ys, marker="o", ms=3, label=r["name"])
        for stage in r["stages"][:-1]:
            ax.axvline(stage["tokens"], color=line.get_color(), ls=":", lw=1)
    ax.axhline(results["original"]["proxy_ppl"], color="black", ls="--", lw=1, label="original")
    ax.set_xlabel("training tokens (attention transfer where used, then distillation; dotted: the switch)")
    ax.set_ylabel("perplexity (held-out train-split windows)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(results: dict, path: Path) -> None:
    orig = results["original"]
    o_val = orig["val"]["perplexity"]
    cfg = results["config"]
    budget = cfg["tokens"] if cfg["tokens"] is not None else f"{cfg['minutes']} minutes"
    lines = [
        f"# kvlab shrink {results['model']} --kv {cfg['kv']}",
        "",
        f"Budget: {results['budget_bytes_per_token']:,} KV bytes per token (bf16), against the original's "
        f"{orig['kv_bytes']:,} ({orig['kv_bytes'] / results['budget_bytes_per_token']:.1f}x); training budget "
        f"{budget}{' tokens' if cfg['tokens'] is not None else ''}; device {cfg['device']}; "
        f"{results['elapsed_s'] / 60:.1f} minutes in all.",
        "",
        f"**Chosen: {results['best']}** — the lowest perplexity on held-out windows of the training split after "
        f"recovery. Saved in `model/` (kvlab)"
        + (", and in `hf/` for transformers." if results["hf_export"] else
           f". No transformers export: {results['hf_note']}"),
        "",
        "## Recovered candidates",
        "",
        "Validation perplexity: the built-in corpus's validation split, which no stage trains, calibrates or selects "
        "on. Chat: greedy answers (16 tokens) to held-out instruction prompts — exact-match accuracy against the "
        "tasks' answers, the share of answers identical to the original model's, and the common prefix with the "
        "original's answer as a share of its length.",
        "",
        "| model | KV bytes/token | smaller | validation perplexity | vs original | chat accuracy | "
        "same answer as original | common prefix | training tokens |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| original | {orig['kv_bytes']:,} | 1.0x | {o_val:.3f} | – | {orig['chat']['accuracy']:.0%} | – | – | – |",
    ]
    for r in results["recovered"]:
        lines.append(f"| {r['name']} | {r['kv_bytes']:,} | {orig['kv_bytes'] / r['kv_bytes']:.1f}x | "
                     f"{r['val']['perplexity']:.3f} | {_pct(r['val']['perplexity'], o_val)} | "
                     f"{r['chat']['accuracy']:.0%} | {r['chat_agreement']:.0%} | {r['chat_prefix_agreement']:.0%} | "
                     f"{r['train_tokens']:,} |")
    lines += ["", "## Every candidate at α = 0 (the ranking)", "",
              "Converted with its best starting point (calibrated merging for GQA/MQA/CLA, PCA latent for MLA, "
              "PCA of the keys and values for low-rank: plain for the uniform splits, weighted by the loss's "
              "gradient for the allocated one), "
              "no training; perplexity on held-out windows of the training split.", "",
              "With `--refit` (the run's `refit: true`), recovered candidates first get the output refit: each "
              "layer's output projection fitted in closed form to the original's attention output "
              "(`kvlab.convert.refit`).", "",
              "| candidate | KV bytes/token | perplexity at α = 0 | after the output refit | after recovery |",
              "|---|---:|---:|---:|---:|",
              f"| original | {orig['kv_bytes']:,} | {orig['proxy_ppl']:.3f} | – | – |"]
    recovered = {r["name"]: r for r in results["recovered"]}
    for r in results["ranking"]:
        rec = recovered.get(r["name"])
        after = f"{rec['proxy_ppl']:.3f}" if rec else "not recovered"
        refit = f"{rec['refit_proxy_ppl']:,.3f}" if rec and rec.get("refit_proxy_ppl") is not None else "–"
        if rec and rec.get("refit_proxy_ppl") is not None and not rec.get("refit_used"):
            refit += " (worse: not used)"
        lines.append(f"| {r['name']} | {r['kv_bytes']:,} | {r['alpha0_proxy_ppl']:,.3f} | {refit} | {after} |")
    lines += ["", "![perplexity against KV bytes](pareto.png)", "", "![recovery](recovery.png)", ""]
    timing = results["plan"].get("timing")
    if timing:
        transfer = (f"attention transfer {timing['transfer_s_per_step']:.2f} s/step, "
                    if timing["transfer_s_per_step"] else "")
        lines += [f"Planned from measured step times: {transfer}distillation {timing['kd_s_per_step']:.2f} s/step, "
                  f"{timing['train_seconds']:.0f} s of training (a start fitted by the loss gets no attention "
                  f"transfer, which would undo it).", ""]
    Path(path).write_text("\n".join(lines))
