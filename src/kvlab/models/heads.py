"""The score head: scalars beside the LM head, read from the decoder's final-norm hidden states.

One design serves every use. A model declares ``ModelConfig.score_outputs`` and carries an
``nn.Linear`` named ``score`` (:class:`~kvlab.models.decoder.Transformer` builds it from the config,
:func:`add_score_head` adds it to a model that has none):

- a reward model reads it at each row's last real token (:meth:`Transformer.sequence_scores`);
- PPO's value head reads it at every position (:func:`kvlab.training.rl.policy_and_values`);
- HF export writes it as ``*ForSequenceClassification``'s ``score`` (:mod:`kvlab.io.hf`);
- an adapter carries it (:func:`kvlab.peft.save_adapter`: PEFT's ``modules_to_save``).

Reading hidden states, it serves any attention kind and KV layout unchanged. This module imports
nothing from the model classes, which import it.
"""

from __future__ import annotations

import torch
from torch import nn


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


def add_score_head(model: nn.Module, n_outputs: int = 1, *, seed: int | None = None) -> nn.Module:
    """Give ``model`` (a :class:`~kvlab.models.decoder.Transformer`, in place) a score head of
    ``n_outputs`` beside its LM head — a reward model, or PPO's value head — initialised
    N(0, 1/d_model) (a head of this scale starts with rewards of order one); a model that has one
    keeps it."""
    if model.cfg.score_outputs == n_outputs and hasattr(model, "score"):
        return model
    model.cfg = model.cfg.replace(score_outputs=n_outputs)
    head = nn.Linear(model.cfg.d_model, n_outputs, bias=False)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * model.cfg.d_model ** -0.5)
    model.score = head.to(device=model.device, dtype=model.dtype)
    return model
