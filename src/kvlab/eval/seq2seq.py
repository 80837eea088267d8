"""An encoder–decoder's quality on source → target pairs: the target's cross-entropy (teacher
forcing) and exact-match accuracy of generated targets, with the decode time per sample — the two
axes of the GQA paper's quality-against-speed figure."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from kvlab.data.chat import IGNORE_INDEX
from kvlab.data.seq2seq import Pair, Seq2SeqBatches, encode_text
from kvlab.eval.tasks import exact_match_scores
from kvlab.inference.seq2seq import generate_seq2seq
from kvlab.models.modes import eval_mode


def target_nll(model, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, int]:
    """The summed cross-entropy of a ``(src, src_mask, tgt_in, labels)`` batch's labelled target tokens
    (teacher forcing), and how many there are (the training objective's loss and count too)."""
    src, src_mask, tgt_in, labels = batch
    logits = model(src, tgt_in, src_mask=src_mask)
    nll = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    return nll, int((labels != IGNORE_INDEX).sum())


@torch.no_grad()
def target_loss(model, pairs: Sequence[Pair], tokenizer, *, batch_size: int = 32) -> dict:
    """Mean cross-entropy (nats) per target token, and its perplexity."""
    batches = Seq2SeqBatches(pairs, tokenizer, model.cfg.decoder_start_token_id, batch_size)
    total, count = 0.0, 0
    with eval_mode(model):
        for batch in batches.all_batches():
            nll, n = target_nll(model, tuple(t.to(model.device) for t in batch))
            total += float(nll)
            count += n
    return {"loss": total / count, "perplexity": math.exp(total / count), "target_tokens": count}


def exact_match(model, pairs: Sequence[Pair], tokenizer, *, max_new_tokens: int = 32, num_beams: int = 1,
                batch_size: int = 32, backend: str | None = None) -> dict:
    """Accuracy of generated targets (greedy, or beam search) against each pair's target, exactly,
    after stripping; per built-in task family; seconds of generation per sample."""
    stop = [t for t in {tokenizer.eos_token_id, model.cfg.eos_token_id} if t is not None]
    replies, seconds = [], 0.0
    with eval_mode(model):
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start:start + batch_size]
            t0 = time.perf_counter()
            outs = generate_seq2seq(model, [encode_text(tokenizer, s) for s, _ in chunk], max_new_tokens,
                                    num_beams=num_beams, stop_tokens=stop, backend=backend)
            seconds += time.perf_counter() - t0
            replies += [tokenizer.decode([t for t in o if t not in stop], skip_special_tokens=True).strip()
                        for o in outs]
    return {**exact_match_scores(pairs, replies, question="source"), "num_beams": num_beams,
            "seconds_per_sample": seconds / len(pairs), "batch_size": batch_size}
