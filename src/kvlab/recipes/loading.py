"""The model a recipe works on: a checkpoint, GGUF file or built-in name, loaded on a device in a
dtype, with a rolling window (StreamingLLM) or a kvlab adapter applied — what every verb that
reads a model takes (:func:`kvlab.cli.common.model_args`)."""

from __future__ import annotations

from dataclasses import dataclass

from kvlab.errors import ConfigError
from kvlab.recipes.options import device_option, option


@dataclass(kw_only=True)
class ModelSource:
    model: str = option(help="a kvlab or HF checkpoint directory, a .gguf file, or a built-in name (smollm2-135m)")
    device: str = device_option()
    model_dtype: str | None = option(None, "load the weights in this dtype (default: fp32 for imports, stored for "
                                           "kvlab)")
    adapter: str | None = option(None, "a kvlab adapter (from kvlab finetune) to apply to MODEL")
    window: int | None = option(None, "run every softmax layer with a sliding window of W positions and a rolling "
                                      "cache of W entries (memory bounded whatever the length)")
    sinks: int = option(0, "with --window: keep the first S positions visible too (StreamingLLM's attention sinks; "
                           "4 is its choice)")
    sink_positions: str | None = option(None, "with --sinks: see each sink at its place in the cache (StreamingLLM; "
                                              "the default for RoPE models: no distance exceeds S+W-1) or at its "
                                              "original position")


def refuse_encoder_decoder(source: ModelSource, verb: str) -> None:
    """One line for a verb that works on decoder-only models, before the weights are read."""
    from kvlab.io import load_config

    if load_config(source.model).is_encoder_decoder:
        raise ConfigError(f"kvlab {verb}: {source.model} is an encoder–decoder; {verb} works on decoder-only models "
                          f"for now (encoder–decoders: train, generate, eval, convert, export, info, plan)")


def load_model(source: ModelSource, decoder_only: str | None = None):
    """The model ``source`` names, with its window and adapter applied; ``decoder_only``: the verb,
    which refuses an encoder–decoder in one line."""
    from kvlab.dtypes import parse_dtype
    from kvlab.io import load

    if decoder_only is not None:
        refuse_encoder_decoder(source, decoder_only)
    dtype = parse_dtype(source.model_dtype) if source.model_dtype else None
    model = load(source.model, dtype=dtype, device=source.device)
    if source.window is not None:
        from kvlab.inference.streaming import with_window

        model = with_window(model, source.window, source.sinks, source.sink_positions)
    elif source.sinks or source.sink_positions:
        raise ConfigError("--sinks and --sink-positions go with --window W (the window they keep sinks for)")
    if source.adapter:
        from kvlab.peft import load_adapter

        load_adapter(model, source.adapter)
    return model


def model_config(*, checkpoint: str | None = None, preset: str | None = None, config: str | None = None,
                 **wiring: int | None):
    """The ModelConfig of a checkpoint, a preset or a JSON file of fields (the first given), with
    the ``wiring`` overrides that are not None applied (``n_kv_head``, ``cla``, ``cross_n_kv_head``,
    ``cross_cla``)."""
    from kvlab.config.model import ModelConfig

    if preset:
        cfg = ModelConfig.from_preset(preset)
    elif config:
        cfg = ModelConfig.from_json(config)
    else:
        from kvlab.io import load_config

        cfg = load_config(checkpoint)
    changes = {name: value for name, value in wiring.items() if value is not None}
    return cfg.replace(**changes) if changes else cfg
