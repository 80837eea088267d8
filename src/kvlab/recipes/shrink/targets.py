"""The runtime a shrunk model is for (``kvlab shrink --target``): which candidates it executes natively,
the format the chosen model is written in, and the command that serves it with its KV cache flags.

A target only restricts and writes; the ranking, the speed gate and the recovery are the same for
every target. What a runtime executes is read from the exporters themselves (:func:`config_to_hf`'s
and :func:`gguf_problems`' refusals), so a target never admits a structure its format cannot hold;
the precisions and MLA widths are each runtime's own (its documented KV cache types):

- ``kvlab``: everything kvlab runs; the kvlab checkpoint (and an HF export where one exists).
- ``transformers``: Llama/Qwen2/Mistral with fewer KV heads, DeepSeek-V3 for MLA, in the model's
  precision (transformers' quantized caches are quanto/HQQ formats, not these); an HF directory.
- ``vllm`` (SGLang reads the same directory): the same architectures, a bf16 or fp8 (e4m3, scale 1:
  ``--kv-cache-dtype fp8``) cache; MLA only at DeepSeek's widths (latent 512, RoPE key 64), the ones
  its MLA kernels are built for.
- ``llama.cpp``: a ``llama``-architecture GGUF (GQA/MQA, no cross-layer sharing) with an f16, q8_0
  (kvlab's int8 quantization) or q4_1 (kvlab's int4) cache, or keys and values in two of them
  (``-ctk q8_0 -ctv q4_1``, kvlab's int8/int4); llama.cpp quantizes its own cache, with the same
  groups and parameters (it orders a group's nibbles differently, which only it reads); MLA as its
  ``deepseek2`` architecture (:mod:`kvlab.io.gguf_export`), whose cache holds the latent and the RoPE
  key as kvlab's does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from kvlab.config.model import ModelConfig
from kvlab.errors import ConfigError
from kvlab.recipes.shrink.candidates import PRECISIONS

TARGET_NAMES = ("kvlab", "transformers", "vllm", "llama.cpp")
DEEPSEEK_MLA_WIDTHS = (512, 64)          # kv_lora_rank, qk_rope_head_dim
LLAMA_CPP_CACHE = {None: "f16", "int8": "q8_0", "int4": "q4_1"}         # kvlab's format -> llama.cpp's type
LLAMA_CPP_PRECISIONS = (None, "int8", "int4", "int8/int4")             # one type, or -ctk and -ctv apart


def llama_cpp_cache_types(precision: str | None) -> tuple[str, str]:
    """llama.cpp's (``-ctk``, ``-ctv``) for a kvlab cache precision ('int8/int4': keys/values)."""
    key, _, value = (precision or "").partition("/")
    return LLAMA_CPP_CACHE[key or None], LLAMA_CPP_CACHE[value or key or None]


@dataclass(frozen=True)
class Target:
    name: str
    precisions: tuple[str | None, ...]    # the KV precisions the runtime stores (None: the model's own)
    output: str                           # "model" (kvlab checkpoint), "hf" (directory) or "model.gguf"

    def refusal(self, planned: ModelConfig, precision: str | None) -> str | None:
        """Why the runtime does not execute a model of config ``planned`` with its cache in
        ``precision`` (None: it does)."""
        if precision not in self.precisions:
            have = ", ".join("the model's own" if p is None else p for p in self.precisions)
            return f"{precision} caches ({self.name} stores {have})"
        if self.name == "kvlab":
            return None
        if self.name == "llama.cpp":
            from kvlab.io.gguf_export import gguf_problems

            return "; ".join(gguf_problems(planned)) or None
        from kvlab.io.hf import config_to_hf

        try:
            config_to_hf(planned, torch.bfloat16)
        except ConfigError as e:
            return str(e).removeprefix("cannot export to HF: ")
        if self.name == "vllm" and planned.attn_kind == "mla":
            from kvlab.attention.mla import MLAShape

            shape = MLAShape.of(planned)
            if (shape.kv_lora_rank, shape.qk_rope_head_dim) != DEEPSEEK_MLA_WIDTHS:
                return (f"MLA {shape.kv_lora_rank}+{shape.qk_rope_head_dim} (vLLM's MLA kernels are built for "
                        f"DeepSeek's latent {DEEPSEEK_MLA_WIDTHS[0]} + RoPE key {DEEPSEEK_MLA_WIDTHS[1]})")
        return None

    @property
    def balances_keys(self) -> bool:
        """Whether the runtime attends over keys stored balanced (kvlab.convert.balance): kvlab only;
        the others store keys as projected, so a candidate for them is measured that way."""
        return self.name == "kvlab"

    def check_model(self, model) -> None:
        """Refuse, before any work, a model whose chosen form this runtime's file could not carry."""
        if self.output == "model.gguf" and getattr(model.tokenizer, "kind", None) != "hf":
            raise ConfigError(f"--target {self.name}: the model has no HF tokenizer, and a GGUF file carries one for "
                              f"llama.cpp (load the model from a directory or GGUF file that has one, or use "
                              f"--target kvlab)")

    def write(self, model, out: Path) -> Path | None:
        """The chosen model in this runtime's format under ``out`` (the kvlab checkpoint is written for
        every target); its path, or None for the kvlab target."""
        if self.output == "hf":
            from kvlab.io.hf import export_hf

            path = out / "hf"
            if not path.exists():
                export_hf(model, path)
            return path
        if self.output == "model.gguf":
            from kvlab.io.gguf_export import export_gguf

            path = out / "model.gguf"
            if not path.exists():
                export_gguf(model, path, gguf_type="f16")
            return path
        return None

    def notes(self, cfg: ModelConfig) -> list[str]:
        """What a user of the written file must know beyond it (its exporter's notes)."""
        if self.output == "model.gguf":
            from kvlab.io.gguf_export import gguf_notes

            return gguf_notes(cfg)
        return []

    def serve_command(self, out_name: str, precision: str | None) -> list[str]:
        """Markdown lines: how this runtime serves the written model with its cache precision."""
        if self.name == "transformers":
            return ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
                    f"model = AutoModelForCausalLM.from_pretrained('{out_name}/hf')",
                    f"tokenizer = AutoTokenizer.from_pretrained('{out_name}/hf')", "```"]
        if self.name == "vllm":
            flag = " --kv-cache-dtype fp8" if precision == "fp8" else ""
            return ["```console", f"$ vllm serve {out_name}/hf{flag}", "```",
                    "(vLLM needs a GPU; SGLang serves the same directory: "
                    f"`python -m sglang.launch_server --model-path {out_name}/hf"
                    + (" --kv-cache-dtype fp8_e4m3" if precision == "fp8" else "") + "`.)"]
        if self.name == "llama.cpp":
            ctk, ctv = llama_cpp_cache_types(precision)
            flags = "" if precision is None else f" -ctk {ctk} -ctv {ctv} -fa on"
            types = ctk if ctk == ctv else f"{ctk}/{ctv}"
            return ["```console", f"$ llama-server -m {out_name}/model.gguf{flags}", "```",
                    "" if precision is None else f"(a quantized V cache needs flash attention, `-fa on`; {types} "
                    f"quantizes as kvlab's {precision} does: groups of 32 with float16 parameters.)"]
        return []


TARGETS = {
    "kvlab": Target("kvlab", PRECISIONS, "model"),
    "transformers": Target("transformers", (None,), "hf"),
    "vllm": Target("vllm", (None, "fp8"), "hf"),
    "llama.cpp": Target("llama.cpp", LLAMA_CPP_PRECISIONS, "model.gguf"),
}


def get_target(name: str) -> Target:
    try:
        return TARGETS[name]
    except KeyError:
        raise ConfigError(f"--target {name!r} is not one of {', '.join(TARGET_NAMES)}") from None
