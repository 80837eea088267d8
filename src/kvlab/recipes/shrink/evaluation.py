"""How ``kvlab shrink`` measures a model: the held-out proxy perplexity (ranking and the recovery
curve), and the final scores — validation perplexity with the fidelity to the original on the same text
(KL and top-1 agreement), and the trust suite (:mod:`kvlab.eval.suite`: fidelity on off-domain text,
passkey retrieval, next-line and recall tasks), the original's scores beside each candidate's."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kvlab.data.corpus import Document
from kvlab.dtypes import KVQuant
from kvlab.eval.fidelity import compare_each
from kvlab.eval.perplexity import batch_loss, evaluate
from kvlab.eval.suite import TrustSuite


def proxy_perplexity(model, batches: list[torch.Tensor], kv_quant: KVQuant | None = None) -> float:
    """exp of :func:`~kvlab.eval.perplexity.batch_loss` over the proxy windows ``batches``."""
    return math.exp(batch_loss(model, batches, kv_quant))


@dataclass
class EvalSet:
    """The held-out text every model of a run is scored on: proxy windows of the train split,
    validation documents (no stage trains, calibrates or selects on them) and the trust suite."""

    proxy: list[torch.Tensor]
    documents: list[Document]
    seq_len: int
    max_tokens: int | None
    suite: TrustSuite

    def score(self, model, tok, kv_quant: KVQuant | None = None, original=None, structure_alone: bool = False) -> dict:
        """Proxy perplexity, validation perplexity and the suite's scores of ``model`` (its cache stored
        in ``kv_quant``), timed; with the ``original`` model, the fidelity to it on the validation
        documents (:func:`kvlab.eval.fidelity.compare`) and on each off-domain set; with
        ``structure_alone``, also the fidelity with a float cache (``"structure_alone"``: a composed
        candidate's structure without its precision), the original read once for both."""
        t = time.perf_counter()
        fid = alone = None
        if original is None:
            ev = evaluate(model, tok, self.documents, seq_len=self.seq_len, max_tokens=self.max_tokens,
                          progress=False, kv_quant=kv_quant)
        else:                       # the same perplexity, and the fidelity, from one pass over the text
            variants = [(model, kv_quant)] + ([(model, None)] if structure_alone else [])
            scores = compare_each(original, variants, tok, self.documents, seq_len=self.seq_len,
                                  max_tokens=self.max_tokens)
            (ev, fid), alone = scores[0], (scores[1][1] if structure_alone else None)
        eval_s = time.perf_counter() - t
        t = time.perf_counter()
        # the original's own perplexity on each off-domain set comes with every candidate's fidelity
        suite = self.suite.score(model, tok, original=original, kv_quant=kv_quant, domains=original is not None)
        suite_s = time.perf_counter() - t
        t = time.perf_counter()
        proxy_ppl = proxy_perplexity(model, self.proxy, kv_quant)
        proxy_s = time.perf_counter() - t
        out = {"proxy_ppl": proxy_ppl, "val": ev.to_dict(), "suite": suite, "eval_s": eval_s, "suite_s": suite_s,
               "proxy_s": proxy_s}
        if fid is not None:
            out["fidelity"] = fid.to_dict()
        if alone is not None:
            out["structure_alone"] = alone.to_dict()
        return out


def duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class ProxyCurve:
    """Training hook: the held-out proxy perplexity every few steps (the recovery curve), with an
    ETA line, and a stop once the candidate's deadline passes; its points travel in the training
    checkpoints, so a resumed stage keeps them."""

    def __init__(self, model, proxy, every: int, offset_tokens: int, tokens_per_step: int, total: int,
                 label: str, log: Callable[[str], None], deadline: Callable[[], bool] | None = None,
                 kv_quant: KVQuant | None = None):
        self.model, self.proxy, self.every, self.kv_quant = model, proxy, every, kv_quant
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
        ppl = proxy_perplexity(self.model, self.proxy, self.kv_quant)
        self.model.train(was)
        self.points.append((self.offset + step * self.tokens_per_step, ppl))
        rate = (time.perf_counter() - self.t0) / max(1, step - self.first_step)
        self.log(f"    {self.label} step {step}/{self.total}  proxy perplexity {ppl:,.2f}  "
                 f"(about {duration(rate * (self.total - step))} left in this stage)")

    def state_dict(self) -> dict:
        return {"points": self.points}

    def load_state_dict(self, state: dict) -> None:
        self.points = [tuple(p) for p in state["points"]]
