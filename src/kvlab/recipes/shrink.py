"""``kvlab shrink``: a trained model in, a model with a KV cache N× smaller that keeps its quality out.

The pipeline (each stage's result is kept in ``OUT/shrink_state.json``, so ``resume`` continues
where a run stopped, and the training stages resume from their own checkpoints):

1. **Enumerate** the wirings that meet the KV budget (bytes per token, bf16): for each KV-head count
   that divides the model's, the least cross-layer sharing that fits (GQA/MQA/CLA); and MLA with a
   shared RoPE key of a quarter, half or three quarters of a head and the rest of the budget as the
   latent (any width, so the budget is met exactly); and low-rank key and value latents (Palu:
   keys rebuilt, then rotated) with a quarter, a third or half of the channels for the keys, and
   with the channels allocated across layers and between keys and values by the loss.
2. **Rank** them by a cheap proxy: each is converted with its best starting point — calibrated
   merging (:mod:`kvlab.convert.calibrated`), PCA of the latent (:mod:`kvlab.convert.mla`) or of the
   keys and values, plain or weighted by the loss's gradient (:mod:`kvlab.convert.lowrank`) — from
   one set of calibration moments, and scored at α = 0 on held-out windows of the training split.
3. **Recover** the best few within the budget (``tokens``, or ``minutes`` of wall time for the whole
   run, planned from measured step times): layer-wise attention transfer to the original model,
   then distillation of its logits (the original is the frozen teacher); the recovery curve is
   recorded on the same held-out windows.
4. **Evaluate** the recovered candidates: perplexity on the validation split (text that no stage
   trains, calibrates or selects on), and greedy chat answers on held-out instruction prompts —
   exact-match accuracy of the original and of each, and their agreement with the original.
5. **Write** ``report.md``, ``results.json``, ``pareto.png`` and ``recovery.png``, the chosen model
   (lowest held-out proxy perplexity after recovery) as a kvlab checkpoint in ``OUT/model`` and,
   where transformers has its architecture, an HF export in ``OUT/hf``.

Nothing in ``OUT`` but what this recipe wrote is ever removed; a directory that holds anything
else is refused.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvlab.config.model import ModelConfig
from kvlab.convert.calibrated import attention_input_moments, needed_moments
from kvlab.convert.heads import convert
from kvlab.convert.lowrank import convert_to_lowrank, kv_loss_moments, plan_lowrank
from kvlab.convert.mla import convert_to_mla, plan_mla
from kvlab.errors import ConfigError
from kvlab.io.atomic import write_json

STATE = "shrink_state.json"


# ------------------------------------------------------------------------------ candidates
@dataclass(frozen=True)
class Candidate:
    """One wiring that meets the budget: ``kind`` 'gqa' (``n_kv_head``, ``cla``), 'mla'
    (``kv_lora_rank``, ``qk_rope_head_dim``) or 'lowrank' (``k_rank``, ``v_rank``), and its cache
    bytes per token in bf16."""

    name: str
    kind: str
    change: dict
    kv_bytes: int

    @property
    def slug(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-")


def parse_kv_budget(spec: str, cfg: ModelConfig) -> int:
    """``'2x'`` (a reduction factor) or a number of bytes per token (bf16) -> bytes per token."""
    if cfg.is_encoder_decoder:
        raise ConfigError("kvlab shrink works on decoder-only models; convert an encoder–decoder with kvlab convert "
                          "(--kv-heads/--cross-kv-heads/--cross-cla, --method calibrated) and uptrain it with "
                          "kvlab train --init")
    original = cfg.kv_bytes_per_token("bf16")
    text = str(spec).strip().lower()
    try:
        if text.endswith("x"):
            factor = float(text[:-1])
            if not factor > 1:
                raise ValueError
            return int(original // factor)
        value = int(text)
        if value < 1:
            raise ValueError
        return value
    except ValueError:
        raise ConfigError(f"--kv {spec!r} is neither a reduction factor above 1 (2x, 3x, 6x) nor a positive number "
                          f"of bytes per token; the model has {original:,} bytes per token (bf16)") from None


def enumerate_candidates(cfg: ModelConfig, budget: int) -> list[Candidate]:
    """The wirings of ``cfg`` whose cache is at most ``budget`` bytes per token (bf16), each as large
    as the budget allows within its family."""
    original = cfg.kv_bytes_per_token("bf16")
    if budget >= original:
        raise ConfigError(f"the model's cache is {original:,} bytes per token (bf16), within the budget of {budget:,} "
                          f"already; ask for a smaller one (e.g. --kv 2x)")
    out = []
    for heads in [h for h in range(cfg.n_kv_head, 0, -1) if cfg.n_kv_head % h == 0]:
        for cla in range(1, cfg.n_layer + 1):
            new = cfg.replace(n_kv_head=heads, cla=cla)
            if new.kv_bytes_per_token("bf16") <= budget:
                base = "MQA" if heads == 1 else f"GQA-{heads}"
                out.append(Candidate(base + (f"-CLA{cla}" if cla > 1 else ""), "gqa",
                                     {"n_kv_head": heads, "cla": cla}, new.kv_bytes_per_token("bf16")))
                break
    channels = budget // (2 * cfg.n_layer)            # per layer and token, bf16
    D = cfg.head_dim
    for rope in sorted({max(2, (D * f // 4) // 2 * 2) for f in (1, 2, 3)}):
        rank = channels - rope
        if cfg.pos != "rope" or rank < 1:
            continue
        try:
            new = plan_mla(cfg, kv_lora_rank=rank, qk_rope_head_dim=rope)
        except ConfigError:
            continue
        out.append(Candidate(f"MLA {rank}+{rope}", "mla", {"kv_lora_rank": rank, "qk_rope_head_dim": rope},
                             new.kv_bytes_per_token("bf16")))
    # Low-rank K/V: a quarter, a third or half of each producer's latent channels for the keys (keys
    # are lower-rank than values in trained models), the rest for the values.
    channels = budget // (2 * cfg.n_kv_layers)
    for k_share in (4, 3, 2):
        k_rank = max(1, round(channels / k_share))
        try:
            new = plan_lowrank(cfg, k_rank=k_rank, v_rank=channels - k_rank)
        except ConfigError:
            continue
        out.append(Candidate(f"Low-rank K{k_rank}+V{channels - k_rank}", "lowrank",
                             {"k_rank": k_rank, "v_rank": channels - k_rank}, new.kv_bytes_per_token("bf16")))
    # ... and the same channels split across layers and between keys and values by each component's
    # estimated effect on the loss (the Fisher-weighted fit): on SmolLM2 at half the KV it starts at
    # proxy 10.5 against 12.1 for the best uniform split.
    if 2 <= channels <= 2 * cfg.n_kv_head * cfg.head_dim and not cfg.is_encoder_decoder:
        new = plan_lowrank(cfg, k_rank=channels // 2, v_rank=channels - channels // 2)     # same bytes
        out.append(Candidate(f"Low-rank {channels} allocated", "lowrank", {"channels": channels, "method": "fisher"},
                             new.kv_bytes_per_token("bf16")))
    if not out:
        raise ConfigError(f"no wiring of this model fits {budget:,} bytes per token (bf16); the smallest is "
                          f"{cfg.replace(n_kv_head=1, cla=cfg.n_layer).kv_bytes_per_token('bf16'):,}")
    return out


def convert_candidate(base, cand: Candidate, calibration, moments) -> Any:
    """``base`` converted to ``cand`` with its best starting point (calibrated, from ``moments``)."""
    if cand.kind == "mla":
        return convert_to_mla(base, calibration=calibration, moments=moments, **cand.change)
    if cand.kind == "lowrank":
        return convert_to_lowrank(base, calibration=calibration, moments=moments, loss_moments=moments.get("kv_loss"),
                                  **cand.change)
    return convert(base, method="calibrated", calibration=calibration, moments=moments,
                   n_kv_head=cand.change["n_kv_head"], cla=cand.change["cla"] if cand.change["cla"] > 1 else None)


def moments_for(base, candidates: list[Candidate], calibration) -> dict:
    pairs = {(i, i) for i in range(base.cfg.n_layer)}
    for cand in candidates:
        if cand.kind == "gqa":
            pairs |= set(needed_moments(base.cfg, base.cfg.replace(**cand.change)))
    moments = attention_input_moments(base, calibration, sorted(pairs))
    if any(cand.change.get("method") == "fisher" for cand in candidates):
        moments["kv_loss"] = kv_loss_moments(base, calibration)     # one backward pass per calibration batch
    return moments


# ---------------------------------------------------------------------------------- config
TRAIN_SETS = ("attention", "all", "lora")
DATA_SOURCES = ("builtin", "library", "generated", "mixed")


@dataclass
class ShrinkConfig:
    """What ``kvlab shrink`` does; the defaults are the CPU default (``--quick``: a tiny smoke run)."""

    kv: str = "2x"
    minutes: float | None = 15.0          # wall time for the whole run (used when tokens is None)
    tokens: int | None = None             # training tokens over all recovered candidates
    # How many of the best-ranked to recover. One: since the loss-allocated low-rank start exists it
    # leads every SmolLM2 ranking by a wide margin (KV/2: proxy 10.54 against 12.11 for the next),
    # and a second candidate halves the first one's training.
    candidates: int = 1
    calibration_tokens: int = 8192
    proxy_tokens: int = 4096
    eval_tokens: int | None = 8192        # validation tokens scored at the end (None: the whole split)
    eval_seq_len: int = 1024
    chat_prompts: int = 32
    # Training windows as long as the evaluation's: the converted layers' position-free channels must
    # learn long distances (at 256-token windows a KV/2 MLA reached +14 % on 512-token windows but
    # +57 % at 1,024 tokens of context).
    seq_len: int = 1024
    batch_size: int = 1
    # Refit every layer's output projection in closed form after converting a chosen candidate
    # (kvlab.convert.refit): at alpha = 0 on SmolLM2 MLA 160+32 goes 28.5 -> 21.4 in about 50 s on 2
    # cores, but after 16k tokens of transfer + distillation the gain is gone (15.59 against 15.49
    # without; BENCHMARKS "The output refit"), so at CPU budgets it is opt-in.
    refit: bool = False
    transfer_fraction: float = 0.3        # share of a candidate's tokens spent on attention transfer
    transfer_lr: float = 3e-4
    # Distillation starts from a model already close to the original, and Adam moves every weight by
    # about the learning rate per step: at 1e-4 or 3e-4 the first steps threw the KV/2 allocated start
    # from proxy 10.54 to 11-90 and training levelled off at 10.1; at 3e-5 it fell to 9.78 in 24 steps
    # (1e-5: 9.95 after 16 steps, slower). BENCHMARKS "Distillation from a good start".
    kd_lr: float = 3e-5
    # What distillation trains: the attention, all weights, or the attention in full plus LoRA on
    # the MLPs (merged into the weights at the end).
    train: str = "attention"
    lora_rank: int = 16
    # Training text: the built-in train split, the larger library corpus (for budgets past its
    # ~270k tokens), text the original model generates (its own distribution: what distillation
    # matches), or the built-in split and generated text.
    data: str = "builtin"
    generated_tokens: int = 65536
    curve_points: int = 4
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.minutes is None and self.tokens is None:
            raise ConfigError("give a budget: --minutes M or --tokens N")
        if self.minutes is not None and not self.minutes > 0:
            raise ConfigError(f"--minutes {self.minutes} must be positive")
        if self.tokens is not None and self.tokens < 0:
            raise ConfigError(f"--tokens {self.tokens} must be >= 0")
        if self.candidates < 1:
            raise ConfigError(f"--candidates {self.candidates} must be at least 1")
        for name in ("kd_lr", "transfer_lr"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"--{name.replace('_', '-')} {getattr(self, name)} must be positive (e.g. 3e-5)")
        if not 0 <= self.transfer_fraction <= 1:
            raise ConfigError(f"transfer_fraction={self.transfer_fraction} must be in [0, 1]")
        if self.train not in TRAIN_SETS:
            raise ConfigError(f"--train {self.train!r} is not one of {', '.join(TRAIN_SETS)}")
        if self.train == "lora" and self.lora_rank < 1:
            raise ConfigError(f"--lora-rank {self.lora_rank} must be a positive integer (typical: 8-64)")
        if self.data not in DATA_SOURCES:
            raise ConfigError(f"--data {self.data!r} is not one of {', '.join(DATA_SOURCES)}")
        if self.data in ("generated", "mixed") and self.generated_tokens < 1:
            raise ConfigError(f"--generated-tokens {self.generated_tokens} must be positive with --data {self.data}")

    @classmethod
    def quick(cls, **overrides) -> "ShrinkConfig":
        base = dict(minutes=None, tokens=2 * 8 * 2 * 32, candidates=2, calibration_tokens=512, proxy_tokens=256,
                    eval_tokens=512, eval_seq_len=64, chat_prompts=4, seq_len=32, batch_size=2, curve_points=2)
        return cls(**{**base, **overrides})


# ------------------------------------------------------------------------------- the state
# What a shrink run writes into its directory (an --overwrite deletes these and nothing else).
OUTPUTS = (STATE, "work", "model", "hf", "report.md", "results.json", "pareto.png", "recovery.png")


def _state(out: Path, settings: dict, resume: bool) -> dict:
    """The run's stage state: read back on --resume (RunDirectory checked the settings), else new."""
    if resume and (out / STATE).is_file():
        return json.loads((out / STATE).read_text())
    state = {"config": settings, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "elapsed_s": 0.0}
    write_json(out / STATE, state)
    return state


class _Curve:
    """Training hook: the held-out proxy perplexity every few steps (the recovery curve), with an
    ETA line; its points travel in the training checkpoints, so a resumed stage keeps them."""

    def __init__(self, model, proxy, device, every: int, offset_tokens: int, tokens_per_step: int, total: int,
                 label: str, log: Callable[[str], None], deadline: Callable[[], bool] | None = None):
        self.model, self.proxy, self.device, self.every = model, proxy, device, every
        self.deadline, self.stopped = deadline, False
        self.offset, self.tokens_per_step, self.total, self.label, self.log = (
            offset_tokens, tokens_per_step, total, label, log)
        self.points: list[tuple[int, float]] = []
        self.t0 = time.perf_counter()
        self.first_step: int | None = None

    def regularizer(self):
        return 0.0

    def stop_requested(self) -> bool:
        return self.stopped

    def after_step(self, step: int) -> None:
        if self.first_step is None:
            self.first_step, self.t0 = step - 1, time.perf_counter()
        # decided here, once per step, so that the stop and the curve's last point agree
        self.stopped = self.deadline is not None and self.deadline()
        if step % self.every and step != self.total and not self.stopped:
            return
        was = self.model.training
        ppl = math.exp(proxy_loss(self.model, self.proxy, self.device))
        self.model.train(was)
        self.points.append((self.offset + step * self.tokens_per_step, ppl))
        rate = (time.perf_counter() - self.t0) / max(1, step - self.first_step)
        self.log(f"    {self.label} step {step}/{self.total}  proxy perplexity {ppl:,.2f}  "
                 f"(about {_duration(rate * (self.total - step))} left in this stage)")

    def state_dict(self) -> dict:
        return {"points": self.points}

    def load_state_dict(self, state: dict) -> None:
        self.points = [tuple(p) for p in state["points"]]


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


@torch.no_grad()
def proxy_loss(model, batches: list[torch.Tensor], device) -> float:
    """Mean next-token cross-entropy over ``batches`` of token rows."""
    model.eval()
    total, count = 0.0, 0
    for tokens in batches:
        tokens = tokens.to(device)
        logits = model(tokens[:, :-1]).float()
        total += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(),
                                                         reduction="sum"))
        count += tokens[:, 1:].numel()
    return total / count


def transfer_fraction(scfg: ShrinkConfig, cand: Candidate) -> float:
    """The share of ``cand``'s tokens spent on attention transfer: none for a start fitted by the loss.
    Transfer fits each layer's attention output in squared error, which such a start trades away on
    purpose where the loss does not notice: on SmolLM2 at KV/2, 10 transfer steps took the allocated
    start from proxy perplexity 10.54 to 11.42, while for plain-PCA starts they help distillation."""
    return 0.0 if cand.change.get("method") == "fisher" else scfg.transfer_fraction


def _attach_mlp_lora(model, scfg: ShrinkConfig) -> None:
    """``--train lora``: LoRA (alpha = 2 r) on every MLP projection; the attention trains in full."""
    from kvlab.peft.lora import LoraConfig, apply_lora

    apply_lora(model, LoraConfig(r=scfg.lora_rank, alpha=2.0 * scfg.lora_rank,
                                 target_modules=("gate_proj", "up_proj", "down_proj")))


def _train_only(train: str) -> str:
    """The training loop's name for a ``--train`` choice."""
    return "attention+adapter" if train == "lora" else train


def _seconds_per_step(model, objective, batch, train_only: str, device) -> float:
    """Wall time of one training step (forward and backward) of ``objective``, measured."""
    from kvlab.training.loop import trainable_parameters

    objective.prepare(torch.device(device))
    trainable_parameters(model, train_only)
    model.train()
    times = []
    for _ in range(3):
        t = time.perf_counter()
        (objective.loss(model, tuple(x.to(device) for x in batch)) / max(1, objective.count(batch))).backward()
        model.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    model.eval()
    # The optimizer step (of the trainable part) and logging come on top, but in the runs so far the
    # loop's steps were 10-15 % faster than this measurement anyway (SmolLM2 distillation on 2 cores:
    # 8.3-8.6 s against 9.3-10.0 s measured), so no margin is added.
    return min(times[1:])


# --------------------------------------------------------------------------------- the run
def run_shrink(model_ref: str, out_dir: str | Path, scfg: ShrinkConfig, *, resume: bool = False,
               overwrite: bool = False, log: Callable[[str], None] = print) -> dict:
    """Run (or resume) the pipeline of the module docstring; returns ``results.json``'s content."""
    from kvlab.io import load_config
    from kvlab.io.rundir import RunDirectory

    parse_kv_budget(scfg.kv, load_config(model_ref))          # bad input fails before any directory is made
    settings = {"model": model_ref, **dataclasses.asdict(scfg)}
    with RunDirectory(out_dir, "shrink", settings, entries=OUTPUTS, resume=resume, overwrite=overwrite, log=log,
                      scaffolding=(STATE,)):
        return _run_shrink(model_ref, Path(out_dir), scfg, settings, resume, log)


def _run_shrink(model_ref: str, out: Path, scfg: ShrinkConfig, settings: dict, resume: bool,
                log: Callable[[str], None]) -> dict:
    import kvlab
    from kvlab.data.corpus import builtin_corpus
    from kvlab.data.instruct import make_tasks
    from kvlab.data.windows import Windows, calibration_batches, tokenize_to_file
    from kvlab.eval.perplexity import evaluate
    from kvlab.eval.tasks import greedy_replies, task_accuracy
    from kvlab.training import AttentionTransfer, Distillation, TrainConfig, checkpoint_dirs, train

    t_start = time.perf_counter()
    state = _state(out, settings, resume)
    elapsed_before = state.get("elapsed_s", 0.0)

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - t_start

    def save_state() -> None:
        state["elapsed_s"] = elapsed()
        write_json(out / STATE, state)

    device = scfg.device
    base = kvlab.load(model_ref, device=device)
    base.eval()
    for p in base.parameters():
        p.requires_grad_(False)
    tok = base.tokenizer
    if tok is None:
        raise ConfigError(f"{model_ref} has no tokenizer; kvlab shrink reads text (calibration, training, evaluation)")
    budget = parse_kv_budget(scfg.kv, base.cfg)
    candidates = enumerate_candidates(base.cfg, budget)
    original_bytes = base.cfg.kv_bytes_per_token("bf16")
    log(f"{model_ref}: {original_bytes:,} KV bytes per token (bf16); budget {budget:,} "
        f"({original_bytes / budget:.1f}x smaller); {len(candidates)} candidate wirings")

    # Data: calibration and training from the train split; proxy = held-out windows of the train
    # split (ranking and the recovery curve); validation split only for the final numbers.
    train_tokens = tokenize_to_file(builtin_corpus("train"), tok, progress=False).tokens
    builtin_train_tokens = train_tokens
    calibration = calibration_batches(tok, scfg.calibration_tokens, seed=scfg.seed)
    proxy_len = min(scfg.eval_seq_len, base.cfg.max_seq_len)
    proxy_rows = max(1, -(-scfg.proxy_tokens // proxy_len))
    proxy_all = Windows(train_tokens, proxy_len, proxy_rows, seed=scfg.seed + 1_000_003).batch(0)
    proxy = [torch.cat([x, y[:, -1:]], 1) for x, y in [(proxy_all[0][i:i + 2], proxy_all[1][i:i + 2])
                                                       for i in range(0, proxy_rows, 2)]]
    docs = builtin_corpus("validation")
    eval_seq = min(scfg.eval_seq_len, base.cfg.max_seq_len)
    chats = make_tasks(scfg.chat_prompts, seed=scfg.seed + 1_000_003)      # the held-out instruction prompts

    # ---- the original's numbers
    if "original" not in state:
        log("scoring the original model...")
        t = time.perf_counter()
        ev = evaluate(base, tok, docs, seq_len=eval_seq, max_tokens=scfg.eval_tokens, progress=False)
        eval_s = time.perf_counter() - t
        t = time.perf_counter()
        replies = greedy_replies(base, tok, chats)
        chat_s = time.perf_counter() - t
        t = time.perf_counter()
        proxy_ppl = math.exp(proxy_loss(base, proxy, device))
        proxy_s = time.perf_counter() - t
        state["original"] = {"name": "original", "kv_bytes": original_bytes, "proxy_s": proxy_s,
                             "proxy_ppl": proxy_ppl, "val": ev.to_dict(),
                             "chat": task_accuracy(base, tok, chats, replies=replies), "replies": replies,
                             "eval_s": eval_s, "chat_s": chat_s}
        save_state()
    original = state["original"]
    log(f"  original: validation perplexity {original['val']['perplexity']:.3f}, proxy {original['proxy_ppl']:.3f}, "
        f"chat exact match {original['chat']['accuracy']:.0%}")

    # ---- rank at alpha = 0
    moments = None
    if "ranking" not in state:
        log(f"ranking {len(candidates)} candidates at alpha = 0 ({scfg.calibration_tokens:,} calibration tokens)...")
        moments = moments_for(base, candidates, calibration)
        ranking = []
        for cand in candidates:
            model = convert_candidate(base, cand, calibration, moments)
            ppl = math.exp(proxy_loss(model, proxy, device))
            ranking.append({"name": cand.name, "kind": cand.kind, "change": cand.change, "kv_bytes": cand.kv_bytes,
                            "alpha0_proxy_ppl": ppl})
            log(f"  {cand.name:22} {cand.kv_bytes:>8,} B/token  proxy perplexity at alpha=0 {ppl:,.2f}")
            del model
        ranking.sort(key=lambda r: r["alpha0_proxy_ppl"])
        state["ranking"] = ranking
        save_state()
    chosen = [Candidate(r["name"], r["kind"], r["change"], r["kv_bytes"]) for r in state["ranking"][:scfg.candidates]]

    # ---- the training text
    if scfg.data == "library":
        from kvlab.data.corpus import library_corpus

        log("reading the library corpus (the first time: about a minute, then cached)...")
        train_tokens = tokenize_to_file(library_corpus("train"), tok, progress=False).tokens
        log(f"  {len(train_tokens):,} tokens of training text")
    if scfg.data in ("generated", "mixed"):
        generated_path = out / "work" / "generated.npy"
        if not generated_path.is_file():
            from kvlab.inference.generated_text import generate_corpus

            log(f"generating {scfg.generated_tokens:,} tokens of training text with the original model...")
            t = time.perf_counter()
            generated = generate_corpus(base, tok, scfg.generated_tokens, prompts=builtin_train_tokens,
                                        seq_len=scfg.seq_len, seed=scfg.seed)
            generated_path.parent.mkdir(parents=True, exist_ok=True)
            np.save(generated_path.with_suffix(".tmp.npy"), generated)
            generated_path.with_suffix(".tmp.npy").replace(generated_path)
            log(f"  {len(generated):,} tokens in {_duration(time.perf_counter() - t)}")
        generated = np.load(generated_path)
        train_tokens = generated if scfg.data == "generated" else np.concatenate([np.asarray(train_tokens), generated])

    # ---- the training budget
    tokens_per_step = scfg.batch_size * scfg.seq_len
    train_windows = Windows(train_tokens, scfg.seq_len, scfg.batch_size, seed=scfg.seed)
    if "plan" not in state:
        fractions = [transfer_fraction(scfg, cand) for cand in chosen]
        if scfg.tokens is not None:
            steps = [scfg.tokens // len(chosen) // tokens_per_step] * len(chosen)
            split = [(round(s * f), s - round(s * f)) for s, f in zip(steps, fractions)]
            timing = None
        else:
            if moments is None:
                moments = moments_for(base, chosen, calibration)
            probe = convert_candidate(base, chosen[0], calibration, moments)
            batch = train_windows.batch(0)
            t_transfer = (_seconds_per_step(probe, AttentionTransfer(base), batch, "attention", device)
                          if any(fractions) else 0.0)
            if scfg.train == "lora":
                _attach_mlp_lora(probe, scfg)
            t_kd = _seconds_per_step(probe, Distillation(base), batch, _train_only(scfg.train), device)
            del probe
            # Each candidate gets an equal share of what is left: its refit, its training (with the
            # recovery curve's points) and then its final proxy, evaluation, chat replies and saving.
            post = original["eval_s"] + original["chat_s"] + original["proxy_s"] + 20
            refit_s = (2.5 * scfg.calibration_tokens / scfg.proxy_tokens + 1) * original["proxy_s"] if scfg.refit else 0
            now = elapsed()
            seconds = scfg.minutes * 60 - now - 30
            per = max(0.0, seconds / len(chosen))
            # each candidate's tokens split f : 1 - f between the stages
            each = []
            for f in fractions:
                train_s = per - post - refit_s - (1 + (0 < f < 1)) * scfg.curve_points * original["proxy_s"]
                each.append(int(train_s / (f * t_transfer + (1 - f) * t_kd)) if train_s > 0 else 0)
            split = [(round(n * f), n - round(n * f)) for n, f in zip(each, fractions)]
            # The step times are measured but vary by 10-30 % between runs on a shared machine: training
            # also stops at each candidate's deadline (elapsed seconds), so the run keeps its minutes.
            deadlines = [now + (k + 1) * per - post for k in range(len(chosen))]
            timing = {"transfer_s_per_step": t_transfer, "kd_s_per_step": t_kd, "train_seconds": max(0.0, seconds),
                      "deadlines_s": deadlines}
            if not any(each):
                log("  the time budget is spent by loading, ranking and evaluation: no recovery training fits")
        state["plan"] = {"tokens_per_step": tokens_per_step, "steps": split, "timing": timing}
        save_state()
    plan = state["plan"]
    total_tokens = sum(a + b for a, b in plan["steps"]) * tokens_per_step
    per_candidate = ", ".join(f"{c.name}: {a} transfer + {b} distillation steps"
                              for c, (a, b) in zip(chosen, plan["steps"]))
    log(f"recovering {len(chosen)} candidate(s): {total_tokens:,} training tokens in all ({per_candidate})")
    most = max((a + b for a, b in plan["steps"]), default=0) * tokens_per_step
    if most > len(train_tokens):
        log(f"  note: a candidate trains on {most:,} tokens, more than the {len(train_tokens):,} of --data "
            f"{scfg.data}; it will see the same text {most / len(train_tokens):.1f} times"
            + (" (--data library has 14 times more)" if scfg.data in ("builtin", "mixed") else ""))

    # ---- recover and evaluate each chosen candidate
    results = state.setdefault("recovered", {})
    deadlines = (plan["timing"] or {}).get("deadlines_s")      # None with a token budget
    best_dir = out / "work" / "best"
    for cand, (n_transfer, n_kd) in zip(chosen, plan["steps"]):
        if cand.name in results:
            continue
        log(f"{cand.name}: converting, then recovering")
        if moments is None:
            moments = moments_for(base, chosen, calibration)
        student = convert_candidate(base, cand, calibration, moments)
        work = out / "work" / cand.slug
        points = [(0, next(r["alpha0_proxy_ppl"] for r in state["ranking"] if r["name"] == cand.name))]
        refit_ppl, refit_used = None, False
        if scfg.refit:
            from kvlab.convert.refit import refit_outputs

            t = time.perf_counter()
            converted = {k: v.clone() for k, v in student.state_dict().items() if ".o_proj." in k}
            provenance = student.provenance
            refit_outputs(base, student, calibration)
            refit_ppl = math.exp(proxy_loss(student, proxy, device))
            log(f"  output refit: proxy perplexity {points[0][1]:,.2f} -> {refit_ppl:,.2f} "
                f"({_duration(time.perf_counter() - t)})")
            refit_used = refit_ppl <= points[0][1]
            if not refit_used:     # fitted on calibration text, worse on held-out text: undo it
                student.load_state_dict(converted, strict=False)
                student.provenance = provenance
                log("  the refit made held-out perplexity worse; recovering from the conversion's projections")
            points.append((0, min(refit_ppl, points[0][1])))
        k = chosen.index(cand)

        def out_of_time(k=k) -> bool:
            return deadlines is not None and elapsed() > deadlines[k]
        stages = [("transfer", n_transfer, AttentionTransfer(base), scfg.transfer_lr, "attention", 1),
                  ("distillation", n_kd, Distillation(base), scfg.kd_lr, _train_only(scfg.train), 2)]
        offset = 0
        boundaries = []
        for name, n_steps, objective, lr, train_only, seed in stages:
            if n_steps <= 0 or (boundaries and out_of_time()):
                continue
            if train_only == "attention+adapter":
                _attach_mlp_lora(student, scfg)       # before resuming: its checkpoints hold the adapter
            curve = _Curve(student, proxy, device, max(1, n_steps // scfg.curve_points), offset, tokens_per_step,
                           n_steps, name, log, deadline=out_of_time)
            tcfg = TrainConfig(out_dir=str(work / name), max_steps=n_steps, batch_size=scfg.batch_size,
                               seq_len=scfg.seq_len, lr=lr, warmup_steps=max(1, n_steps // 10), weight_decay=0.0,
                               eval_every=10**9, save_every=max(1, n_steps // 4), keep_last=1, log_every=10**9,
                               train_only=train_only, seed=seed)
            resumable = bool(checkpoint_dirs(work / name))   # a stage that an interruption cut short
            summary = train(student, Windows(train_tokens, scfg.seq_len, scfg.batch_size, seed=scfg.seed + seed), None,
                            tcfg, resume=resumable, device=device, quiet=True, hooks=curve, objective=objective)
            done = summary.get("step", n_steps)
            if done < n_steps:
                log(f"    {name}: the time budget ended the stage after {done} of {n_steps} steps")
            points += curve.points
            offset += done * tokens_per_step
            boundaries.append({"stage": name, "tokens": offset})
        if getattr(student, "lora_config", None) is not None:
            from kvlab.peft.lora import merge_and_unload

            merge_and_unload(student)
        student.eval()
        for p in student.parameters():
            p.requires_grad_(False)
        proxy_ppl = math.exp(proxy_loss(student, proxy, device))
        ev = evaluate(student, tok, docs, seq_len=eval_seq, max_tokens=scfg.eval_tokens, progress=False)
        replies = greedy_replies(student, tok, chats)
        agree = sum(a == b for a, b in zip(replies, original["replies"])) / len(chats)
        prefix = sum(_common_prefix(a, b) / max(1, len(b)) for a, b in zip(replies, original["replies"])) / len(chats)
        results[cand.name] = {"name": cand.name, "kind": cand.kind, "change": cand.change, "kv_bytes": cand.kv_bytes,
                              "proxy_ppl": proxy_ppl, "refit_proxy_ppl": refit_ppl, "refit_used": refit_used,
                              "val": ev.to_dict(),
                              "curve": points,
                              "stages": boundaries, "train_tokens": offset,
                              "chat": task_accuracy(student, tok, chats, replies=replies), "chat_agreement": agree,
                              "chat_prefix_agreement": prefix}
        log(f"  {cand.name}: validation perplexity {ev.perplexity:.3f} "
            f"({100 * (ev.perplexity / original['val']['perplexity'] - 1):+.1f} %), proxy {proxy_ppl:.3f}, "
            f"chat replies equal to the original's {agree:.0%} (common prefix {prefix:.0%} of their length)")
        best_name = state.get("best")
        if best_name is None or proxy_ppl < results[best_name]["proxy_ppl"]:
            _save_model(student, best_dir, cand, state, out)
            state["best"] = cand.name
        save_state()
        shutil.rmtree(work, ignore_errors=True)        # this run's own training checkpoints
        del student

    return _finish(out, state, base, model_ref, budget, elapsed, save_state, log)


def _save_model(student, best_dir: Path, cand: Candidate, state: dict, out: Path) -> None:
    from kvlab.io import save_checkpoint
    from kvlab.io.provenance import record_step

    record_step(student, "shrink", kv=state["config"]["kv"], candidate=cand.name)
    if best_dir.exists():
        shutil.rmtree(best_dir)                          # written by this run (out/work is ours)
    save_checkpoint(student, best_dir)


def _finish(out: Path, state: dict, base, model_ref: str, budget: int, elapsed, save_state, log) -> dict:
    import kvlab
    from kvlab.io import save_checkpoint
    from kvlab.io.hf import config_to_hf, export_hf

    best = state["best"]
    model_dir, hf_dir = out / "model", out / "hf"
    if not model_dir.exists():
        save_checkpoint(kvlab.load(out / "work" / "best"), model_dir)
    best_model = kvlab.load(model_dir)
    hf_note = None
    try:
        config_to_hf(best_model.cfg, best_model.dtype, best_model)
        if not hf_dir.exists():
            export_hf(best_model, hf_dir)
    except ConfigError as e:
        hf_note = str(e)
    state["hf_export"] = None if hf_note else "hf"
    state["hf_note"] = hf_note
    save_state()
    results = {"model": model_ref, "budget_bytes_per_token": budget, "original": _public(state["original"]),
               "ranking": state["ranking"], "recovered": [_public(r) for r in state["recovered"].values()],
               "best": best, "plan": state["plan"], "hf_export": state["hf_export"], "hf_note": hf_note,
               "config": state["config"], "elapsed_s": elapsed()}
    write_json(out / "results.json", results)
    from kvlab.recipes.shrink_report import plot_pareto, plot_recovery, write_report

    plot_pareto(results, out / "pareto.png")
    plot_recovery(results, out / "recovery.png")
    write_report(results, out / "report.md")
    shutil.rmtree(out / "work", ignore_errors=True)         # this run's checkpoints and generated text
    log(f"chose {best}: {out / 'model'} (kvlab)" + ("" if hf_note else f", {hf_dir} (transformers)")
        + f"; report {out / 'report.md'}; {elapsed() / 60:.1f} min in all")
    return results


def _public(entry: dict) -> dict:
    return {k: v for k, v in entry.items() if k != "replies"}

