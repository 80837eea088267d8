"""Passkey retrieval: can the model repeat a five-digit key hidden at a given depth of a long, dull text?

The test of Mohtashami & Jaggi (Landmark Attention, 2023), used since by LongLoRA, LongRoPE and
others to check that a model still reads its whole context: a short instruction, filler sentences,
the key stated once at ``depth`` (0: right after the instruction, 1: right before the question), more
filler, then "What is the pass key? The pass key is". A trial is **retrieved** when the model's greedy
continuation begins with the key: every token of " KEY" is the most likely next token given the prompt
and the key's tokens before it. That is decided from one forward pass over prompt + key (teacher
forcing, only the last logits computed), the same answer greedy decoding gives without its decode
loop; the model reads the prompt through its own cache format (``kv_quant``).

A prompt of ``length`` tokens holds as many filler sentences as fit (at most ``length`` tokens with the
key and the context token the document starts with). Keys come from a seeded generator, so the
original and every shrunk model answer the same trials.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from kvlab.errors import ConfigError

INSTRUCTION = ("There is an important piece of information hidden inside a lot of irrelevant text. Find it and "
               "memorize it. I will quiz you about the important information there.\n\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\n\nWhat is the pass key? The pass key is"
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass(frozen=True)
class PasskeyTrial:
    length: int                 # the prompt's budget in tokens
    depth: float
    key: str
    prompt: tuple[int, ...]     # the context token, then the prompt's tokens
    answer: tuple[int, ...]     # the tokens of " KEY" after the prompt


def default_lengths(max_seq_len: int, shortest: int = 1024) -> list[int]:
    """1,024, 2,048, … doubling up to the model's trained context, which is the last length."""
    lengths, n = [], shortest
    while n < max_seq_len:
        lengths.append(n)
        n *= 2
    return lengths + [max_seq_len]


def _prompt_text(fillers: int, at: int, key: str) -> str:
    return INSTRUCTION + FILLER * at + NEEDLE.format(key=key) + FILLER * (fillers - at) + QUESTION


def passkey_trials(tokenizer, lengths: Sequence[int], depths: Sequence[float] = DEPTHS, trials: int = 1,
                   seed: int = 0) -> list[PasskeyTrial]:
    """``trials`` trials per (length, depth), their keys drawn from ``seed``."""
    if any(not 0 <= d <= 1 for d in depths):
        raise ConfigError(f"passkey depths {list(depths)} must lie in [0, 1] (0: the start of the text, 1: its end)")
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if prefix is None:
        raise ConfigError("the tokenizer has neither a BOS nor an EOS token to start the prompt with")
    per_filler = len(tokenizer.encode(FILLER * 8, add_special_tokens=False)) / 8
    out = []
    for length in lengths:
        fixed = len(tokenizer.encode(_prompt_text(0, 0, "12345") + " 12345", add_special_tokens=False)) + 1
        if fixed >= length:
            raise ConfigError(f"passkey length {length} is too short for the prompt itself ({fixed} tokens)")
        for depth in depths:
            for trial in range(trials):
                key = str(random.Random(f"{seed}/{length}/{depth}/{trial}").randint(10_000, 99_999))
                fillers = int((length - fixed) / per_filler)
                while True:         # the estimate can be a sentence too long where tokens merge at the joins
                    at = round(depth * fillers)
                    text = _prompt_text(fillers, at, key)
                    prompt = tokenizer.encode(text, add_special_tokens=False)
                    full = tokenizer.encode(text + " " + key, add_special_tokens=False)
                    if len(full) + 1 <= length or fillers == 0:
                        break
                    fillers -= 1
                if full[:len(prompt)] != prompt:     # the key's tokens must follow the prompt's unchanged
                    raise ConfigError("this tokenizer merges the pass key with the question; passkey retrieval "
                                      "cannot be scored by teacher forcing with it")
                out.append(PasskeyTrial(length, depth, key, (prefix, *prompt), tuple(full[len(prompt):])))
    return out


@dataclass
class PasskeyResult:
    accuracy: float                               # share of trials retrieved
    by_length: dict[str, float]                   # "1024" -> share retrieved at that length
    by_cell: dict[str, dict[str, float]]          # "1024" -> {"0.5": share} per depth
    trials: int

    def to_dict(self) -> dict:
        return asdict(self)


@torch.inference_mode()
def passkey_retrieval(model, trials: Sequence[PasskeyTrial], *, kv_quant=None,
                      backend: str | None = None) -> PasskeyResult:
    """The share of ``trials`` whose key ``model`` retrieves (module docstring), overall, per length and
    per (length, depth) cell."""
    if not trials:
        raise ConfigError("no passkey trials to score")
    too_long = [t.length for t in trials if len(t.prompt) + len(t.answer) - 1 > model.cfg.max_seq_len
                and model.cfg.pos == "learned"]
    if too_long:
        raise ConfigError(f"passkey length {max(too_long)} exceeds the model's max_seq_len={model.cfg.max_seq_len}")
    model.eval()
    hits: dict[tuple[int, float], list[bool]] = {}
    for t in trials:
        tokens = torch.tensor([[*t.prompt, *t.answer[:-1]]])
        n = len(t.answer)
        logits = _last_logits(model, tokens, n, backend=backend, kv_quant=kv_quant)
        ok = bool((logits[0].argmax(-1).cpu() == torch.tensor(t.answer)).all())
        hits.setdefault((t.length, t.depth), []).append(ok)
    by_cell: dict[str, dict[str, float]] = {}
    by_length: dict[str, list[bool]] = {}
    for (length, depth), oks in sorted(hits.items()):
        by_cell.setdefault(str(length), {})[f"{depth:g}"] = sum(oks) / len(oks)
        by_length.setdefault(str(length), []).extend(oks)
    every = [ok for oks in hits.values() for ok in oks]
    return PasskeyResult(accuracy=sum(every) / len(every), by_length={k: sum(v) / len(v) for k, v in by_length.items()},
                         by_cell=by_cell, trials=len(every))


def _last_logits(model, tokens: torch.Tensor, n: int, *, backend, kv_quant) -> torch.Tensor:
    """The last ``n`` positions' logits (the LM head over the whole prompt would be most of the memory)."""
    cache = model.new_cache(1, tokens.shape[1], kv_quant=kv_quant) if kv_quant else None
    return model(tokens.to(model.device), backend=backend, cache=cache, logits_to_keep=n).float()
