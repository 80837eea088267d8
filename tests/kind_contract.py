"""The generic tests every attention kind gets: subclass :class:`KindContract` with ``kind = NAME``
and the conftest parametrizes each test over that kind's registered examples.

Each test checks a kind against something independent of it: the model in float64 through the
reference backend (the backends), a full forward (cached decoding), the cache's real allocation
(the kind's closed-form accounting), the modules' real parameters (its closed-form count), and a
written and re-read checkpoint.
"""

from __future__ import annotations

import pytest
import torch

from kvlab import cache_bytes, load
from kvlab.io import save_checkpoint

from conftest import make_model

BACKENDS = ("reference", "sdpa", "flash")


def _tokens(B: int, T: int, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(seed))


class KindContract:
    kind: str

    @pytest.mark.parametrize("backend", BACKENDS)
    def test_backends_match_float64_reference(self, variant, backend):
        model = make_model(**variant)
        tokens = _tokens(2, 11)
        ref = make_model(**variant).double()(tokens, backend="reference")
        torch.testing.assert_close(model(tokens, backend=backend).double(), ref, rtol=1e-5, atol=1e-5)

    @pytest.mark.parametrize("backend", BACKENDS)
    def test_cached_decoding_equals_full_forward(self, variant, backend):
        model = make_model(**variant)
        tokens = _tokens(2, 12)
        full = model(tokens, backend=backend)
        cache = model.new_cache(2, 16)
        pieces = [model(tokens[:, :5], cache=cache, backend=backend)]
        pieces += [model(tokens[:, t:t + 1], cache=cache, backend=backend) for t in range(5, 12)]
        torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-5, atol=1e-5)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    def test_cache_bytes_match_the_allocation(self, variant, dtype):
        model = make_model(**variant)
        cache = model.new_cache(3, 24, dtype=dtype)
        assert cache.nbytes == 3 * cache_bytes(model.cfg, dtype).for_sequence(24)
        assert cache.nbytes > 0

    def test_param_counts_match_the_modules(self, variant):
        model = make_model(**variant)
        assert model.cfg.param_counts() == model.param_counts()

    def test_checkpoint_round_trip(self, variant, tmp_path):
        model = make_model(**variant)
        save_checkpoint(model, tmp_path / "ckpt")
        loaded = load(tmp_path / "ckpt")
        assert loaded.cfg == model.cfg
        tokens = _tokens(1, 9)
        assert torch.equal(loaded(tokens), model(tokens))
