"""The settings of a ``kvlab train`` run (:class:`PretrainConfig`): one place for each default and
the help of its flag; the training loop's own default to :class:`~kvlab.training.TrainConfig`'s."""

from __future__ import annotations

from dataclasses import dataclass

from kvlab.errors import ConfigError
from kvlab.recipes.options import device_option, option
from kvlab.training import STRATEGIES, TrainConfig

# What `kvlab train` may train: the whole model, or the part a conversion changed (the adapter
# modes belong to kvlab finetune).
PRETRAIN_MODES = ("all", "attention", "kv")


@dataclass(kw_only=True)
class PretrainConfig:
    """A ``kvlab train`` run. The training loop's settings default to :class:`TrainConfig`'s."""

    # The model: one of a preset or a config file (pretraining, kvlab's byte tokenizer), or a
    # checkpoint (uptraining), and for a new model its KV wiring.
    preset: str | None = option(None)
    config: str | None = option(None)
    init: str | None = option(None, "a checkpoint to continue training (uptraining)")
    n_kv_head: int | None = option(None, "with --preset/--config: override KV heads")
    cla: int | None = option(None, "with --preset/--config: override the CLA sharing factor")
    cross_n_kv_head: int | None = option(None, "with --preset/--config of an encoder–decoder: override "
                                               "cross-attention's KV heads")
    cross_cla: int | None = option(None, "with --preset/--config of an encoder–decoder: share cross-attention K/V "
                                         "across K layers")
    out: str = option(help="run directory: metrics.jsonl, checkpoints/, final/")
    data: str = option("builtin", "'builtin', 'library', a text file, a directory, a glob, a .jsonl file of text or "
                                  "chat records, or a weighted mix such as notes/:0.7,builtin:0.3 (a tenth of "
                                  "your text held out for validation); for an encoder–decoder 'builtin' (the "
                                  "instruction tasks) or a .jsonl file of source/target pairs")
    data_field: str = option("text", "the JSONL field holding the text (default %(default)r)")
    source_field: str = option("source", "encoder–decoders: the JSONL field of the source")
    target_field: str = option("target", "encoder–decoders: the JSONL field of the target")
    # The budget: exactly one of steps, tokens, or a fraction alpha of a pretraining budget (the
    # GQA paper's uptraining budget).
    max_steps: int | None = option(None)
    tokens: int | None = option(None, "training tokens")
    alpha: float | None = option(None, "a fraction of --reference-tokens (uptraining budget)")
    reference_tokens: int | None = option(None, "the pretraining budget --alpha refers to")
    batch_size: int = option(TrainConfig.batch_size, "sequences per optimizer step")
    grad_accum: int = option(TrainConfig.grad_accum)
    seq_len: int = option(TrainConfig.seq_len)
    lr: float = option(TrainConfig.lr)
    warmup_steps: int = option(TrainConfig.warmup_steps)
    eval_every: int = option(TrainConfig.eval_every)
    eval_batches: int = option(TrainConfig.eval_batches)
    save_every: int = option(TrainConfig.save_every)
    keep_last: int = option(TrainConfig.keep_last)
    log_every: int = option(TrainConfig.log_every)
    seed: int = option(TrainConfig.seed)
    train_only: str = option(TrainConfig.train_only)
    data_mode: str = option(TrainConfig.data_mode)
    cache_dir: str | None = option(None, "where tokenized data is cached (default ~/.cache/kvlab or $KVLAB_CACHE)")
    resume: bool = option(False, "continue from the last complete checkpoint in --out")
    overwrite: bool = False       # start over in a directory that holds a run (kvlab.io.rundir)
    strategy: str = option(STRATEGIES[0], "under torchrun: DDP, or FSDP2 (fully_shard per block)")
    device: str = device_option()

    def wiring(self) -> dict[str, int | None]:
        """The KV wiring a new model gets (None: the preset's or config file's)."""
        return {name: getattr(self, name) for name in ("n_kv_head", "cla", "cross_n_kv_head", "cross_cla")}

    def train_config(self) -> TrainConfig:
        """The loop's settings, ``max_steps`` from the one budget given."""
        from kvlab.training import steps_for_budget

        budgets = [flag for flag, value in (("--max-steps", self.max_steps), ("--tokens", self.tokens),
                                            ("--alpha", self.alpha)) if value is not None]
        if len(budgets) != 1:
            raise ConfigError(f"kvlab train: give exactly one budget: --max-steps N, --tokens N, or --alpha A with "
                              f"--reference-tokens N (got {', '.join(budgets) or 'none'})")
        if self.reference_tokens is not None and self.alpha is None:
            raise ConfigError("kvlab train: --reference-tokens goes with --alpha (the budget is alpha x reference "
                              "tokens); drop it, or give --alpha instead of " + budgets[0])
        max_steps = self.max_steps if self.max_steps is not None else steps_for_budget(
            self.batch_size * self.seq_len, tokens=self.tokens, alpha=self.alpha,
            reference_tokens=self.reference_tokens)
        return TrainConfig(out_dir=self.out, max_steps=max_steps, batch_size=self.batch_size,
                           grad_accum=self.grad_accum, seq_len=self.seq_len, lr=self.lr,
                           warmup_steps=self.warmup_steps, eval_every=self.eval_every, eval_batches=self.eval_batches,
                           save_every=self.save_every, keep_last=self.keep_last, seed=self.seed,
                           train_only=self.train_only, data_mode=self.data_mode, log_every=self.log_every)
