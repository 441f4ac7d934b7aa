"""UMT5 encoder (the Wan2.1 text encoder, UMT5-XXL) in Flax NNX.

Numerically follows ``transformers.UMT5EncoderModel``:

* token embedding (``shared``), no absolute positions, no embedding scaling;
* pre-norm blocks: T5 RMSNorm (no mean subtraction, weight only, statistic in fp32; the
  normalized activations are cast to the weight dtype before the weight multiply, as T5) ->
  self-attention -> residual; T5 RMSNorm -> (gated) feed-forward -> residual;
* self-attention WITHOUT the 1/sqrt(d) scaling, plus a relative position bias; unlike T5, every
  layer owns its ``relative_attention_bias`` table (buckets, heads): here one stacked parameter
  of shape (layers, buckets, heads);
* bidirectional relative buckets exactly as transformers (``_relative_position_bucket`` with
  ``is_decoder=False``): half of the buckets per direction, half of those exact, the rest
  log-spaced up to ``relative_attention_max_distance``. They depend only on the sequence length,
  so they are computed once on the host (numpy, float32 as torch) and baked in as a constant;
* feed-forward ``wo(act(wi_0 x) * wi_1 x)`` for ``gated-*`` (UMT5-XXL: gated-gelu = tanh GELU,
  transformers' ``gelu_new``), ``wo(act(wi x))`` otherwise;
* final RMSNorm.

Precision: parameters and matmul inputs in ``dtype`` (fp32 or bf16); the residual stream, the norm
statistics and the attention logits/softmax are always fp32 (a bf16 transformers model keeps its
residual stream in bf16 unless ``wo`` is kept in fp32; on the tiny test model our bf16 output is
closer to the fp32 reference than transformers' bf16 output). The output is in the parameter dtype.

Blocks are stacked on a leading axis and applied with ``jax.lax.scan`` (``layers.scan_layers``).
Weights: ``vans_jax.convert.umt5.from_pretrained``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from functools import lru_cache

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vans_jax.models.layers import (Embed, Linear, RMSNorm, attention, resolve_dtype, rms_norm, scan_layers,
                                    stack_layers)

# transformers' ACT2FN names we support for ``dense_act_fn``
_ACTS = {
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


# --------------------------------------------------------------------------------------------
# config


@dataclasses.dataclass(frozen=True)
class UMT5Config:
    """Defaults are google/umt5-xxl's encoder (the Wan2.1 text encoder)."""
    vocab_size: int = 256384
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"
    pad_token_id: int = 0
    eos_token_id: int = 1
    attn_impl: str = "xla"   # "xla" (einsum, fp32 softmax), "cudnn" or "auto"
    remat: str = "none"      # scan_layers remat policy: "none", "full", "dots"

    def __post_init__(self):
        act = self.feed_forward_proj.split("-")
        if len(act) > 2 or (len(act) == 2 and act[0] != "gated"):
            raise ValueError(f"feed_forward_proj {self.feed_forward_proj!r} is not 'gated-ACT' or 'ACT'")
        if self.dense_act_fn not in _ACTS:
            raise ValueError(f"unsupported activation {self.dense_act_fn!r} (from feed_forward_proj "
                             f"{self.feed_forward_proj!r}); supported: {sorted(_ACTS)}")
        if self.relative_attention_num_buckets < 4:
            raise ValueError("relative_attention_num_buckets must be >= 4")

    # As transformers' UMT5Config.__post_init__: both are derived from feed_forward_proj
    # (a config.json's own ``is_gated_act`` / ``dense_act_fn`` are overwritten there too).
    @property
    def is_gated_act(self) -> bool:
        return self.feed_forward_proj.split("-")[0] == "gated"

    @property
    def dense_act_fn(self) -> str:
        return "gelu_new" if self.feed_forward_proj == "gated-gelu" else self.feed_forward_proj.split("-")[-1]

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.d_kv

    @classmethod
    def from_dict(cls, d: dict, **overrides) -> "UMT5Config":
        """From a transformers UMT5 (or T5) ``config.json`` dict."""
        mt = d.get("model_type", "umt5")
        if mt not in ("umt5", None):
            # T5/mT5 keep one relative-bias table (in the first block) for all layers: a different model.
            raise ValueError(f"expected a UMT5 config (model_type 'umt5'), got model_type {mt!r}")
        fields = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in fields and v is not None}
        if isinstance(kw.get("eos_token_id"), list):
            kw["eos_token_id"] = kw["eos_token_id"][0]
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def from_pretrained(cls, path: str, **overrides) -> "UMT5Config":
        """``path``: a transformers UMT5 directory, or a diffusers Wan pipeline directory (its
        ``text_encoder/`` is used)."""
        cfg_path = os.path.join(resolve_encoder_dir(path), "config.json")
        with open(cfg_path) as f:
            return cls.from_dict(json.load(f), **overrides)

    def to_hf_dict(self) -> dict:
        return {"model_type": "umt5", "architectures": ["UMT5EncoderModel"], "vocab_size": self.vocab_size,
                "d_model": self.d_model, "d_kv": self.d_kv, "d_ff": self.d_ff, "num_layers": self.num_layers,
                "num_heads": self.num_heads, "relative_attention_num_buckets": self.relative_attention_num_buckets,
                "relative_attention_max_distance": self.relative_attention_max_distance,
                "layer_norm_epsilon": self.layer_norm_epsilon, "feed_forward_proj": self.feed_forward_proj,
                "dense_act_fn": self.dense_act_fn, "is_gated_act": self.is_gated_act,
                "pad_token_id": self.pad_token_id, "eos_token_id": self.eos_token_id}


def resolve_encoder_dir(path: str) -> str:
    """The directory holding the UMT5 ``config.json``: ``path`` itself, or ``path/text_encoder``
    (a diffusers Wan pipeline)."""
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    sub = os.path.join(path, "text_encoder")
    if os.path.isfile(os.path.join(sub, "config.json")):
        return sub
    if not os.path.isdir(path):
        raise FileNotFoundError(f"UMT5 encoder directory {path} does not exist")
    raise FileNotFoundError(f"no config.json in {path} (nor in {sub}): expected a transformers UMT5 "
                            f"directory or a diffusers Wan pipeline directory")


# --------------------------------------------------------------------------------------------
# relative position buckets


def relative_position_bucket(relative_position: np.ndarray, num_buckets: int, max_distance: int) -> np.ndarray:
    """Bidirectional T5 buckets (transformers ``_relative_position_bucket`` with
    ``is_decoder=False``) for memory_position - query_position, computed in float32 as torch."""
    rel = np.asarray(relative_position, np.int64)
    half = num_buckets // 2
    out = (rel > 0).astype(np.int64) * half
    rel = np.abs(rel)
    max_exact = half // 2
    is_small = rel < max_exact
    # log(0) is never selected; clamp to keep the float path finite.
    ratio = np.log(np.maximum(rel, 1).astype(np.float32) / np.float32(max_exact))
    ratio = ratio / np.float32(math.log(max_distance / max_exact)) * np.float32(half - max_exact)
    large = np.minimum(max_exact + ratio.astype(np.int64), half - 1)
    return (out + np.where(is_small, rel, large)).astype(np.int32)


@lru_cache(maxsize=32)
def _bucket_table(q_len: int, k_len: int, num_buckets: int, max_distance: int) -> np.ndarray:
    rel = np.arange(k_len)[None, :] - np.arange(q_len)[:, None]
    table = relative_position_bucket(rel, num_buckets, max_distance)
    table.setflags(write=False)
    return table


# --------------------------------------------------------------------------------------------
# modules


def t5_norm(norm: RMSNorm, x):
    """T5/UMT5 RMSNorm: statistic in fp32, normalized activations cast to the weight dtype, then
    times the weight (transformers ``UMT5LayerNorm`` with a half-precision weight; identical to
    ``layers.rms_norm`` in fp32)."""
    w = norm.weight[...]
    xn = rms_norm(x.astype(jnp.float32), jnp.ones((), jnp.float32), norm.eps)
    return w * xn.astype(w.dtype)


class UMT5Block(nnx.Module):
    """One encoder block (transformers ``UMT5Block``, encoder side)."""

    def __init__(self, cfg: UMT5Config, *, dtype, rngs: nnx.Rngs):
        d, inner, ff = cfg.d_model, cfg.inner_dim, cfg.d_ff
        self.num_heads, self.d_kv = cfg.num_heads, cfg.d_kv
        self.attn_impl = cfg.attn_impl
        self.act = cfg.dense_act_fn
        self.attn_norm = RMSNorm(d, eps=cfg.layer_norm_epsilon, dtype=dtype)
        self.q = Linear(d, inner, use_bias=False, axes=("embed", "heads"), dtype=dtype, rngs=rngs)
        self.k = Linear(d, inner, use_bias=False, axes=("embed", "heads"), dtype=dtype, rngs=rngs)
        self.v = Linear(d, inner, use_bias=False, axes=("embed", "heads"), dtype=dtype, rngs=rngs)
        self.o = Linear(inner, d, use_bias=False, axes=("heads", "embed"), dtype=dtype, rngs=rngs)
        self.relative_attention_bias = nnx.Param(
            (jax.random.normal(rngs.params(), (cfg.relative_attention_num_buckets, cfg.num_heads), jnp.float32)
             * d ** -0.5).astype(dtype), axes=(None, "heads"))
        self.ffn_norm = RMSNorm(d, eps=cfg.layer_norm_epsilon, dtype=dtype)
        self.wi_0 = Linear(d, ff, use_bias=False, axes=("embed", "mlp"), dtype=dtype, rngs=rngs)
        self.wi_1 = (Linear(d, ff, use_bias=False, axes=("embed", "mlp"), dtype=dtype, rngs=rngs)
                     if cfg.is_gated_act else None)
        self.wo = Linear(ff, d, use_bias=False, axes=("mlp", "embed"), dtype=dtype, rngs=rngs)

    def position_bias(self, buckets):
        """(H, Lq, Lk) fp32 bias for an (Lq, Lk) bucket table."""
        table = self.relative_attention_bias[...].astype(jnp.float32)
        return jnp.transpose(jnp.take(table, jnp.asarray(buckets), axis=0), (2, 0, 1))

    def __call__(self, h, buckets, mask=None):
        """h: (B, L, d) fp32 residual stream; buckets: (L, L) int; mask: (B, 1, 1, L) bool."""
        b, n, _ = h.shape
        x = t5_norm(self.attn_norm, h)
        split = lambda t: t.reshape(b, n, self.num_heads, self.d_kv)
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        o = attention(q, k, v, mask=mask, bias=self.position_bias(buckets)[None], scale=1.0, impl=self.attn_impl)
        h = h + self.o(o.reshape(b, n, self.num_heads * self.d_kv)).astype(jnp.float32)
        x = t5_norm(self.ffn_norm, h)
        y = _ACTS[self.act](self.wi_0(x))
        if self.wi_1 is not None:
            y = y * self.wi_1(x)
        return h + self.wo(y).astype(jnp.float32)


class UMT5Encoder(nnx.Module):
    """``encoder(input_ids (B, L), attention_mask (B, L) or None) -> last_hidden_state (B, L, d)``
    (transformers ``UMT5EncoderModel(...).last_hidden_state``)."""

    def __init__(self, config: UMT5Config, *, dtype="float32", rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        dt = resolve_dtype(dtype)
        self.config = config
        self.embed_tokens = Embed(config.vocab_size, config.d_model, axes=("vocab", "embed"), dtype=dt, rngs=rngs)
        self.layers = stack_layers(lambda r: UMT5Block(config, dtype=dt, rngs=r), config.num_layers, rngs)
        self.final_norm = RMSNorm(config.d_model, eps=config.layer_norm_epsilon, dtype=dt)

    @property
    def dtype(self):
        return self.final_norm.weight[...].dtype

    def __call__(self, input_ids, attention_mask=None):
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {input_ids.shape}")
        n = input_ids.shape[1]
        cfg = self.config
        buckets = _bucket_table(n, n, cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance)
        mask = None
        if attention_mask is not None:
            attention_mask = jnp.asarray(attention_mask)
            if attention_mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask shape {attention_mask.shape} != input_ids shape {input_ids.shape}")
            mask = (attention_mask > 0)[:, None, None, :]
        h = self.embed_tokens(input_ids).astype(jnp.float32)

        def body(layer, carry, _):
            return layer(carry, buckets, mask), None

        h, _ = scan_layers(self.layers, body, h, remat=cfg.remat)
        return t5_norm(self.final_norm, h)
