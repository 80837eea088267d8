import os

import pytest
import torch

# Triton kernels run under its interpreter on machines without a GPU (CI). It is read when the
# kernels are decorated, so it must be set before kvlab's kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kvlab import ModelConfig, Transformer

# Every attention variant the core must support, on the tiny shape (d_model 64, 4 heads).
VARIANTS = {
    "mha": dict(n_kv_head=4),
    "gqa": dict(n_kv_head=2),
    "mqa": dict(n_kv_head=1),
    "cla2": dict(n_kv_head=2, cla=2),
    "cla3-7layers": dict(n_kv_head=2, cla=3, n_layer=7),
    "mqa-cla2": dict(n_kv_head=1, cla=2),
    "kv-source": dict(n_kv_head=2, n_layer=5, kv_source=[0, 0, 2, 0, 4]),
    "parallel": dict(n_kv_head=2, block="parallel"),
    "learned-pos": dict(n_kv_head=2, pos="learned"),
    "gelu-layernorm-bias-tied": dict(n_kv_head=2, mlp="gelu", norm="layernorm", qkv_bias=True,
                                     o_bias=True, tie_embeddings=True),
    "sliding-window": dict(n_kv_head=2, sliding_window=5),
}


def make_model(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(ModelConfig.from_preset("tiny", **overrides)).eval()
    # Non-zero biases, so that bias handling is actually exercised.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model


@pytest.fixture(params=list(VARIANTS), ids=list(VARIANTS))
def variant_model(request) -> Transformer:
    return make_model(**VARIANTS[request.param])


# ---- the real model, loaded once per session (kvlab and transformers, from the same GGUF) ----
@pytest.fixture(scope="session")
def smollm2():
    import kvlab

    return kvlab.load("smollm2-135m")


@pytest.fixture(scope="session")
def hf_smollm2():
    import os

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvlab.checkpoints import builtin_model_path

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = builtin_model_path("smollm2-135m")
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model, tok
