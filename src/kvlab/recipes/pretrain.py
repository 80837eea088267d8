"""``kvlab train``: pretrain a model from a config, or uptrain a checkpoint, with the LM loss.

:func:`run_training` is the whole verb for Python callers: tokenize the data (cached by content
hash), join torchrun's process group if there is one, shard the windows by rank, run the loop
(:func:`kvlab.training.train`) with resume, record the run in the model's provenance, and write
``OUT/final`` (gathered under FSDP, by rank 0).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from kvlab.config.model import ModelConfig
from kvlab.data.corpus import builtin_corpus, read_documents
from kvlab.data.windows import Windows, tokenize_to_file
from kvlab.errors import ConfigError
from kvlab.io.kvlab_format import save_checkpoint
from kvlab.io.provenance import record_step
from kvlab.io.tokenizer import ByteTokenizer
from kvlab.models.decoder import Transformer
from kvlab.models.encoder_decoder import model_class
from kvlab.training import Dist, TrainConfig, full_model_state, train
from kvlab.training.objectives import Objective


def new_byte_level_model(model_cfg: ModelConfig, seed: int = 0) -> Transformer:
    """A freshly initialised model with kvlab's byte tokenizer (what pretraining from a config uses)."""
    tokenizer = ByteTokenizer()
    if model_cfg.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"a model trained from scratch uses kvlab's byte tokenizer ({tokenizer.vocab_size} ids); "
                          f"vocab_size={model_cfg.vocab_size} is too small")
    if model_cfg.is_encoder_decoder and model_cfg.decoder_start_token_id is None:
        model_cfg = model_cfg.replace(decoder_start_token_id=tokenizer.pad_token_id)    # T5 starts from pad
    torch.manual_seed(seed)
    model = model_class(model_cfg)(model_cfg)
    model.tokenizer = tokenizer
    return model


def training_tokens(tokenizer, data: str = "builtin", *, data_field: str = "text", cache_dir: str | None = None):
    """Train and validation token arrays of ``data`` ('builtin', a text file, JSONL, a directory)."""
    if data in ("builtin", "builtin:train"):
        train_docs, val_docs = builtin_corpus("train"), builtin_corpus("validation")
    else:
        docs = read_documents(data, field=data_field)
        train_docs = [d for d in docs if d.split == "train"] or docs
        val_docs = [d for d in docs if d.split == "validation"]
    train_tokens = tokenize_to_file(train_docs, tokenizer, cache_dir=cache_dir).tokens
    val_tokens = tokenize_to_file(val_docs, tokenizer, cache_dir=cache_dir).tokens if val_docs else None
    return train_tokens, val_tokens


def run_training(model: Transformer, cfg: TrainConfig, *, data: str = "builtin", data_field: str = "text",
                 cache_dir: str | None = None, device: str | torch.device = "cpu", strategy: str = "ddp",
                 resume: bool = False, objective: Objective | None = None,
                 record: dict[str, Any] | None = None) -> dict:
    """Train ``model`` as configured and write ``OUT/final``; returns the loop's summary plus
    ``final``. ``record`` adds fields to the provenance step of this run."""
    if model.tokenizer is None:
        raise ConfigError("the model has no tokenizer to read the training data with")
    train_tokens, val_tokens = training_tokens(model.tokenizer, data, data_field=data_field, cache_dir=cache_dir)
    device = torch.device(device)
    dist_ctx = Dist.from_env(strategy, device)
    if dist_ctx.enabled and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    shard = dict(rank=dist_ctx.rank, world_size=dist_ctx.world_size)
    train_windows = Windows(train_tokens, cfg.seq_len, cfg.batch_size, mode=cfg.data_mode, seed=cfg.seed, **shard)
    val_windows = (Windows(val_tokens, cfg.seq_len, cfg.batch_size, mode="sequential", seed=cfg.seed, **shard)
                   if val_tokens is not None and len(val_tokens) > cfg.seq_len + 1 else None)
    summary = train(model, train_windows, val_windows, cfg, resume=resume, device=device, dist_ctx=dist_ctx,
                    objective=objective)
    step = dict(steps=cfg.max_steps, tokens=cfg.max_steps * cfg.tokens_per_step, data=data,
                train_only=cfg.train_only, lr=cfg.lr, seed=cfg.seed, **(record or {}))
    if dist_ctx.enabled:
        step.update(world_size=dist_ctx.world_size, strategy=dist_ctx.strategy)
    record_step(model, "train", **step)
    final = Path(cfg.out_dir) / "final"
    state = full_model_state(model, dist_ctx)                # collective under FSDP
    if dist_ctx.is_main:
        save_checkpoint(model, final, state_dict=state)
    dist_ctx.barrier()
    if dist_ctx.enabled:
        import torch.distributed as dist

        dist.destroy_process_group()
    return {**summary, "final": str(final)}
