"""Block-sparse attention: the layout rule against a loop over its definition, the tile map that
lets the flash and Triton kernels skip hidden tiles (exact where it can be, never hiding a visible
pair), the kernels' work counted in tiles, and the config surface. Backends against float64 run
in test_kernels.py (the "block-sparse" cases) and the model contract in test_kinds.py's variants."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvlab.attention import AttentionMask, BlockSparse, attention, may_attend
from kvlab.config import ModelConfig
from kvlab.errors import ConfigError


def loop_allowed(q_pos, k_pos, layout: BlockSparse, window=None, sinks=0):
    """The layout's definition, pair by pair: causal, then the key's block is local, global or on
    the stride — written from the docstring, not from the implementation."""
    out = torch.zeros(len(q_pos), len(k_pos), dtype=torch.bool)
    for i, qp in enumerate(q_pos):
        for j, kp in enumerate(k_pos):
            if kp > qp:
                continue
            if window is not None and not (qp - kp < window or kp < sinks):
                continue
            qb, kb = qp // layout.block, kp // layout.block
            local = qb - kb < layout.local
            glob = kb < layout.global_blocks
            strided = layout.stride > 0 and (qb - kb) % layout.stride == 0
            out[i, j] = local or glob or strided
    return out


layouts = st.builds(BlockSparse, block=st.integers(1, 5), local=st.integers(1, 3), global_blocks=st.integers(0, 2),
                    stride=st.integers(0, 4))


@settings(max_examples=40, deadline=None)
@given(layout=layouts, T=st.integers(1, 30), offset=st.integers(0, 12),
       window=st.one_of(st.none(), st.integers(1, 9)), sinks=st.integers(0, 3))
def test_rule_matches_the_definition(layout, T, offset, window, sinks):
    q_pos = (offset + torch.arange(T))
    k_pos = torch.arange(offset + T)
    got = may_attend(q_pos[None], k_pos[None], window=window, sinks=sinks, sparse=layout)[0, 0]
    assert torch.equal(got, loop_allowed(q_pos.tolist(), k_pos.tolist(), layout, window, sinks))


def _exact_tiles(allowed, bq, bk):
    nq, nk = -(-allowed.shape[0] // bq), -(-allowed.shape[1] // bk)
    return torch.tensor([[bool(allowed[a * bq:(a + 1) * bq, b * bk:(b + 1) * bk].any()) for b in range(nk)]
                         for a in range(nq)])


@settings(max_examples=40, deadline=None)
@given(layout=layouts, T=st.integers(1, 40), bq=st.integers(1, 9), bk=st.integers(1, 9))
def test_tile_map_is_exact_for_one_sequence(layout, T, bq, bk):
    """Positions 0..T-1 and the layout alone: every tile is decided exactly from its ranges."""
    pos = torch.arange(T)[None]
    mask = AttentionMask(pos, pos, sparse=layout)
    assert torch.equal(mask.tile_map(bq, bk), _exact_tiles(mask.dense()[0, 0], bq, bk))


@settings(max_examples=40, deadline=None)
@given(layout=st.one_of(st.none(), layouts), T=st.integers(2, 30), window=st.one_of(st.none(), st.integers(1, 9)),
       sinks=st.integers(0, 2), bq=st.integers(1, 8), bk=st.integers(1, 8), seed=st.integers(0, 999))
def test_tile_map_never_hides_a_visible_pair(layout, T, window, sinks, bq, bk, seed):
    """Ragged rows (left padding of different lengths), windows with sinks and layouts together:
    the map may keep a tile that holds nothing, never skip one that holds something."""
    g = torch.Generator().manual_seed(seed)
    B = 3
    valid = torch.ones(B, T, dtype=torch.bool)
    for b in range(1, B):
        valid[b, :int(torch.randint(0, T, (1,), generator=g))] = False
    pos = (valid.long().cumsum(-1) - 1).clamp_min(0)
    mask = AttentionMask(pos, pos, q_valid=valid, k_valid=valid, window=window, sinks=sinks, sparse=layout)
    exact = _exact_tiles(mask.dense()[:, 0].any(0), bq, bk)
    assert not (exact & ~mask.tile_map(bq, bk)).any()


def test_flash_computes_only_the_visible_tiles(monkeypatch):
    """The work of the flash backend is the visible tiles: count the tiles whose mask it builds."""
    import kvlab.attention.kernels.flash as flash

    calls = []
    real = flash._tile_mask
    monkeypatch.setattr(flash, "_tile_mask", lambda *a: calls.append(a[1:]) or real(*a))
    T, blk = 256, 16
    pos = torch.arange(T)[None]
    q, k, v = (torch.randn(1, 2, T, 8, dtype=torch.float64) for _ in range(3))
    layouts = {"dense causal": None, "local 2": BlockSparse(blk, local=2),
               "local 2 + global 1 + stride 4": BlockSparse(blk, local=2, global_blocks=1, stride=4)}
    counted = {}
    for name, layout in layouts.items():
        calls.clear()
        mask = AttentionMask(pos, pos, sparse=layout)
        out = flash.flash_attention(q, k, v, mask, block_q=blk, block_k=blk)
        torch.testing.assert_close(out, attention(q, k, v, mask, backend="reference"))
        counted[name] = len(calls)
        assert len(calls) == int(_exact_tiles(mask.dense()[0, 0], blk, blk).sum())
    n = T // blk
    assert counted == {"dense causal": n * (n + 1) // 2, "local 2": 2 * n - 1,
                       "local 2 + global 1 + stride 4": counted["local 2 + global 1 + stride 4"]}
    assert counted["local 2"] < counted["local 2 + global 1 + stride 4"] < counted["dense causal"]


def test_triton_tile_lists_name_the_visible_tiles():
    from kvlab.attention.kernels.triton_backend import PREFILL_BLOCK_M, PREFILL_BLOCK_N, _tile_lists

    T = 5 * PREFILL_BLOCK_M
    pos = torch.arange(T)[None]
    mask = AttentionMask(pos, pos, sparse=BlockSparse(PREFILL_BLOCK_M, local=1, global_blocks=1))
    exact = _exact_tiles(mask.dense()[0, 0], PREFILL_BLOCK_M, PREFILL_BLOCK_N)
    for by_key, table in ((False, exact), (True, exact.t())):
        counts, order, stride, use_list = _tile_lists(mask, torch.device("cpu"), by_key=by_key)
        assert use_list and stride == table.shape[1]
        assert [order[r, :int(c)].tolist() for r, c in enumerate(counts)] == \
            [row.nonzero().flatten().tolist() for row in table]
    # The diagonal and the global first tile: 2 per query tile but the first.
    assert counts.tolist() == [5, 1, 1, 1, 1]          # by key: tile 0 is read by all, the others by themselves


def test_window_tiles_are_skipped_too():
    pos = torch.arange(512)[None]
    mask = AttentionMask(pos, pos, window=64)
    visible = mask.tile_map(64, 64)
    assert int(visible.sum()) == 8 + 7                 # the diagonal and the one before it


@pytest.mark.parametrize("spec, match", [
    ({"block": 0}, "block=0 must be an integer >= 1"),
    ({"block": 4, "local": 0}, "local=0 must be an integer >= 1"),
    ({"block": 4, "glob": 1}, r"no field\(s\) \['glob'\]"),
    ([4], "must be (a dict with 'block'|an object or null)"),
    ({"block": 4, "stride": -1}, "stride=-1 must be an integer >= 0"),
])
def test_bad_layouts_are_named(spec, match):
    with pytest.raises(ConfigError, match=match):
        ModelConfig(block_sparse=spec)
    with pytest.raises(ConfigError, match="layer 1: sparse"):
        ModelConfig(n_layer=2, attention_layers=["gqa", {"kind": "gqa", "sparse": spec}])


def test_linear_layers_refuse_a_layout():
    with pytest.raises(ConfigError, match="linear attention has no block-sparse layout"):
        ModelConfig(n_layer=2, block_sparse={"block": 4},
                    attention_layers=[{"kind": "linear"}, "gqa"])


def test_a_sparse_model_decodes_like_its_forward_past_many_blocks():
    """Generation-length decoding (the contract uses short sequences): 3 layouts, 70 tokens."""
    from kvlab.models import Transformer

    cfg = ModelConfig(vocab_size=50, d_model=32, n_layer=3, n_head=4, n_kv_head=2, max_seq_len=128,
                      attention_layers=[{"kind": "gqa", "sparse": {"block": 4, "local": 2, "global": 1}},
                                        {"kind": "gqa", "sparse": {"block": 8, "local": 1, "stride": 2}}, "gqa"])
    torch.manual_seed(0)
    model = Transformer(cfg).double().eval()
    tokens = torch.randint(0, 50, (2, 70))
    full = model(tokens)
    cache = model.new_cache(2, 70, dtype=torch.float64)
    steps = [model(tokens[:, :9], cache=cache)] + [model(tokens[:, t:t + 1], cache=cache) for t in range(9, 70)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-9, atol=1e-9)
