"""What ``kvlab shrink`` writes for people: ``report.md``, ``pareto.png`` and ``recovery.png``, from
its ``results.json`` content (:func:`kvlab.recipes.shrink.run_shrink`)."""

from __future__ import annotations

from pathlib import Path

from kvlab.recipes.shrink.candidates import integer_keys

# How each runtime stores a KV cache in kvlab's precisions (its own flag), or why it cannot.
RUNTIME_FLAGS = {
    "fp8": {"kvlab": "--kv-quant fp8", "vLLM": "--kv-cache-dtype fp8",
            "llama.cpp": "no fp8 cache (its q8_0 is 8.5 bits per value: -ctk q8_0 -ctv q8_0 -fa on)"},
    "int8": {"kvlab": "--kv-quant int8", "vLLM": "no int8 cache (its fp8 is the same bytes without scales)",
             "llama.cpp": "-ctk q8_0 -ctv q8_0 -fa on (the same quantization: 32 values and a float16 scale)"},
    "int8/int4": {"kvlab": "--kv-quant int8/int4",
                  "vLLM": "no 4-bit cache, and one dtype for keys and values (its fp8: --kv-cache-dtype fp8)",
                  "llama.cpp": "-ctk q8_0 -ctv q4_1 -fa on (the same quantizations: int8 keys, int4 values)"},
    "int4": {"kvlab": "--kv-quant int4", "vLLM": "no 4-bit cache",
             "llama.cpp": "-ctk q4_1 -ctv q4_1 -fa on (the same quantization: 32 values, a float16 scale and "
                          "minimum)"},
    "int8/int4-h": {"kvlab": "--kv-quant int8/int4-h",
                    "vLLM": "no 4-bit cache, and one dtype for keys and values (its fp8: --kv-cache-dtype fp8)",
                    "llama.cpp": "-ctk q8_0 -ctv q4_1 -fa on: the same bytes without kvlab's rotation of the values "
                                 "(+0.58 % against +0.48 % on SmolLM2)"},
    "int4-h": {"kvlab": "--kv-quant int4-h", "vLLM": "no 4-bit cache",
               "llama.cpp": "-ctk q4_1 -ctv q4_1 -fa on: the same bytes without kvlab's rotation (+6.6 % against "
                            "+5.0 % on SmolLM2)"},
}


def runtime_flags(precision: str) -> dict[str, str]:
    """How each runtime stores a cache of ``precision``: :data:`RUNTIME_FLAGS`, or for a format per
    layer (``int8/int4+int8@0-3``) kvlab's flag and the others' lack of one."""
    if precision in RUNTIME_FLAGS:
        return RUNTIME_FLAGS[precision]
    return {"kvlab": f"--kv-quant {precision}",
            "vLLM": "one cache dtype for every layer (no precision per layer)",
            "llama.cpp": "one cache type for every layer (-ctk/-ctv; no precision per layer)"}


def _pct(value: float, ref: float) -> str:
    return f"{100 * (value / ref - 1):+.1f} %"


def _category(r: dict) -> str:
    if r["family"] == "cache":
        return "quantization only"
    return "structure only" if r["precision"] is None else "structure × precision"


_MARKERS = {"quantization only": "s", "structure only": "o", "structure × precision": "^"}


def plot_pareto(results: dict, path: Path) -> None:
    """Perplexity against KV bytes per token: the original, every candidate at α = 0 — quantization
    only, structure only, and the two composed — and the recovered ones (held-out proxy perplexity,
    the measure the ranking used)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    orig = results["original"]
    ax.scatter([orig["kv_bytes"]], [orig["proxy_ppl"]], marker="*", s=220, color="black", label="original", zorder=3)
    families = list(dict.fromkeys(r["family"] for r in results["ranking"]))
    colour = {family: f"C{i}" for i, family in enumerate(families)}
    for r in results["ranking"]:
        ax.scatter([r["kv_bytes"]], [r["alpha0_proxy_ppl"]], facecolors="none", edgecolors=colour[r["family"]],
                   marker=_MARKERS[_category(r)], s=45)
        ax.annotate(r["name"], (r["kv_bytes"], r["alpha0_proxy_ppl"]), fontsize=6, xytext=(4, 2),
                    textcoords="offset points")
    for r in results["recovered"]:
        ax.scatter([r["kv_bytes"]], [r["proxy_ppl"]], color=colour[r["family"]], marker=_MARKERS[_category(r)], s=55)
    for family in families:
        ax.scatter([], [], color=colour[family], label=family)
    for category, marker in _MARKERS.items():
        ax.scatter([], [], facecolors="none", edgecolors="gray", marker=marker, label=category)
    ax.scatter([], [], color="gray", label="recovered (filled)")
    ax.axvline(results["budget_bytes_per_token"], color="gray", ls=":", lw=1, label="budget")
    ax.set_xlabel("KV cache bytes per token (scales included; bf16 for the model's own precision)")
    ax.set_ylabel("perplexity (held-out train-split windows)")
    ax.set_yscale("log")
    ax.set_title(f"{results['model']}: quality against cache bytes", fontsize=10)
    ax.legend(fontsize=7, ncol=2)
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


def _target_lines(results: dict) -> list[str]:
    """For a target runtime: its command for the written model, and what it left out and why."""
    from kvlab.recipes.shrink.targets import get_target

    target = get_target(results.get("target", "kvlab"))
    if target.name == "kvlab":
        return []
    best = next(r for r in results["recovered"] if r["name"] == results["best"])
    lines = [f"## In {target.name}", "", f"Written for {target.name} in `{results['target_output']}`:", "",
             *target.serve_command(".", best["precision"]), ""]
    lines += [f"Note: {note}." for note in results.get("target_notes") or []]
    if results.get("target_notes"):
        lines.append("")
    refused = results.get("refused") or {}
    if refused:
        lines += [f"Left out because {target.name} does not run them natively:", ""]
        by_reason: dict[str, list[str]] = {}
        for name, reason in refused.items():
            by_reason.setdefault(reason, []).append(name)
        lines += [f"- {', '.join(names)}: {reason}" for reason, names in by_reason.items()] + [""]
    return lines


def _serve_lines(results: dict) -> list[str]:
    """How to run the chosen cache: kvlab's command, and each runtime's flag for its precision."""
    best = next(r for r in results["recovered"] if r["name"] == results["best"])
    precision = best["precision"]
    balanced = bool(results.get("keys_balanced")) and integer_keys(precision)
    flag = f" {runtime_flags(precision)['kvlab']}" if precision else ""
    lines = [*_target_lines(results), "## Serving it", "", "```console", f"$ kvlab serve model/{flag}", "```", ""]
    if balanced:
        lines += ["Where the cache keeps integer codes, `model/` stores the keys centred and balanced against the "
                  "queries (`kvlab convert --balance-keys`, fitted on calibration text): the outputs are the "
                  "original's, and kvlab's cache rounds far less of what attention reads. The HF and GGUF exports "
                  "hold the weights as projected: other runtimes' caches of the same type round the keys as the "
                  "original's would.", ""]
    if best["family"] == "cache" and precision not in RUNTIME_FLAGS:       # a format per layer
        lines += [f"**Quantization alone wins at this budget**: the model computes what the original does and its "
                  f"cache keeps a key and a value format per layer (`{precision}`), which kvlab stores; other "
                  f"runtimes keep one format for every layer:", ""]
    elif best["family"] == "cache" and not balanced:
        lines += [f"**Quantization alone wins at this budget**: the model is unchanged and its cache is stored in "
                  f"{precision}. Any runtime with such a cache gives the same without kvlab:", ""]
    elif best["family"] == "cache":
        lines += [f"**Quantization alone wins at this budget**: the model computes what the original does and its "
                  f"cache is stored in {precision}. In other runtimes the same cache type costs more quality (see "
                  f"below):", ""]
    elif precision:
        lines += [f"The converted model's cache is stored in {precision}; in other runtimes:", ""]
    if precision:
        lines += [f"- {runtime}: {text}" for runtime, text in runtime_flags(precision).items() if runtime != "kvlab"]
        lines.append("")
    return lines


def _speed_lines(results: dict) -> list[str]:
    contexts = sorted({int(c) for r in results["recovered"] for c in r.get("speed", {})})
    if not contexts:
        return []
    any_speed = next(r["speed"] for r in results["recovered"] if r.get("speed"))
    clock = next(iter(any_speed.values()))["clock"]
    lines = ["## Decode speed", "",
             f"One decode step at batch {next(iter(any_speed.values()))['batch']} with the context already cached, "
             f"against the original's in the same process, interleaved, {clock}; ms per step (medians) and the "
             f"ratio's median and range over the rounds.", "",
             "| model | " + " | ".join(f"{c:,} tokens" for c in contexts) + " |",
             "|---|" + "---:|" * len(contexts)]
    first = next(r for r in results["recovered"] if r.get("speed"))
    lines.append("| original | " + " | ".join(f"{first['speed'][str(c)]['original_ms']:.1f} ms" for c in contexts)
                 + " |")
    for r in results["recovered"]:
        cells = []
        for c in contexts:
            s = r.get("speed", {}).get(str(c))
            cells.append("–" if s is None else f"{s['candidate_ms']:.1f} ms ({s['ratio']:.2f}x, "
                                               f"{s['ratio_min']:.2f}-{s['ratio_max']:.2f})")
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    return lines + [""]


def _serving_lines(results: dict) -> list[str]:
    s = results.get("serving")
    if not s:
        return []
    return ["## Serving gain", "",
            f"kvlab serve's engine (continuous batching over a paged pool) with a KV budget of "
            f"{s['budget_bytes'] / 2**20:.1f} MiB, {s['clients']} requests at once of {s['prompt_tokens']} prompt + "
            f"{s['max_tokens']} new tokens, each cache in the model's dtype (the chosen one's in its precision); "
            f"output tokens/s over wall time, mean of {s['rounds']} alternating rounds.", "",
            "| model | running at once | tokens/s |", "|---|---:|---:|",
            f"| original | {s['original_running']} | {s['original_tok_s']:.1f} |",
            f"| {results['best']} | {s['candidate_running']} | {s['candidate_tok_s']:.1f} ({s['gain']:.2f}x) |", ""]


def write_report(results: dict, path: Path) -> None:
    orig = results["original"]
    o_val = orig["val"]["perplexity"]
    cfg = results["config"]
    budget = cfg["tokens"] if cfg["tokens"] is not None else f"{cfg['minutes']} minutes"
    factor = orig["kv_bytes"] / results["budget_bytes_per_token"]
    lines = [
        f"# kvlab shrink {results['model']} --kv {cfg['kv']}",
        "",
        f"Budget: {results['budget_bytes_per_token']:,} KV bytes per token, a quantized cache's scales included, "
        f"against the original's {orig['kv_bytes']:,} in bf16 ({factor:.1f}x); "
        f"precisions considered: {', '.join(cfg['precisions'])}; training budget "
        f"{budget}{' tokens' if cfg['tokens'] is not None else ''}; device {cfg['device']}; "
        f"{results['elapsed_s'] / 60:.1f} minutes in all"
        + (f"; target runtime {results['target']}" if results.get("target", "kvlab") != "kvlab" else "") + ".",
        "",
        f"**Chosen: {results['best']}** — the lowest perplexity on held-out windows of the training split after "
        f"recovery, among the candidates that decode no slower than the original"
        + (" (any speed accepted: --allow-slower)" if cfg.get("allow_slower") else "") + ". Saved in `model/` (kvlab)"
        + (", and in `hf/` for transformers." if results["hf_export"] else
           f". No transformers export: {results['hf_note']}"),
        "",
        *_serve_lines(results),
        "## Recovered candidates",
        "",
        f"Validation perplexity: {results.get('validation_text', 'the built-in validation split')}, which no stage "
        "trains, calibrates or selects on, scored with the candidate's cache in its precision; on the same tokens, "
        "the mean KL(original ‖ candidate) of the next-token distributions and the share of tokens whose most "
        "likely next token is the original's. A structure with a quantized cache is scored with a float cache too: "
        "the structure alone (its perplexity against the original's). Off the training text: the next section.",
        "",
        "| model | cache | KV bytes/token | smaller | validation perplexity | vs original | KL to original "
        "(nats/token) | top-1 agreement | structure alone | training tokens |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| original | bf16 | {orig['kv_bytes']:,} | 1.0x | {o_val:.3f} | – | 0 | 100% | – | – |",
    ]
    for r in results["recovered"]:
        fid = r.get("fidelity")         # absent from runs recorded before it was measured
        kl, top1 = (f"{fid['kl']:.4f}", f"{fid['top1_agreement']:.1%}") if fid else ("–", "–")
        lines.append(f"| {r['name']} | {r['precision'] or 'bf16'} | {r['kv_bytes']:,} | "
                     f"{orig['kv_bytes'] / r['kv_bytes']:.1f}x | {r['val']['perplexity']:.3f} | "
                     f"{_pct(r['val']['perplexity'], o_val)} | {kl} | {top1} | {_structure_alone(r)} | "
                     f"{r['train_tokens']:,} |")
    lines += ["", *trust_lines(results), *_speed_lines(results), *_serving_lines(results)]
    lines += _ranking_lines(results)
    timing = results["plan"].get("timing")
    if timing and timing["kd_s_per_step"]:
        transfer = (f"attention transfer {timing['transfer_s_per_step']:.2f} s/step, "
                    if timing["transfer_s_per_step"] else "")
        lines += [f"Planned from measured step times: {transfer}distillation {timing['kd_s_per_step']:.2f} s/step, "
                  f"{timing['train_seconds']:.0f} s of training (a start fitted by the loss gets no attention "
                  f"transfer, which would undo it).", ""]
    Path(path).write_text("\n".join(lines))


def _structure_alone(r: dict) -> str:
    alone = r.get("structure_alone")
    return "–" if not alone else f"{alone['perplexity']:.3f} ({100 * (alone['perplexity_ratio'] - 1):+.1f} %)"


def trust_lines(results: dict) -> list[str]:
    """The section on what no stage saw (kvlab.eval.suite): fidelity per off-domain set, passkey
    retrieval and the tasks, the original's scores first."""
    orig, recovered = results["original"], results["recovered"]
    if not orig.get("suite") and not any(r.get("suite") for r in recovered):
        return []                   # a run recorded before the suite existed
    lines = ["## Off the training text", "",
             "Text no stage of this run trained, calibrated or selected on, none of it Python: off-domain sets "
             "assembled from what this machine ships (`kvlab.data.offdomain`: C headers, manual pages, "
             "JavaScript in packages, licence texts), each model against the original on the same tokens; "
             "passkey retrieval (a five-digit key at depths 0.1, 0.5 and 0.9 of a filler text, retrieved when "
             "greedy decoding repeats it); next-line (pick the true next line of a passage among four, by "
             "log-likelihood; chance 25 %) and recall (continue a passage with an identifier it used before, "
             "exact match), both built from the off-domain text. `kvlab eval MODEL --original ORIGINAL "
             "--data offdomain --passkey --tasks next-line,recall` measures a model at any size.", ""]
    sets = sorted({name for r in recovered for name in r.get("suite", {}).get("domains", {})})
    if sets:
        lines += ["| model | " + " | ".join(f"{name}: ratio / KL / top-1" for name in sets) + " |",
                  "|---|" + "---:|" * len(sets)]
        first = next(r["suite"]["domains"] for r in recovered if r.get("suite", {}).get("domains"))
        lines.append("| original (perplexity) | " + " | ".join(
            f"{first[name]['original_perplexity']:.3f}" if name in first else "–" for name in sets) + " |")
        for r in recovered:
            d = r.get("suite", {}).get("domains", {})
            lines.append(f"| {r['name']} | " + " | ".join(
                f"{d[n]['perplexity_ratio']:.3f} / {d[n]['kl']:.4f} / {d[n]['top1_agreement']:.1%}" if n in d
                else "–" for n in sets) + " |")
        lines.append("")
    lengths = sorted({int(k) for e in (orig, *recovered) for k in e.get("suite", {}).get("passkey", {})
                      .get("by_length", {})})
    lines += ["| model | " + "".join(f"passkey at {n:,} | " for n in lengths) + "next-line (acc / acc_norm) | "
              "recall (exact match) |", "|---|" + "---:|" * (len(lengths) + 2)]
    for e in (orig, *recovered):
        suite = e.get("suite", {})
        by_length = suite.get("passkey", {}).get("by_length", {})
        tasks = suite.get("tasks", {})
        nl, rc = tasks.get("next-line"), tasks.get("recall")
        lines.append(f"| {e['name']} | " + "".join(
            f"{by_length[str(n)]:.0%} | " if str(n) in by_length else "– | " for n in lengths)
            + (f"{nl['accuracy']:.1%} / {nl['accuracy_norm']:.1%} (n={nl['n']}) | " if nl else "– | ")
            + (f"{rc['accuracy']:.1%} (n={rc['n']}) |" if rc else "– |"))
    return lines + [""]


def _ranking_lines(results: dict) -> list[str]:
    orig = results["original"]
    lines = ["## Every candidate at α = 0 (the ranking)", "",
             "Converted with its best starting point (calibrated merging for GQA/MQA/CLA, for MLA the latent "
             "fitted in the loss's metric, "
             "PCA of the keys and values for low-rank: plain for the uniform splits, weighted by the loss's "
             "gradient for the allocated one), no training, its cache in its precision; perplexity on held-out "
             "windows of the training split — all of them for the best few, the first half for the rest. Decode "
             "speed against the original where it was measured, down the ranking until enough candidates were "
             "no slower.", "",
             "With `--refit` (the run's `refit: true`), recovered candidates first get the output refit: each "
             "layer's output projection fitted in closed form to the original's attention output "
             "(`kvlab.convert.refit`).", "",
             "| candidate | kind | KV bytes/token | perplexity at α = 0 | tokens scored | decode step vs original | "
             "after the output refit | after recovery |",
             "|---|---|---:|---:|---:|---:|---:|---:|",
             f"| original | – | {orig['kv_bytes']:,} | {orig['proxy_ppl']:.3f} | – | 1.00x | – | – |"]
    recovered = {r["name"]: r for r in results["recovered"]}
    for r in results["ranking"]:
        rec = recovered.get(r["name"])
        after = f"{rec['proxy_ppl']:.3f}" if rec else "not recovered"
        refit = f"{rec['refit_proxy_ppl']:,.3f}" if rec and rec.get("refit_proxy_ppl") is not None else "–"
        if rec and rec.get("refit_proxy_ppl") is not None and not rec.get("refit_used"):
            refit += " (worse: not used)"
        speed = r.get("speed")
        speed = ("–" if not speed else f"as {speed['as']}" if "as" in speed
                 else f"{speed['ratio']:.2f}x ({speed['ratio_min']:.2f}-{speed['ratio_max']:.2f})")
        lines.append(f"| {r['name']} | {_category(r)} | {r['kv_bytes']:,} | {r['alpha0_proxy_ppl']:,.3f} | "
                     f"{r['proxy_tokens']:,} | {speed} | {refit} | {after} |")
    return lines + ["", "![perplexity against KV bytes](pareto.png)", "", "![recovery](recovery.png)", ""]
