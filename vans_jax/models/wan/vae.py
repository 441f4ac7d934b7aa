"""Wan2.1 video VAE (diffusers ``AutoencoderKLWan``) in Flax NNX.

Layout: activations are channels-last, (B, T, H, W, C); causal conv kernels are (kT, kH, kW, in, out),
2D conv kernels (kH, kW, in, out), the attention block's 1x1 convs are ``Linear`` (in, out). The
public ``encode`` / ``decode`` take and return diffusers' (B, C, T, H, W) unless ``channels_last``.

Causality and chunking follow diffusers exactly:

* every causal conv with temporal kernel 3 pads 2 frames in front; across chunks it keeps a
  2-frame feature cache (the last two frames of its padded input), zeros before the first chunk;
* the encoder sees frame 0 alone, then chunks of 4 frames; a temporal downsample (stride-2 time
  conv) passes the first chunk through untouched and afterwards convolves [last frame of the
  previous chunk, this chunk];
* the decoder sees one latent frame at a time; a temporal upsample skips its time conv for the
  first latent frame (so it yields 1 frame), afterwards its time conv doubles the frames, with a
  cache that starts from zeros (the first chunk is not in it) -- diffusers' ``"Rep"`` marker.

The first chunk runs outside a ``jax.lax.scan`` that carries the feature cache over the remaining
chunks, so activation memory is bounded by one chunk whatever the number of frames.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from ..layers import Linear, attention, resolve_dtype

CACHE_T = 2  # frames kept per causal conv between chunks
ENCODE_CHUNK = 4  # frames per encoder chunk after the first frame

WAN21_LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                      0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN21_LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                     3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)


@dataclasses.dataclass(frozen=True)
class WanVAEConfig:
    """``AutoencoderKLWan`` hyper-parameters; the defaults are the Wan2.1 VAE."""
    base_dim: int = 96
    decoder_base_dim: int | None = None
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    dropout: float = 0.0
    latents_mean: tuple[float, ...] = WAN21_LATENTS_MEAN
    latents_std: tuple[float, ...] = WAN21_LATENTS_STD
    in_channels: int = 3
    out_channels: int = 3
    # runtime
    dtype: str = "float32"          # activations / convs (norms are computed in fp32)
    param_dtype: str = "float32"
    attn_impl: str = "xla"          # layers.attention impl for the per-frame mid attention
    # ``unroll`` of the chunk scans. 1 keeps one scan step in the program (compile time and activation
    # memory flat in the number of chunks); True unrolls them, which training on CPU needs: XLA:CPU
    # runs the scan's backward pass ~10x slower than the same body unrolled.
    scan_unroll: int | bool = 1

    def __post_init__(self):
        for name in ("dim_mult", "attn_scales", "latents_mean", "latents_std"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "temperal_downsample", tuple(bool(t) for t in self.temperal_downsample))
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(f"temperal_downsample has {len(self.temperal_downsample)} entries; "
                             f"dim_mult {self.dim_mult} needs {len(self.dim_mult) - 1}")
        if self.attn_scales:
            # diffusers' and the original Wan encoder crash on these blocks (they pass the feature cache
            # to an attention block that takes none); no released checkpoint uses them.
            raise ValueError(f"attn_scales {self.attn_scales} are not supported (only the mid-block attention)")
        if sum(self.temperal_downsample) > 2:
            raise ValueError("at most 2 temporal downsamples are supported (chunks of 4 frames)")
        if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
            raise ValueError(f"latents_mean/latents_std have {len(self.latents_mean)}/{len(self.latents_std)} "
                             f"entries; z_dim is {self.z_dim}")

    @property
    def temporal_compression(self) -> int:
        return 2 ** sum(self.temperal_downsample)

    @property
    def spatial_compression(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

    @classmethod
    def from_diffusers_config(cls, cfg: Mapping[str, Any] | str, **overrides) -> "WanVAEConfig":
        """From an ``AutoencoderKLWan`` config (dict, config.json path or its directory)."""
        if isinstance(cfg, (str, os.PathLike)):
            path = os.path.join(cfg, "config.json") if os.path.isdir(cfg) else os.fspath(cfg)
            with open(path) as f:
                cfg = json.load(f)
        cfg = dict(cfg)
        if cfg.get("is_residual", False):
            raise ValueError("is_residual=True (the Wan2.2 VAE) is not supported")
        if cfg.get("patch_size") not in (None, 1):
            raise ValueError(f"patch_size {cfg.get('patch_size')!r} (the Wan2.2 VAE) is not supported")
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in cfg.items() if k in names}
        kw.update(overrides)
        out = cls(**kw)
        for key, want in (("scale_factor_temporal", out.temporal_compression),
                          ("scale_factor_spatial", out.spatial_compression)):
            if cfg.get(key) is not None and int(cfg[key]) != want:
                raise ValueError(f"config {key}={cfg[key]} disagrees with the architecture ({want})")
        return out

    def to_diffusers_config(self) -> dict:
        return {"_class_name": "AutoencoderKLWan", "base_dim": self.base_dim,
                "decoder_base_dim": self.decoder_base_dim, "z_dim": self.z_dim, "dim_mult": list(self.dim_mult),
                "num_res_blocks": self.num_res_blocks, "attn_scales": list(self.attn_scales),
                "temperal_downsample": list(self.temperal_downsample), "dropout": self.dropout,
                "latents_mean": list(self.latents_mean), "latents_std": list(self.latents_std),
                "is_residual": False, "in_channels": self.in_channels, "out_channels": self.out_channels,
                "patch_size": None, "scale_factor_temporal": self.temporal_compression,
                "scale_factor_spatial": self.spatial_compression}


class DiagonalGaussian(NamedTuple):
    """The encoder's posterior (logvar clamped to [-30, 20] as diffusers)."""
    mean: jax.Array
    logvar: jax.Array

    @property
    def std(self):
        return jnp.exp(0.5 * self.logvar)

    def mode(self):
        return self.mean

    def sample(self, key):
        return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)


# ----------------------------------------------------------------------------- layers

_CONV2D_DN = ("NHWC", "HWIO", "NHWC")


def _uniform(key, shape, fan_in, dtype):
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)


class CausalConv3d(nnx.Module):
    """3D conv, causal in time: ``2 * pad_t`` frames in front (zeros, or the feature cache), spatial
    padding symmetric. kernel (kT, kH, kW, in, out)."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0, *, dtype, rngs: nnx.Rngs):
        k = tuple(kernel) if isinstance(kernel, (tuple, list)) else (kernel,) * 3
        s = tuple(stride) if isinstance(stride, (tuple, list)) else (stride,) * 3
        p = tuple(padding) if isinstance(padding, (tuple, list)) else (padding,) * 3
        fan_in = cin * math.prod(k)
        self.kernel = nnx.Param(_uniform(rngs.params(), k + (cin, cout), fan_in, dtype),
                                axes=(None, None, None, "conv_in", "conv_out"))
        self.bias = nnx.Param(_uniform(rngs.params(), (cout,), fan_in, dtype), axes=("conv_out",))
        self.stride = s
        self.front = 2 * p[0]          # causal time padding
        self.spatial_pad = (p[1], p[2])

    def conv(self, x, kernel=None):
        """The convolution on an already time-padded input (no time padding added); ``kernel``: these
        time taps instead of the whole kernel (kT', kH, kW, in, out).

        Computed as ONE per-frame 2D conv whose input channels are the ``kT`` time taps stacked
        (kernel (kH, kW, kT * in, out)): the same sum as a 3D conv, but XLA's CPU backend runs 3D
        convolutions (and their gradients) about 5x slower than 2D ones."""
        kernel = self.kernel[...] if kernel is None else kernel
        kt, kh, kw, cin, cout = kernel.shape
        st, sh, sw = self.stride
        b, t = x.shape[:2]
        t_out = (t - kt) // st + 1
        if t_out < 1:
            raise ValueError(f"causal conv with time kernel {kt} got {t} frames")
        taps = [x[:, i:i + st * (t_out - 1) + 1:st] for i in range(kt)]
        xs = taps[0] if kt == 1 else jnp.concatenate(taps, axis=-1)             # (B, T_out, H, W, kT * in)
        xs = xs.reshape((b * t_out,) + xs.shape[2:])
        k = kernel.astype(x.dtype).transpose(1, 2, 0, 3, 4).reshape(kh, kw, kt * cin, cout)
        ph, pw = self.spatial_pad
        y = jax.lax.conv_general_dilated(xs, k, (sh, sw), [(ph, ph), (pw, pw)], dimension_numbers=_CONV2D_DN)
        y = y.reshape((b, t_out) + y.shape[1:])
        return y + self.bias[...].astype(x.dtype)

    def __call__(self, x, cache=None):
        """-> (y, new cache). cache: the previous chunk's last ``front`` padded-input frames, None = zeros
        (first chunk). Convs without time padding keep no cache (new cache None)."""
        if self.front == 0:
            return self.conv(x), None
        if cache is None:
            cache = jnp.zeros((x.shape[0], self.front) + x.shape[2:], x.dtype)
            if x.shape[1] == 1 and self.stride[0] == 1 and self.kernel.shape[0] == self.front + 1:
                # one frame after the zero padding: only the kernel's last time tap sees non-zero input, so
                # the conv is that tap's 2D conv (the same sum, a third of the work: the first frame of
                # every clip, and every step of the VAE's single-frame training)
                return self.conv(x, self.kernel[...][-1:]), jnp.concatenate([cache, x], axis=1)[:, -self.front:]
        xp = jnp.concatenate([cache.astype(x.dtype), x], axis=1)
        return self.conv(xp), xp[:, -self.front:]


class Conv2d(nnx.Module):
    """Per-frame 2D conv, kernel (kH, kW, in, out); padding as ((top, bottom), (left, right))."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, padding, *, dtype, rngs: nnx.Rngs):
        fan_in = cin * kernel * kernel
        self.kernel = nnx.Param(_uniform(rngs.params(), (kernel, kernel, cin, cout), fan_in, dtype),
                                axes=(None, None, "conv_in", "conv_out"))
        self.bias = nnx.Param(_uniform(rngs.params(), (cout,), fan_in, dtype), axes=("conv_out",))
        self.stride = (stride, stride)
        self.padding = tuple(tuple(p) for p in padding)

    def __call__(self, x):
        b, t = x.shape[:2]
        h = x.reshape((b * t,) + x.shape[2:])
        h = jax.lax.conv_general_dilated(h, self.kernel[...].astype(x.dtype), self.stride, self.padding,
                                         dimension_numbers=_CONV2D_DN)
        h = h + self.bias[...].astype(x.dtype)
        return h.reshape((b, t) + h.shape[1:])


class WanRMSNorm(nnx.Module):
    """diffusers ``WanRMS_norm``: F.normalize over channels * sqrt(C) * gamma (statistic in fp32)."""

    def __init__(self, dim: int, *, dtype):
        self.scale = dim ** 0.5
        self.weight = nnx.Param(jnp.ones((dim,), dtype), axes=("norm",))

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        # F.normalize: x / max(||x||, 1e-12)
        inv = jax.lax.rsqrt(jnp.maximum(jnp.sum(xf * xf, axis=-1, keepdims=True), 1e-24))
        y = (xf * inv).astype(x.dtype)
        return y * jnp.asarray(self.scale, x.dtype) * self.weight[...].astype(x.dtype)


class ResidualBlock(nnx.Module):
    def __init__(self, cin: int, cout: int, *, dtype, rngs: nnx.Rngs):
        self.norm1 = WanRMSNorm(cin, dtype=dtype)
        self.conv1 = CausalConv3d(cin, cout, 3, padding=1, dtype=dtype, rngs=rngs)
        self.norm2 = WanRMSNorm(cout, dtype=dtype)
        self.conv2 = CausalConv3d(cout, cout, 3, padding=1, dtype=dtype, rngs=rngs)
        self.conv_shortcut = CausalConv3d(cin, cout, 1, dtype=dtype, rngs=rngs) if cin != cout else None

    def __call__(self, x, cache=None):
        h = x if self.conv_shortcut is None else self.conv_shortcut(x)[0]
        x, c1 = self.conv1(jax.nn.silu(self.norm1(x)), None if cache is None else cache[0])
        x, c2 = self.conv2(jax.nn.silu(self.norm2(x)), None if cache is None else cache[1])  # dropout: eval
        return x + h, (c1, c2)


class AttentionBlock(nnx.Module):
    """Single-head self-attention over the pixels of each frame (no cache)."""

    def __init__(self, dim: int, *, dtype, attn_impl: str = "xla", rngs: nnx.Rngs):
        self.norm = WanRMSNorm(dim, dtype=dtype)
        self.to_qkv = Linear(dim, 3 * dim, axes=("conv_in", "conv_out"), dtype=dtype, rngs=rngs)
        self.proj = Linear(dim, dim, axes=("conv_in", "conv_out"), dtype=dtype, rngs=rngs)
        self.attn_impl = attn_impl

    def __call__(self, x, cache=None):
        b, t, h, w, c = x.shape
        y = self.norm(x).reshape(b * t, h * w, c)
        q, k, v = jnp.split(self.to_qkv(y).astype(x.dtype), 3, axis=-1)
        y = attention(q[:, :, None], k[:, :, None], v[:, :, None], scale=c ** -0.5, impl=self.attn_impl)
        y = self.proj(y[:, :, 0]).astype(x.dtype)
        return x + y.reshape(b, t, h, w, c), None


class Resample(nnx.Module):
    """Spatial 2x down/up sampling, with a temporal 2x stage for the ``*3d`` modes."""

    MODES = ("downsample2d", "downsample3d", "upsample2d", "upsample3d")

    def __init__(self, dim: int, mode: str, *, dtype, rngs: nnx.Rngs):
        if mode not in self.MODES:
            raise ValueError(f"unknown resample mode {mode!r}")
        self.mode = mode
        if mode.startswith("down"):
            # ZeroPad2d((0, 1, 0, 1)) then a stride-2 3x3 conv
            self.resample = Conv2d(dim, dim, 3, 2, ((0, 1), (0, 1)), dtype=dtype, rngs=rngs)
            self.time_conv = (CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1), dtype=dtype, rngs=rngs)
                              if mode == "downsample3d" else None)
        else:
            self.resample = Conv2d(dim, dim // 2, 3, 1, ((1, 1), (1, 1)), dtype=dtype, rngs=rngs)
            self.time_conv = (CausalConv3d(dim, 2 * dim, (3, 1, 1), padding=(1, 0, 0), dtype=dtype, rngs=rngs)
                              if mode == "upsample3d" else None)

    def __call__(self, x, cache=None):
        new_cache = None
        if self.mode == "upsample3d":
            if cache is None:  # first chunk: no time conv; the cache starts from zeros afterwards
                new_cache = jnp.zeros((x.shape[0], CACHE_T) + x.shape[2:], x.dtype)
            else:
                y, new_cache = self.time_conv(x, cache)
                b, t, h, w, c2 = y.shape
                c = c2 // 2
                # channels [:c] -> frame 2i, [c:] -> frame 2i+1
                x = y.reshape(b, t, h, w, 2, c).transpose(0, 1, 4, 2, 3, 5).reshape(b, 2 * t, h, w, c)
        if self.mode.startswith("up"):
            # nearest(-exact) 2x, computed in fp32 as diffusers
            x = jnp.repeat(jnp.repeat(x.astype(jnp.float32), 2, axis=2), 2, axis=3).astype(x.dtype)
        x = self.resample(x)
        if self.mode == "downsample3d":
            if cache is None:  # first chunk passes through; remember its last frame
                new_cache = x[:, -1:]
            else:
                last = x[:, -1:]
                x = self.time_conv.conv(jnp.concatenate([cache.astype(x.dtype), x], axis=1))
                new_cache = last
        return x, new_cache


def _get(cache, i):
    return None if cache is None else cache[i]


class MidBlock(nnx.Module):
    def __init__(self, dim: int, *, dtype, attn_impl: str, rngs: nnx.Rngs):
        self.resnets = nnx.List([ResidualBlock(dim, dim, dtype=dtype, rngs=rngs),
                                 ResidualBlock(dim, dim, dtype=dtype, rngs=rngs)])
        self.attentions = nnx.List([AttentionBlock(dim, dtype=dtype, attn_impl=attn_impl, rngs=rngs)])

    def __call__(self, x, cache=None):
        x, c0 = self.resnets[0](x, _get(cache, 0))
        x, _ = self.attentions[0](x)
        x, c1 = self.resnets[1](x, _get(cache, 1))
        return x, (c0, c1)


class Encoder(nnx.Module):
    def __init__(self, cfg: WanVAEConfig, *, dtype, rngs: nnx.Rngs):
        dim = cfg.base_dim
        dims = [dim * u for u in (1,) + cfg.dim_mult]
        self.conv_in = CausalConv3d(cfg.in_channels, dims[0], 3, padding=1, dtype=dtype, rngs=rngs)
        blocks = []
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResidualBlock(cin, cout, dtype=dtype, rngs=rngs))
                cin = cout
            if i != len(cfg.dim_mult) - 1:
                mode = "downsample3d" if cfg.temperal_downsample[i] else "downsample2d"
                blocks.append(Resample(cout, mode, dtype=dtype, rngs=rngs))
        self.down_blocks = nnx.List(blocks)
        self.mid_block = MidBlock(dims[-1], dtype=dtype, attn_impl=cfg.attn_impl, rngs=rngs)
        self.norm_out = WanRMSNorm(dims[-1], dtype=dtype)
        self.conv_out = CausalConv3d(dims[-1], 2 * cfg.z_dim, 3, padding=1, dtype=dtype, rngs=rngs)

    def __call__(self, x, cache=None):
        """One chunk -> (latent moments chunk, new cache); cache None = first chunk."""
        x, c_in = self.conv_in(x, _get(cache, 0))
        down = []
        for j, layer in enumerate(self.down_blocks):
            x, c = layer(x, None if cache is None else cache[1][j])
            down.append(c)
        x, c_mid = self.mid_block(x, _get(cache, 2))
        x, c_out = self.conv_out(jax.nn.silu(self.norm_out(x)), _get(cache, 3))
        return x, (c_in, tuple(down), c_mid, c_out)


class UpBlock(nnx.Module):
    def __init__(self, cin: int, cout: int, num_res_blocks: int, mode: str | None, *, dtype, rngs: nnx.Rngs):
        res = []
        for _ in range(num_res_blocks + 1):
            res.append(ResidualBlock(cin, cout, dtype=dtype, rngs=rngs))
            cin = cout
        self.resnets = nnx.List(res)
        self.upsamplers = nnx.List([Resample(cout, mode, dtype=dtype, rngs=rngs)]) if mode else None

    def __call__(self, x, cache=None):
        cs = []
        for j, r in enumerate(self.resnets):
            x, c = r(x, None if cache is None else cache[0][j])
            cs.append(c)
        cu = None
        if self.upsamplers is not None:
            x, cu = self.upsamplers[0](x, _get(cache, 1))
        return x, (tuple(cs), cu)


class Decoder(nnx.Module):
    def __init__(self, cfg: WanVAEConfig, *, dtype, rngs: nnx.Rngs):
        dim = cfg.decoder_base_dim or cfg.base_dim
        mult = cfg.dim_mult
        dims = [dim * u for u in (mult[-1],) + mult[::-1]]
        temporal_up = cfg.temperal_downsample[::-1]
        self.conv_in = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1, dtype=dtype, rngs=rngs)
        self.mid_block = MidBlock(dims[0], dtype=dtype, attn_impl=cfg.attn_impl, rngs=rngs)
        blocks = []
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                cin = cin // 2  # the previous upsample's conv halves the channels
            mode = None
            if i != len(mult) - 1:
                mode = "upsample3d" if temporal_up[i] else "upsample2d"
            blocks.append(UpBlock(cin, cout, cfg.num_res_blocks, mode, dtype=dtype, rngs=rngs))
        self.up_blocks = nnx.List(blocks)
        self.norm_out = WanRMSNorm(dims[-1], dtype=dtype)
        self.conv_out = CausalConv3d(dims[-1], cfg.out_channels, 3, padding=1, dtype=dtype, rngs=rngs)

    def __call__(self, x, cache=None):
        """One latent frame -> (video chunk, new cache); cache None = first latent frame."""
        x, c_in = self.conv_in(x, _get(cache, 0))
        x, c_mid = self.mid_block(x, _get(cache, 1))
        ups = []
        for j, blk in enumerate(self.up_blocks):
            x, c = blk(x, None if cache is None else cache[2][j])
            ups.append(c)
        x, c_out = self.conv_out(jax.nn.silu(self.norm_out(x)), _get(cache, 3))
        return x, (c_in, c_mid, tuple(ups), c_out)


def _run_chunks(module: nnx.Module, first, rest, unroll: int | bool = 1):
    """``module(first)`` then a scan of ``module`` over ``rest`` (chunks on axis 0) with the cache as the
    carry (``unroll``: as ``jax.lax.scan``). Returns the outputs concatenated on the time axis (axis 1)."""
    y0, cache = module(first, None)
    if rest is None or rest.shape[0] == 0:
        return y0
    graphdef, state = nnx.split(module)

    def step(c, chunk):
        y, c = nnx.merge(graphdef, state)(chunk, c)
        return c, y

    _, ys = jax.lax.scan(step, cache, rest, unroll=unroll)
    n, b, t = ys.shape[:3]
    ys = jnp.moveaxis(ys, 0, 1).reshape((b, n * t) + ys.shape[3:])
    return jnp.concatenate([y0, ys], axis=1)


class WanVAE(nnx.Module):
    """Wan2.1 VAE: ``encode`` (video in [-1, 1] -> posterior) and ``decode`` (latents -> video)."""

    def __init__(self, cfg: WanVAEConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        pdt = resolve_dtype(cfg.param_dtype)
        self.encoder = Encoder(cfg, dtype=pdt, rngs=rngs)
        self.quant_conv = CausalConv3d(2 * cfg.z_dim, 2 * cfg.z_dim, 1, dtype=pdt, rngs=rngs)
        self.post_quant_conv = CausalConv3d(cfg.z_dim, cfg.z_dim, 1, dtype=pdt, rngs=rngs)
        self.decoder = Decoder(cfg, dtype=pdt, rngs=rngs)

    # -------------------------------------------------------------------- checks

    def check_video_shape(self, shape: Sequence[int], channels_last: bool = False):
        if len(shape) != 5:
            raise ValueError(f"video must be 5-D ({'B, F, H, W, C' if channels_last else 'B, C, F, H, W'}), "
                             f"got shape {tuple(shape)}")
        b, f, h, w, c = shape if channels_last else (shape[0], shape[2], shape[3], shape[4], shape[1])
        if c != self.cfg.in_channels:
            raise ValueError(f"video has {c} channels, the VAE expects {self.cfg.in_channels}")
        if f < 1 or (f - 1) % ENCODE_CHUNK:
            raise ValueError(f"the Wan VAE needs 4k+1 frames (1, 5, 9, ...); got {f} frames")
        s = self.cfg.spatial_compression
        if h % s or w % s:
            raise ValueError(f"video height and width must be divisible by {s}; got {h}x{w}")

    def num_latent_frames(self, num_frames: int) -> int:
        return 1 + (num_frames - 1) // self.cfg.temporal_compression

    def num_frames(self, num_latent_frames: int) -> int:
        return 1 + (num_latent_frames - 1) * self.cfg.temporal_compression

    # -------------------------------------------------------------------- API

    def encode(self, video, *, channels_last: bool = False) -> DiagonalGaussian:
        """video (B, C, F, H, W) in [-1, 1], F = 4k+1 -> posterior with mean/logvar (B, z, 1+k, H/8, W/8)
        (channels_last: (B, F, H, W, C) -> (B, T, h, w, z))."""
        self.check_video_shape(video.shape, channels_last)
        x = jnp.asarray(video).astype(resolve_dtype(self.cfg.dtype))
        if not channels_last:
            x = x.transpose(0, 2, 3, 4, 1)
        b, f = x.shape[:2]
        rest = None
        if f > 1:
            rest = x[:, 1:].reshape((b, (f - 1) // ENCODE_CHUNK, ENCODE_CHUNK) + x.shape[2:])
            rest = jnp.moveaxis(rest, 1, 0)
        h = _run_chunks(self.encoder, x[:, :1], rest, self.cfg.scan_unroll)
        h, _ = self.quant_conv(h)
        mean, logvar = jnp.split(h, 2, axis=-1)
        logvar = jnp.clip(logvar, -30.0, 20.0)
        if not channels_last:
            mean, logvar = mean.transpose(0, 4, 1, 2, 3), logvar.transpose(0, 4, 1, 2, 3)
        return DiagonalGaussian(mean, logvar)

    def decode(self, latents, *, channels_last: bool = False, clamp: bool = True):
        """latents (B, z, T, h, w) (unnormalized, i.e. the posterior's scale) -> video (B, C, 1+4(T-1), 8h, 8w)
        clamped to [-1, 1] (channels_last: (B, T, h, w, z) -> (B, F, H, W, C)). ``clamp=False`` returns the
        raw decoder output, for training: the clamp has zero gradient wherever the output is out of range."""
        if latents.ndim != 5:
            raise ValueError(f"latents must be 5-D, got shape {tuple(latents.shape)}")
        z = jnp.asarray(latents).astype(resolve_dtype(self.cfg.dtype))
        if not channels_last:
            z = z.transpose(0, 2, 3, 4, 1)
        if z.shape[-1] != self.cfg.z_dim:
            raise ValueError(f"latents have {z.shape[-1]} channels, the VAE expects z_dim={self.cfg.z_dim}")
        z, _ = self.post_quant_conv(z)
        rest = jnp.moveaxis(z[:, 1:, None], 1, 0) if z.shape[1] > 1 else None  # (T-1, B, 1, h, w, z)
        out = _run_chunks(self.decoder, z[:, :1], rest, self.cfg.scan_unroll)
        if clamp:
            out = jnp.clip(out, -1.0, 1.0)
        return out if channels_last else out.transpose(0, 4, 1, 2, 3)

    # -------------------------------------------------------------------- latent scaling

    def _stats(self, x, channels_last):
        mean = jnp.asarray(self.cfg.latents_mean, jnp.float32)
        std = jnp.asarray(self.cfg.latents_std, jnp.float32)
        shape = (-1,) if channels_last else (-1, 1, 1, 1)
        if x.shape[-1 if channels_last else 1] != mean.shape[0]:
            raise ValueError(f"latents have {x.shape[-1 if channels_last else 1]} channels, "
                             f"latents_mean has {mean.shape[0]}")
        return mean.reshape(shape), std.reshape(shape)

    def normalize_latents(self, mu, *, channels_last: bool = False):
        """(mu - latents_mean) / latents_std per channel (the DiT's latent space)."""
        mean, std = self._stats(mu, channels_last)
        return ((mu.astype(jnp.float32) - mean) / std).astype(mu.dtype)

    def denormalize_latents(self, z, *, channels_last: bool = False):
        """Inverse of ``normalize_latents``: z * latents_std + latents_mean."""
        mean, std = self._stats(z, channels_last)
        return (z.astype(jnp.float32) * std + mean).astype(z.dtype)
