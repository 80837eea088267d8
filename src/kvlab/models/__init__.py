"""Models: the decoder-only LM, the encoder–decoder built on it, and the score head (reward, value)
that reads the same hidden states."""

from kvlab.models.decoder import Block, InputEntry, Transformer
from kvlab.models.encoder_decoder import EncoderDecoder, Memory, model_class
from kvlab.models.heads import add_score_head

__all__ = ["Block", "EncoderDecoder", "InputEntry", "Memory", "Transformer", "add_score_head", "model_class"]
