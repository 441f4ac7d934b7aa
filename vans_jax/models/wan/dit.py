"""Wan2.1 text-to-video diffusion transformer (DiT) in Flax NNX, with VANS reference frames.

Numerics follow diffusers' ``WanTransformer3DModel``: LayerNorms and modulation in fp32,
RMSNorm over the full q/k width before the head split, interleaved ("complex") 3D RoPE with
the head dim split t/h/w = D - 2*(2*(D//6)), 2*(D//6), 2*(D//6) (44/42/42 for D=128).

VANS conditioning: ``n_ref`` clean reference latent frames are concatenated in FRONT of the
noisy target latents on the time axis (the caller does the concatenation), they share the
scalar timestep and take temporal RoPE positions 0..n_ref-1; the model's output at those
positions is dropped, so the output covers only the target frames.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ...parallel import SEQ_PARALLEL, constrain, sequence_parallel_attention
from ..layers import (LayerNorm, Linear, RMSNorm, attention, layer_norm, resolve_attention_impl, resolve_dtype,
                      loop_layers, scan_layers,
                      stack_layers)

# Logical axes of activations (sharding constraints under ``jax.set_mesh``; no-ops without a mesh).
TOKENS = ("activation_batch", "activation_length", "activation_embed")      # (B, L, d) video tokens
TEXT = ("activation_batch", None, "activation_embed")                        # (B, L_text, d)
QUERY_HEADS = ("activation_batch", "activation_length", "activation_heads", None)
KV_HEADS = ("activation_batch", None, "activation_heads", None)              # keys/values: all positions
FFN_HIDDEN = ("activation_batch", "activation_length", "activation_mlp")


@dataclasses.dataclass(frozen=True)
class WanLoRAConfig:
    """LoRA on the DiT blocks' projections (PEFT semantics: scale alpha / rank).

    Target names: ``to_q``, ``to_k``, ``to_v``, ``to_out`` (self- and cross-attention) and
    ``ffn_in``, ``ffn_out`` (the feed-forward's two linears)."""
    rank: int = 32
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out", "ffn_in", "ffn_out")
    self_attn: bool = True
    cross_attn: bool = True


UNROLL_MAX_LAYERS = 8       # layer_loop="auto": deeper DiTs scan their layers


@dataclasses.dataclass(frozen=True)
class WanConfig:
    """Wan2.1 DiT hyper-parameters; the defaults are T2V-1.3B."""
    dim: int = 1536
    num_layers: int = 30
    num_heads: int = 12
    ffn_dim: int = 8960
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    cross_attn_norm: bool = True
    rope_theta: float = 10000.0
    rope_max_seq_len: int = 1024
    text_len: int = 512
    # runtime
    dtype: str = "float32"          # activations / matmuls
    param_dtype: str = "float32"    # weights (modulation tables and the time MLP stay fp32)
    attn_impl: str = "xla"          # layers.attention: "xla", "cudnn", "chunked", "splash" or "auto"
    attn_block_size: int | None = None  # splash block (queries and keys); None: layers.SPLASH_BLOCK
    seq_parallel: str = "none"      # self-attention over the `sequence` mesh axis: "none" (keys/values
                                    # gathered), "ring" or "ulysses" (parallel.sequence_parallel_attention)
    remat: str = "none"             # per-layer remat policy: "none", "full", "dots"
    # "scan": lax.scan over the stacked layers (compile time flat in depth); "unroll": a Python loop
    # over the same stacked parameters (no stacked per-layer residuals to copy in and out of the
    # scan's buffers: a CPU training step of the bench's 2-layer DiT ~20-30% faster); "auto": unroll
    # up to UNROLL_MAX_LAYERS layers (the tiny and bench DiTs), scan above (Wan2.1's 30).
    layer_loop: str = "auto"

    def __post_init__(self):
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        if self.seq_parallel not in SEQ_PARALLEL:
            raise ValueError(f"seq_parallel {self.seq_parallel!r} is not one of {SEQ_PARALLEL}")
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 2 or (self.head_dim - 2 * self.rope_hw_dim) <= 0:
            raise ValueError(f"head_dim {self.head_dim} cannot be split into t/h/w RoPE parts")
        if self.layer_loop not in ("auto", "scan", "unroll"):
            raise ValueError(f"layer_loop must be 'auto', 'scan' or 'unroll', got {self.layer_loop!r}")

    @property
    def unrolled(self) -> bool:
        """Whether the blocks run as a Python loop (``layer_loop``) rather than a ``lax.scan``."""
        return self.layer_loop == "unroll" or (self.layer_loop == "auto" and self.num_layers <= UNROLL_MAX_LAYERS)

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def rope_hw_dim(self) -> int:
        return 2 * (self.head_dim // 6)

    @property
    def rope_dims(self) -> tuple[int, int, int]:
        hw = self.rope_hw_dim
        return (self.head_dim - 2 * hw, hw, hw)

    @property
    def patch_features(self) -> int:
        return self.in_channels * math.prod(self.patch_size)

    @classmethod
    def from_diffusers_config(cls, cfg: Mapping[str, Any] | str, **overrides) -> "WanConfig":
        """From a diffusers ``WanTransformer3DModel`` config (dict, config.json path or its dir)."""
        if isinstance(cfg, str):
            path = os.path.join(cfg, "config.json") if os.path.isdir(cfg) else cfg
            with open(path) as f:
                cfg = json.load(f)
        cfg = dict(cfg)
        if cfg.get("image_dim") is not None or cfg.get("added_kv_proj_dim") is not None:
            raise ValueError("image-conditioned (I2V) Wan DiTs are not supported")
        if cfg.get("pos_embed_seq_len") is not None:
            raise ValueError("pos_embed_seq_len is not supported")
        qk_norm = cfg.get("qk_norm", "rms_norm_across_heads")
        if qk_norm != "rms_norm_across_heads":
            raise ValueError(f"qk_norm {qk_norm!r} is not supported (only 'rms_norm_across_heads')")
        heads = int(cfg.get("num_attention_heads", 40))
        head_dim = int(cfg.get("attention_head_dim", 128))
        in_ch = int(cfg.get("in_channels", 16))
        kw = dict(
            dim=heads * head_dim, num_heads=heads, num_layers=int(cfg.get("num_layers", 40)),
            ffn_dim=int(cfg.get("ffn_dim", 13824)), in_channels=in_ch,
            out_channels=int(cfg.get("out_channels") or in_ch), text_dim=int(cfg.get("text_dim", 4096)),
            freq_dim=int(cfg.get("freq_dim", 256)), patch_size=tuple(cfg.get("patch_size", (1, 2, 2))),
            eps=float(cfg.get("eps", 1e-6)), cross_attn_norm=bool(cfg.get("cross_attn_norm", True)),
            rope_max_seq_len=int(cfg.get("rope_max_seq_len", 1024)))
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def from_wan_config(cls, cfg: Mapping[str, Any], **overrides) -> "WanConfig":
        """From the original Wan repo's config (``dim``, ``in_dim``, ``num_heads``, ...)."""
        cfg = dict(cfg)
        if cfg.get("model_type", "t2v") != "t2v":
            raise ValueError(f"only t2v Wan DiTs are supported, got model_type {cfg.get('model_type')!r}")
        kw = dict(dim=int(cfg["dim"]), num_heads=int(cfg["num_heads"]), num_layers=int(cfg["num_layers"]),
                  ffn_dim=int(cfg["ffn_dim"]), in_channels=int(cfg.get("in_dim", 16)),
                  out_channels=int(cfg.get("out_dim", 16)), text_dim=int(cfg.get("text_dim", 4096)),
                  freq_dim=int(cfg.get("freq_dim", 256)), patch_size=tuple(cfg.get("patch_size", (1, 2, 2))),
                  eps=float(cfg.get("eps", 1e-6)), cross_attn_norm=bool(cfg.get("cross_attn_norm", True)),
                  text_len=int(cfg.get("text_len", 512)))
        kw.update(overrides)
        return cls(**kw)

    def to_diffusers_config(self) -> dict:
        return {
            "_class_name": "WanTransformer3DModel",
            "patch_size": list(self.patch_size),
            "num_attention_heads": self.num_heads,
            "attention_head_dim": self.head_dim,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "text_dim": self.text_dim,
            "freq_dim": self.freq_dim,
            "ffn_dim": self.ffn_dim,
            "num_layers": self.num_layers,
            "cross_attn_norm": self.cross_attn_norm,
            "qk_norm": "rms_norm_across_heads",
            "eps": self.eps,
            "image_dim": None,
            "added_kv_proj_dim": None,
            "rope_max_seq_len": self.rope_max_seq_len,
            "pos_embed_seq_len": None,
        }


# ----------------------------------------------------------------------------- functions


def timestep_sinusoid(t, dim: int, max_period: float = 10000.0):
    """[cos, sin] sinusoidal embedding (fp32) of timesteps t: (B,) -> (B, dim)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def rope_angles(cfg: WanConfig, frames: int, height: int, width: int, frame_offset: int = 0) -> np.ndarray:
    """Per-token RoPE angles (L, head_dim/2) in float64 (host, static shapes); tokens ordered
    (t, h, w) row-major as the patchified sequence. Temporal positions start at frame_offset."""
    dt, dh, dw = cfg.rope_dims

    def inv(d):
        return 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))

    at = np.outer(np.arange(frames, dtype=np.float64) + frame_offset, inv(dt))
    ah = np.outer(np.arange(height, dtype=np.float64), inv(dh))
    aw = np.outer(np.arange(width, dtype=np.float64), inv(dw))
    f, h, w = frames, height, width
    ang = np.concatenate([
        np.broadcast_to(at[:, None, None], (f, h, w, at.shape[-1])),
        np.broadcast_to(ah[None, :, None], (f, h, w, ah.shape[-1])),
        np.broadcast_to(aw[None, None, :], (f, h, w, aw.shape[-1])),
    ], axis=-1)
    return ang.reshape(f * h * w, -1)


def apply_rope_interleaved(x, cos, sin):
    """Rotates interleaved pairs (x[2i], x[2i+1]) of x (B, L, H, D) by angles with cos/sin
    (L, D/2), in fp32."""
    xf = x.astype(jnp.float32).reshape(x.shape[:-1] + (x.shape[-1] // 2, 2))
    x1, x2 = xf[..., 0], xf[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    out = jnp.stack([x1 * c - x2 * s, x1 * s + x2 * c], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


def patchify(x, patch_size):
    """(B, C, T, H, W) -> (B, T'*H'*W', C*pt*ph*pw) with features ordered (C, pt, ph, pw) as a
    Conv3d weight flattens."""
    b, c, t, h, w = x.shape
    pt, ph, pw = patch_size
    if t % pt or h % ph or w % pw:
        raise ValueError(f"latent shape {(t, h, w)} is not divisible by the patch size {patch_size}")
    x = x.reshape(b, c, t // pt, pt, h // ph, ph, w // pw, pw)
    x = x.transpose(0, 2, 4, 6, 1, 3, 5, 7)
    return x.reshape(b, (t // pt) * (h // ph) * (w // pw), c * pt * ph * pw)


def unpatchify(x, grid, patch_size, channels):
    """(B, f*h*w, pt*ph*pw*C) with features ordered (pt, ph, pw, C) -> (B, C, T, H, W)."""
    b = x.shape[0]
    f, h, w = grid
    pt, ph, pw = patch_size
    x = x.reshape(b, f, h, w, pt, ph, pw, channels)
    x = x.transpose(0, 7, 1, 4, 2, 5, 3, 6)
    return x.reshape(b, channels, f * pt, h * ph, w * pw)


# ----------------------------------------------------------------------------- modules


def _lora(layer: Linear, name: str, lora: WanLoRAConfig | None, rngs, dtype):
    if lora is not None and name in lora.targets:
        layer.add_lora(lora.rank, lora.alpha, lora.dropout, rngs, dtype)
    return layer


class WanAttention(nnx.Module):
    """q/k/v/out projections with RMSNorm over the full q and k width (before the head split)."""

    def __init__(self, cfg: WanConfig, *, dtype, rngs, lora: WanLoRAConfig | None = None):
        d = cfg.dim
        self.num_heads = cfg.num_heads
        self.attn_impl = cfg.attn_impl
        self.attn_block_size = cfg.attn_block_size
        self.seq_parallel = cfg.seq_parallel
        self.to_q = _lora(Linear(d, d, axes=("embed", "qkv"), dtype=dtype, rngs=rngs), "to_q", lora, rngs, dtype)
        self.to_k = _lora(Linear(d, d, axes=("embed", "qkv"), dtype=dtype, rngs=rngs), "to_k", lora, rngs, dtype)
        self.to_v = _lora(Linear(d, d, axes=("embed", "qkv"), dtype=dtype, rngs=rngs), "to_v", lora, rngs, dtype)
        self.to_out = _lora(Linear(d, d, axes=("qkv", "embed"), dtype=dtype, rngs=rngs), "to_out", lora, rngs,
                            dtype)
        self.norm_q = RMSNorm(d, eps=cfg.eps, dtype=dtype)
        self.norm_k = RMSNorm(d, eps=cfg.eps, dtype=dtype)

    def __call__(self, x, context=None, rope=None, keys=None, bias=None):
        """``bias``: an additive logit bias broadcastable to (B, heads, Lq, Lk) (the trimmed text
        context's pad key, ``WanTransformer3D.text_context``); None: none."""
        keys = keys if keys is not None else (None,) * 4
        context = x if context is None else context
        b, lq, d = x.shape
        lk = context.shape[1]
        hd = d // self.num_heads
        q = self.norm_q(self.to_q(x, keys[0])).reshape(b, lq, self.num_heads, hd)
        k = self.norm_k(self.to_k(context, keys[1])).reshape(b, lk, self.num_heads, hd)
        v = self.to_v(context, keys[2]).reshape(b, lk, self.num_heads, hd)
        if rope is not None:
            cos, sin = rope
            q = apply_rope_interleaved(q, cos, sin)
            k = apply_rope_interleaved(k, cos, sin)
        attend = lambda q, k, v: attention(q, k, v, bias=bias, impl=self.attn_impl, block_sizes=self.attn_block_size)
        if self.seq_parallel != "none" and context is x:
            # self-attention: keys/values stay sharded over `sequence` (a ring, or all-to-all over heads)
            q, k, v = constrain(q, QUERY_HEADS), constrain(k, QUERY_HEADS), constrain(v, QUERY_HEADS)
            o = sequence_parallel_attention(q, k, v, attend, kind=self.seq_parallel)
        else:
            # heads over `tensor`; queries keep their token sharding (`sequence`), keys/values are gathered
            q, k, v = constrain(q, QUERY_HEADS), constrain(k, KV_HEADS), constrain(v, KV_HEADS)
            o = attend(q, k, v)
        o = constrain(o, QUERY_HEADS)
        return self.to_out(o.reshape(b, lq, d), keys[3])


class WanBlock(nnx.Module):
    def __init__(self, cfg: WanConfig, *, dtype, rngs, lora: WanLoRAConfig | None = None):
        d = cfg.dim
        self.eps = cfg.eps
        self.cross_attn_norm = cfg.cross_attn_norm
        self.attn1 = WanAttention(cfg, dtype=dtype, rngs=rngs,
                                  lora=lora if (lora is not None and lora.self_attn) else None)
        self.attn2 = WanAttention(cfg, dtype=dtype, rngs=rngs,
                                  lora=lora if (lora is not None and lora.cross_attn) else None)
        self.norm2 = LayerNorm(d, eps=cfg.eps, dtype=jnp.float32) if cfg.cross_attn_norm else None
        self.ffn_in = _lora(Linear(d, cfg.ffn_dim, axes=("embed", "mlp"), dtype=dtype, rngs=rngs), "ffn_in",
                            lora, rngs, dtype)
        self.ffn_out = _lora(Linear(cfg.ffn_dim, d, axes=("mlp", "embed"), dtype=dtype, rngs=rngs), "ffn_out",
                             lora, rngs, dtype)
        self.scale_shift_table = nnx.Param(
            jax.random.normal(rngs.params(), (1, 6, d), jnp.float32) / d ** 0.5, axes=(None, None, "modulation"))

    def __call__(self, x, context, mod, rope, rng=None, context_bias=None):
        """x (B, L, d) in the compute dtype; mod (B, 6, d) fp32 time projection; ``context_bias``: the
        cross-attention logit bias of a trimmed text context (``WanTransformer3D.text_context``)."""
        keys = [None] * 10 if rng is None else list(jax.random.split(rng, 10))
        e = self.scale_shift_table[...].astype(jnp.float32) + mod
        shift, scale, gate, c_shift, c_scale, c_gate = (e[:, i:i + 1] for i in range(6))
        dtype = x.dtype
        h = (layer_norm(x, self.eps) * (1.0 + scale) + shift).astype(dtype)
        a = self.attn1(h, None, rope, keys[0:4])
        x = (x.astype(jnp.float32) + a.astype(jnp.float32) * gate).astype(dtype)
        h = (self.norm2(x) if self.norm2 is not None else x).astype(dtype)
        x = x + self.attn2(h, context, None, keys[4:8], bias=context_bias).astype(dtype)
        h = (layer_norm(x, self.eps) * (1.0 + c_scale) + c_shift).astype(dtype)
        f = constrain(jax.nn.gelu(self.ffn_in(h, keys[8]), approximate=True), FFN_HIDDEN)
        f = self.ffn_out(f, keys[9])
        return constrain((x.astype(jnp.float32) + f.astype(jnp.float32) * c_gate).astype(dtype), TOKENS)


class WanTransformer3D(nnx.Module):
    """Wan2.1 DiT. ``model(hidden_states[B,C,T,H,W], timestep[B], encoder_hidden_states[B,L,text_dim],
    n_ref=0)`` -> velocity [B, C_out, T - n_ref, H, W] (the first n_ref frames are clean references)."""

    def __init__(self, cfg: WanConfig, *, rngs: nnx.Rngs, lora: WanLoRAConfig | None = None):
        self.cfg = cfg
        dtype = resolve_dtype(cfg.param_dtype)
        d = cfg.dim
        f32 = jnp.float32
        self.patch_embedding = Linear(cfg.patch_features, d, axes=("conv_in", "embed"), dtype=dtype, rngs=rngs)
        # The time MLP and the modulation tables stay fp32 (diffusers' _keep_in_fp32_modules).
        self.time_linear_1 = Linear(cfg.freq_dim, d, axes=("time_embed", "embed"), dtype=f32, rngs=rngs)
        self.time_linear_2 = Linear(d, d, axes=("embed", "time_embed"), dtype=f32, rngs=rngs)
        self.time_proj = Linear(d, 6 * d, axes=("embed", "modulation"), dtype=f32, rngs=rngs)
        self.text_linear_1 = Linear(cfg.text_dim, d, axes=("text_embed", "mlp"), dtype=dtype, rngs=rngs)
        self.text_linear_2 = Linear(d, d, axes=("mlp", "embed"), dtype=dtype, rngs=rngs)
        self.blocks = stack_layers(lambda r: WanBlock(cfg, dtype=dtype, rngs=r, lora=lora), cfg.num_layers, rngs)
        self.proj_out = Linear(d, cfg.out_channels * math.prod(cfg.patch_size), axes=("embed", "patch"),
                               dtype=dtype, rngs=rngs)
        self.scale_shift_table = nnx.Param(
            jax.random.normal(rngs.params(), (1, 2, d), f32) / d ** 0.5, axes=(None, None, "modulation"))
        # LoRA dropout on the cross-attention's keys/values (training): then the padding positions
        # of the text are not identical keys and the text context is not trimmed (``trims_text_context``)
        self.cross_kv_dropout = float(lora.dropout) if (lora is not None and lora.cross_attn and any(
            t in lora.targets for t in ("to_k", "to_v"))) else 0.0

    # -- pieces, public so that callers (e.g. caching the text projection) can reuse them
    def embed_time(self, timestep, batch: int):
        """-> temb (B, d) fp32 and the block modulation (B, 6, d) fp32."""
        t = jnp.broadcast_to(jnp.asarray(timestep, jnp.float32).reshape(-1), (batch,))
        emb = timestep_sinusoid(t, self.cfg.freq_dim)
        temb = self.time_linear_2(jax.nn.silu(self.time_linear_1(emb)))
        mod = self.time_proj(jax.nn.silu(temb)).reshape(batch, 6, self.cfg.dim)
        return temb.astype(jnp.float32), mod.astype(jnp.float32)

    def embed_text(self, encoder_hidden_states):
        dtype = resolve_dtype(self.cfg.dtype)
        h = self.text_linear_1(encoder_hidden_states.astype(dtype))
        return self.text_linear_2(jax.nn.gelu(h, approximate=True)).astype(dtype)

    def text_context(self, encoder_hidden_states, context_pad=None):
        """The cross-attention keys' input: (context (B, L, d), logit bias or None).

        ``context_pad`` None: ``embed_text`` of the L rows. Otherwise ``encoder_hidden_states`` is a
        text context whose all-zero tail of ``context_pad`` rows (a scalar or (B,)) was dropped
        (``trim_text_context``): one zero row is appended, standing for all of them. Every zero row
        gives the same key and value, so attending to n of them is attending to one with its logit
        raised by log n: the bias (B, 1, 1, L + 1) is 0 on the kept rows and log n on the appended
        one (a large negative number when n = 0). The same function as the untrimmed context, at
        the cost of the kept rows (Wan pads every caption to 512 positions)."""
        if context_pad is None:
            return self.embed_text(encoder_hidden_states), None
        b, _, dt = encoder_hidden_states.shape
        ctx = jnp.concatenate([encoder_hidden_states, jnp.zeros((b, 1, dt), encoder_hidden_states.dtype)], axis=1)
        n = jnp.broadcast_to(jnp.asarray(context_pad, jnp.float32).reshape(-1), (b,))
        pad_logit = jnp.where(n > 0, jnp.log(jnp.maximum(n, 1.0)), jnp.float32(-1e30))
        bias = jnp.concatenate([jnp.zeros((b, ctx.shape[1] - 1), jnp.float32), pad_logit[:, None]], axis=1)
        return self.embed_text(ctx), bias[:, None, None, :]

    def trims_text_context(self, training: bool = False) -> bool:
        """Whether a trimmed text context (``text_context``) gives exactly this model's function: with
        the xla / chunked attention (splash takes no bias; cudnn's bias path is not checked here), and
        in training not with LoRA dropout on the cross-attention's keys or values."""
        impl = resolve_attention_impl(self.cfg.attn_impl, resolve_dtype(self.cfg.dtype))
        return impl in ("xla", "chunked") and not (training and self.cross_kv_dropout > 0)

    def __call__(self, hidden_states, timestep, encoder_hidden_states, n_ref: int = 0, *, rng=None,
                 context_pad=None):
        """``context_pad``: the number of all-zero rows trimmed off the end of
        ``encoder_hidden_states`` (``trim_text_context``; see ``text_context``), None: untrimmed."""
        cfg = self.cfg
        dtype = resolve_dtype(cfg.dtype)
        b, _, t, h, w = hidden_states.shape
        pt, ph, pw = cfg.patch_size
        n_ref = int(n_ref)
        if n_ref < 0 or n_ref % pt or n_ref >= t:
            raise ValueError(f"n_ref={n_ref} must be a multiple of the temporal patch {pt} and < frames {t}")
        grid = (t // pt, h // ph, w // pw)
        x = self.patch_embedding(patchify(hidden_states, cfg.patch_size).astype(dtype)).astype(dtype)
        x = constrain(x, TOKENS)

        ang = rope_angles(cfg, *grid)
        rope = (jnp.asarray(np.cos(ang), jnp.float32), jnp.asarray(np.sin(ang), jnp.float32))
        temb, mod = self.embed_time(timestep, b)
        context, context_bias = self.text_context(encoder_hidden_states, context_pad)
        context = constrain(context, TEXT)

        layer_keys = None if rng is None else jax.random.split(rng, cfg.num_layers)

        def body(layer, carry, key):
            return layer(carry, context, mod, rope, key, context_bias), None

        if cfg.unrolled:
            x = loop_layers(self.blocks, body, x, layer_keys, remat=cfg.remat)
        else:
            x, _ = scan_layers(self.blocks, body, x, layer_keys, remat=cfg.remat)

        if n_ref:
            x = x[:, (n_ref // pt) * grid[1] * grid[2]:]
            grid = (grid[0] - n_ref // pt, grid[1], grid[2])
        e = self.scale_shift_table[...].astype(jnp.float32) + temb[:, None]
        shift, scale = e[:, 0:1], e[:, 1:2]
        x = (layer_norm(x, cfg.eps) * (1.0 + scale) + shift).astype(dtype)
        x = self.proj_out(x)
        return unpatchify(x, grid, cfg.patch_size, cfg.out_channels)


TEXT_TRIM_MULTIPLE = 16   # a trimmed text context keeps a multiple of this many rows (few compiled shapes)


def _nonzero_positions(context) -> np.ndarray:
    """(L,) bool on the host: whether position l of the (B, L, d) ``context`` is nonzero in any row
    (reduced where the array lives; a replicated result when it spans processes)."""
    if isinstance(context, np.ndarray):
        return np.any(context != 0, axis=(0, 2))
    if not context.is_fully_addressable:
        from jax.sharding import NamedSharding, PartitionSpec
        rep = NamedSharding(context.sharding.mesh, PartitionSpec())
        nz = jax.jit(lambda c: jnp.any(c != 0, axis=(0, 2)), out_shardings=rep)(context)
        return np.asarray(nz.addressable_data(0))
    return np.asarray(jnp.any(context != 0, axis=(0, 2)))


def trim_text_context(*contexts, multiple: int = TEXT_TRIM_MULTIPLE, host=None):
    """Drops the tail of positions that is zero in every row of every context (B_i, L, d) (Wan's text
    encoder zeroes each caption's padding to 512 positions), keeping a multiple of ``multiple`` rows.
    Returns (the contexts, pad): pad = the number of rows dropped, to pass to the DiT as
    ``context_pad`` (``WanTransformer3D.text_context``: the same outputs); (the contexts unchanged,
    None) when nothing can be dropped, when the contexts differ in length, or under a trace (the
    kept length must be known on the host). None entries pass through. ``host`` (optional): for each
    context, a host (numpy) copy of its values or None; the decision reads a given copy instead of the
    device array (no transfer, and no wait for the computations queued before it)."""
    given = [c for c in contexts if c is not None]
    if not given or any(isinstance(c, jax.core.Tracer) for c in given):
        return contexts, None
    length = given[0].shape[1]
    if any(c.ndim != 3 or c.shape[1] != length for c in given):
        return contexts, None
    copies = list(host) if host is not None else [None] * len(contexts)
    if len(copies) != len(contexts):
        raise ValueError(f"trim_text_context: {len(copies)} host copies for {len(contexts)} contexts")
    nz = np.zeros(length, bool)
    for c, h in zip(contexts, copies):
        if c is None:
            continue
        if h is not None and tuple(np.shape(h)) != tuple(c.shape):
            raise ValueError(f"trim_text_context: host copy of shape {np.shape(h)} for a context of shape {c.shape}")
        nz |= _nonzero_positions(np.asarray(h) if h is not None else c)
    used = int(np.nonzero(nz)[0][-1]) + 1 if nz.any() else 0
    keep = max(multiple, -(-used // multiple) * multiple)
    if keep >= length:
        return contexts, None
    return tuple(None if c is None else c[:, :keep] for c in contexts), length - keep
