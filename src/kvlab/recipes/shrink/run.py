"""``kvlab shrink`` as a run of named stages over a typed state (:class:`ShrinkRun`).

:meth:`ShrinkRun.setup` loads the original and the data; then each stage reads what it needs from
the state and records its result there, and a stage whose result is already there (a resumed run)
is skipped: score the original, enumerate and rank the candidates, plan the recovery, recover and
evaluate each chosen candidate, export the best, report.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from kvlab.convert.balance import BALANCE_WINDOW, balance_keys, balanceable_layers
from kvlab.errors import ConfigError
from kvlab.eval.suite import suite_summary
from kvlab.models.modes import frozen
from kvlab.recipes.shrink.candidates import (
    Candidate,
    admitted_by,
    balanced_like,
    convert_candidate,
    enumerate_candidates,
    integer_keys,
    moments_for,
    parse_kv_budget,
    resolve_candidates,
    undominated,
)
from kvlab.recipes.shrink.config import ShrinkConfig
from kvlab.recipes.shrink.evaluation import EvalSet, ProxyCurve, duration, proxy_perplexity
from kvlab.recipes.shrink.planning import (
    StepTimes,
    attach_mlp_lora,
    seconds_per_step,
    split_by_time,
    split_by_tokens,
    transfer_fraction,
)
from kvlab.recipes.shrink.ranking import choose, rank_candidates
from kvlab.recipes.shrink.speed import decode_ratio, serving_gain
from kvlab.recipes.shrink.state import (
    STATE,
    OriginalScore,
    RankedCandidate,
    RecoveredCandidate,
    RecoveryPlan,
    ShrinkState,
)
from kvlab.recipes.shrink.targets import get_target
from kvlab.recipes.shrink.text import RunText

# What a shrink run writes into its directory (an --overwrite deletes these and nothing else).
OUTPUTS = (STATE, "work", "model", "hf", "model.gguf", "report.md", "results.json", "pareto.png", "recovery.png")


class ShrinkRun:
    """One run of ``kvlab shrink`` in its directory ``out`` (held by a RunDirectory)."""

    def __init__(self, model_ref: str, out: Path, scfg: ShrinkConfig, settings: dict, resume: bool,
                 log: Callable[[str], None]):
        self.model_ref, self.out, self.scfg, self.log = model_ref, out, scfg, log
        self.target = get_target(scfg.target)
        self.t_start = time.perf_counter()
        resumed = resume and (out / STATE).is_file()
        self.state = ShrinkState.load(out / STATE) if resumed else ShrinkState(config=settings)
        self.elapsed_before = self.state.elapsed_s
        if not resumed:
            self.save()
        self._moments: dict | None = None
        # seconds one decode-speed measurement took when choosing: each evaluation makes three
        self.speed_seconds = 0.0

    def elapsed(self) -> float:
        """Seconds of this run, the interrupted runs it resumes included."""
        return self.elapsed_before + time.perf_counter() - self.t_start

    def save(self) -> None:
        self.state.elapsed_s = self.elapsed()
        self.state.save(self.out / STATE)

    # --------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        """The original (frozen), its budget and candidates, and the run's text. Calibration and
        training come from the train split; the proxy is held-out windows of the train split (ranking
        and the recovery curve); the validation split serves only the final numbers."""
        import kvlab
        from kvlab.data.windows import calibration_batches
        from kvlab.eval.suite import build_suite

        scfg = self.scfg
        self.base = frozen(kvlab.load(self.model_ref, device=scfg.device))
        self.tok = self.base.tokenizer
        self.target.check_model(self.base)
        if self.tok is None:
            raise ConfigError(f"{self.model_ref} has no tokenizer; kvlab shrink reads text (calibration, training, "
                              f"evaluation)")
        self.text = RunText(scfg.data, self.tok, work=self.out / "work", generated_tokens=scfg.generated_tokens,
                            window=scfg.seq_len, generate=self._generate, log=self.log)
        self.state.validation_text = self.text.validation_name
        self.budget = parse_kv_budget(scfg.kv, self.base.cfg)
        self.candidates = self._candidates()
        original = self.base.cfg.kv_bytes_per_token("bf16")
        self.log(f"{self.model_ref}: {original:,} KV bytes per token (bf16); budget {self.budget:,} "
                 f"({original / self.budget:.1f}x smaller); {len(self.candidates)} candidate caches"
                 + (f" that {self.target.name} runs ({len(self.state.refused)} it does not)"
                    if self.target.name != "kvlab" else ""))
        self.calibration = calibration_batches(self.tok, scfg.calibration_tokens, seed=scfg.seed,
                                               text=self.text.reference)
        self.balance_text = None
        if (scfg.balance_keys and self.target.balances_keys and any(integer_keys(c.precision) for c in self.candidates)
                and balanceable_layers(self.base.cfg)):
            # Exact in float (the original's scores are the same); integer caches round less. Fitted on
            # windows of BALANCE_WINDOW tokens (kvlab.convert.balance).
            seq_len = min(self.context, BALANCE_WINDOW)
            self.balance_text = calibration_batches(self.tok, scfg.calibration_tokens, seq_len=seq_len,
                                                    batch_size=max(1, 4096 // seq_len), seed=scfg.seed,
                                                    text=self.text.reference)
            self.base = frozen(balance_keys(self.base, self.balance_text))
            self.state.keys_balanced = True
            self.log(f"  integer caches store the keys centred and balanced against the queries (fitted on "
                     f"{scfg.calibration_tokens:,} tokens in {seq_len:,}-token windows)")
        proxy_len = min(scfg.eval_seq_len, self.base.cfg.max_seq_len)
        rows = max(1, -(-scfg.proxy_tokens // proxy_len))
        proxy_len = min(proxy_len, self.text.reference.shortest - 2)
        x, y = self.text.reference.windows(proxy_len, rows, seed=scfg.seed + 1_000_003).batch(0)
        proxy = [torch.cat([x[i:i + 2], y[i:i + 2, -1:]], 1) for i in range(0, rows, 2)]
        eval_len = min(scfg.eval_seq_len, self.base.cfg.max_seq_len)
        suite = build_suite(self.tok, self.base.cfg.max_seq_len, domain_tokens=scfg.offdomain_tokens,
                            passkey_lengths=scfg.passkey_lengths, task_items=scfg.task_items, seq_len=eval_len,
                            seed=scfg.seed)
        self.evalset = EvalSet(proxy, self.text.validation, eval_len, scfg.eval_tokens, suite)

    def _candidates(self) -> list[Candidate]:
        """The caches within the budget that the target runtime executes (the others, with the reason,
        go to the report)."""
        precisions = undominated([p for p in self.scfg.precision_values if p in self.target.precisions])
        if not precisions:
            raise ConfigError(f"--target {self.target.name} stores none of --precisions "
                              f"{','.join(self.scfg.precisions)}; it stores "
                              f"{', '.join('none' if p is None else p for p in self.target.precisions)}")
        every = enumerate_candidates(self.base.cfg, self.budget, precisions)
        admitted, self.state.refused = admitted_by(self.target, self.base.cfg, every)
        if not admitted:
            reasons = "; ".join(sorted(set(self.state.refused.values())))
            raise ConfigError(f"none of the {len(every)} caches within {self.budget:,} bytes per token runs in "
                              f"{self.target.name}: {reasons}. Give a larger --kv or --target kvlab")
        return admitted

    def moments(self, candidates: list[Candidate]) -> dict:
        """The calibration statistics, computed once per process (for ``candidates`` the first time)."""
        if self._moments is None:
            self._moments = moments_for(self.base, candidates, self.calibration)
        return self._moments

    @property
    def chosen(self) -> list[Candidate]:
        """The candidates chosen for recovery, in ranking order."""
        return [r.candidate for r in self.state.ranking if r.name in self.state.chosen]

    @property
    def context(self) -> int:
        """The context decode speed is measured at: ``--context``, else the model's trained context
        (at most 4,096 tokens)."""
        return self.scfg.context or min(self.base.cfg.max_seq_len, 4096)

    # -------------------------------------------------------------------------------- stages
    def score_original(self) -> OriginalScore:
        if self.state.original is None:
            self.log("scoring the original model...")
            score = self.evalset.score(self.base, self.tok)
            self.state.original = OriginalScore(name="original", kv_bytes=self.base.cfg.kv_bytes_per_token("bf16"),
                                                **score)
            self.save()
        original = self.state.original
        self.log(f"  original: validation perplexity {original.val['perplexity']:.3f}, proxy "
                 f"{original.proxy_ppl:.3f}" + suite_summary(original.suite))
        return original

    def rank(self) -> list[RankedCandidate]:
        """Every candidate converted with its best start and scored at α = 0, best first
        (:func:`~kvlab.recipes.shrink.ranking.rank_candidates`)."""
        if self.state.ranking is None:
            self.log(f"ranking {len(self.candidates)} candidates at alpha = 0 ({self.scfg.calibration_tokens:,} "
                     f"calibration tokens)...")
            candidates = resolve_candidates(self.base, self.candidates, self.calibration,
                                            lambda: self.moments(self.candidates), self.log)
            self.state.ranking = rank_candidates(self.base, candidates, self.calibration,
                                                 lambda: self.moments(self.candidates), self.evalset.proxy,
                                                 self.scfg, self.log, self.balance_text)
            self.save()
        return self.state.ranking

    def choose(self) -> list[Candidate]:
        """The best-ranked candidates that decode no slower than the original
        (:func:`~kvlab.recipes.shrink.ranking.choose`)."""
        if self.state.chosen is None:
            self.state.chosen = choose(self.base, self.state.ranking, self.scfg, self.context, self.log)
            self.save()
        return self.chosen

    def _generate(self, n_tokens: int, prompts: np.ndarray) -> np.ndarray:
        """``n_tokens`` of text the original samples (``--data generated``), prompted from ``prompts``."""
        from kvlab.inference.generated_text import generate_corpus

        return generate_corpus(self.base, self.tok, n_tokens, prompts=prompts, seq_len=self.scfg.seq_len,
                               seed=self.scfg.seed)

    def plan_recovery(self, chosen: list[Candidate], train_tokens) -> RecoveryPlan:
        """Each chosen candidate's transfer and distillation steps within the budget."""
        scfg = self.scfg
        tokens_per_step = scfg.batch_size * scfg.seq_len
        if self.state.plan is None:
            if scfg.tokens is not None:
                steps, timing = split_by_tokens(scfg, chosen, tokens_per_step), None
            else:
                steps, timing = split_by_time(scfg, chosen, self._step_times(chosen, train_tokens), self.elapsed())
                if any(c.restructured for c in chosen) and not any(a + b for a, b in steps):
                    self.log("  the time budget is spent by loading, ranking and evaluation: no recovery training "
                             "fits")
            self.state.plan = RecoveryPlan(tokens_per_step, steps, timing)
            self.save()
        plan = self.state.plan
        total = sum(a + b for a, b in plan.steps) * tokens_per_step
        each = ", ".join(f"{c.name}: {a} transfer + {b} distillation steps" for c, (a, b) in zip(chosen, plan.steps))
        self.log(f"recovering {len(chosen)} candidate(s): {total:,} training tokens in all ({each})")
        most = max((a + b for a, b in plan.steps), default=0) * tokens_per_step
        if most > train_tokens.n_tokens:
            self.log(f"  note: a candidate trains on {most:,} tokens, more than the {train_tokens.n_tokens:,} of "
                     f"--data {scfg.data}; it will see the same text {most / train_tokens.n_tokens:.1f} times"
                     + (" (--data library has 14 times more)" if scfg.data in ("builtin", "mixed") else ""))
        return plan

    def _step_times(self, chosen: list[Candidate], train_tokens) -> StepTimes:
        """Step times measured on the first chosen candidate, and the original's scoring times."""
        from kvlab.training import AttentionTransfer, Distillation

        scfg, original = self.scfg, self.state.original
        # a candidate's scoring reads each text twice (it and the original: the fidelity), the tasks once
        domain_tokens = self.evalset.suite.domain_tokens * len(self.evalset.suite.domains)
        # and a structure with a quantized cache once more with a float cache (the structure alone)
        composed = any(c.restructured and c.kv_quant is not None for c in chosen)
        eval_s = (original.eval_s * (2 + composed + 2 * domain_tokens / max(1, original.val["tokens"]))
                  + original.suite_s + original.proxy_s + 3 * self.speed_seconds + 20)
        trained = [c for c in chosen if c.restructured]
        if not trained:                    # quantized caches of the original: nothing to time
            return StepTimes(transfer_s=0.0, kd_s=0.0, proxy_s=original.proxy_s, refit_s=0.0, eval_s=eval_s)
        probe = convert_candidate(self.base, trained[0], self.calibration, self.moments(chosen), self.balance_text)
        batch = train_tokens.windows(scfg.seq_len, scfg.batch_size, seed=scfg.seed).batch(0)
        uses_transfer = any(transfer_fraction(scfg, cand) for cand in trained)
        t_transfer = (seconds_per_step(probe, AttentionTransfer(self.base), batch, "attention", scfg.device)
                      if uses_transfer else 0.0)
        if scfg.train == "lora":
            attach_mlp_lora(probe, scfg)
        t_kd = seconds_per_step(probe, Distillation(self.base), batch, scfg.train_only, scfg.device)
        refit_s = (2.5 * scfg.calibration_tokens / scfg.proxy_tokens + 1) * original.proxy_s if scfg.refit else 0
        return StepTimes(transfer_s=t_transfer, kd_s=t_kd, proxy_s=original.proxy_s, refit_s=refit_s, eval_s=eval_s)

    def recover(self, cand: Candidate, steps: tuple[int, int], train_tokens, deadline: float | None):
        """``cand`` converted, its output projections refitted if asked, then trained: attention
        transfer, then distillation, each stopping at the candidate's deadline (elapsed seconds).
        Returns the student and its record so far (curve, stages, tokens, refit)."""
        alpha0 = next(r.alpha0_proxy_ppl for r in self.state.ranking if r.name == cand.name)
        record = {"curve": [(0, alpha0)], "refit_proxy_ppl": None, "refit_used": False}
        if not cand.restructured:
            self.log(f"{cand.name}: the original model with its cache stored in {cand.precision}: nothing to train")
            return copy.deepcopy(self.base), {**record, "stages": [], "train_tokens": 0}
        self.log(f"{cand.name}: converting, then recovering")
        student = convert_candidate(self.base, cand, self.calibration, self.moments(self.chosen), self.balance_text)
        if self.scfg.refit:
            self._refit(student, record, cand)
        record.update(self._train(student, cand, steps, train_tokens, deadline, record["curve"]))
        if getattr(student, "lora_config", None) is not None:
            from kvlab.peft.lora import merge_and_unload

            merge_and_unload(student)
        return balanced_like(self.base, student, cand, self.balance_text), record

    def _refit(self, student, record: dict, cand: Candidate) -> None:
        """The closed-form output refit, kept only if it lowers the held-out proxy perplexity."""
        from kvlab.convert.refit import refit_outputs

        t = time.perf_counter()
        before = record["curve"][0][1]
        converted = {k: v.clone() for k, v in student.state_dict().items() if ".o_proj." in k}
        provenance = student.provenance
        refit_outputs(self.base, student, self.calibration)
        ppl = proxy_perplexity(student, self.evalset.proxy, cand.kv_quant)
        self.log(f"  output refit: proxy perplexity {before:,.2f} -> {ppl:,.2f} ({duration(time.perf_counter() - t)})")
        record.update(refit_proxy_ppl=ppl, refit_used=ppl <= before)
        if not record["refit_used"]:     # fitted on calibration text, worse on held-out text: undo it
            student.load_state_dict(converted, strict=False)
            student.provenance = provenance
            self.log("  the refit made held-out perplexity worse; recovering from the conversion's projections")
        record["curve"].append((0, min(ppl, before)))

    def _train(self, student, cand: Candidate, steps: tuple[int, int], train_tokens, deadline: float | None,
               curve: list) -> dict:
        from kvlab.training import AttentionTransfer, Distillation, TrainConfig, checkpoint_dirs, train

        scfg, work = self.scfg, self.out / "work" / cand.slug
        tokens_per_step = scfg.batch_size * scfg.seq_len

        def out_of_time() -> bool:
            return deadline is not None and self.elapsed() > deadline
        stages = [("transfer", steps[0], AttentionTransfer(self.base), scfg.transfer_lr, "attention", 1),
                  ("distillation", steps[1], Distillation(self.base), scfg.kd_lr, scfg.train_only, 2)]
        offset, boundaries = 0, []
        for name, n_steps, objective, lr, train_only, seed in stages:
            if n_steps <= 0 or (boundaries and out_of_time()):
                continue
            if train_only == "attention+adapter":
                attach_mlp_lora(student, scfg)       # before resuming: its checkpoints hold the adapter
            hook = ProxyCurve(student, self.evalset.proxy, max(1, n_steps // scfg.curve_points), offset,
                              tokens_per_step, n_steps, name, self.log, deadline=out_of_time, kv_quant=cand.kv_quant)
            tcfg = TrainConfig(out_dir=str(work / name), max_steps=n_steps, batch_size=scfg.batch_size,
                               seq_len=scfg.seq_len, lr=lr, warmup_steps=max(1, n_steps // 10), weight_decay=0.0,
                               eval_every=10**9, save_every=max(1, n_steps // 4), keep_last=1, log_every=10**9,
                               train_only=train_only, seed=seed)
            resumable = bool(checkpoint_dirs(work / name))   # a stage that an interruption cut short
            summary = train(student, train_tokens.windows(scfg.seq_len, scfg.batch_size, seed=scfg.seed + seed),
                            None, tcfg, resume=resumable, device=scfg.device, quiet=True, hooks=hook,
                            objective=objective)
            done = summary.get("step", n_steps)
            if done < n_steps:
                self.log(f"    {name}: the time budget ended the stage after {done} of {n_steps} steps")
            curve += hook.points
            offset += done * tokens_per_step
            boundaries.append({"stage": name, "tokens": offset})
        return {"curve": curve, "stages": boundaries, "train_tokens": offset}

    def evaluate(self, cand: Candidate, student, record: dict) -> RecoveredCandidate:
        """The recovered ``student``'s scores, its cache in the candidate's precision, and its decode
        step against the original's at 512 and 2,048 tokens and at the run's context; it becomes the
        run's best (saved in ``OUT/work/best``) if its held-out proxy perplexity is the lowest so far."""
        student.eval()
        for p in student.parameters():
            p.requires_grad_(False)
        original = self.state.original
        # a structure with a quantized cache is also scored with a float cache: what the structure costs alone
        score = self.evalset.score(student, self.tok, kv_quant=cand.kv_quant, original=self.base,
                                   structure_alone=cand.restructured and cand.kv_quant is not None)
        contexts = sorted({c for c in (512, 2048, self.context) if c <= self.base.cfg.max_seq_len} or {self.context})
        speed = {str(c): decode_ratio(self.base, student, cand.kv_quant, batch=self.scfg.speed_batch, context=c,
                                      rounds=self.scfg.speed_rounds, seed=self.scfg.seed).to_dict() for c in contexts}
        result = RecoveredCandidate(
            name=cand.name, family=cand.family, kind=cand.kind, change=cand.change, kv_bytes=cand.kv_bytes,
            precision=cand.precision, proxy_ppl=score["proxy_ppl"], refit_proxy_ppl=record["refit_proxy_ppl"],
            refit_used=record["refit_used"], val=score["val"], curve=record["curve"], stages=record["stages"],
            train_tokens=record["train_tokens"], speed=speed, fidelity=score["fidelity"], suite=score["suite"],
            structure_alone=score.get("structure_alone"))
        self.state.recovered[cand.name] = result
        self.log(f"  {cand.name}: validation perplexity {result.val['perplexity']:.3f} "
                 f"({100 * (result.val['perplexity'] / original.val['perplexity'] - 1):+.1f} %), KL to the "
                 f"original {result.fidelity['kl']:.4f} nats/token, top-1 agreement "
                 f"{result.fidelity['top1_agreement']:.1%}, proxy "
                 f"{result.proxy_ppl:.3f}" + suite_summary(result.suite, original.suite) + "; decode step "
                 + ", ".join(f"{v['ratio']:.2f}x at {int(c):,}" for c, v in speed.items()))
        best = self.state.best
        if best is None or result.proxy_ppl < self.state.recovered[best].proxy_ppl:
            self._save_best(student, cand)
            self.state.best = cand.name
        self.save()
        return result

    def _save_best(self, student, cand: Candidate) -> None:
        from kvlab.io import save_checkpoint
        from kvlab.io.provenance import record_step

        record_step(student, "shrink", kv=self.state.config["kv"], candidate=cand.name, kv_cache=cand.precision)
        best_dir = self.out / "work" / "best"
        if best_dir.exists():
            shutil.rmtree(best_dir)                          # written by this run (out/work is ours)
        save_checkpoint(student, best_dir)

    def export(self) -> None:
        """The best model as a kvlab checkpoint in ``OUT/model``; in the target runtime's format
        (``OUT/hf``, ``OUT/model.gguf``); and for the kvlab target, where transformers has its
        architecture, an HF export in ``OUT/hf`` too (else the reason, in the report)."""
        import kvlab
        from kvlab.io import save_checkpoint
        from kvlab.io.hf import config_to_hf, export_hf

        model_dir, hf_dir = self.out / "model", self.out / "hf"
        if not model_dir.exists():
            save_checkpoint(kvlab.load(self.out / "work" / "best"), model_dir)
        best_model = kvlab.load(model_dir)
        written = self.target.write(best_model, self.out)
        self.state.target_output = None if written is None else written.name
        self.state.target_notes = self.target.notes(best_model.cfg)
        hf_note = None
        try:
            config_to_hf(best_model.cfg, best_model.dtype, best_model)
            if not hf_dir.exists():
                export_hf(best_model, hf_dir)
        except ConfigError as e:
            hf_note = str(e)
        self.state.hf_export = None if hf_note else "hf"
        self.state.hf_note = hf_note
        self.save()

    def serving(self) -> None:
        """The chosen model's serving gain: kvlab serve's engine at one KV budget, against the original."""
        if self.state.serving is None:
            import kvlab

            scfg = self.scfg
            best = next(r for r in self.state.ranking if r.name == self.state.best).candidate
            self.log(f"serving gain: {scfg.serve_clients} requests at once, a KV budget for "
                     f"{scfg.serve_original_seqs} of the original's...")
            gain = serving_gain(self.base, kvlab.load(self.out / "model", device=scfg.device), best.kv_quant,
                                clients=scfg.serve_clients, prompt_tokens=scfg.serve_prompt_tokens,
                                max_tokens=scfg.serve_max_tokens, original_seqs=scfg.serve_original_seqs,
                                seed=scfg.seed)
            self.state.serving = gain.to_dict()
            self.save()
            self.log(f"  {gain.candidate_tok_s:.1f} tok/s against {gain.original_tok_s:.1f} ({gain.gain:.2f}x), "
                     f"{gain.candidate_running} running at once against {gain.original_running}")

    def report(self) -> dict:
        """``results.json``, ``report.md`` and the two plots; then this run's work files go."""
        from kvlab.io.atomic import write_json
        from kvlab.recipes.shrink.report import plot_pareto, plot_recovery, write_report

        results = self.state.results(self.model_ref, self.budget, self.elapsed())
        write_json(self.out / "results.json", results)
        plot_pareto(results, self.out / "pareto.png")
        plot_recovery(results, self.out / "recovery.png")
        write_report(results, self.out / "report.md")
        shutil.rmtree(self.out / "work", ignore_errors=True)         # this run's checkpoints and generated text
        self.log(f"chose {self.state.best}: {self.out / 'model'} (kvlab)"
                 + ("" if self.state.hf_note else f", {self.out / 'hf'} (transformers)")
                 + (f", {self.out / 'model.gguf'} (llama.cpp)" if self.state.target_output == "model.gguf" else "")
                 + f"; report {self.out / 'report.md'}; {self.elapsed() / 60:.1f} min in all")
        return results

    # ------------------------------------------------------------------------------- the run
    def run(self) -> dict:
        self.setup()
        self.score_original()
        self.rank()
        t = time.perf_counter()
        self.choose()
        measured = sum(1 for r in self.state.ranking if r.speed and "ratio" in r.speed)
        self.speed_seconds = (time.perf_counter() - t) / max(1, measured)
        train_tokens = self.text.training()
        plan = self.plan_recovery(self.chosen, train_tokens)
        deadlines = (plan.timing or {}).get("deadlines_s")      # None with a token budget
        for k, (cand, steps) in enumerate(zip(self.chosen, plan.steps)):
            if cand.name in self.state.recovered:
                continue
            student, record = self.recover(cand, steps, train_tokens, deadlines[k] if deadlines else None)
            self.evaluate(cand, student, record)
            shutil.rmtree(self.out / "work" / cand.slug, ignore_errors=True)   # its training checkpoints
            del student
        self.export()
        self.serving()
        return self.report()


def run_shrink(model_ref: str, out_dir: str | Path, scfg: ShrinkConfig, *, resume: bool = False,
               overwrite: bool = False, log: Callable[[str], None] = print) -> dict:
    """Run (or resume) ``kvlab shrink`` in ``out_dir``; returns ``results.json``'s content.
    Nothing in ``out_dir`` but what this recipe wrote is ever removed; a directory that holds anything
    else is refused."""
    import dataclasses

    from kvlab.io import load_config
    from kvlab.io.rundir import RunDirectory

    parse_kv_budget(scfg.kv, load_config(model_ref))          # bad input fails before any directory is made
    # as JSON has them (tuples as lists), so that a resumed run's settings compare equal to the record
    settings = json.loads(json.dumps({"model": model_ref, **dataclasses.asdict(scfg)}))
    with RunDirectory(out_dir, "shrink", settings, entries=OUTPUTS, resume=resume, overwrite=overwrite, log=log,
                      scaffolding=(STATE,)):
        return ShrinkRun(model_ref, Path(out_dir), scfg, settings, resume, log).run()

