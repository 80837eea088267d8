"""Named model shapes: unit-test sizes, real checkpoints' configs and the CLA paper's 1B family."""

from __future__ import annotations

from typing import Any

_LLAMA = dict(mlp="swiglu", norm="rmsnorm", pos="rope", block="sequential")

PRESETS: dict[str, dict[str, Any]] = {
    # Small enough for unit tests on a CPU; GQA so the grouping code is always exercised.
    # Its vocabulary fits kvlab's ByteTokenizer (256 bytes + BOS/EOS/PAD), padded to 320.
    "tiny": dict(vocab_size=320, d_model=64, n_layer=4, n_head=4, n_kv_head=2, d_ff=128,
                 max_seq_len=512, bos_token_id=256, eos_token_id=257, pad_token_id=258, **_LLAMA),
    # HuggingFaceTB/SmolLM2-135M(-Instruct) config.json.
    "smollm2-135m": dict(vocab_size=49152, d_model=576, n_layer=30, n_head=9, n_kv_head=3,
                         head_dim=64, d_ff=1536, norm_eps=1e-5, rope_theta=100000.0,
                         tie_embeddings=True, max_seq_len=8192, bos_token_id=1, eos_token_id=2,
                         pad_token_id=2, **_LLAMA),
    # TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T config.json.
    "tinyllama-1.1b": dict(vocab_size=32000, d_model=2048, n_layer=22, n_head=32, n_kv_head=4,
                           d_ff=5632, norm_eps=1e-5, rope_theta=10000.0, max_seq_len=2048,
                           bos_token_id=1, eos_token_id=2, **_LLAMA),
    # meta-llama/Llama-2-7b-hf config.json.
    "llama2-7b": dict(vocab_size=32000, d_model=4096, n_layer=32, n_head=32, n_kv_head=32,
                      d_ff=11008, norm_eps=1e-5, rope_theta=10000.0, max_seq_len=4096,
                      bos_token_id=1, eos_token_id=2, **_LLAMA),
    # meta-llama/Meta-Llama-3-8B config.json.
    "llama3-8b": dict(vocab_size=128256, d_model=4096, n_layer=32, n_head=32, n_kv_head=8,
                      d_ff=14336, norm_eps=1e-5, rope_theta=500000.0, max_seq_len=8192,
                      bos_token_id=128000, eos_token_id=128001, **_LLAMA),
    # Encoder–decoders (T5 v1.1's block: relative bias, gated GELU, untied head). "t5-tiny" is a byte-level
    # test and study size; "t5-v1.1-small" is google/t5-v1_1-small's config.json.
    "t5-tiny": dict(vocab_size=320, d_model=64, n_layer=2, n_encoder_layer=2, n_head=4, d_ff=128, pos="t5",
                    mlp="geglu", norm="rmsnorm", max_seq_len=512, bos_token_id=256, eos_token_id=257,
                    pad_token_id=258, decoder_start_token_id=258),
    "t5-v1.1-small": dict(vocab_size=32128, d_model=512, n_layer=8, n_encoder_layer=8, n_head=6, head_dim=64,
                          d_ff=1024, pos="t5", mlp="geglu", norm="rmsnorm", norm_eps=1e-6, attn_scale=1.0,
                          max_seq_len=512, eos_token_id=1, pad_token_id=0, decoder_start_token_id=0),
}


def _cla_paper_1b_family() -> dict[str, dict[str, Any]]:
    """The CLA paper's 1B design space: d_model 2048, 20 layers, head size and KV sharing varied.

    The paper (Brandon et al. 2024) and our seed give d_model, depth and head sizes; they do not
    give vocabulary, MLP width or query-head counts for head sizes that do not divide d_model.
    We use Llama-style choices: GPT-NeoX's padded vocabulary (50304), SwiGLU at Llama's width,
    and ⌊d_model / d_head⌋ query heads. KV bytes per token, the quantity the paper studies,
    depends only on layers, KV heads and head size, and matches the paper's figures
    (H128-MHA 163840, H128-MQA 10240, H128-MQA-CLA2 and H64-MQA 5120 bytes in 16-bit).
    """
    base = dict(vocab_size=50304, d_model=2048, n_layer=20, max_seq_len=2048, **_LLAMA)
    family: dict[str, dict[str, Any]] = {}

    def add(head_dim: int, kv: str, cla: int = 1) -> None:
        n_head = 2048 // head_dim
        n_kv = {"mha": n_head, "mqa": 1}.get(kv) or int(kv.removeprefix("gqa"))
        name = f"cla1b-h{head_dim}-{kv}" + (f"-cla{cla}" if cla > 1 else "")
        family[name] = dict(base, n_head=n_head, n_kv_head=n_kv, head_dim=head_dim, cla=cla)

    add(128, "mha")
    for kv in ("gqa4", "gqa2", "mqa"):
        add(128, kv)
    for cla in (2, 3, 4):
        add(128, "mqa", cla)
    add(128, "gqa4", 2)
    for head_dim in (32, 46, 64, 90, 256, 512):
        add(head_dim, "mqa")
        add(head_dim, "mqa", 2)
    return family


PRESETS.update(_cla_paper_1b_family())
