"""Which candidates ``kvlab shrink`` recovers: ranked by quality at α = 0, then passed over where they
decode slower than the original.

**Quality.** Every candidate is converted with its family's best start and scored on the first half
of the held-out proxy windows, its cache in its own precision; the best few (``rescore``) are kept in
memory and scored on the rest too, so that their order rests on every window. A candidate costs a
conversion and a proxy pass, and there are several per precision.

**Speed.** Down the ranking, each candidate's decode step is measured against the original's on the
run's device (:func:`kvlab.recipes.shrink.speed.decode_ratio`, a random model of its shapes: speed
does not depend on the weights), until enough candidates are no slower than the original or the
ranking ends. A slower one is chosen only with ``allow_slower``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from kvlab.errors import ConfigError
from kvlab.eval.perplexity import batch_loss
from kvlab.recipes.shrink.candidates import Candidate, convert_candidate, plan_candidate
from kvlab.recipes.shrink.config import SPEED_TOLERANCE, ShrinkConfig
from kvlab.recipes.shrink.speed import SpeedRatio, decode_ratio
from kvlab.recipes.shrink.state import RankedCandidate


def _tokens(batches: list[torch.Tensor]) -> int:
    return sum(int(b[:, 1:].numel()) for b in batches)


def rank_candidates(base, candidates: list[Candidate], calibration, moments: Callable[[], dict],
                    proxy: list[torch.Tensor], scfg: ShrinkConfig, log: Callable[[str], None],
                    balance_text=None) -> list[RankedCandidate]:
    """``candidates`` best first by held-out proxy perplexity at α = 0 (see the module docstring);
    ``balance_text``: what a converted model's keys are balanced on where ``base``'s are."""
    first, rest = proxy[:1], proxy[1:]
    scored: list[tuple[float, Candidate]] = []
    kept: dict[str, object] = {}                     # the converted models of the current best few
    for cand in candidates:
        model = convert_candidate(base, cand, calibration, moments(), balance_text)
        loss = batch_loss(model, first, cand.kv_quant)
        scored.append((loss, cand))
        log(f"  {cand.name:30} {cand.kv_bytes:>8,} B/token  proxy perplexity at alpha=0 {math.exp(loss):,.2f}")
        best = {c.name for _, c in sorted(scored, key=lambda x: x[0])[:scfg.rescore]}
        if cand.name in best:
            kept[cand.name] = model
        kept = {name: m for name, m in kept.items() if name in best}
        del model
    ranking = []
    n_first, n_rest = _tokens(first), _tokens(rest)
    for loss, cand in sorted(scored, key=lambda x: x[0]):
        tokens = n_first
        if cand.name in kept and rest:
            loss = (loss * n_first + batch_loss(kept.pop(cand.name), rest, cand.kv_quant) * n_rest) / (
                n_first + n_rest)
            tokens += n_rest
        ranking.append(RankedCandidate(cand.name, cand.family, cand.kind, cand.change, cand.kv_bytes, cand.precision,
                                       math.exp(loss), tokens))
    # every window for the best few, half of them for the rest: the few first, each part in its order
    ranking.sort(key=lambda r: (r.proxy_tokens != n_first + n_rest, r.alpha0_proxy_ppl))
    return ranking


def speed_of(base, cand: Candidate, scfg: ShrinkConfig, context: int) -> SpeedRatio:
    """``cand``'s decode step against the original's at ``context`` tokens (random weights of its
    shapes; the original's own)."""
    from kvlab.models.decoder import Transformer

    if cand.restructured:
        torch.manual_seed(scfg.seed)
        with torch.device(base.device):
            model = Transformer(plan_candidate(base.cfg, cand)).to(base.dtype).eval()
    else:
        model = base
    return decode_ratio(base, model, cand.kv_quant, batch=scfg.speed_batch, context=context,
                        rounds=scfg.speed_rounds, seed=scfg.seed)


def choose(base, ranking: list[RankedCandidate], scfg: ShrinkConfig, context: int,
           log: Callable[[str], None]) -> list[str]:
    """The names of the best-ranked candidates that decode no slower than the original (any, with
    ``allow_slower``), as many as ``scfg.candidates``; each measured candidate's speed is recorded in
    its ranking entry."""
    chosen = []
    slow: dict[tuple[str, str | None], str] = {}   # (family, precision) measured slower -> the one measured
    log(f"decode speed against the original (batch {scfg.speed_batch}, {context:,} tokens cached, "
        f"{'any speed accepted' if scfg.allow_slower else f'at most {1 + SPEED_TOLERANCE:.2f}x its step time'}):")
    for entry in ranking:
        if len(chosen) == scfg.candidates:
            break
        kind = (entry.family, entry.precision)
        if kind in slow and not scfg.allow_slower:
            # The same structure family in the same precision at the same budget: the step costs the
            # same within the measurement's spread (the variants differ in a width or two).
            entry.speed = {"as": slow[kind]}
            log(f"  {entry.name:30} taken as slow as {slow[kind]}")
            continue
        ratio = speed_of(base, entry.candidate, scfg, context)
        entry.speed = ratio.to_dict()
        fast = ratio.ratio <= 1 + SPEED_TOLERANCE
        log(f"  {entry.name:30} {ratio.candidate_ms:8.1f} ms/step against {ratio.original_ms:.1f}: {ratio.ratio:.2f}x "
            f"({ratio.ratio_min:.2f}-{ratio.ratio_max:.2f})" + ("" if fast else "  slower"))
        if fast or scfg.allow_slower:
            chosen.append(entry.name)
        else:
            slow[kind] = entry.name
    if not chosen:
        raise ConfigError(f"every candidate within the budget decodes slower than the original (more than "
                          f"{1 + SPEED_TOLERANCE:.2f}x its step time at {context:,} tokens); give --allow-slower to "
                          f"accept that, or a larger --kv budget")
    return chosen
