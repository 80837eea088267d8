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


@torch.inference_mode()
def compare(original, model, tokenizer, docs: Sequence[Document], *, seq_len: int = 1024,
            stride: int | None = None, max_tokens: int | None = None, batch_size: int = 4, kv_quant=None,
            original_kv_quant=None, backend: str | None = None,
            progress: bool = False) -> tuple[EvalResult, Fidelity]:
    """``model``'s :func:`~kvlab.eval.perplexity.evaluate` result and its :class:`Fidelity` to ``original``
    on ``docs``, from one pass of each model; each reads through its own cache format (``kv_quant`` /
    ``original_kv_quant``; None: a float cache). The two must share a vocabulary."""
    if original.cfg.vocab_size != model.cfg.vocab_size:
        raise ConfigError(f"the models' vocabularies differ ({original.cfg.vocab_size} and {model.cfg.vocab_size}); "
                          f"compare a model with the original it was shrunk from")
    text = scored_text(model, tokenizer, docs, seq_len=seq_len, stride=stride, max_tokens=max_tokens,
                       batch_size=batch_size)
    nll = nll_original = kl = 0.0
    agree = scored = 0
    for tokens, targets, mask in show_progress(text.batches, "comparing", progress):
        p_log = F.log_softmax(window_logits(original, tokens, mask, backend=backend, kv_quant=original_kv_quant), -1)
        q_log = F.log_softmax(window_logits(model, tokens, mask, backend=backend, kv_quant=kv_quant), -1)
        q_log = q_log.to(p_log.device)
        keep = (targets != -100).to(p_log.device)
        t = targets.to(p_log.device).clamp(min=0)
        nll -= float(q_log.gather(-1, t.unsqueeze(-1)).squeeze(-1)[keep].sum())
        nll_original -= float(p_log.gather(-1, t.unsqueeze(-1)).squeeze(-1)[keep].sum())
        kl += float((p_log.exp() * (p_log - q_log)).sum(-1)[keep].sum())
        agree += int((p_log.argmax(-1) == q_log.argmax(-1))[keep].sum())
        scored += int(keep.sum())
    ppl, ppl_original = math.exp(nll / scored), math.exp(nll_original / scored)
    result = EvalResult(perplexity=ppl, bits_per_byte=nll / math.log(2) / text.n_bytes, nll=nll, tokens=scored,
                        bytes=text.n_bytes, documents=text.documents, seq_len=seq_len, stride=text.stride)
    return result, Fidelity(perplexity=ppl, original_perplexity=ppl_original, perplexity_ratio=ppl / ppl_original,
                            kl=kl / scored, top1_agreement=agree / scored, tokens=scored)
