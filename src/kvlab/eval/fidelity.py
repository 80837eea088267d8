"""How close a shrunk model stays to its original on a text: the perplexity ratio, the mean
KL(original ‖ shrunk) per token and the share of tokens whose most likely next token is the same.

Perplexity alone can hide a model that is as uncertain as the original but about different tokens;
the KL measures the whole next-token distribution against the original's, and top-1 agreement is
what greedy decoding sees. All three are computed on the same windows as :func:`kvlab.eval.perplexity.evaluate`
(each token scored once), both models reading the same tokens, each through its own cache format.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from kvlab.data.corpus import Document
from kvlab.errors import ConfigError
from kvlab.eval.perplexity import EvalResult, scored_text, window_logits
from kvlab.progress import progress as show_progress


@dataclass
class Fidelity:
    perplexity: float               # the model's
    original_perplexity: float
    perplexity_ratio: float         # perplexity / original_perplexity
    kl: float                       # mean KL(original ‖ model) per scored token, nats
    top1_agreement: float           # share of scored tokens where both models' argmax agree
    tokens: int

    def to_dict(self) -> dict:
        return asdict(self)


def fidelity(original, model, tokenizer, docs: Sequence[Document], **options) -> Fidelity:
    """``model`` against ``original`` on ``docs`` (module docstring; ``options`` as :func:`compare` takes)."""
    return compare(original, model, tokenizer, docs, **options)[1]


def compare(original, model, tokenizer, docs: Sequence[Document], *, kv_quant=None,
            **options) -> tuple[EvalResult, Fidelity]:
    """``model``'s :func:`~kvlab.eval.perplexity.evaluate` result and its :class:`Fidelity` to ``original``
    on ``docs``, from one pass of each model; each reads through its own cache format (``kv_quant`` /
    ``original_kv_quant``; None: a float cache). The two must share a vocabulary. ``options``: as
    :func:`compare_each` takes."""
    return compare_each(original, [(model, kv_quant)], tokenizer, docs, **options)[0]


@torch.inference_mode()
def compare_each(original, models: Sequence[tuple], tokenizer, docs: Sequence[Document], *, seq_len: int = 1024,
                 stride: int | None = None, max_tokens: int | None = None, batch_size: int = 4,
                 original_kv_quant=None, backend: str | None = None,
                 progress: bool = False) -> list[tuple[EvalResult, Fidelity]]:
    """:func:`compare` for each ``(model, kv_quant)`` of ``models`` on the same tokens, the original read
    once for all of them (a structure with a quantized cache and with a float cache: one original pass)."""
    for model, _ in models:
        if original.cfg.vocab_size != model.cfg.vocab_size:
            raise ConfigError(f"the models' vocabularies differ ({original.cfg.vocab_size} and "
                              f"{model.cfg.vocab_size}); compare a model with the original it was shrunk from")
    text = scored_text(models[0][0], tokenizer, docs, seq_len=seq_len, stride=stride, max_tokens=max_tokens,
                       batch_size=batch_size)
    sums = [dict(nll=0.0, kl=0.0, agree=0) for _ in models]
    nll_original, scored = 0.0, 0
    for tokens, targets, mask in show_progress(text.batches, "comparing", progress):
        p_log = F.log_softmax(window_logits(original, tokens, mask, backend=backend, kv_quant=original_kv_quant), -1)
        keep = (targets != -100).to(p_log.device)
        t = targets.to(p_log.device).clamp(min=0).unsqueeze(-1)
        nll_original -= float(p_log.gather(-1, t).squeeze(-1)[keep].sum())
        scored += int(keep.sum())
        for acc, (model, kv_quant) in zip(sums, models):
            q_log = F.log_softmax(window_logits(model, tokens, mask, backend=backend, kv_quant=kv_quant), -1)
            q_log = q_log.to(p_log.device)
            acc["nll"] -= float(q_log.gather(-1, t).squeeze(-1)[keep].sum())
            acc["kl"] += float((p_log.exp() * (p_log - q_log)).sum(-1)[keep].sum())
            acc["agree"] += int((p_log.argmax(-1) == q_log.argmax(-1))[keep].sum())
    ppl_original = math.exp(nll_original / scored)
    out = []
    for acc in sums:
        nll = acc["nll"]
        ppl = math.exp(nll / scored)
        result = EvalResult(perplexity=ppl, bits_per_byte=nll / math.log(2) / text.n_bytes, nll=nll, tokens=scored,
                            bytes=text.n_bytes, documents=text.documents, seq_len=seq_len, stride=text.stride)
        out.append((result, Fidelity(perplexity=ppl, original_perplexity=ppl_original,
                                     perplexity_ratio=ppl / ppl_original, kl=acc["kl"] / scored,
                                     top1_agreement=acc["agree"] / scored, tokens=scored)))
    return out
