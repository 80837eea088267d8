"""Scalar heads beside the LM head: a reward model scores a whole sequence, a value model (PPO)
scores every position. Both read the decoder's final-norm hidden states, so any attention kind and
any KV layout serves them unchanged."""

from __future__ import annotations

import torch
from torch import nn

from kvlab.models.decoder import Transformer


class ScalarHead(nn.Module):
    """``n_outputs`` scalars from a :class:`Transformer`'s hidden states.

    ``per_token=False`` (a reward model): the hidden state of each row's last real token
    (:func:`last_real_token`, the backbone's pad token excluded) -> ``(B, n_outputs)``.
    ``per_token=True`` (a value model): every position -> ``(B, T, n_outputs)``.
    """

    def __init__(self, backbone: Transformer, n_outputs: int = 1, *, per_token: bool = False):
        super().__init__()
        self.backbone = backbone
        self.per_token = per_token
        self.score = nn.Linear(backbone.cfg.d_model, n_outputs, bias=False)
        nn.init.normal_(self.score.weight, std=backbone.cfg.d_model ** -0.5)
        self.score.to(device=backbone.device, dtype=backbone.dtype)

    def forward(self, tokens: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                backend: str | None = None) -> torch.Tensor:
        h = self.backbone.hidden_states(tokens, attention_mask=attention_mask, backend=backend)
        if self.per_token:
            return self.score(h)
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        return self.score(h[rows, last_real_token(tokens, attention_mask, self.backbone.cfg.pad_token_id)])


def last_real_token(tokens: torch.Tensor, attention_mask: torch.Tensor | None,
                    pad_id: int | None = None) -> torch.Tensor:
    """``(B,)``: the index of each row's last real token — the last position that ``attention_mask``
    marks real (every position without a mask) and, when ``pad_id`` is given, whose token is not
    ``pad_id``, whether the row is left- or right-padded; 0 for a row without one.

    The token rule is transformers' ``*ForSequenceClassification`` (the rightmost token that is not
    ``pad_token_id``), so that an exported reward model scores what kvlab's does and kvlab's reward
    loss equals TRL's: where the pad token is also the EOS (SmolLM2), a trailing EOS is read past,
    to the token before it, as TRL's reward models read it."""
    real = torch.ones_like(tokens, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    if pad_id is not None:
        real = real & (tokens != pad_id)
    idx = torch.arange(tokens.shape[1], device=tokens.device)
    return torch.where(real, idx, -1).amax(-1).clamp_min(0)


def add_score_head(model: Transformer, n_outputs: int = 1, *, seed: int | None = None) -> Transformer:
    """Give ``model`` (in place) a score head of ``n_outputs`` beside its LM head — a reward model
    (:meth:`Transformer.sequence_scores`) — initialised N(0, 1/d_model) (a head of this scale starts
    with rewards of order one); a model that has one keeps it."""
    if model.cfg.score_outputs == n_outputs and hasattr(model, "score"):
        return model
    model.cfg = model.cfg.replace(score_outputs=n_outputs)
    head = nn.Linear(model.cfg.d_model, n_outputs, bias=False)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * model.cfg.d_model ** -0.5)
    model.score = head.to(device=model.device, dtype=model.dtype)
    return model
