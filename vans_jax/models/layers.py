"""Shared building blocks: linear layers (with optional LoRA), norms, attention dispatch.

Parameters carry logical axis names in their ``axes`` metadata (see ``vans_jax.parallel``).
Linear kernels are stored (in, out) as is usual in JAX; converters transpose torch weights.
"""
from __future__ import annotations

import functools
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

ATTN_IMPLS = ("xla", "cudnn", "chunked", "splash", "auto")


def resolve_attention_impl(impl: str, dtype=None) -> str:
    """The implementation ``impl`` stands for here: "auto" becomes "splash" on a TPU, "cudnn" on
    an NVIDIA GPU when ``dtype`` is bf16/fp16, "xla" otherwise; the others are returned as given."""
    if impl not in ATTN_IMPLS:
        raise ValueError(f"unknown attention impl {impl!r}; expected one of {', '.join(map(repr, ATTN_IMPLS))}")
    if impl != "auto":
        return impl
    backend = jax.default_backend()
    if backend == "tpu":
        return "splash"
    if backend == "gpu" and dtype is not None and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    return "xla"


def structural_mask(segment_ids, causal: bool, lq: int, lk: int):
    """The boolean (B or 1, 1, Lq, Lk) mask that ``segment_ids`` / ``causal`` stand for (None when
    neither is given)."""
    m = None
    if segment_ids is not None:
        qs, ks = (jnp.asarray(s) for s in segment_ids)
        m = (qs[:, :, None] == ks[:, None, :])[:, None]
    if causal:
        c = (jnp.arange(lk)[None, :] <= jnp.arange(lq)[:, None])[None, None]
        m = c if m is None else m & c
    return m


def attention(q, k, v, *, mask=None, bias=None, scale: float | None = None, impl: str = "xla",
              segment_ids=None, causal: bool = False, block_sizes=None):
    """Multi-head attention with grouped KV heads.

    q: (B, Lq, Hq, D); k, v: (B, Lk, Hkv, D) with Hq a multiple of Hkv.
    mask: boolean, broadcastable to (B, 1, Lq, Lk); True = may attend.
    segment_ids: (q_ids (B, Lq), kv_ids (B, Lk)) non-negative ints: query i may attend key j only
    when their ids are equal (padding, packed rows, vision windows / frames); every query must
    share its id with at least one key. causal: query i may attend keys j <= i (needs Lq == Lk).
    mask, segment_ids and causal combine (all must allow).
    bias: additive logits bias broadcastable to (B, Hq, Lq, Lk) (e.g. T5 relative positions).
    scale: logits scale (default 1/sqrt(D); T5 uses 1.0).
    impl:
      "xla"     reference einsum; fp32 logits and softmax; any mask / bias.
      "cudnn"   flash attention on NVIDIA GPUs (``jax.nn.dot_product_attention``).
      "chunked" the xla math over blocks of ``CHUNK`` queries, each recomputed in the backward
                pass: memory O(CHUNK x Lk) instead of O(Lq x Lk), on any backend.
      "splash"  the Pallas TPU splash-attention kernel (flash-style blocks, its own backward pass);
                on a backend that is not a TPU it runs in Pallas interpret mode (slow: tests).
                It takes the structural masks only: ``segment_ids`` and ``causal``. A call with
                an arbitrary boolean ``mask`` or a ``bias`` (UMT5's relative-position bias) runs
                on "xla" instead: UMT5 always does. Lengths are padded to multiples of 128 and
                blocked by ``block_sizes`` (an int, or (block_q, block_kv); default
                ``SPLASH_BLOCK``, reduced to a multiple of 128 that divides the padded length).
      "auto"    splash on a TPU, cudnn on an NVIDIA GPU in bf16/fp16, xla elsewhere.
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] \
            or q.shape[-1] != k.shape[-1] or q.shape[2] % k.shape[2]:
        raise ValueError(f"attention expects q (B, Lq, Hq, D) and k, v (B, Lk, Hkv, D) with Hq a multiple of "
                         f"Hkv; got q {q.shape}, k {k.shape}, v {v.shape}")
    lq, lk = q.shape[1], k.shape[1]
    if causal and lq != lk:
        raise ValueError(f"causal attention needs as many queries as keys; got Lq={lq}, Lk={lk}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    impl = resolve_attention_impl(impl, q.dtype)
    if impl == "splash":
        if mask is None and bias is None:
            return _splash_on_mesh(q, k, v, scale, segment_ids, causal, block_sizes)
        impl = "xla"  # arbitrary masks and biases have no splash form
    smask = structural_mask(segment_ids, causal, lq, lk)
    if smask is not None:
        mask = smask if mask is None else jnp.asarray(mask) & smask
    if impl == "cudnn":
        if bias is not None:
            bias = jnp.asarray(bias).astype(q.dtype)
        return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale, implementation="cudnn")
    if impl == "chunked":
        return _chunked_attention(q, k, v, mask, bias, scale)
    return _xla_attention(q, k, v, mask, bias, scale)


def _xla_attention(q, k, v, mask, bias, scale):
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


SPLASH_BLOCK = 512   # default splash block (queries and keys), reduced to divide the padded length
_LANE = 128          # splash lengths are padded to a multiple of this


def _splash_block(length: int, block: int) -> tuple[int, int]:
    """(block, padded length): the length padded to a multiple of 128 and the largest multiple
    of 128 <= ``block`` that divides it."""
    if block % _LANE or block <= 0:
        raise ValueError(f"splash block size {block} is not a positive multiple of {_LANE}")
    padded = -(-length // _LANE) * _LANE
    b = min(block, padded)
    while padded % b:
        b -= _LANE
    return b, padded


@functools.lru_cache(maxsize=64)
def _splash_kernel(heads: int, lq: int, lk: int, causal: bool, bq: int, bk: int, mqa: bool, interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as sa
    one = sa.CausalMask((lq, lk)) if causal else sa.FullMask((lq, lk))
    sizes = sa.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq, block_kv_dkv=bk,
                          block_kv_dkv_compute=bk, block_q_dq=bq, block_kv_dq=bk)
    make = sa.make_splash_mqa_single_device if mqa else sa.make_splash_mha_single_device
    with jax.ensure_compile_time_eval():   # concrete mask tables, cached across traces
        return make(sa.MultiHeadMask([one] * heads), block_sizes=sizes, interpret=interpret)


def _splash_on_mesh(q, k, v, scale, segment_ids, causal, block_sizes):
    """``_splash_attention`` per device under a context mesh (``jax.set_mesh``): a Pallas kernel
    cannot be partitioned by XLA, so it runs in a ``shard_map``: rows over the batch axes, heads
    over ``tensor`` (where the KV heads divide), queries over ``sequence`` when there is no causal
    mask (keys and values whole on every device). Without a mesh, or inside a ``shard_map``
    already, the kernel runs as is."""
    from jax.sharding import PartitionSpec as P

    from ..parallel import context_mesh, logical_to_spec
    mesh = context_mesh()
    run = lambda q, k, v, seg: _splash_attention(q, k, v, scale, seg, causal, block_sizes)
    if mesh is None or mesh.manual_axes or all(n == 1 for n in mesh.shape.values()):
        return run(q, k, v, segment_ids)
    b, lq, hq, _ = q.shape
    batch = logical_to_spec(("activation_batch",), mesh=mesh, shape=(b,))[0]
    t = mesh.shape.get("tensor", 1)
    heads = "tensor" if t > 1 and k.shape[2] % t == 0 else None
    s = mesh.shape.get("sequence", 1)
    length = "sequence" if s > 1 and not causal and lq % s == 0 else None
    q_spec, kv_spec = P(batch, length, heads, None), P(batch, None, heads, None)
    if segment_ids is None:
        f = lambda q, k, v: run(q, k, v, None)
        return jax.shard_map(f, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec), out_specs=q_spec,
                             check_vma=False)(q, k, v)
    seg = tuple(jnp.broadcast_to(jnp.asarray(x, jnp.int32), (b, n)) for x, n in zip(segment_ids, (lq, k.shape[1])))
    f = lambda q, k, v, qs, ks: run(q, k, v, (qs, ks))
    return jax.shard_map(f, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, P(batch, length), P(batch, None)),
                         out_specs=q_spec, check_vma=False)(q, k, v, *seg)


def _splash_attention(q, k, v, scale, segment_ids, causal, block_sizes):
    from jax.experimental.pallas.ops.tpu import splash_attention as sa
    b, lq, hq, d = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    g = hq // hkv
    block_q, block_kv = (block_sizes, block_sizes) if isinstance(block_sizes, int) else (
        block_sizes or (SPLASH_BLOCK, SPLASH_BLOCK))
    bq, lq_p = _splash_block(lq, block_q)
    bk, lk_p = _splash_block(lk, block_kv)
    if segment_ids is None and (lq_p != lq or lk_p != lk):
        segment_ids = (jnp.zeros((b, lq), jnp.int32), jnp.zeros((b, lk), jnp.int32))
    seg = None
    if segment_ids is not None:
        qs, ks = (jnp.broadcast_to(jnp.asarray(s, jnp.int32), (b, n)) for s, n in zip(segment_ids, (lq, lk)))
        # padded queries join key 0's segment (their output is dropped); padded keys get -1 (no query)
        qs = jnp.concatenate([qs, jnp.broadcast_to(ks[:, :1], (b, lq_p - lq))], axis=1)
        ks = jnp.pad(ks, ((0, 0), (0, lk_p - lk)), constant_values=-1)
        seg = sa.SegmentIds(q=qs, kv=ks)
    # splash does not scale the logits: scale the queries (in fp32, back to the input dtype)
    qh = (q.astype(jnp.float32) * scale).astype(q.dtype)
    qh = jnp.pad(qh, ((0, 0), (0, lq_p - lq), (0, 0), (0, 0))).transpose(0, 2, 1, 3)   # (B, Hq, Lq, D)
    kh = jnp.pad(k, ((0, 0), (0, lk_p - lk), (0, 0), (0, 0))).transpose(0, 2, 1, 3)    # (B, Hkv, Lk, D)
    vh = jnp.pad(v, ((0, 0), (0, lk_p - lk), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    interpret = jax.default_backend() != "tpu"
    if g == 1:
        kernel = _splash_kernel(hq, lq_p, lk_p, bool(causal), bq, bk, False, interpret)
        one = lambda q_, k_, v_, s_: kernel(q_, k_, v_, segment_ids=s_)
    else:                                   # grouped heads: an MQA kernel per KV head
        kernel = _splash_kernel(g, lq_p, lk_p, bool(causal), bq, bk, True, interpret)
        per_kv = jax.vmap(lambda q_, k_, v_, s_: kernel(q_, k_, v_, segment_ids=s_), in_axes=(0, 0, 0, None))
        one = lambda q_, k_, v_, s_: per_kv(q_.reshape(hkv, g, lq_p, d), k_, v_, s_).reshape(hq, lq_p, d)
    out = jax.vmap(one, in_axes=(0, 0, 0, None if seg is None else 0))(qh, kh, vh, seg)
    return out.transpose(0, 2, 1, 3)[:, :lq].astype(q.dtype)


CHUNK = 512


def _chunked_attention(q, k, v, mask, bias, scale):
    """``attention(impl="xla")`` over query blocks of ``CHUNK`` (a ``lax.scan``; each block under
    ``jax.checkpoint``), so neither pass holds more than one block's scores."""
    lq = q.shape[1]
    if lq <= CHUNK:
        return _xla_attention(q, k, v, mask, bias, scale)
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
        out = _xla_attention(jax.lax.dynamic_slice_in_dim(qp, start, CHUNK, axis=1), k, v, take(mask, mask_q),
                             take(bias, bias_q), scale)
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

    return jax.lax.scan(with_remat(step, remat), carry, (state, xs))


def with_remat(fn, remat: str):
    """``fn`` under a remat policy: "none", "full" (``jax.checkpoint``) or "dots" (matmul outputs
    without batch dims saved)."""
    if remat == "full":
        return jax.checkpoint(fn)
    if remat == "dots":
        return jax.checkpoint(fn, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    if remat != "none":
        raise ValueError(f"unknown remat policy {remat!r}; expected 'none', 'full' or 'dots'")
    return fn


def loop_layers(layers: nnx.Module, body, carry, xs=None, *, remat: str = "none"):
    """``scan_layers``' semantics (``body(layer, carry, x) -> (carry, y)``, the same remat policies)
    as a Python loop over the stacked layers: each layer is a static slice of the stacked
    parameters, and its backward pass reads its own residuals instead of a slice of a stacked
    buffer. Returns the final carry."""
    graphdef, state = nnx.split(layers)

    def step(c, layer_state, x):
        return body(nnx.merge(graphdef, layer_state), c, x)[0]

    step = with_remat(step, remat)
    n = jax.tree.leaves(state)[0].shape[0]
    for i in range(n):
        carry = step(carry, jax.tree.map(lambda a: a[i], state), None if xs is None else xs[i])
    return carry

