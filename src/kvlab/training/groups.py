"""What trains: a mode (``TrainConfig.train_only``) is a union of named parameter groups.

The model declares its groups from its structure (:meth:`kvlab.models.decoder.Transformer.parameter_groups`:
``model``, ``attention``, ``kv``, ``score``) and the adapters theirs
(:func:`kvlab.peft.adapter.adapter_groups`: ``adapter``, and ``adapter_fixed`` that never trains).
An adapter's tensors sit inside the modules they adapt (LoRA's factors in an attention
projection), so they are taken out of the model's groups: they train only in a mode that names
``adapter``. A score head (a reward model's, PPO's value head) is new, and trains with whatever
else does.
"""

from __future__ import annotations

import torch
from torch import nn

from kvlab.errors import ConfigError
from kvlab.peft.adapter import adapter_groups

TRAIN_MODES: dict[str, tuple[str, ...]] = {
    "all": ("model",),                                   # every weight of the model (adapters aside)
    "attention": ("attention", "score"),                 # every attention projection, cross-attention too
    "kv": ("kv", "score"),                               # the decoder's K/V projections: what a conversion changed
    "adapter": ("adapter", "score"),                     # a kvlab.peft adapter
    "attention+adapter": ("attention", "adapter", "score"),  # the attention in full, an adapter on the rest
}
TRAIN_ONLY = tuple(TRAIN_MODES)

# The groups an adapter directory holds (kvlab.peft.save_adapter: the adapter and a score head).
_ADAPTER_DIRECTORY = {"adapter", "score"}


def checkpoints_hold_adapter_only(train_only: str) -> bool:
    """Whether a mode's checkpoints hold the adapter alone: it trains nothing else of the model (a
    4-bit base cannot be written as safetensors, and need not be: it never changes)."""
    return set(TRAIN_MODES[train_only]) <= _ADAPTER_DIRECTORY


def parameter_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """The model's groups with the adapters' tensors taken out, and the adapters' groups."""
    added = adapter_groups(model)
    taken = {id(p) for group in added.values() for p in group}
    groups = {name: [p for p in group if id(p) not in taken] for name, group in model.parameter_groups().items()}
    return groups | added


def trainable_parameters(model: nn.Module, train_only: str) -> list[tuple[str, torch.nn.Parameter]]:
    """Set ``requires_grad`` on the parameters of mode ``train_only`` (and off on the rest) and
    return them by name, in the model's order: ``all``; ``attention`` (every attention projection,
    an encoder–decoder's cross-attention and encoder included); ``kv`` (the decoder's K/V
    projections only — the part a KV conversion changed); ``adapter`` (a :mod:`kvlab.peft`
    adapter's parameters); ``attention+adapter`` (the attention in full and an adapter on the rest,
    e.g. LoRA on the MLPs: the checkpoints then hold the whole model, adapter included). A score
    head trains in every mode."""
    if train_only not in TRAIN_MODES:
        raise ConfigError(f"train_only={train_only!r} is not one of {list(TRAIN_ONLY)}")
    groups = parameter_groups(model)
    selected = {id(p) for name in TRAIN_MODES[train_only] for p in groups[name]}
    chosen = []
    for name, p in model.named_parameters():
        keep = id(p) in selected
        p.requires_grad_(keep)
        if keep:
            chosen.append((name, p))
    if not chosen:
        raise ConfigError(f"train_only={train_only!r} selects no parameters of this model")
    return chosen
