"""Models: the decoder-only LM (today's), with room beside it for an encoder-decoder model and
scalar heads (reward, value) that read the same hidden states."""

from kvlab.models.decoder import Block, InputEntry, Transformer
from kvlab.models.heads import ScalarHead

__all__ = ["Block", "InputEntry", "ScalarHead", "Transformer"]
