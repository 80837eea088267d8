"""What ``kvlab shrink`` does, with its defaults and the reason for each: :class:`ShrinkConfig`."""

from __future__ import annotations

from dataclasses import dataclass

from kvlab.errors import ConfigError
from kvlab.recipes.shrink.candidates import PRECISIONS
from kvlab.recipes.shrink.targets import TARGET_NAMES
from kvlab.recipes.shrink.text import check_data

TRAIN_SETS = ("attention", "all", "lora")
PRECISION_NAMES = tuple("none" if p is None else p for p in PRECISIONS)     # as --precisions names them
# A candidate whose decode step takes more than this times the original's (median ratio, measured
# interleaved) is slower: on the 2-core VM two identical models read 0.94-1.06 against each other.
SPEED_TOLERANCE = 0.05


@dataclass
class ShrinkConfig:
    """What ``kvlab shrink`` does; the defaults are the CPU default (``--quick``: a tiny smoke run)."""

    kv: str = "2x"
    minutes: float | None = 15.0          # wall time for the whole run (used when tokens is None)
    tokens: int | None = None             # training tokens over all recovered candidates
    # How many of the best-ranked to recover. One: since the loss-allocated low-rank start exists it
    # leads every SmolLM2 ranking by a wide margin (KV/2: proxy 10.54 against 12.11 for the next),
    # and a second candidate halves the first one's training.
    candidates: int = 1
    calibration_tokens: int = 8192
    proxy_tokens: int = 4096
    eval_tokens: int | None = 8192        # validation tokens scored at the end (None: the whole split)
    eval_seq_len: int = 1024
    # Beside the validation text, every recovered model is scored against the original on what no stage
    # saw (kvlab.eval.suite): each off-domain set the machine has (this many tokens of each; 0: none),
    # passkey retrieval at these prompt lengths (each at depths 0.1, 0.5, 0.9; those past the model's
    # context left out; empty: none) and task_items items of the next-line and recall tasks (0: none).
    # Each costs scoring time that recovery does not get (about a minute per model at these sizes on 2
    # cores); kvlab eval --original measures a finished model at any size.
    offdomain_tokens: int = 1024
    passkey_lengths: tuple[int, ...] = (1024, 2048)
    task_items: int = 32
    # Training windows as long as the evaluation's: the converted layers' position-free channels must
    # learn long distances (at 256-token windows a KV/2 MLA reached +14 % on 512-token windows but
    # +57 % at 1,024 tokens of context).
    seq_len: int = 1024
    batch_size: int = 1
    # Refit every layer's output projection in closed form after converting a chosen candidate
    # (kvlab.convert.refit): at alpha = 0 on SmolLM2 MLA 160+32 goes 28.5 -> 21.4 in about 50 s on 2
    # cores, but after 16k tokens of transfer + distillation the gain is gone (15.59 against 15.49
    # without; BENCHMARKS "The output refit"), so at CPU budgets it is opt-in.
    refit: bool = False
    transfer_fraction: float = 0.3        # share of a candidate's tokens spent on attention transfer
    transfer_lr: float = 3e-4
    # Distillation starts from a model already close to the original, and Adam moves every weight by
    # about the learning rate per step: at 1e-4 or 3e-4 the first steps threw the KV/2 allocated start
    # from proxy 10.54 to 11-90 and training levelled off at 10.1; at 3e-5 it fell to 9.78 in 24 steps
    # (1e-5: 9.95 after 16 steps, slower). BENCHMARKS "Distillation from a good start".
    kd_lr: float = 3e-5
    # What distillation trains: the attention, all weights, or the attention in full plus LoRA on
    # the MLPs (merged into the weights at the end).
    train: str = "attention"
    lora_rank: int = 16
    # The run's text (kvlab.recipes.shrink.text): the built-in train split, the larger library corpus
    # (for budgets past its ~270k tokens), text the original model generates (its own distribution:
    # what distillation matches), "mixed" (the built-in split and generated text), the user's files,
    # or a weighted mix of these ("notes/:0.7,builtin:0.3").
    data: str = "builtin"
    generated_tokens: int = 65536
    curve_points: int = 4
    # The cache precisions to consider, alone and composed with every structure ("none": the model's
    # own). Quantization is the baseline a runtime gives for free: at half the bytes fp8 costs a few
    # hundredths of a percent of perplexity, so structure must beat it or compose with it.
    precisions: tuple[str, ...] = PRECISION_NAMES
    # Ranking: every candidate on the first half of the proxy windows, then the best few on all of them
    # (a candidate costs a conversion and a proxy pass; SmolLM2 has 20-30 of them at 4x).
    rescore: int = 3
    # Speed: the decode step of each candidate chosen, against the original's, at this context (None:
    # the model's trained context, at most 4,096) and batch, on the run's device; a candidate slower
    # than the original (SPEED_TOLERANCE) is passed over unless allow_slower.
    context: int | None = None
    speed_batch: int = 4
    speed_rounds: int = 5
    allow_slower: bool = False
    # Quantized caches of gqa layers hold the keys centred and balanced against the queries
    # (kvlab.convert.balance: the same outputs, far less rounding error) where the target runtime
    # stores kvlab's cache; off: keys as projected.
    balance_keys: bool = True
    # The serving gain of the chosen model: kvlab serve's engine, the original and the chosen model at
    # one KV budget (what holds serve_original_seqs of the original's sequences), serve_clients
    # requests of serve_prompt_tokens + serve_max_tokens at once.
    serve_clients: int = 32
    serve_prompt_tokens: int = 32
    serve_max_tokens: int = 32
    serve_original_seqs: int = 8
    # The runtime the model is for (kvlab.recipes.shrink.targets): only what it executes natively is
    # considered, and the chosen model is written in its format.
    target: str = "kvlab"
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.minutes is None and self.tokens is None:
            raise ConfigError("give a budget: --minutes M or --tokens N")
        if self.minutes is not None and not self.minutes > 0:
            raise ConfigError(f"--minutes {self.minutes} must be positive")
        if self.tokens is not None and self.tokens < 0:
            raise ConfigError(f"--tokens {self.tokens} must be >= 0")
        if self.candidates < 1:
            raise ConfigError(f"--candidates {self.candidates} must be at least 1")
        for name in ("kd_lr", "transfer_lr"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"--{name.replace('_', '-')} {getattr(self, name)} must be positive (e.g. 3e-5)")
        if not 0 <= self.transfer_fraction <= 1:
            raise ConfigError(f"transfer_fraction={self.transfer_fraction} must be in [0, 1]")
        if self.train not in TRAIN_SETS:
            raise ConfigError(f"--train {self.train!r} is not one of {', '.join(TRAIN_SETS)}")
        if self.train == "lora" and self.lora_rank < 1:
            raise ConfigError(f"--lora-rank {self.lora_rank} must be a positive integer (typical: 8-64)")
        parts = check_data(self.data)
        self.precisions = tuple(self.precisions)
        unknown = [p for p in self.precisions if p not in PRECISION_NAMES]
        if unknown or not self.precisions:
            raise ConfigError(f"--precisions {','.join(map(str, self.precisions))!r}: give some of "
                              f"{', '.join(PRECISION_NAMES)}, separated by commas")
        if self.target not in TARGET_NAMES:
            raise ConfigError(f"--target {self.target!r} is not one of {', '.join(TARGET_NAMES)}")
        if self.context is not None and self.context < 1:
            raise ConfigError(f"--context {self.context} must be a positive number of tokens")
        if min(self.rescore, self.speed_batch, self.speed_rounds, self.serve_clients, self.serve_prompt_tokens,
               self.serve_max_tokens, self.serve_original_seqs) < 1:
            raise ConfigError("rescore, speed_batch, speed_rounds and the serve_* settings must be positive integers")
        self.passkey_lengths = tuple(self.passkey_lengths)
        if self.offdomain_tokens < 0 or self.task_items < 0 or any(n < 1 for n in self.passkey_lengths):
            raise ConfigError("offdomain_tokens and task_items must be >= 0 and passkey_lengths positive token counts")
        if any(p.source == "generated" for p in parts) and self.generated_tokens < 1:
            raise ConfigError(f"--generated-tokens {self.generated_tokens} must be positive with --data {self.data}")

    @classmethod
    def quick(cls, **overrides) -> "ShrinkConfig":
        base = dict(minutes=None, tokens=2 * 8 * 2 * 32, candidates=2, calibration_tokens=512, proxy_tokens=256,
                    eval_tokens=512, eval_seq_len=64, offdomain_tokens=64, passkey_lengths=(), task_items=4,
                    seq_len=32, batch_size=2, curve_points=2,
                    serve_clients=4, serve_prompt_tokens=8, serve_max_tokens=4, serve_original_seqs=1)
        return cls(**{**base, **overrides})

    @property
    def precision_values(self) -> tuple[str | None, ...]:
        """The precisions as candidates carry them (None: the model's own)."""
        return tuple(None if p == "none" else p for p in self.precisions)

    @property
    def train_only(self) -> str:
        """The training loop's name for the ``train`` choice (its trainable set)."""
        return "attention+adapter" if self.train == "lora" else self.train
