"""Model configuration: one dataclass, its validation, and closed forms over it.

Everything that depends only on the shape of a model (cache bytes, parameter counts, which layers
produce KV) is computed from the config, in closed form, so the planner can size models that are
never instantiated and the tests can check the formulas against real modules. What depends on an
attention kind comes from that kind's registration (:mod:`kvlab.registry`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from kvlab.registry import CacheBytes

from kvlab.config.presets import PRESETS
from kvlab.config.specs import DEFAULT_KIND, LayerSpec, given_specs, migrate_legacy_fields, resolve_specs
from kvlab.config.validation import (
    GATED_MLPS,
    MLP_TYPES,
    check_types,
    validate_config,
)
from kvlab.dtypes import dtype_bytes
from kvlab.errors import ConfigError
from kvlab.registry import KINDS, get_kind


def _round_up(x: int, multiple: int) -> int:
    return multiple * math.ceil(x / multiple)


def default_d_ff(d_model: int, mlp: str) -> int:
    """Llama's SwiGLU width (2/3 of 4·d, rounded up to 256) for a gated MLP, or 4·d."""
    if mlp in GATED_MLPS:
        return _round_up(int(2 * 4 * d_model / 3), 256)
    return 4 * d_model


@dataclass
class ModelConfig:
    """The shape of a decoder-only transformer LM.

    ``n_kv_head`` defaults to ``n_head`` (MHA); 1 is MQA, anything between that divides
    ``n_head`` is GQA. Query head ``h`` reads KV head ``h // (n_head // n_kv_head)``.

    Cross-Layer Attention: ``cla=k`` makes layer ``i`` read the KV of layer ``k*(i//k)``; or
    ``kv_source`` names, for each layer, the layer whose KV it reads (itself or an earlier
    producer). Give one or the other. :attr:`kv_sources` is the resolved per-layer list.

    Attention kinds: ``attn_kind`` names the kind of every layer (the flat, common case), with
    ``attn_options`` its options; ``attention_layers`` instead gives one spec per layer, a kind name
    or a dict ``{"kind": name, **options}`` (e.g. ``{"kind": "gqa", "window": 512}``), so hybrids such
    as "every 4th layer global, the rest windowed" are expressible. :attr:`layer_specs` is the
    resolved per-layer list of :class:`LayerSpec` (:mod:`kvlab.config.specs`).
    """

    vocab_size: int = 256
    d_model: int = 64
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int | None = None
    head_dim: int | None = None
    mlp: str = "swiglu"
    d_ff: int | None = None
    norm: str = "rmsnorm"
    norm_eps: float = 1e-5
    pos: str = "rope"
    rope_theta: float = 10000.0
    # pos="t5": T5's learned relative position bias, shared by all layers (buckets, and the
    # distance from which all positions share the last bucket).
    relative_buckets: int = 32
    relative_max_distance: int = 128
    block: str = "sequential"
    cla: int = 1
    kv_source: list[int] | None = None
    tie_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    sliding_window: int | None = None
    # StreamingLLM's attention sinks: a windowed layer also attends to the first this-many
    # positions forever, and its rolling cache keeps them (a layer spec's "sinks" overrides it).
    attention_sinks: int = 0
    # Where a RoPE query sees a sink: "original" (at its own position, so a query far down the
    # sequence sees it far away) or "cache" (StreamingLLM: at its place in a cache that holds the
    # sinks and then the window, so no sink is ever further than sinks + window - 1 back; what lets a
    # full-attention model run with a window far past the distances it was trained on).
    sink_positions: str = "original"
    # A block-sparse layout for every softmax layer (a layer spec's "sparse" overrides it):
    # {"block": B, "local": L, "global": G, "stride": S} (kvlab.attention.masks.BlockSparse).
    block_sparse: dict[str, int] | None = None
    max_seq_len: int = 2048
    attn_backend: str = "sdpa"
    attn_kind: str = DEFAULT_KIND
    # The options of ``attn_kind`` for every layer of that kind (a layer spec's own override them):
    # e.g. {"kv_lora_rank": 512, "qk_rope_head_dim": 64} for mla, {"k_rank": 64, "v_rank": 128} for
    # lowrank, {"feature": "hedgehog"} for linear. Each kind declares its options and their defaults.
    attn_options: dict[str, Any] | None = None
    attention_layers: list[Any] | None = None
    # A scalar head beside the LM head, read at each row's last real token: a reward model has one
    # output (kvlab.models.heads.add_score_head; HF's *ForSequenceClassification "score").
    score_outputs: int | None = None
    # Attention scores are multiplied by this before the softmax (None: 1/sqrt(head_dim)); T5 folds
    # the scaling into its initialisation and uses 1.0. Softmax (gqa) layers only.
    attn_scale: float | None = None
    # gqa layers store their keys centred and balanced against their queries (kvlab.convert.balance):
    # the buffers key_shift/key_scale, fitted on calibration text. Attention computes the same in exact
    # arithmetic (softmax ignores a shift common to every key; the scale moves into the queries); a
    # quantized cache rounds far less of what matters (SmolLM2 int4-h cache: +5.0 % -> +1.7 %).
    key_balance: bool = False
    # An encoder–decoder (T5, the GQA paper's setting) when > 0: a bidirectional MHA encoder of this
    # many layers, whose output every one of the n_layer decoder layers reads through cross-attention
    # with ``cross_n_kv_head`` K/V heads (default n_head); decoder layer i reads the cross-attention
    # K/V that layer ``cross_cla * (i // cross_cla)`` projects (CLA across the decoder: every layer
    # attends to the same encoder output). Models: kvlab.models.encoder_decoder.
    n_encoder_layer: int = 0
    cross_n_kv_head: int | None = None
    cross_cla: int = 1
    # The decoder's last hidden state is multiplied by this before the LM head (the original T5 with
    # tied embeddings uses d_model ** -0.5); encoder–decoders only.
    output_scale: float = 1.0
    # Special token ids, where the model has them (used by generation and the tokenizer);
    # ``decoder_start_token_id`` begins every target of an encoder–decoder.
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    decoder_start_token_id: int | None = None
    name: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        check_types(self)
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.head_dim is None:
            if isinstance(self.n_head, int) and self.n_head > 0 and self.d_model % self.n_head:
                raise ConfigError(
                    f"d_model={self.d_model} is not divisible by n_head={self.n_head}; "
                    f"give head_dim explicitly or choose n_head dividing d_model")
            self.head_dim = self.d_model // self.n_head if self.n_head else 0
        if self.cross_n_kv_head is None and isinstance(self.n_encoder_layer, int) and self.n_encoder_layer > 0:
            self.cross_n_kv_head = self.n_head
        if self.d_ff is None and self.mlp in MLP_TYPES:
            self.d_ff = default_d_ff(self.d_model, self.mlp)
        if self.kv_source is not None:
            self.kv_source = [int(s) for s in self.kv_source]
        if self.attention_layers is not None:
            self.attention_layers = [dict(s) if isinstance(s, dict) else s for s in self.attention_layers]
        if self.attn_options is not None:
            self.attn_options = dict(self.attn_options)
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first impossible value, the rule and the fix
        (:mod:`kvlab.config.validation`)."""
        validate_config(self)

    @property
    def is_encoder_decoder(self) -> bool:
        return self.n_encoder_layer > 0

    @property
    def cross_kv_sources(self) -> list[int]:
        """For each decoder layer, the layer whose cross-attention K/V it reads (itself if it projects them)."""
        return [self.cross_cla * (i // self.cross_cla) for i in range(self.n_layer)]

    @property
    def cross_kv_producers(self) -> list[int]:
        return [i for i, s in enumerate(self.cross_kv_sources) if s == i]

    def encoder_config(self) -> "ModelConfig":
        """The encoder stack's shape: ``n_encoder_layer`` MHA layers (an encoder's K/V are never
        cached, so they stay MHA, as in the GQA paper), no window, CLA or cross-attention."""
        return dataclasses.replace(self, n_layer=self.n_encoder_layer, n_kv_head=self.n_head, cla=1,
                                   kv_source=None, attention_layers=None, sliding_window=None,
                                   attention_sinks=0, block_sparse=None, n_encoder_layer=0, cross_n_kv_head=None,
                                   cross_cla=1, output_scale=1.0, decoder_start_token_id=None)

    # ------------------------------------------------------------------------ attention kinds
    @property
    def layer_specs(self) -> list[LayerSpec]:
        """The attention spec of every layer (``attn_kind`` for all, unless ``attention_layers``),
        its options resolved: the layer's own, the model-wide ``attn_options``, the kind's defaults.

        Resolved once per state of the config: validation and model building ask for one layer's
        spec at a time, and resolving all of them each time made a 30-layer config 30x slower to
        create. The state compared is every field's value (a kind's defaults may read any of them),
        so a changed field is never answered from the old resolution. Do not mutate the result."""
        state = tuple(getattr(self, name) for name in _FIELD_NAMES)
        cached = self.__dict__.get("_resolved_specs")
        if cached is not None and cached[0] == state:
            return list(cached[1])
        specs = resolve_specs(self)
        self.__dict__["_resolved_specs"] = (copy.deepcopy(state), specs)
        return list(specs)

    @property
    def kinds(self) -> list[str]:
        """The attention kinds of the model's layers, each once, in the order they were registered."""
        used = {spec.kind for spec in given_specs(self)}
        return [name for name in KINDS if name in used] + sorted(used - set(KINDS))

    def layer_options(self, layer: int) -> dict[str, Any]:
        """The resolved options of ``layer``'s kind (:attr:`layer_specs`)."""
        return self.layer_specs[layer].options

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of ``layer``: its spec's ``window`` option, else ``sliding_window``."""
        return self.layer_specs[layer].options.get("window", self.sliding_window)

    def layer_sinks(self, layer: int) -> int:
        """Attention sinks of ``layer``: its spec's ``sinks``, else ``attention_sinks``; 0 for a
        layer without a window (it sees every position anyway)."""
        if self.layer_window(layer) is None:
            return 0
        return self.layer_specs[layer].options.get("sinks", self.attention_sinks)

    def positional_reach(self) -> int | None:
        """The farthest distance (in positions) at which any layer's query sees a key, whatever the
        sequence length, or None when some layer's grows with it: a sequence longer than
        ``max_seq_len`` extrapolates only if this is None or at least ``max_seq_len``."""
        reaches = []
        for i, spec in enumerate(self.layer_specs):
            rule = get_kind(spec.kind).reach
            reaches.append(None if rule is None else rule(self, i))
        return None if None in reaches else max(reaches, default=0)

    def extrapolates(self, length: int) -> bool:
        """Whether a sequence of ``length`` tokens takes some query past the positions (learned
        embeddings) or distances (relative encodings) a model trained at ``max_seq_len`` saw."""
        if length <= self.max_seq_len:
            return False
        reach = self.positional_reach()
        return self.pos == "learned" or reach is None or reach >= self.max_seq_len

    def layer_sparse(self, layer: int) -> dict[str, int] | None:
        """The block-sparse layout of ``layer`` (its spec's ``sparse``, else ``block_sparse``) as
        given; the attention kinds validate and parse it."""
        return self.layer_specs[layer].options.get("sparse", self.block_sparse)

    # ------------------------------------------------------------------------ KV accounting
    @property
    def kv_sources(self) -> list[int]:
        """For each layer, the layer whose K/V it attends to (itself if it is a producer)."""
        if self.kv_source is not None:
            return list(self.kv_source)
        return [self.cla * (i // self.cla) for i in range(self.n_layer)]

    @property
    def kv_producers(self) -> list[int]:
        """The layers that compute and cache K/V, in order."""
        return [i for i, s in enumerate(self.kv_sources) if s == i]

    @property
    def n_kv_layers(self) -> int:
        return len(self.kv_producers)

    @property
    def q_per_kv(self) -> int:
        """Query heads per KV head (the group size G)."""
        return self.n_head // self.n_kv_head

    def cache_bytes(self, dtype: str | torch.dtype = "bf16", kv_quant: str | None = None) -> "CacheBytes":
        """Cache bytes per token and per sequence, summed over the layers' kinds
        (:func:`kvlab.config.accounting.cache_bytes`, the one accounting function)."""
        from kvlab.config.accounting import cache_bytes

        return cache_bytes(self, dtype, kv_quant)

    def kv_bytes_per_token(self, dtype: str | torch.dtype = "bf16", kv_quant: str | None = None) -> int:
        """Bytes one token adds to the cache; for full attention the formula
        2 × n_kv_layers × n_kv_head × head_dim × bytes(dtype)."""
        return self.cache_bytes(dtype, kv_quant).per_token

    # --------------------------------------------------------------------- parameter counts
    def param_counts(self) -> dict[str, int]:
        """Closed-form parameter counts by part: embedding, attention, mlp, norm, lm_head, total.

        The test suite checks these against the modules' real ``numel``; the planner uses them
        to size models it never instantiates.
        """
        d = self.d_model
        attn = sum(get_kind(spec.kind).param_count(self, i) for i, spec in enumerate(self.layer_specs))
        n_mats = 3 if self.mlp in GATED_MLPS else 2
        mlp = self.n_layer * n_mats * d * self.d_ff
        per_norm = d if self.norm == "rmsnorm" else 2 * d
        norms_per_block = 1 if self.block == "parallel" else 2
        norm = (self.n_layer * norms_per_block + 1) * per_norm
        embedding = self.vocab_size * d + (self.max_seq_len * d if self.pos == "learned" else 0) + (
            self.relative_buckets * self.n_head if self.pos == "t5" else 0)
        lm_head = 0 if self.tie_embeddings else self.vocab_size * d
        if self.is_encoder_decoder:
            # The encoder's stack (its own relative bias; the embedding is shared), and per decoder
            # layer a cross-attention and its norm.
            enc = self.encoder_config().param_counts()
            attn += enc["attention"] + sum(self._cross_attention_params(i) for i in range(self.n_layer))
            mlp += enc["mlp"]
            norm += enc["norm"] + self.n_layer * per_norm
            embedding += enc["embedding"] - self.vocab_size * d
        total = attn + mlp + norm + embedding + lm_head
        return {"embedding": embedding, "attention": attn, "mlp": mlp, "norm": norm,
                "lm_head": lm_head, "total": total}

    def query_output_params(self) -> int:
        """Parameters of one attention layer's ``q_proj`` and ``o_proj`` (every gqa-shaped layer, and
        cross-attention, has them)."""
        d, q_out = self.d_model, self.n_head * self.head_dim
        return (d + (1 if self.qkv_bias else 0)) * q_out + q_out * d + (d if self.o_bias else 0)

    def _cross_attention_params(self, layer: int) -> int:
        count = self.query_output_params()
        if self.cross_kv_sources[layer] == layer:
            count += 2 * (self.d_model + (1 if self.qkv_bias else 0)) * self.cross_n_kv_head * self.head_dim
        return count

    # ------------------------------------------------------------------------- conversions
    def replace(self, **changes: Any) -> "ModelConfig":
        """A validated copy with some fields changed.

        Changing ``n_kv_head``/``cla`` keeps everything else; passing ``cla`` clears an explicit
        ``kv_source`` and vice versa, since the two describe the same wiring.
        """
        if "cla" in changes and "kv_source" not in changes:
            changes["kv_source"] = None
        if "kv_source" in changes and changes["kv_source"] is not None and "cla" not in changes:
            changes["cla"] = 1
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        """A config from its JSON fields (a config.json of any kvlab version: older kind fields are
        moved into options, :func:`~kvlab.config.specs.migrate_legacy_fields`)."""
        data = migrate_legacy_fields(data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config field(s) {unknown}; known fields are {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {str(path)!r} does not exist") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"config file {str(path)!r} is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a JSON object of ModelConfig fields")
        # A kvlab checkpoint's config.json wraps the fields; accept both forms.
        if "model" in data and isinstance(data["model"], dict):
            data = data["model"]
        return cls.from_dict(data)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        try:
            fields = PRESETS[name]
        except KeyError:
            raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}") from None
        return cls(**{**fields, "name": name, **overrides})


_FIELD_NAMES = tuple(f.name for f in dataclasses.fields(ModelConfig))


def kv_bytes_per_token(n_kv_layers: int, n_kv_head: int, head_dim: int,
                       dtype: str | torch.dtype = "bf16") -> int:
    """Bytes of K and V that one token adds to a full-attention cache (the ``gqa`` kind's
    formula; every total goes through :func:`kvlab.config.accounting.cache_bytes`)."""
    return 2 * n_kv_layers * n_kv_head * head_dim * dtype_bytes(dtype)
