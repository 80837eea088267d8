"""``kvlab generate``: text from a model. Prompts are text (encoded, or wrapped as a chat turn) or
token ids; decoder-only models continue them greedily or by sampling (optionally with a window or a
quantized cache), an encoder–decoder takes each as its source (and may search with beams). With one
prompt the text streams out as it is generated.

:func:`generate_text` is the whole verb for Python callers; it returns the token ids and leaves
printing them to the caller, except for the stream.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kvlab.errors import ConfigError
from kvlab.recipes.loading import ModelSource, load_model
from kvlab.recipes.options import option


@dataclass(kw_only=True)
class GenerateConfig:
    source: ModelSource
    prompt: list[str] | None = option(None, "a prompt (repeat for a batch)")
    prompt_ids: list[str] | None = option(None, "a prompt as token ids, e.g. 1,2,3")
    chat: bool = option(False, "wrap each prompt as a user turn in the chat template")
    # A sentence or two: enough to see what a model does, quick on a CPU.
    max_new_tokens: int = option(64)
    temperature: float = option(0.0, "0 = greedy (default)")
    top_k: int | None = option(None)
    top_p: float | None = option(None)
    seed: int | None = option(None, "makes sampling deterministic")
    stop_token: list[int] | None = option(None, "token id that ends a row (default EOS)")
    no_stop: bool = option(False, "generate exactly --max-new-tokens tokens (no EOS stop)")
    num_beams: int = option(1, "an encoder–decoder: beam search with this many hypotheses per source (default "
                               "%(default)s: greedy or sampling)")
    length_penalty: float = option(1.0, "--num-beams: hypotheses are scored by sum log p / length ** this "
                                        "(default %(default)s)")
    backend: str | None = option(None, "attention backend: reference, sdpa, flash, triton or auto (default: the "
                                       "model's)")
    # fp8, int8, int4 or int8/int4 (keys/values) storage of the cache's per-token entries (kvlab.cache.quantized)
    kv_quant: str = "none"


@dataclass
class Generation:
    """What :func:`generate_text` produced: each prompt's token ids and its new tokens."""

    prompts: list[list[int]]
    outputs: list[list[int]]
    tokenizer: Any
    streamed: bool = False        # the text went out through ``write`` as it was generated

    def records(self) -> list[dict]:
        """One ``{"prompt_ids", "new_ids", "text"}`` per prompt (``text`` None without a tokenizer)."""
        tok = self.tokenizer
        return [{"prompt_ids": p, "new_ids": o, "text": tok.decode(o, skip_special_tokens=True) if tok else None}
                for p, o in zip(self.prompts, self.outputs)]

    def lines(self) -> list[str]:
        """One line per prompt: ``[i]`` and the new text, or prompt and new ids without a tokenizer."""
        tok = self.tokenizer
        return [f"[{i}] " + (tok.decode(o, skip_special_tokens=True) if tok else " ".join(map(str, p + o)))
                for i, (p, o) in enumerate(zip(self.prompts, self.outputs))]


def generate_text(cfg: GenerateConfig, write: Callable[[str], None] | None = None) -> Generation:
    """Load ``cfg.source``'s model, encode the prompts and generate. Given ``write`` and a single
    prompt (and no beam search, which knows its best hypothesis only at the end), the text streams
    through ``write`` as it is generated — a plain-text prompt first, a newline last."""
    if cfg.prompt is None and cfg.prompt_ids is None:
        raise ConfigError("kvlab generate: give --prompt TEXT or --prompt-ids 1,2,3")
    if cfg.prompt is not None and cfg.prompt_ids is not None:
        raise ConfigError("kvlab generate: give --prompt TEXT or --prompt-ids 1,2,3, not both (one batch is "
                          "either text or token ids)")
    model = load_model(cfg.source)
    seq2seq = model.cfg.is_encoder_decoder
    _check_fits_the_model(cfg, seq2seq)
    prompts = encode_prompts(cfg, model)
    if cfg.no_stop and cfg.stop_token:
        raise ConfigError("kvlab generate: --no-stop and --stop-token contradict each other; give one")
    stop = [] if cfg.no_stop else cfg.stop_token if cfg.stop_token else None
    for t in [*(stop or []), *(i for p in prompts for i in p)]:
        if not 0 <= t < model.cfg.vocab_size:
            raise ConfigError(f"kvlab generate: token id {t} is outside the vocabulary [0, {model.cfg.vocab_size})")
    check_cache_fits(model, len(prompts), max(map(len, prompts)) + cfg.max_new_tokens, cfg.max_new_tokens,
                     cfg.kv_quant)
    stream = write is not None and len(prompts) == 1 and not (seq2seq and cfg.num_beams > 1)
    on_token = _streamer(model.tokenizer, write) if stream else None
    sampling = dict(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, seed=cfg.seed, stop_tokens=stop,
                    backend=cfg.backend, on_token=on_token)
    if seq2seq:
        from kvlab.inference.seq2seq import generate_seq2seq

        outs = generate_seq2seq(model, prompts, cfg.max_new_tokens, num_beams=cfg.num_beams,
                                length_penalty=cfg.length_penalty, **sampling)
    else:
        from kvlab.inference.generation import generate

        if stream and cfg.prompt is not None and not cfg.chat:
            write(cfg.prompt[0])
        outs = generate(model, prompts, cfg.max_new_tokens, kv_quant=cfg.kv_quant, **sampling)
    if stream:
        write("\n")
    return Generation(prompts, outs, model.tokenizer, streamed=stream)


def _check_fits_the_model(cfg: GenerateConfig, seq2seq: bool) -> None:
    """Beam search is for encoder–decoders; chat, quantized caches and windows for decoder-only models."""
    if cfg.num_beams > 1 and not seq2seq:
        raise ConfigError("kvlab generate: --num-beams is beam search for encoder–decoders; decoder-only models "
                          "generate greedily or by sampling")
    if seq2seq and (cfg.chat or cfg.kv_quant != "none" or cfg.source.window is not None):
        flag = "--chat" if cfg.chat else "--kv-quant" if cfg.kv_quant != "none" else "--window"
        raise ConfigError(f"kvlab generate: {flag} is for decoder-only models; an encoder–decoder takes each "
                          f"--prompt as its source")


def encode_prompts(cfg: GenerateConfig, model) -> list[list[int]]:
    """The prompts as token ids: text encoded (an encoder–decoder's source, or a chat turn with
    ``chat``), or ``prompt_ids`` parsed."""
    tok = model.tokenizer
    if cfg.prompt is None:
        try:
            return [[int(t) for t in ids.split(",")] for ids in cfg.prompt_ids]
        except ValueError:
            raise ConfigError(f"kvlab generate: --prompt-ids {cfg.prompt_ids} must be comma-separated "
                              f"integers such as 1,2,3") from None
    if tok is None:
        raise ConfigError(f"kvlab generate: {cfg.source.model} has no tokenizer; pass --prompt-ids instead")
    if model.cfg.is_encoder_decoder:
        from kvlab.data.seq2seq import encode_text

        return [encode_text(tok, p) for p in cfg.prompt]
    if cfg.chat:
        return [tok.apply_chat_template([{"role": "user", "content": p}]) for p in cfg.prompt]
    return [tok.encode(p) for p in cfg.prompt]


def _streamer(tok, write: Callable[[str], None]) -> Callable[[int, int], None]:
    """``on_token`` for one row: its text so far, decoded again each time (a character may span
    several tokens) and written from where the last write ended; token ids without a tokenizer."""
    shown: list[int] = []
    text_so_far = ""

    def on_token(row: int, token: int) -> None:
        nonlocal text_so_far
        shown.append(token)
        if tok is None:
            write(f"{token} ")
        else:
            text = tok.decode(shown, skip_special_tokens=True)
            write(text[len(text_so_far):])
            text_so_far = text

    return on_token


def check_cache_fits(model, rows: int, length: int, new_tokens: int, kv_quant: str | None = None) -> None:
    """Refuse a generation whose KV cache alone would exceed this machine's memory (before trying)."""
    import os

    from kvlab.config.accounting import cache_bytes

    need = rows * cache_bytes(model.cfg, model.dtype, kv_quant).for_sequence(length)
    try:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    if need > have:
        raise ConfigError(f"kvlab generate: --max-new-tokens {new_tokens} needs a KV cache of {need / 2**30:,.1f} "
                          f"GiB for {rows} row(s), more than this machine's {have / 2**30:,.0f} GiB of memory; "
                          f"generate fewer tokens")
