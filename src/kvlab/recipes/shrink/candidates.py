"""The wirings ``kvlab shrink`` considers: each a :class:`Candidate` value made by a family, which
also converts the original model to it with its best starting point.

A family is a structure of the KV cache (fewer KV heads and cross-layer sharing; MLA latents;
low-rank key and value latents) with three things: which candidates meet a budget, which
calibration statistics its conversion needs, and the conversion. A new family is one more entry in
:data:`FAMILIES`, not a branch in the recipe.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Protocol

from kvlab.config.model import ModelConfig
from kvlab.convert.calibrated import attention_input_moments, needed_moments
from kvlab.convert.heads import convert
from kvlab.convert.lowrank import convert_to_lowrank, kv_loss_moments, plan_lowrank
from kvlab.convert.mla import convert_to_mla, plan_mla
from kvlab.errors import ConfigError


@dataclass(frozen=True)
class Candidate:
    """One wiring that meets the budget: the attention ``kind`` of the converted model, the
    family's conversion parameters (``change``: ``n_kv_head``/``cla`` for 'gqa', ``kv_lora_rank``/
    ``qk_rope_head_dim`` for 'mla', ``k_rank``/``v_rank`` or ``channels`` with ``method`` for
    'lowrank'), and its cache bytes per token in bf16."""

    name: str
    kind: str
    change: dict
    kv_bytes: int

    @property
    def slug(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-")

    @property
    def loss_fitted(self) -> bool:
        """Whether its start is fitted to the loss (the Fisher-weighted latents) rather than to the
        activations' squared error."""
        return self.change.get("method") == "fisher"


class Family(Protocol):
    def candidates(self, cfg: ModelConfig, budget: int) -> list[Candidate]: ...

    def moment_pairs(self, cfg: ModelConfig, cand: Candidate) -> set[tuple[int, int]]: ...

    def convert(self, base, cand: Candidate, calibration, moments: dict) -> Any: ...


class HeadsFamily:
    """GQA/MQA/CLA: for each KV-head count that divides the model's, the least cross-layer sharing
    that fits; calibrated merging of heads and layers."""

    def candidates(self, cfg: ModelConfig, budget: int) -> list[Candidate]:
        out = []
        for heads in [h for h in range(cfg.n_kv_head, 0, -1) if cfg.n_kv_head % h == 0]:
            for cla in range(1, cfg.n_layer + 1):
                new = cfg.replace(n_kv_head=heads, cla=cla)
                if new.kv_bytes_per_token("bf16") <= budget:
                    base = "MQA" if heads == 1 else f"GQA-{heads}"
                    out.append(Candidate(base + (f"-CLA{cla}" if cla > 1 else ""), "gqa",
                                         {"n_kv_head": heads, "cla": cla}, new.kv_bytes_per_token("bf16")))
                    break
        return out

    def moment_pairs(self, cfg: ModelConfig, cand: Candidate) -> set[tuple[int, int]]:
        return set(needed_moments(cfg, cfg.replace(**cand.change)))

    def convert(self, base, cand: Candidate, calibration, moments: dict) -> Any:
        cla = cand.change["cla"]
        return convert(base, method="calibrated", calibration=calibration, moments=moments,
                       n_kv_head=cand.change["n_kv_head"], cla=cla if cla > 1 else None)


class MLAFamily:
    """MLA with a shared RoPE key of a quarter, half or three quarters of a head and the rest of the
    budget as the latent (any width, so the budget is met exactly); PCA of the latent."""

    def candidates(self, cfg: ModelConfig, budget: int) -> list[Candidate]:
        out = []
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
        return out

    def moment_pairs(self, cfg: ModelConfig, cand: Candidate) -> set[tuple[int, int]]:
        return set()

    def convert(self, base, cand: Candidate, calibration, moments: dict) -> Any:
        return convert_to_mla(base, calibration=calibration, moments=moments, **cand.change)


class LowRankFamily:
    """Low-rank key and value latents (Palu: keys rebuilt, then rotated) with a quarter, a third or
    half of each producer's latent channels for the keys (keys are lower-rank than values in trained
    models), and the same channels split across layers and between keys and values by each
    component's estimated effect on the loss (the Fisher-weighted fit): on SmolLM2 at half the KV it
    starts at proxy 10.5 against 12.1 for the best uniform split."""

    def candidates(self, cfg: ModelConfig, budget: int) -> list[Candidate]:
        out = []
        channels = budget // (2 * cfg.n_kv_layers)
        for k_share in (4, 3, 2):
            k_rank = max(1, round(channels / k_share))
            try:
                new = plan_lowrank(cfg, k_rank=k_rank, v_rank=channels - k_rank)
            except ConfigError:
                continue
            out.append(Candidate(f"Low-rank K{k_rank}+V{channels - k_rank}", "lowrank",
                                 {"k_rank": k_rank, "v_rank": channels - k_rank}, new.kv_bytes_per_token("bf16")))
        if 2 <= channels <= 2 * cfg.n_kv_head * cfg.head_dim and not cfg.is_encoder_decoder:
            new = plan_lowrank(cfg, k_rank=channels // 2, v_rank=channels - channels // 2)     # same bytes
            out.append(Candidate(f"Low-rank {channels} allocated", "lowrank",
                                 {"channels": channels, "method": "fisher"}, new.kv_bytes_per_token("bf16")))
        return out

    def moment_pairs(self, cfg: ModelConfig, cand: Candidate) -> set[tuple[int, int]]:
        return set()

    def convert(self, base, cand: Candidate, calibration, moments: dict) -> Any:
        return convert_to_lowrank(base, calibration=calibration, moments=moments, loss_moments=moments.get("kv_loss"),
                                  **cand.change)


# By the attention kind a family converts to; enumeration follows this order.
FAMILIES: dict[str, Family] = {"gqa": HeadsFamily(), "mla": MLAFamily(), "lowrank": LowRankFamily()}


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
    out = [cand for family in FAMILIES.values() for cand in family.candidates(cfg, budget)]
    if not out:
        raise ConfigError(f"no wiring of this model fits {budget:,} bytes per token (bf16); the smallest is "
                          f"{cfg.replace(n_kv_head=1, cla=cfg.n_layer).kv_bytes_per_token('bf16'):,}")
    return out


def convert_candidate(base, cand: Candidate, calibration, moments: dict) -> Any:
    """``base`` converted to ``cand`` with its family's best starting point (from ``moments``)."""
    return FAMILIES[cand.kind].convert(base, cand, calibration, moments)


def moments_for(base, candidates: list[Candidate], calibration) -> dict:
    """One set of calibration statistics for every candidate's conversion: the attention inputs'
    second moments per layer (and per pair of layers a CLA merge needs), and the loss's gradient
    moments when a candidate is fitted to the loss (one backward pass per calibration batch)."""
    pairs = {(i, i) for i in range(base.cfg.n_layer)}
    for cand in candidates:
        pairs |= FAMILIES[cand.kind].moment_pairs(base.cfg, cand)
    moments = attention_input_moments(base, calibration, sorted(pairs))
    if any(cand.loss_fitted for cand in candidates):
        moments["kv_loss"] = kv_loss_moments(base, calibration)
    return moments
