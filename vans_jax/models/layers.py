"""Shared building blocks: linear layers (with optional LoRA), norms, attention dispatch.

Parameters carry logical axis names in their ``axes`` metadata (see ``vans_jax.parallel``).
Linear kernels are stored (in, out) as is usual in JAX; converters transpose torch weights.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx


class LoRAParam(nnx.Param):
    """A LoRA adapter parameter: the only trainable kind when the base is frozen."""


def _dtype(name_or_dtype):
    if name_or_dtype is None:
        return jnp.float32
    if isinstance(name_or_dtype, str):
        table = {"float32": jnp.float32, "fp32": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16,
                 "float16": jnp.float16, "fp16": jnp.float16}
        if name_or_dtype not in table:
            raise ValueError(f"unknown dtype name {name_or_dtype!r}; expected one of {sorted(table)}")
        return table[name_or_dtype]
    return jnp.dtype(name_or_dtype)


resolve_dtype = _dtype


class Linear(nnx.Module):
    """y = x @ kernel + bias, optionally plus a LoRA update (alpha / r) * dropout(x) @ A @ B."""

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool = True,
                 axes: tuple[str, str] = ("embed", "mlp"), dtype=jnp.float32, rngs: nnx.Rngs,
                 init_std: float = 0.02):
        self.in_features, self.out_features = in_features, out_features
        self.kernel = nnx.Param(
            (jax.random.normal(rngs.params(), (in_features, out_features), jnp.float32) * init_std).astype(dtype),
            axes=axes)
        self.bias = nnx.Param(jnp.zeros((out_features,), dtype), axes=(axes[1],)) if use_bias else None
        self.lora_a = nnx.data(None)  # LoRAParam once ``add_lora`` is called
        self.lora_b = nnx.data(None)
        self.lora_scale = 0.0
        self.lora_dropout = 0.0
        self._axes = axes

    def add_lora(self, rank: int, alpha: float, dropout: float, rngs: nnx.Rngs, dtype=jnp.float32):
        # PEFT's init: A ~ kaiming-uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)); B = 0, so the
        # adapted model starts equal to the base.
        bound = 1.0 / math.sqrt(self.in_features)
        self.lora_a = LoRAParam(
            jax.random.uniform(rngs.params(), (self.in_features, rank), jnp.float32, -bound, bound).astype(dtype),
            axes=(self._axes[0], "lora_rank"))
        self.lora_b = LoRAParam(jnp.zeros((rank, self.out_features), dtype), axes=("lora_rank", self._axes[1]))
        self.lora_scale = alpha / rank
        self.lora_dropout = float(dropout)

    def merge_lora(self):
        if self.lora_a is None:
            return
        delta = (self.lora_a[...].astype(jnp.float32) @ self.lora_b[...].astype(jnp.float32)) * self.lora_scale
        self.kernel.set_value((self.kernel[...].astype(jnp.float32) + delta).astype(self.kernel[...].dtype))
        self.lora_a = self.lora_b = None
        self.lora_scale = 0.0
        self.lora_dropout = 0.0

    def __call__(self, x, dropout_rng=None):
        """``dropout_rng`` (a key) turns on LoRA dropout, as in training; None = deterministic."""
        kernel = self.kernel[...]
        y = jnp.einsum("...i,io->...o", x.astype(kernel.dtype), kernel)
        if self.bias is not None:
            y = y + self.bias[...]
        if self.lora_a is not None:
            h = x
            if dropout_rng is not None and self.lora_dropout > 0:
                keep = jax.random.bernoulli(dropout_rng, 1.0 - self.lora_dropout, x.shape)
                h = jnp.where(keep, x / (1.0 - self.lora_dropout), 0).astype(x.dtype)
            a, b = self.lora_a[...], self.lora_b[...]
            y = y + (h.astype(a.dtype) @ a @ b).astype(y.dtype) * self.lora_scale
        return y


class Embed(nnx.Module):
    def __init__(self, num: int, dim: int, *, axes=("vocab", "embed"), dtype=jnp.float32, rngs: nnx.Rngs):
        self.embedding = nnx.Param(
            (jax.random.normal(rngs.params(), (num, dim), jnp.float32) * 0.02).astype(dtype), axes=axes)

    def __call__(self, ids):
        return jnp.take(self.embedding[...], ids, axis=0)

    def attend(self, x):
        """Tied output projection: logits = x @ embedding.T (in fp32)."""
        return jnp.einsum("...d,vd->...v", x, self.embedding[...], preferred_element_type=jnp.float32)


class RMSNorm(nnx.Module):
    """x * rsqrt(mean(x^2) + eps) * weight, the statistic in fp32 (as the references)."""

    def __init__(self, dim: int, *, eps: float = 1e-6, axes=("norm",), dtype=jnp.float32):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), dtype), axes=axes)

    def __call__(self, x):
        return rms_norm(x, self.weight[...], self.eps)


class LayerNorm(nnx.Module):
    """Affine LayerNorm (torch semantics: biased variance), computed in fp32 and returned in the
    input dtype (as diffusers' FP32LayerNorm and CLIP)."""

    def __init__(self, dim: int, *, eps: float, axes=("norm",), dtype=jnp.float32):
        self.eps = float(eps)
        self.weight = nnx.Param(jnp.ones((dim,), dtype), axes=axes)
        self.bias = nnx.Param(jnp.zeros((dim,), dtype), axes=axes)

    def __call__(self, x):
        return layer_norm(x, self.eps, self.weight[...], self.bias[...]).astype(x.dtype)


def layer_norm(x, eps: float, weight=None, bias=None):
    """LayerNorm in fp32, returned in fp32; non-affine without weight/bias."""
    xf = x.astype(jnp.float32)
    xc = xf - jnp.mean(xf, axis=-1, keepdims=True)
    y = xc * jax.lax.rsqrt(jnp.mean(xc * xc, axis=-1, keepdims=True) + eps)
    if weight is not None:
        y = y * weight.astype(jnp.float32)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y


def rms_norm(x, weight, eps):
    dtype = x.dtype
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight * xf.astype(dtype)


NEG_INF = -1e30


def attention(q, k, v, *, mask=None, bias=None, scale: float | None = None, impl: str = "xla"):
    """Multi-head attention with grouped KV heads.

    q: (B, Lq, Hq, D); k, v: (B, Lk, Hkv, D) with Hq a multiple of Hkv.
    mask: boolean, broadcastable to (B, 1, Lq, Lk); True = may attend.
    bias: additive logits bias broadcastable to (B, Hq, Lq, Lk) (e.g. T5 relative positions).
    scale: logits scale (default 1/sqrt(D); T5 uses 1.0).
    impl: "xla" (reference einsum; fp32 logits and softmax), "cudnn" (flash attention on NVIDIA
    GPUs), "chunked" (the xla math over blocks of ``CHUNK`` queries, each recomputed in the
    backward pass: memory O(CHUNK x Lk) instead of O(Lq x Lk), on any backend), or "auto" (cudnn
    when running on a GPU in bf16/fp16, else xla).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if impl == "auto":
        on_gpu = jax.default_backend() == "gpu"
        impl = "cudnn" if on_gpu and q.dtype in (jnp.bfloat16, jnp.float16) else "xla"
    if impl == "cudnn":
        if bias is not None:
            bias = jnp.asarray(bias).astype(q.dtype)
        return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale, implementation="cudnn")
    if impl == "chunked":
        return _chunked_attention(q, k, v, mask, bias, scale)
    if impl != "xla":
        raise ValueError(f"unknown attention impl {impl!r}; expected 'xla', 'cudnn', 'chunked' or 'auto'")
    b, lq, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    qg = q.reshape(b, lq, hkv, g, d)
    logits = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=jnp.float32) * scale
    if bias is not None:
        bias = jnp.broadcast_to(jnp.asarray(bias, jnp.float32), (b, hq, lq, k.shape[1]))
        logits = logits + bias.reshape(b, hkv, g, lq, k.shape[1])
    if mask is not None:
        m = jnp.asarray(mask)
        m = jnp.broadcast_to(m, (b, 1) + m.shape[-2:]) if m.ndim == 4 else m
        logits = jnp.where(m[:, :, None] if m.ndim == 4 else m, logits, NEG_INF)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(b, lq, hq, d).astype(q.dtype)


CHUNK = 512


def _chunked_attention(q, k, v, mask, bias, scale):
    """``attention(impl="xla")`` over query blocks of ``CHUNK`` (a ``lax.scan``; each block under
    ``jax.checkpoint``), so neither pass holds more than one block's scores."""
    lq = q.shape[1]
    if lq <= CHUNK:
        return attention(q, k, v, mask=mask, bias=bias, scale=scale, impl="xla")
    n = -(-lq // CHUNK)
    pad = n * CHUNK - lq

    def by_query(x):
        """(x, whether it has a query axis (-2) to slice), padded to n * CHUNK queries."""
        if x is None or jnp.ndim(x) < 2 or jnp.shape(x)[-2] != lq:
            return x, False
        x = jnp.asarray(x)
        return jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, pad), (0, 0)]), True

    qp = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
    (mask, mask_q), (bias, bias_q) = by_query(mask), by_query(bias)

    @jax.checkpoint
    def block(_, i):
        start = i * CHUNK
        take = lambda x, on: jax.lax.dynamic_slice_in_dim(x, start, CHUNK, axis=x.ndim - 2) if on else x
        out = attention(jax.lax.dynamic_slice_in_dim(qp, start, CHUNK, axis=1), k, v, mask=take(mask, mask_q),
                        bias=take(bias, bias_q), scale=scale, impl="xla")
        return None, out

    _, out = jax.lax.scan(block, None, jnp.arange(n))            # (n, B, CHUNK, H, D)
    out = jnp.moveaxis(out, 0, 1).reshape((q.shape[0], n * CHUNK) + q.shape[2:])
    return out[:, :lq]


def rotate_half(x):
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rotary(x, cos, sin):
    """rotate_half RoPE in fp32; cos/sin broadcast against x (..., D)."""
    xf = x.astype(jnp.float32)
    return (xf * cos + rotate_half(xf) * sin).astype(x.dtype)


def stack_layers(make_layer, n: int, rngs: nnx.Rngs):
    """Builds ``n`` identically shaped layers with their parameters stacked on a leading axis
    (for ``scan_layers``)."""

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(r):
        return make_layer(r)

    return make(rngs)


def scan_layers(layers: nnx.Module, body, carry, xs=None, *, remat: str = "none"):
    """Applies stacked layers with ``jax.lax.scan``: ``body(layer, carry, x) -> (carry, y)``.

    remat: "none", "full" (recompute each layer in the backward pass) or
    "dots" (save only matmul outputs without batch dims).
    """
    graphdef, state = nnx.split(layers)

    def step(c, inp):
        layer_state, x = inp
        layer = nnx.merge(graphdef, layer_state)
        return body(layer, c, x)

    if remat == "full":
        step = jax.checkpoint(step)
    elif remat == "dots":
        step = jax.checkpoint(step, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    elif remat != "none":
        raise ValueError(f"unknown remat policy {remat!r}; expected 'none', 'full' or 'dots'")
    return jax.lax.scan(step, carry, (state, xs))
