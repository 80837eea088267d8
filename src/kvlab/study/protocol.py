"""``kvlab study``: the KV-cache trade-off study, end to end, in one run.

Default (no ``--model``), the experiment of the GQA and CLA papers at small scale:

1. pretrain a small MHA model (byte-level) on the built-in corpus — the budget P;
2. convert it to GQA, MQA, CLA2 and MQA-CLA2 by mean pooling, and MQA also by first head and by a
   fresh projection (the GQA paper's ablation); evaluate each at α = 0 and after uptraining with
   α·P tokens (α = 5 %, and 10 % for MQA);
3. train every variant from scratch with the full budget P (the CLA paper's comparison);
4. measure every model: validation perplexity, KV bytes per token, the largest batch that fits a
   memory budget at a context, and decode tokens/s at a long-context batch;
5. write ``results.json``, ``report.md``, ``pareto.png``, ``uptraining.png`` and ``loss_curves.png``.

With ``model=`` (e.g. ``smollm2-135m``) it runs steps 2 and 4 on that checkpoint, the uptraining
budget given in tokens. All runs share one data stream: the same seed gives pretraining and every
from-scratch run the same batches, so their differences are the attention variant's alone.
"""

from __future__ import annotations

import copy
import json
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from kvlab.errors import ConfigError, require_positive_ints
from kvlab.io import save_checkpoint
from kvlab.io.provenance import new_provenance
from kvlab.study.report import mark_pareto, write_plots, write_report
from kvlab.study.results import Entry, aggregate

SCRATCH, PRETRAINED, CONVERTED, UPTRAINED, LOADED = "from scratch", "pretrained", "converted", "uptrained", "loaded"
# The control: the unconverted model trained on the same uptraining tokens. It separates what
# uptraining recovers from what more training on this corpus gives any model.
CONTINUED = "continued"


@dataclass
class StudyConfig:
    out_dir: str | None = None            # default runs/study-<time>
    model: str | None = None              # None: pretrain; else a checkpoint / built-in name
    # The pretrained model (byte-level; ignored with model=).
    d_model: int = 128
    n_layer: int = 4
    n_head: int = 8
    d_ff: int = 384
    pretrain_tokens: int = 786_432        # P: pretraining and each from-scratch run (192 steps)
    lr: float = 3e-3
    # Variants and budgets.
    gqa_heads: tuple[int, ...] = (4, 2)
    alphas: tuple[float, ...] = (0.05,)   # uptraining budgets as fractions of P
    mqa_alphas: tuple[float, ...] = (0.05, 0.10)
    uptrain_tokens: tuple[int, ...] = (4096,)     # with model=: uptraining budgets in tokens
    # Uptraining peak lr. Default lr / 3: of lr, lr/3 and lr/10 it recovered most at α = 5 % on the
    # default study (a full-lr restart undoes more than 10 short steps can relearn); 1e-4 with model=.
    uptrain_lr: float | None = None
    ablation_uptrain: bool | None = None  # uptrain MQA first/random too (default: only without model=)
    from_scratch: bool = True
    # Further attention kinds trained from scratch beside the KV wirings (names of KIND_VARIANTS).
    variants: tuple[str, ...] = ()
    # Training shape.
    seq_len: int = 256
    batch_size: int = 16
    warmup_frac: float = 0.05
    # Measurement.
    eval_tokens: int = 49_152
    decode_batch: int = 16
    decode_context: int = 2048
    decode_steps: int = 8
    plan_memory: str = "24GiB"
    plan_context: int = 8192
    device: str = "cpu"
    seed: int = 0
    # Repeat every training run with seeds seed, seed+1, ...: the report gives mean ± std and the
    # plots error bars (one seed cannot tell a few-percent wiring effect from noise).
    seeds: int = 1
    # Give the from-scratch variants MHA's parameter count back (seed 000: Falcon widened d_model,
    # ChatGLM2 the FFN): "ffn" widens d_ff, "width" d_model (head_dim kept, d_ff in proportion).
    match_params: str | None = None
    keep_checkpoints: bool = False
    verbose: bool = False
    cache_dir: str | None = None

    @classmethod
    def make(cls, quick: bool = False, **given) -> "StudyConfig":
        """The defaults for the path chosen (pretraining, or ``model=``), then ``quick``'s sizes,
        then what the user gave."""
        base: dict = {}
        if given.get("model"):
            base.update(MODEL_DEFAULTS)
        if quick:
            base.update(QUICK_MODEL if given.get("model") else QUICK)
        return cls(**{**base, **given})

    @classmethod
    def quick(cls, **given) -> "StudyConfig":
        return cls.make(quick=True, **given)

    def __post_init__(self) -> None:
        require_positive_ints(self, ("d_model", "n_layer", "n_head", "d_ff", "pretrain_tokens", "seq_len",
                                     "batch_size", "eval_tokens", "decode_batch", "decode_context", "decode_steps",
                                     "plan_context", "seeds"))
        if self.match_params not in (None, "ffn", "width"):
            raise ConfigError(f"--match-params {self.match_params}: choose 'ffn' (widen the MLP) or 'width' "
                              f"(widen d_model)")
        if self.match_params and self.model is not None:
            raise ConfigError("--match-params sizes the from-scratch models; it goes without --model")
        for a in (*self.alphas, *self.mqa_alphas):
            if not 0 < a <= 1:
                raise ConfigError(f"alpha={a} must be in (0, 1]: a fraction of the pretraining budget")
        if any(not isinstance(t, int) or t < 1 for t in self.uptrain_tokens):
            raise ConfigError(f"uptrain_tokens={list(self.uptrain_tokens)} must be positive token counts")
        if self.model is None:
            if self.n_layer < 2:
                raise ConfigError(f"n_layer={self.n_layer}: CLA2 needs at least 2 layers")
            for g in self.gqa_heads:
                if not 1 < g < self.n_head or self.n_head % g:
                    raise ConfigError(f"gqa_heads={g} must divide n_head={self.n_head} and lie strictly between "
                                      f"1 (MQA) and n_head (MHA)")
        unknown = [v for v in self.variants if v not in KIND_VARIANTS]
        if unknown:
            raise ConfigError(f"--variants {','.join(unknown)}: unknown; choose from {', '.join(KIND_VARIANTS)}")
        if self.variants and self.model is not None:
            raise ConfigError("--variants trains attention kinds from scratch; it goes without --model")
        if not 0 <= self.warmup_frac < 1:
            raise ConfigError(f"warmup_frac={self.warmup_frac} must be in [0, 1)")
        from kvlab.eval.plan import parse_size

        parse_size(self.plan_memory)


# A 135M-parameter model on a CPU: two optimizer steps (about 1.5 minutes) per uptraining run.
MODEL_DEFAULTS = dict(seq_len=256, batch_size=8, uptrain_tokens=(4096,), eval_tokens=4096)
# Every step at tiny sizes: well under 3 minutes on 2 CPU cores (tests, a first look).
QUICK = dict(d_model=64, n_layer=4, n_head=4, d_ff=192, pretrain_tokens=98_304, gqa_heads=(2,), seq_len=128,
             batch_size=16, eval_tokens=8192, decode_batch=4, decode_context=256, decode_steps=3)
QUICK_MODEL = dict(seq_len=64, batch_size=4, uptrain_tokens=(1024,), eval_tokens=1024, decode_batch=2,
                   decode_context=128, decode_steps=3)


# Attention kinds the study can train from scratch beside the KV wirings (``--variants``): the
# ModelConfig changes of each, given the study's settings (windows are a quarter of the training
# length, so they matter within it).
KIND_VARIANTS = {
    "alibi": lambda c: dict(pos="alibi"),
    "window": lambda c: dict(sliding_window=max(1, c.seq_len // 4)),
    "window-sinks": lambda c: dict(sliding_window=max(1, c.seq_len // 4), attention_sinks=4),
    # Longformer/BigBird-like: blocks of 1/16 of the training length, the two latest, the first
    # one global, every 4th block back (46 % of the causal pairs at the study's length).
    "block-sparse": lambda c: dict(block_sparse={"block": max(1, c.seq_len // 16), "local": 2, "global": 1,
                                                 "stride": 4}),
    "linear": lambda c: dict(attention_layers=[{"kind": "linear", "decay": "retnet"}] * c.n_layer),
    "linear-hybrid": lambda c: dict(attention_layers=[{"kind": "linear", "decay": "retnet"} if i % 2 == 0 else "gqa"
                                                      for i in range(c.n_layer)]),
    "mla": lambda c: dict(attn_kind="mla", attn_options={"kv_lora_rank": c.d_model // c.n_head * 2}),
    # Memory compression: the window of "window", and a summary of every older block of 1/16 of it.
    "compressed": lambda c: dict(attention_layers=[
        {"kind": "compressed", "window": max(1, c.seq_len // 4), "block": max(1, c.seq_len // 16)}] * c.n_layer),
    # PaLM / GPT-J's parallel block (one norm, attention and MLP side by side, their input
    # projections in one matmul) against the sequential MHA model: training speed and quality.
    "parallel": lambda c: dict(block="parallel"),
}


def param_matched(cfg, target: int, how: str):
    """``cfg`` widened until its parameter count is the closest to ``target`` from below or above:
    ``how="ffn"`` solves for d_ff (linear in it), ``"width"`` searches d_model with head_dim and the
    heads kept and d_ff scaled in proportion (Falcon's 4096 → 4544)."""
    if how == "ffn":
        per_unit = cfg.replace(d_ff=cfg.d_ff + 1).param_counts()["total"] - cfg.param_counts()["total"]
        d_ff = cfg.d_ff + round((target - cfg.param_counts()["total"]) / per_unit)
        return cfg.replace(d_ff=max(1, d_ff))
    best = cfg
    for d in range(cfg.d_model, 4 * cfg.d_model + 1):
        candidate = cfg.replace(d_model=d, head_dim=cfg.head_dim, d_ff=max(1, round(cfg.d_ff * d / cfg.d_model)))
        if abs(candidate.param_counts()["total"] - target) < abs(best.param_counts()["total"] - target):
            best = candidate
        if candidate.param_counts()["total"] > target:
            break
    return best


@dataclass
class Variant:
    """A KV wiring to convert to / train: ``n_kv_head`` heads, layers sharing KV in groups of ``cla``."""

    label: str
    n_kv_head: int
    cla: int = 1


def study_variants(cfg, gqa_heads=()) -> list[Variant]:
    """The targets for a model with ``cfg``'s heads: GQA (each of ``gqa_heads``), MQA, CLA2 and
    MQA-CLA2 — those that differ from the model itself."""
    from kvlab.eval.plan import kv_label

    out = [Variant("", g) for g in gqa_heads if 1 < g < cfg.n_kv_head and cfg.n_kv_head % g == 0]
    out += [Variant("", 1), Variant("", cfg.n_kv_head, 2), Variant("", 1, 2)]
    seen, unique = {(cfg.n_kv_head, cfg.cla)}, []
    for v in out:
        if (v.n_kv_head, v.cla) not in seen and v.cla <= cfg.n_layer:
            seen.add((v.n_kv_head, v.cla))
            v.label = kv_label(cfg.replace(n_kv_head=v.n_kv_head, cla=v.cla))
            unique.append(v)
    return unique


# What a study writes into its directory (--overwrite deletes these and nothing else).
STUDY_OUTPUTS = ("runs", "pretrained-mha", "results.json", "report.md", "pareto.png", "uptraining.png",
                 "loss_curves.png")


class Study:
    def __init__(self, cfg: StudyConfig, log: Callable[[str], None] = print):
        self.cfg, self.log = cfg, log
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.dir = Path(cfg.out_dir or f"runs/study-{stamp}")
        self.device = torch.device(cfg.device)
        self.entries: list[Entry] = []
        self.decode_cache: dict[tuple, tuple[float, float]] = {}
        self.t0 = time.perf_counter()
        self.step_no = 0
        self.seed = cfg.seed                    # the seed of the pass under way (--seeds repeats them)
        self._loaded = None

    # ----------------------------------------------------------------------------- plumbing
    def say(self, text: str) -> None:
        self.log(f"[{time.perf_counter() - self.t0:6.0f}s] {text}")

    def setup_data(self, tokenizer) -> None:
        from kvlab.data.corpus import builtin_corpus
        from kvlab.data.windows import Windows, tokenize_to_file

        c = self.cfg
        self.tokenizer = tokenizer
        self.val_docs = builtin_corpus("validation")
        train_tokens = tokenize_to_file(builtin_corpus("train"), tokenizer, cache_dir=c.cache_dir,
                                        progress=c.verbose).tokens
        val_tokens = tokenize_to_file(self.val_docs, tokenizer, cache_dir=c.cache_dir, progress=c.verbose).tokens
        self.windows = lambda seed: Windows(train_tokens, c.seq_len, c.batch_size, seed=seed)
        self.val_windows = Windows(val_tokens, c.seq_len, c.batch_size, mode="sequential")
        self.train_corpus_tokens = len(train_tokens)

    def train_run(self, model, name: str, tokens: int, lr: float, seed: int) -> tuple[int, float, str]:
        """Train ``model`` in place for ``tokens`` tokens; returns (tokens trained, seconds, metrics path)."""
        from kvlab.training import TrainConfig, steps_for_budget, train

        c = self.cfg
        steps = steps_for_budget(c.batch_size * c.seq_len, tokens=tokens)
        run_dir = self.dir / "runs" / (name + (f"-seed{self.seed}" if c.seeds > 1 else ""))
        tc = TrainConfig(out_dir=str(run_dir), max_steps=steps, batch_size=c.batch_size, seq_len=c.seq_len, lr=lr,
                         # Validation 4 times a run (and at its end); short runs only at the end.
                         warmup_steps=max(1, round(c.warmup_frac * steps)),
                         eval_every=steps if steps < 8 else steps // 4, eval_batches=2, save_every=steps, keep_last=1,
                         log_every=max(1, steps // 10), seed=seed)
        t = time.perf_counter()
        train(model, self.windows(seed), self.val_windows, tc, device=self.device, quiet=not c.verbose)
        seconds = time.perf_counter() - t
        if not c.keep_checkpoints:
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        return steps * tc.tokens_per_step, seconds, str((run_dir / "metrics.jsonl").relative_to(self.dir))

    def measure(self, model, entry: Entry) -> Entry:
        """Perplexity, KV bytes, max batch, decode speed (shared by models of the same wiring)."""
        from kvlab.eval.bench import measure_decode
        from kvlab.eval.perplexity import evaluate
        from kvlab.eval.plan import kv_label, max_batch, parse_size

        c, mcfg = self.cfg, model.cfg
        model.to(self.device).eval()
        result = evaluate(model, self.tokenizer, self.val_docs, seq_len=c.seq_len, max_tokens=c.eval_tokens,
                          batch_size=8, progress=c.verbose)
        key = json.dumps({k: v for k, v in mcfg.to_dict().items() if k != "name"}, sort_keys=True, default=str)
        if key not in self.decode_cache:
            speed = measure_decode(model, c.decode_batch, c.decode_context, steps=c.decode_steps, warmup=1)
            self.decode_cache[key] = (speed.tokens_per_s, speed.step_ms)
        entry.variant = entry.variant or kv_label(mcfg)
        entry.params = mcfg.param_counts()["total"]
        entry.n_kv_head, entry.n_kv_layers = mcfg.n_kv_head, mcfg.n_kv_layers
        # Per token at the study's planning context: the same as the growth per token for caches that
        # grow, and what windows and recurrent states amount to at that length (so they have a place
        # on the Pareto plot).
        entry.kv_bytes_per_token = round(mcfg.cache_bytes("bf16").for_sequence(c.plan_context) / c.plan_context)
        entry.val_ppl, entry.val_bits_per_byte, entry.val_tokens = (result.perplexity, result.bits_per_byte,
                                                                   result.tokens)
        entry.max_batch = max_batch(mcfg, parse_size(c.plan_memory), c.plan_context, "bf16")
        entry.decode_tokens_per_s, entry.decode_step_ms = self.decode_cache[key]
        entry.seed = self.seed
        self.entries.append(entry)
        how = entry.origin + (f" ({entry.method})" if entry.method else "")
        budget = f", α={entry.alpha:g}" if entry.alpha else (f", {entry.uptrain_tokens:,} tokens"
                                                             if entry.uptrain_tokens else "")
        self.say(f"{entry.variant:<12} {how}{budget}: val ppl {entry.val_ppl:,.3f}, "
                 f"{entry.kv_bytes_per_token:,} KV B/token, decode {entry.decode_tokens_per_s:,.0f} tok/s")
        return entry

    # ---------------------------------------------------------------------------- the study
    def run(self, overwrite: bool = False) -> dict:
        from dataclasses import asdict

        from kvlab.io.rundir import RunDirectory

        with RunDirectory(self.dir, "study", asdict(self.cfg), entries=STUDY_OUTPUTS, overwrite=overwrite,
                          log=self.log):
            return self._run()

    def _run(self) -> dict:
        for s in range(self.cfg.seeds):
            self.seed = self.cfg.seed + s
            if self.cfg.seeds > 1:
                self.say(f"seed {self.seed} ({s + 1} of {self.cfg.seeds})")
            self._run_seed()
        return self.finish()

    def _run_seed(self) -> None:
        """Every step of the study with :attr:`seed`: its pretraining, conversions, uptraining and
        from-scratch runs."""
        from kvlab.convert.heads import convert
        from kvlab.eval.plan import kv_label

        c = self.cfg
        torch.manual_seed(self.seed)
        base, base_entry = self.base_model()
        uptrain_lr = c.uptrain_lr if c.uptrain_lr is not None else (c.lr / 3 if c.model is None else 1e-4)
        ablation = c.ablation_uptrain if c.ablation_uptrain is not None else c.model is None
        variants = study_variants(base.cfg, c.gqa_heads)

        # Step 2: conversions at α = 0, then uptraining.
        for v in variants:
            methods = ("mean", "first", "random") if v.n_kv_head == 1 and v.cla == 1 else ("mean",)
            for method in methods:
                converted = convert(base, n_kv_head=v.n_kv_head, cla=v.cla if v.cla > 1 else None, method=method,
                                    seed=self.seed)
                name = f"{v.label}-{method}"
                self.measure(converted, Entry(name=f"{name}-a0", variant=v.label, origin=CONVERTED, method=method,
                                              alpha=0.0 if c.model is None else None,
                                              train_tokens=base_entry.train_tokens))
                if method != "mean" and not ablation:
                    continue
                for alpha, tokens in self.uptrain_budgets(v):
                    model = convert(base, n_kv_head=v.n_kv_head, cla=v.cla if v.cla > 1 else None, method=method,
                                    seed=self.seed)
                    tag = f"a{alpha:g}" if alpha is not None else f"t{tokens}"
                    trained, secs, metrics = self.train_run(model, f"uptrain-{name}-{tag}", tokens, uptrain_lr,
                                                            seed=self.seed + 1)
                    self.measure(model, Entry(name=f"{name}-{tag}", variant=v.label, origin=UPTRAINED, method=method,
                                              alpha=alpha, uptrain_tokens=trained,
                                              train_tokens=base_entry.train_tokens + trained, train_seconds=secs,
                                              metrics=metrics))

        # The control: the unconverted model, trained on each uptraining budget.
        budgets = sorted({b for v in variants for b in self.uptrain_budgets(v)}, key=lambda b: b[1])
        for alpha, tokens in budgets:
            tokenizer, base.tokenizer = base.tokenizer, None      # shared, not copied
            model = copy.deepcopy(base)
            base.tokenizer = model.tokenizer = tokenizer
            tag = f"a{alpha:g}" if alpha is not None else f"t{tokens}"
            trained, secs, metrics = self.train_run(model, f"continue-{base_entry.variant}-{tag}", tokens, uptrain_lr,
                                                    seed=self.seed + 1)
            self.measure(model, Entry(name=f"{base_entry.variant}-continued-{tag}", variant=base_entry.variant,
                                      origin=CONTINUED, alpha=alpha, uptrain_tokens=trained,
                                      train_tokens=base_entry.train_tokens + trained, train_seconds=secs,
                                      metrics=metrics))

        # Step 3: every variant from scratch with the full budget, then the other attention kinds.
        if c.model is None and c.from_scratch:
            for v in variants:
                model = self.new_model(n_kv_head=v.n_kv_head, cla=v.cla, matched=True)
                trained, secs, metrics = self.train_run(model, f"scratch-{v.label}", c.pretrain_tokens, c.lr,
                                                        self.seed)
                self.measure(model, Entry(name=f"{v.label}-scratch", variant=v.label, origin=SCRATCH,
                                          train_tokens=trained, train_seconds=secs, metrics=metrics,
                                          matched=c.match_params))
        for name in c.variants:
            model = self.new_model(matched=name != "parallel", **KIND_VARIANTS[name](c))
            label = kv_label(model.cfg)
            if name.split("-")[0] not in label.lower():                # "MHA alibi", but "Linear-4"
                label = f"{label} {name}"
            trained, secs, metrics = self.train_run(model, f"scratch-{name}", c.pretrain_tokens, c.lr, self.seed)
            self.measure(model, Entry(name=f"{name}-scratch", variant=label, origin=SCRATCH, train_tokens=trained,
                                      train_seconds=secs, metrics=metrics,
                                      matched=c.match_params if name != "parallel" else None))

    def uptrain_budgets(self, v: Variant) -> list[tuple[float | None, int]]:
        c = self.cfg
        if c.model is not None:
            return [(None, t) for t in c.uptrain_tokens]
        alphas = c.mqa_alphas if v.n_kv_head == 1 and v.cla == 1 else c.alphas
        return [(a, round(a * c.pretrain_tokens)) for a in alphas]

    def new_model(self, n_kv_head: int | None = None, cla: int = 1, matched: bool = False, **kind):
        """A fresh byte-level model of the study's shape with these changes; ``matched`` (with
        ``match_params``) widens it to the MHA model's parameter count."""
        from kvlab.config.model import ModelConfig
        from kvlab.io.tokenizer import ByteTokenizer
        from kvlab.models.decoder import Transformer

        c = self.cfg
        cfg = ModelConfig.from_preset("tiny", d_model=c.d_model, n_layer=c.n_layer, n_head=c.n_head,
                                      n_kv_head=n_kv_head or c.n_head, d_ff=c.d_ff, cla=cla,
                                      max_seq_len=max(c.seq_len, c.decode_context + 1), **kind).replace(name="study")
        if matched and c.match_params:
            mha = cfg.replace(n_kv_head=c.n_head, cla=1, attn_kind="gqa", attention_layers=None,
                              block_sparse=None, attn_options=None)
            cfg = param_matched(cfg, mha.param_counts()["total"], c.match_params)
        torch.manual_seed(self.seed)               # every from-scratch model of a pass starts from one seed
        model = Transformer(cfg)
        model.tokenizer = ByteTokenizer()
        model.provenance = new_provenance("init", config="study")
        return model

    def base_model(self):
        c = self.cfg
        if c.model is not None and self._loaded is not None:     # a later seed: the same original
            self.entries.append(replace(self._loaded[1], seed=self.seed))
            return self._loaded[0], self._loaded[1]
        if c.model is not None:
            from kvlab.io import load

            self.say(f"loading {c.model}")
            model = load(c.model)
            if model.tokenizer is None:
                raise ConfigError(f"{c.model} has no tokenizer; the study evaluates on text")
            self.setup_data(model.tokenizer)
            model.float()
            self._loaded = model, self.measure(model, Entry(name="original", variant="", origin=LOADED))
            return self._loaded
        from kvlab.io.tokenizer import ByteTokenizer

        self.setup_data(ByteTokenizer())
        model = self.new_model()
        self.say(f"pretraining the MHA model ({model.cfg.param_counts()['total']:,} parameters) on "
                 f"{c.pretrain_tokens:,} tokens (the corpus has {self.train_corpus_tokens:,})")
        trained, secs, metrics = self.train_run(model, "pretrain-MHA", c.pretrain_tokens, c.lr, self.seed)
        if self.seed == c.seed:                   # always kept: the study's one reusable model (first seed)
            save_checkpoint(model, self.dir / "pretrained-mha")
        return model, self.measure(model, Entry(name="MHA-pretrained", variant="", origin=PRETRAINED,
                                                train_tokens=trained, train_seconds=secs, metrics=metrics))

    # ------------------------------------------------------------------------------ outputs
    def finish(self) -> dict:
        c = self.cfg
        models = aggregate(self.entries)
        mark_pareto(models)
        meta = {"config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(c).items()},
                "out_dir": str(self.dir), "date": time.strftime("%Y-%m-%d %H:%M"),
                "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
                "cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
                "device": (torch.cuda.get_device_name() if self.device.type == "cuda" else "cpu"),
                "seconds": round(time.perf_counter() - self.t0, 1),
                "train_corpus_tokens": self.train_corpus_tokens,
                "kv_bytes_dtype": "bf16", "decode": {"batch": c.decode_batch, "context": c.decode_context},
                "plan": {"memory": c.plan_memory, "context": c.plan_context}}
        results = {"meta": meta, "models": [asdict(e) for e in models]}
        if c.seeds > 1:
            results["runs"] = [asdict(e) for e in self.entries]
        write_plots(models, self.dir, meta)
        write_report(results, self.dir)
        tmp = self.dir / ".results.json.tmp"
        tmp.write_text(json.dumps(results, indent=2, default=_json_default) + "\n")
        tmp.replace(self.dir / "results.json")
        self.say(f"done: {self.dir}")
        return results


def _json_default(x):
    raise TypeError(f"not JSON serialisable: {x!r}")


def run_study(cfg: StudyConfig, log: Callable[[str], None] = print, *, overwrite: bool = False) -> dict:
    return Study(cfg, log).run(overwrite=overwrite)
