"""Prefix tuning, P-tuning v2 and prompt tuning: trained tokens the model attends to.

- **Prefix tuning** (Li & Liang 2021): trainable key/value prefixes at every layer, produced during
  training by a reparameterisation MLP (an embedding per virtual token → all layers' K/V), which
  :meth:`PrefixAdapter.merge` replaces by the tensors it computes — the MLP is gone after training.
- **P-tuning v2** (Liu et al. 2022, "deep prompt tuning"): the same per-layer prefixes as direct
  parameters, no reparameterisation.
- **Prompt tuning** (Lester et al. 2021): trainable input embeddings of virtual tokens, prepended.

kvlab's rules for the KV prefixes: they have ``n_kv_head`` heads (not ``n_head`` — the bug other
libraries had with GQA/MQA) and exist only for KV-producing layers (a CLA consumer reads its
producer's, prefix included). They live in the KV cache: the first forward call on an empty cache
writes them into slots ``[0, P)``, so the real tokens sit at positions ``P, P+1, …`` and a decode
step costs only ``P`` more cached keys. Without a cache the model prepends them itself, with the
same positions, so training and cached generation compute the same function.

Virtual tokens are initialised from real ones (Lester et al.: sampled vocabulary tokens; for KV
prefixes, the base model's own keys and values for those tokens), so tuning starts from a prefix
the model already knows how to read.

On a sliding-window model the virtual tokens obey the window like any other token (they are tokens
at positions ``0..P-1``): after ``L`` layers of window ``W`` a real token at index ``t >= L*(W-1)``
no longer sees them, directly or through earlier tokens. kvlab keeps the model's attention rule
rather than making prefixes a permanent sink, and says so with a warning when one is attached.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass

import torch
from torch import nn

from kvlab.errors import ConfigError
from kvlab.models.decoder import InputEntry
from kvlab.models.modes import eval_mode
from kvlab.registry import kinds_without

PREFIX_METHODS = ("prefix", "ptuning", "prompt")


@dataclass
class PromptConfig:
    method: str = "prefix"            # prefix | ptuning | prompt
    num_virtual_tokens: int = 16
    reparam_hidden: int = 512         # prefix tuning's MLP width
    init_seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in PREFIX_METHODS:
            raise ConfigError(f"method={self.method!r} is not one of {list(PREFIX_METHODS)}")
        if not isinstance(self.num_virtual_tokens, int) or self.num_virtual_tokens < 1:
            raise ConfigError(f"num_virtual_tokens={self.num_virtual_tokens!r} must be a positive integer")
        if not isinstance(self.reparam_hidden, int) or self.reparam_hidden < 1:
            raise ConfigError(f"reparam_hidden={self.reparam_hidden!r} must be a positive integer")

    def to_dict(self) -> dict:
        return asdict(self)


class PrefixAdapter(nn.Module):
    """Key/value prefixes ``(n_kv_head, P, head_dim)`` for each KV-producing layer."""

    def __init__(self, model, cfg: PromptConfig):
        super().__init__()
        mc = model.cfg
        self.producers = list(mc.kv_producers)
        self.n_tokens, self.n_kv_head, self.head_dim = cfg.num_virtual_tokens, mc.n_kv_head, mc.head_dim
        init_k, init_v = _kv_of_sampled_tokens(model, cfg.num_virtual_tokens, cfg.init_seed)
        kv = torch.stack([torch.stack([init_k[p], init_v[p]]) for p in self.producers])   # (L, 2, H, P, D)
        if cfg.method == "prefix":
            # The reparameterisation: virtual-token embeddings -> MLP -> every layer's K/V, added to
            # the sampled tokens' K/V (a fixed buffer). The MLP's last layer starts at zero, so the
            # initial prefix is exactly those K/V and the MLP learns the change (as LoRA's B = 0).
            width = len(self.producers) * 2 * self.n_kv_head * self.head_dim
            gen = torch.Generator().manual_seed(cfg.init_seed)
            self.embedding = nn.Parameter(torch.randn(self.n_tokens, mc.d_model, generator=gen) * 0.02)
            self.mlp = nn.Sequential(nn.Linear(mc.d_model, cfg.reparam_hidden), nn.Tanh(),
                                     nn.Linear(cfg.reparam_hidden, width))
            with torch.no_grad():
                self.mlp[2].weight.zero_()
                self.mlp[2].bias.zero_()
            self.register_buffer("initial", _flat_per_token(kv))
        else:
            self.kv = nn.Parameter(kv)
        self.to(device=model.device, dtype=model.dtype)

    @property
    def reparameterized(self) -> bool:
        return hasattr(self, "mlp")

    def tensor(self) -> torch.Tensor:
        """All prefixes, ``(n_producers, 2, n_kv_head, P, head_dim)``."""
        if not self.reparameterized:
            return self.kv
        flat = self.mlp(self.embedding) + self.initial                      # (P, L·2·H·D)
        return flat.view(self.n_tokens, len(self.producers), 2, self.n_kv_head, self.head_dim).permute(1, 2, 3, 0, 4)

    def per_layer(self, batch_size: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        t = self.tensor()
        return {p: (t[i, 0].expand(batch_size, -1, -1, -1), t[i, 1].expand(batch_size, -1, -1, -1))
                for i, p in enumerate(self.producers)}

    def enter(self, x: torch.Tensor, attention_mask: torch.Tensor | None, cache):
        """The model's input hook: into an empty cache, the prefixes go to slots ``[0, P)``;
        without a cache, each producer layer puts them before the call's own keys."""
        if cache is not None:
            cache.write_prefix(self.per_layer(1))
            return InputEntry(x, attention_mask)
        return InputEntry(x, attention_mask, prefix=self.per_layer(x.shape[0]))

    def merge(self) -> None:
        """Replace the reparameterisation MLP by the prefixes it produces (after training)."""
        if self.reparameterized:
            with torch.no_grad():
                kv = self.tensor().detach().clone()
            del self.mlp, self.embedding, self.initial
            self.kv = nn.Parameter(kv, requires_grad=False)


def _flat_per_token(kv: torch.Tensor) -> torch.Tensor:
    """``(L, 2, H, P, D)`` -> ``(P, L·2·H·D)``: one row per virtual token."""
    return kv.permute(3, 0, 1, 2, 4).reshape(kv.shape[3], -1)


class PromptAdapter(nn.Module):
    """Trainable input embeddings of ``P`` virtual tokens, prepended to every sequence."""

    def __init__(self, model, cfg: PromptConfig):
        super().__init__()
        ids = _sampled_tokens(model, cfg.num_virtual_tokens, cfg.init_seed)
        self.n_tokens = cfg.num_virtual_tokens
        self.embeddings = nn.Parameter(model.embed_tokens.weight[ids].detach().clone())

    def enter(self, x: torch.Tensor, attention_mask: torch.Tensor | None, cache):
        """The model's input hook: virtual input tokens before the real ones (dropped from the output)."""
        B = x.shape[0]
        x = torch.cat([self.embeddings.to(x.dtype).expand(B, -1, -1), x], 1)
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask.new_ones(B, self.n_tokens), attention_mask], 1)
        return InputEntry(x, attention_mask, n_virtual=self.n_tokens)

    def merge(self) -> None:
        pass


def _sampled_tokens(model, n: int, seed: int) -> torch.Tensor:
    vocab = model.cfg.vocab_size
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).to(model.device)


@torch.no_grad()
def _kv_of_sampled_tokens(model, n: int, seed: int):
    """The base model's keys and values (per producer, ``(n_kv_head, n, head_dim)``) for ``n``
    sampled vocabulary tokens read as one sequence."""
    ids = _sampled_tokens(model, n, seed).unsqueeze(0)
    cache = model.new_cache(1, n)
    with eval_mode(model):
        model(ids, cache=cache)
    return ({p: cache.keys[p][0].clone() for p in model.cfg.kv_producers},
            {p: cache.values[p][0].clone() for p in model.cfg.kv_producers})


def add_prompt_adapter(model, cfg: PromptConfig) -> nn.Module:
    """Attach a prefix / P-tuning v2 / prompt-tuning adapter to ``model`` (as
    ``model.prompt_adapter``) and freeze the rest of the model."""
    if getattr(model, "prompt_adapter", None) is not None:
        raise ConfigError("the model already has a prompt adapter; load a fresh model to add another")
    kinds = kinds_without("prefix_adapters", model.cfg.kinds)
    if kinds and cfg.method != "prompt":
        raise ConfigError(f"{cfg.method} tuning writes K/V prefixes, which layers of kind(s) {kinds} do not keep; "
                          f"use prompt tuning (virtual input tokens) or LoRA on this model")
    if model.cfg.key_balance and cfg.method != "prompt":
        raise ConfigError(f"{cfg.method} tuning writes keys into the cache as projected, and this model stores them "
                          f"balanced for integer caches (kvlab convert --balance-keys): tune the model before "
                          f"balancing its keys, or use LoRA or prompt tuning")
    if model.cfg.pos == "learned" and cfg.num_virtual_tokens >= model.cfg.max_seq_len:
        raise ConfigError(f"num_virtual_tokens={cfg.num_virtual_tokens} leaves no room in max_seq_len="
                          f"{model.cfg.max_seq_len} of a model with learned positions")
    window = model.cfg.sliding_window
    if window is not None:
        reach = model.cfg.n_layer * (window - 1)
        warnings.warn(f"{cfg.method} tuning on a model with sliding_window={window}: the virtual tokens fall out "
                      f"of the window like real ones, so tokens from index {reach} on "
                      f"(n_layer*(window-1)) are not steered by them", UserWarning, stacklevel=3)
    adapter = PromptAdapter(model, cfg) if cfg.method == "prompt" else PrefixAdapter(model, cfg)
    for p in model.parameters():
        p.requires_grad_(False)
    model.prompt_adapter = adapter.to(model.device)
    return adapter


def prompt_parameter_count(model_cfg, cfg: PromptConfig) -> int:
    """Closed form of the trainable parameters (during training, before any merge)."""
    P = cfg.num_virtual_tokens
    if cfg.method == "prompt":
        return P * model_cfg.d_model
    kv = len(model_cfg.kv_producers) * 2 * model_cfg.n_kv_head * model_cfg.head_dim
    if cfg.method == "ptuning":
        return P * kv
    h = cfg.reparam_hidden
    return P * model_cfg.d_model + (model_cfg.d_model * h + h) + (h * kv + kv)
