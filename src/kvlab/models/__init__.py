"""Models: the decoder-only LM, the encoder–decoder built on it, and scalar heads (reward, value)
that read the same hidden states."""

from kvlab.models.decoder import Block, InputEntry, Transformer
from kvlab.models.encoder_decoder import EncoderDecoder, Memory, model_class
from kvlab.models.heads import ScalarHead

__all__ = ["Block", "EncoderDecoder", "InputEntry", "Memory", "ScalarHead", "Transformer", "model_class"]
