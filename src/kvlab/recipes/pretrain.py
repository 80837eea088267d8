"""``kvlab train``: pretrain a model from a config, or uptrain a checkpoint, with the LM loss (an
encoder–decoder on source/target pairs: :mod:`kvlab.recipes.seq2seq`).

:func:`pretrain` is the whole verb for Python callers: check the settings, build or load the model,
and run it in its run directory. :func:`run_training` trains a model you have: tokenize the data
(cached by content hash), join torchrun's process group if there is one, shard the windows by rank,
run the loop (:func:`kvlab.training.train`) with resume, record the run in the model's provenance,
and write ``OUT/final`` (gathered under FSDP, by rank 0).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from kvlab.config.model import ModelConfig
from kvlab.data.sources import document_sides, parse_data
from kvlab.data.windows import TokenMix, Windows, tokenize_to_file
from kvlab.errors import ConfigError
from kvlab.io.kvlab_format import save_checkpoint
from kvlab.io.provenance import record_step
from kvlab.io.tokenizer import ByteTokenizer
from kvlab.models.decoder import Transformer
from kvlab.models.encoder_decoder import model_class
from kvlab.recipes.pretrain_config import PretrainConfig
from kvlab.training import Dist, TrainConfig, full_model_state, train
from kvlab.training.objectives import Objective


def pretrain(cfg: PretrainConfig) -> dict:
    """Pretrain ``cfg.preset``/``cfg.config`` or uptrain ``cfg.init`` in the run directory
    ``cfg.out`` (resumable); returns the loop's summary plus ``final`` (the written model)."""
    from kvlab.io.atomic import refuse_output_over_input
    from kvlab.io.rundir import RunDirectory
    from kvlab.training.checkpoints import RESUMABLE_CHANGES, TRAIN_OUTPUTS, run_settings

    if len([x for x in (cfg.preset, cfg.config, cfg.init) if x]) != 1:
        raise ConfigError("kvlab train: give exactly one of --preset NAME, --config FILE (pretraining) or "
                          "--init MODEL (uptraining a checkpoint)")
    tcfg = cfg.train_config()
    model = _model(cfg)
    if tcfg.seq_len > model.cfg.max_seq_len:
        raise ConfigError(f"kvlab train: --seq-len {tcfg.seq_len} exceeds the model's max_seq_len "
                          f"{model.cfg.max_seq_len}; train on windows of at most {model.cfg.max_seq_len} tokens")
    refuse_output_over_input(cfg.out, [cfg.init])
    refuse_output_over_input(cfg.out, [cfg.data], what="its data", holds=False)
    record = dict(alpha=cfg.alpha, reference_tokens=cfg.reference_tokens) if cfg.alpha is not None else None
    # What a resumed run must repeat (kvlab.io.rundir): these keys and values are in every run.json.
    settings = {"init": cfg.init, "preset": cfg.preset, "config": cfg.config, "n_kv_head": cfg.n_kv_head,
                "cla": cfg.cla, "data": cfg.data, "data_field": cfg.data_field, "strategy": cfg.strategy,
                **run_settings(tcfg)}
    seq2seq = model.cfg.is_encoder_decoder
    if seq2seq:
        _check_seq2seq(cfg)
        settings.update(cross_n_kv_head=cfg.cross_n_kv_head, cross_cla=cfg.cross_cla,
                        source_field=cfg.source_field, target_field=cfg.target_field)
    with RunDirectory(cfg.out, "train", settings, entries=TRAIN_OUTPUTS, resume=cfg.resume,
                      overwrite=cfg.overwrite, free=RESUMABLE_CHANGES, scaffolding=("metrics.jsonl", "checkpoints")):
        if seq2seq:
            from kvlab.recipes.seq2seq import run_seq2seq_training

            return run_seq2seq_training(model, tcfg, data=cfg.data, source_field=cfg.source_field,
                                        target_field=cfg.target_field, device=cfg.device, resume=cfg.resume,
                                        record=record)
        return run_training(model, tcfg, data=cfg.data, data_field=cfg.data_field, cache_dir=cfg.cache_dir,
                            device=cfg.device, strategy=cfg.strategy, resume=cfg.resume, record=record)


def _model(cfg: PretrainConfig) -> Transformer:
    """A new byte-level model of the preset or config file with its wiring, or the checkpoint to
    uptrain (whose wiring is its own)."""
    from kvlab.recipes.loading import ModelSource, load_model, model_config

    wiring = cfg.wiring()
    overrides = ["--" + name.replace("_", "-") for name, value in wiring.items() if value is not None]
    if cfg.init and overrides:
        raise ConfigError(f"kvlab train: {overrides[0]} shapes a new model (--preset/--config); a checkpoint given "
                          f"with --init keeps its wiring — convert it first (kvlab convert {cfg.init} --kv-heads G / "
                          f"--cla K)")
    if cfg.init:
        model = load_model(ModelSource(model=cfg.init))
        if model.tokenizer is None:
            raise ConfigError(f"kvlab train: {cfg.init} has no tokenizer to read the data with")
        return model
    try:
        return new_byte_level_model(model_config(preset=cfg.preset, config=cfg.config, **wiring), seed=cfg.seed)
    except ConfigError as e:
        raise ConfigError(f"kvlab train: {e}") from None


def _check_seq2seq(cfg: PretrainConfig) -> None:
    """An encoder–decoder trains in one process, on pairs it can read (checked before the run starts)."""
    from kvlab.recipes.seq2seq import seq2seq_pairs

    if "RANK" in os.environ:
        raise ConfigError("kvlab train: encoder–decoders train in one process for now; run without torchrun")
    try:
        seq2seq_pairs(cfg.data, source_field=cfg.source_field, target_field=cfg.target_field, n_tasks=1)
    except ConfigError as e:
        raise ConfigError(f"kvlab train: {e}") from None


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
    """``(train, validation)`` of ``data`` (:mod:`kvlab.data.sources`: 'builtin', 'library', files,
    directories, globs, JSONL, or a weighted mix of these): the train sides as a
    :class:`~kvlab.data.windows.TokenMix`, the validation sides' tokens together (None if none)."""
    parts = parse_data(data, named=("builtin", "library"))
    sides = [document_sides(p.source, data_field, tokenizer) for p in parts]
    train = TokenMix([(p.source, tokenize_to_file(side["train"], tokenizer, cache_dir=cache_dir).tokens, p.weight)
                      for p, side in zip(parts, sides)])
    val_docs = [d for side in sides for d in side["validation"]]
    val_tokens = tokenize_to_file(val_docs, tokenizer, cache_dir=cache_dir).tokens if val_docs else None
    return train, val_tokens


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
    train_windows = train_tokens.windows(cfg.seq_len, cfg.batch_size, mode=cfg.data_mode, seed=cfg.seed, **shard)
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
