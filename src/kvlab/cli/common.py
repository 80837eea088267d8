"""What the verbs share: model sources and overrides, loading, console output, list arguments."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from kvlab.errors import ConfigError, KvlabError


class UsageError(KvlabError):
    """Bad command-line usage: exit 2 with one line."""


# ------------------------------------------------------------------------------- model source
def add_model_source(p: argparse.ArgumentParser) -> None:
    src = p.add_argument_group("model (give one)")
    src.add_argument("checkpoint", nargs="?", metavar="MODEL",
                     help="a kvlab or HF checkpoint directory, a .gguf file, or a built-in name (smollm2-135m)")
    src.add_argument("--preset", metavar="NAME", help="a built-in preset (kvlab info --list-presets)")
    src.add_argument("--config", metavar="FILE", help="a JSON file of ModelConfig fields")
    p.add_argument("--n-kv-head", type=int, metavar="N", help="override the number of KV heads (1 = MQA)")
    p.add_argument("--cla", type=int, metavar="K", help="override the cross-layer KV sharing factor")
    p.add_argument("--cross-n-kv-head", type=int, metavar="N",
                   help="an encoder–decoder: override cross-attention's KV heads")
    p.add_argument("--cross-cla", type=int, metavar="K",
                   help="an encoder–decoder: share cross-attention K/V across K decoder layers")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32", "fp8"],
                   help="dtype of the KV cache and weights for byte counts (default bf16)")
    kv_quant_arg(p)
    p.add_argument("--json", action="store_true", help="print JSON for machines instead of a table")


def kv_quant_arg(p: argparse.ArgumentParser) -> None:
    """``--kv-quant``: fp8, int8, int4 or int8-keys/int4-values storage of the KV cache's per-token entries
    (kvlab.cache.quantized), or a format per layer (``int8/int4+int8@0-3``, what ``kvlab shrink`` allocates)."""
    p.add_argument("--kv-quant", type=_kv_quant_name, default="none", metavar="FORMAT",
                   help="keep the KV cache's per-token entries (K/V, MLA latents) as fp8 (e4m3) values, or as int8 "
                        "or int4 codes with float16 scales per 32 channels; int8/int4: int8 keys, int4 values "
                        "(llama.cpp's -ctk q8_0 -ctv q4_1; GQA/MQA caches); int8-h/int4-h: rotated (Hadamard) before "
                        "rounding, the same bytes with less error; BASE+FORMAT@LAYERS: BASE everywhere but the layers "
                        "named (int8/int4+int8@0-3,7) (default none)")


def _kv_quant_name(text: str) -> str:
    """``--kv-quant``'s value, checked (argparse turns the error into a usage line) and spelt as kvlab spells it."""
    from kvlab.dtypes import parse_kv_quant

    try:
        fmt = parse_kv_quant(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return "none" if fmt is None else fmt.name


def model_config_from_args(args: argparse.Namespace):
    """The ModelConfig of :func:`add_model_source`'s flags (one source, the wiring overrides applied)."""
    from kvlab.recipes.loading import model_config

    given = [x for x in (args.checkpoint, args.preset, args.config) if x]
    if len(given) != 1:
        raise UsageError(f"kvlab {args.verb}: give exactly one of MODEL, --preset NAME or "
                         f"--config FILE (got {len(given)})")
    return model_config(checkpoint=args.checkpoint, preset=args.preset, config=args.config, n_kv_head=args.n_kv_head,
                        cla=args.cla, cross_n_kv_head=getattr(args, "cross_n_kv_head", None),
                        cross_cla=getattr(args, "cross_cla", None))


def make_console():
    from rich.console import Console

    class _Console(Console):
        def on_broken_pipe(self) -> None:
            # rich exits 1 when the reader goes away (`kvlab plan | head`); kvlab's main exits 141
            # quietly, as for every other verb.
            self.quiet = True
            raise BrokenPipeError

    # Not a terminal (pipes, CI, tests): wide enough that tables never wrap.
    return _Console(width=None if sys.stdout.isatty() else 160, highlight=False)


# ----------------------------------------------------------------------------------- verbs


def model_source(args: argparse.Namespace):
    """The :class:`~kvlab.recipes.loading.ModelSource` of a verb's :func:`model_args`."""
    from kvlab.recipes.loading import ModelSource

    return config_from_args(ModelSource, args)


def load_model(args: argparse.Namespace, decoder_only: str | None = None):
    """The model ``args.model`` names (with ``--window``/``--adapter`` applied); ``decoder_only``: the
    verb, which refuses an encoder–decoder in one line."""
    from kvlab.recipes.loading import load_model as load

    return load(model_source(args), decoder_only)


def add_overwrite(p: argparse.ArgumentParser, run: bool = False) -> None:
    """``--overwrite``: the one switch of the output policy (:mod:`kvlab.io.atomic`)."""
    p.add_argument("--overwrite", action="store_true",
                   help=("start over in a directory that holds a run or other files (only the run's own files are "
                         "replaced)" if run else
                         "replace the output path even if it holds something kvlab did not write there (a file, "
                         "a directory of yours, another kind of output); by default kvlab refuses"))


def device_arg(text: str) -> str:
    """``--device``: a torch device this machine has (checked before any work)."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"--device {text!r} is not a device: give cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise argparse.ArgumentTypeError(f"--device {text}: {why}; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"--device {text}: only {torch.cuda.device_count()} GPU(s) are visible "
                                             f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"--device {text}: MPS is not available here; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"--device {text}: kvlab runs on cpu, cuda or mps")
    elif device.type == "cpu" and device.index not in (None, 0):
        raise argparse.ArgumentTypeError(f"--device {text}: there is one cpu device; use --device cpu")
    return text


def _bounded_int(text: str, low: int, high: int | None, name: str, rule: str) -> int:
    """An argparse type's check: an integer in ``[low, high)``, else one line naming it."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name}{text!r} is not an integer") from None
    if value < low or (high is not None and value >= high):
        raise argparse.ArgumentTypeError(f"{name}{value} {rule}")
    return value


def seed_arg(text: str) -> int:
    """``--seed``: an integer in [0, 2**32) (what torch, numpy and Python's generators all take)."""
    return _bounded_int(text, 0, 2 ** 32, "--seed ", "must be in [0, 2**32)")


def positive_int(text: str) -> int:
    """A flag that counts something: an integer >= 1."""
    return _bounded_int(text, 1, None, "", "must be at least 1")


def nonnegative_int(text: str) -> int:
    """A flag that may be zero: an integer >= 0."""
    return _bounded_int(text, 0, None, "", "must be at least 0")


def number_list(kind, what: str):
    def parse(text: str):
        try:
            return tuple(kind(x) for x in text.split(",") if x.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of {what}") from None
    return parse


def model_args(p: argparse.ArgumentParser, adapter: bool = False, window: bool = False) -> None:
    """The flags of :class:`~kvlab.recipes.loading.ModelSource`: the model, its device and dtype and,
    where asked for, ``--adapter`` and ``--window``/``--sinks``/``--sink-positions``."""
    from kvlab.recipes.loading import ModelSource

    config_option(p, ModelSource, "model", "model", metavar="MODEL")
    config_option(p, ModelSource, "device", type=device_arg)
    config_option(p, ModelSource, "model_dtype", choices=["fp32", "bf16", "fp16"])
    if adapter:    # where the adapted model is only run (finetune attaches its own; export/convert refuse)
        config_option(p, ModelSource, "adapter", metavar="DIR")
    if window:     # StreamingLLM: any model run with a rolling window cache (kvlab.inference.streaming)
        config_option(p, ModelSource, "window", type=positive_int, metavar="W")
        config_option(p, ModelSource, "sinks", type=nonnegative_int, metavar="S")
        config_option(p, ModelSource, "sink_positions", choices=["cache", "original"])


# ------------------------------------------------------------------------- recipe configs
def _field(config: type, name: str) -> dataclasses.Field:
    try:
        return next(f for f in dataclasses.fields(config) if f.name == name)
    except StopIteration:
        raise AttributeError(f"{config.__name__} has no setting {name!r}") from None


def config_option(p, config: type, name: str, *flags: str, **kwargs) -> argparse.Action:
    """Add the flag of the recipe config field ``config.name`` (``--name-with-dashes`` unless
    ``flags`` are given) with the field's default and help: one source for the library and the
    command line, so ``kwargs`` (argparse's type, choices, metavar...) may not set them."""
    if "default" in kwargs or "help" in kwargs:
        raise TypeError(f"the flag of {config.__name__}.{name} takes its default and help from the field")
    f = _field(config, name)
    if f.default is not dataclasses.MISSING:
        kwargs["default"] = f.default
    if f.metadata.get("help"):
        kwargs["help"] = f.metadata["help"]
    return p.add_argument(*(flags or ("--" + name.replace("_", "-"),)), **kwargs)


def config_from_args(config: type, args: argparse.Namespace, **given):
    """``config`` built from the parsed flags of its fields (by name) and the ``given`` values."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(config)
              if f.name not in given and hasattr(args, f.name)}
    return config(**values, **given)


def torch_seed(seed: int) -> None:
    import torch

    torch.manual_seed(seed)
