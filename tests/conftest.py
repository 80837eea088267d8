import os

import pytest
import torch

# Triton kernels run under its interpreter on machines without a GPU (CI). It is read when the
# kernels are decorated, so it must be set before kvlab's kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kvlab import ModelConfig, Transformer
from kvlab.registry import KINDS, get_kind

# Every attention variant the core must support, on the tiny shape (d_model 64, 4 heads): the
# examples every registered attention kind gives (kvlab.registry.AttentionKind.examples), so a
# newly registered kind is tested everywhere these are.
VARIANTS = {name: overrides for kind in KINDS.values() for name, overrides in kind.examples.items()}


def make_model(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(ModelConfig.from_preset("tiny", **overrides)).eval()
    # Non-zero biases, so that bias handling is actually exercised.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model


def kind_config(base: dict, **changes) -> dict:
    """``base`` (config fields with ``attn_kind`` and ``attn_options``) with ``changes``: those that
    are options of the kind go into ``attn_options``, the rest are config fields."""
    from kvlab.registry import get_kind

    options = set(get_kind(base["attn_kind"]).options)
    out = {**base, **{k: v for k, v in changes.items() if k not in options}}
    out["attn_options"] = {**base.get("attn_options", {}), **{k: v for k, v in changes.items() if k in options}}
    return out


def fail_call(monkeypatch, model, n: int) -> None:
    """Make the ``n``-th forward call of ``model``'s class from now raise RuntimeError("simulated device
    failure") (servers and engines must survive a failed step)."""
    real = type(model).forward
    calls = {"n": 0}

    def flaky(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise RuntimeError("simulated device failure")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "forward", flaky)


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

    from kvlab.io import builtin_model_path

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = builtin_model_path("smollm2-135m")
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model, tok


def pytest_generate_tests(metafunc):
    """Contract tests (tests/kind_contract.py): a test class naming an attention ``kind`` runs on each
    of that kind's registered examples, read from the registry when the class is collected."""
    kind = getattr(metafunc.cls, "kind", None)
    if kind is not None and "variant" in metafunc.fixturenames:
        examples = get_kind(kind).examples
        metafunc.parametrize("variant", list(examples.values()), ids=list(examples))


@pytest.fixture(scope="session")
def trained_mha(tmp_path_factory):
    """The tiny shape with 4 KV heads (MHA), trained 150 steps on the built-in corpus's byte-level
    train split: ``(model, validation windows, calibration batches)``. Conversions are compared on it;
    tests must not change its weights."""
    from kvlab.data.corpus import builtin_corpus
    from kvlab.data.windows import Windows, calibration_batches, tokenize_to_file
    from kvlab.io.tokenizer import ByteTokenizer
    from kvlab.training import TrainConfig, train

    tmp = tmp_path_factory.mktemp("trained_mha")
    tok = ByteTokenizer()
    train_tokens = tokenize_to_file(builtin_corpus("train"), tok, cache_dir=tmp, progress=False).tokens
    val_tokens = tokenize_to_file(builtin_corpus("validation"), tok, cache_dir=tmp, progress=False).tokens
    torch.manual_seed(0)
    model = make_model(n_kv_head=4)
    cfg = TrainConfig(out_dir=str(tmp / "run"), max_steps=150, batch_size=16, seq_len=64, lr=3e-3,
                      warmup_steps=10, eval_every=1000, save_every=1000, log_every=1000)
    train(model, Windows(train_tokens, 64, 16, seed=0), None, cfg, quiet=True)
    val = Windows(val_tokens, 64, 16, mode="sequential")
    return model, val, calibration_batches(tok, 4096, seq_len=64, cache_dir=tmp)


# ---- kvlab shrink's small trained model ----
@pytest.fixture(scope="session")
def small(tmp_path_factory):
    """The tiny preset (4 heads, 2 KV heads) trained briefly on the built-in corpus, saved: what the
    shrink tests convert (one per session: training it takes seconds)."""
    from kvlab.data.corpus import builtin_corpus
    from kvlab.data.windows import Windows, tokenize_to_file
    from kvlab.io import save_checkpoint
    from kvlab.recipes.pretrain import new_byte_level_model
    from kvlab.training import TrainConfig, train

    tmp = tmp_path_factory.mktemp("shrink")
    model = new_byte_level_model(ModelConfig.from_preset("tiny", max_seq_len=256))
    tokens = tokenize_to_file(builtin_corpus("train"), model.tokenizer, cache_dir=tmp, progress=False).tokens
    cfg = TrainConfig(out_dir=str(tmp / "run"), max_steps=80, batch_size=16, seq_len=64, lr=3e-3, warmup_steps=8,
                      eval_every=10**9, save_every=10**9, log_every=10**9)
    train(model, Windows(tokens, 64, 16, seed=0), None, cfg, quiet=True)
    save_checkpoint(model, tmp / "model")
    return tmp / "model"
