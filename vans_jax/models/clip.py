"""CLIP (ViT image tower + causal text tower + projections) in Flax NNX, for the VANS rewards
and evaluation metrics (CLIP-V, CLIP-T / CLIPScore).

Numerically follows ``transformers.CLIPModel``:

* vision: conv patch embedding (no bias; done here as patchify + matmul), a class token,
  learned absolute positions, ``pre_layrnorm``, pre-LN encoder layers, ``post_layernorm`` on the
  class token, ``visual_projection`` (no bias);
* text: token + position embeddings, causal pre-LN encoder (plus key padding from
  ``attention_mask``), ``final_layer_norm``, pooled at the end-of-text token, ``text_projection``;
* pooling position: configs written before transformers PR #24773 carry ``eos_token_id == 2``
  (the OpenAI checkpoints); for them the pooled position is ``argmax(input_ids)`` (the EOT token
  has the largest id in the original vocabulary). Any other ``eos_token_id`` pools at the first
  position holding that id (a list of ids: the first position holding any of them);
* LayerNorm statistics in fp32; attention softmax in fp32 (``layers.attention``).

Encoder layers are stacked on a leading axis and applied with ``jax.lax.scan``.
Checkpoint I/O (the Hugging Face key tables, ``from_pretrained``, ``export_state_dict``) lives in
``vans_jax.convert.clip``.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vans_jax.models.layers import Embed, LayerNorm, Linear, attention, resolve_dtype, scan_layers, stack_layers

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# --------------------------------------------------------------------------------------------
# config


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    pad_token_id: int | None = 1
    bos_token_id: int | None = 49406
    eos_token_id: int | tuple[int, ...] | None = 49407

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def _square(v, name):
    if isinstance(v, (list, tuple)):
        if len(v) != 2 or v[0] != v[1]:
            raise ValueError(f"only square {name} is supported, got {v}")
        return int(v[0])
    return int(v)


def _sub(cls, d: dict | None):
    fields = {f.name for f in dataclasses.fields(cls)}
    token_fields = ("pad_token_id", "bos_token_id", "eos_token_id")
    kw = {k: v for k, v in dict(d or {}).items() if k in fields and (v is not None or k in token_fields)}
    if "image_size" in kw:
        kw["image_size"] = _square(kw["image_size"], "image_size")
    if "patch_size" in kw:
        kw["patch_size"] = _square(kw["patch_size"], "patch_size")
    if isinstance(kw.get("eos_token_id"), list):
        kw["eos_token_id"] = tuple(kw["eos_token_id"])
    return cls(**kw)


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    text: CLIPTextConfig = dataclasses.field(default_factory=CLIPTextConfig)
    vision: CLIPVisionConfig = dataclasses.field(default_factory=CLIPVisionConfig)
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592
    attn_impl: str = "xla"  # passed to layers.attention ("xla", "cudnn", "auto")

    @classmethod
    def from_dict(cls, d: dict, **overrides) -> "CLIPConfig":
        """From a Hugging Face ``CLIPConfig`` dict (``config.json``). Missing fields take the
        transformers defaults (= ViT-B/32); ``text_config_dict``/``vision_config_dict`` (old
        configs) override ``text_config``/``vision_config`` as in transformers."""
        mt = d.get("model_type", "clip")
        if mt not in ("clip", None):
            raise ValueError(f"expected a CLIP config (model_type 'clip'), got model_type {mt!r}")
        text = dict(d.get("text_config") or {})
        text.update(d.get("text_config_dict") or {})
        vision = dict(d.get("vision_config") or {})
        vision.update(d.get("vision_config_dict") or {})
        kw = {"text": _sub(CLIPTextConfig, text), "vision": _sub(CLIPVisionConfig, vision)}
        for k in ("projection_dim", "logit_scale_init_value"):
            if d.get(k) is not None:
                kw[k] = d[k]
        kw.update(overrides)
        cfg = cls(**kw)
        for name, sub in (("text", cfg.text), ("vision", cfg.vision)):
            if sub.hidden_size % sub.num_attention_heads:
                raise ValueError(f"{name}: hidden_size {sub.hidden_size} is not a multiple of "
                                 f"num_attention_heads {sub.num_attention_heads}")
        if cfg.vision.image_size % cfg.vision.patch_size:
            raise ValueError(f"image_size {cfg.vision.image_size} is not a multiple of patch_size "
                             f"{cfg.vision.patch_size}")
        return cfg

    @classmethod
    def from_pretrained(cls, local_dir: str, **overrides) -> "CLIPConfig":
        path = os.path.join(local_dir, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no config.json in {local_dir}")
        with open(path) as f:
            return cls.from_dict(json.load(f), **overrides)


# --------------------------------------------------------------------------------------------
# modules


def activation(name: str):
    if name == "quick_gelu":
        return lambda x: x * jax.nn.sigmoid(1.702 * x)
    if name == "gelu":
        return lambda x: jax.nn.gelu(x, approximate=False)
    if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return lambda x: jax.nn.gelu(x, approximate=True)
    if name == "relu":
        return jax.nn.relu
    raise ValueError(f"unsupported hidden_act {name!r}")


class CLIPAttention(nnx.Module):
    def __init__(self, dim: int, heads: int, *, embed_axis: str, heads_axis: str, dtype, rngs: nnx.Rngs,
                 attn_impl: str = "xla"):
        self.heads, self.head_dim, self.attn_impl = heads, dim // heads, attn_impl
        mk = lambda axes: Linear(dim, dim, use_bias=True, axes=axes, dtype=dtype, rngs=rngs)
        self.q_proj = mk((embed_axis, heads_axis))
        self.k_proj = mk((embed_axis, heads_axis))
        self.v_proj = mk((embed_axis, heads_axis))
        self.out_proj = mk((heads_axis, embed_axis))

    def __call__(self, x, mask=None):
        b, n, _ = x.shape
        split = lambda t: t.reshape(b, n, self.heads, self.head_dim)
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        o = attention(q, k, v, mask=mask, scale=self.head_dim ** -0.5, impl=self.attn_impl)
        return self.out_proj(o.reshape(b, n, self.heads * self.head_dim))


class CLIPMLP(nnx.Module):
    def __init__(self, dim: int, hidden: int, act: str, *, embed_axis: str, mlp_axis: str, dtype, rngs):
        self.act_name = act
        self.fc1 = Linear(dim, hidden, axes=(embed_axis, mlp_axis), dtype=dtype, rngs=rngs)
        self.fc2 = Linear(hidden, dim, axes=(mlp_axis, embed_axis), dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.fc2(activation(self.act_name)(self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig | CLIPVisionConfig, *, prefix: str, dtype, rngs: nnx.Rngs,
                 attn_impl: str = "xla"):
        embed_axis = f"{prefix}embed"
        heads_axis = f"{prefix}heads"
        mlp_axis = f"{prefix}mlp"
        self.layer_norm1 = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype)
        self.self_attn = CLIPAttention(cfg.hidden_size, cfg.num_attention_heads, embed_axis=embed_axis,
                                       heads_axis=heads_axis, dtype=dtype, rngs=rngs, attn_impl=attn_impl)
        self.layer_norm2 = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype)
        self.mlp = CLIPMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, embed_axis=embed_axis,
                           mlp_axis=mlp_axis, dtype=dtype, rngs=rngs)

    def __call__(self, x, mask=None):
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


def _run_layers(layers, x, mask, remat):
    def body(layer, h, _):
        return layer(h, mask), None

    out, _ = scan_layers(layers, body, x, remat=remat)
    return out


class CLIPTextTransformer(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, dtype, rngs: nnx.Rngs, attn_impl="xla", remat="none"):
        self.cfg, self.remat = cfg, remat
        d = cfg.hidden_size
        self.token_embedding = Embed(cfg.vocab_size, d, axes=("vocab", "embed"), dtype=dtype, rngs=rngs)
        self.position_embedding = nnx.Param(
            (jax.random.normal(rngs.params(), (cfg.max_position_embeddings, d)) * 0.01).astype(dtype),
            axes=(None, "embed"))
        self.layers = stack_layers(
            lambda r: CLIPEncoderLayer(cfg, prefix="", dtype=dtype, rngs=r, attn_impl=attn_impl),
            cfg.num_hidden_layers, rngs)
        self.final_layer_norm = LayerNorm(d, eps=cfg.layer_norm_eps, dtype=dtype)

    def pool_index(self, input_ids):
        eos = self.cfg.eos_token_id
        if eos == 2 or eos is None:
            # pre-#24773 configs (OpenAI): the EOT token has the largest id.
            return jnp.argmax(input_ids, axis=-1)
        eos_ids = jnp.asarray(eos if isinstance(eos, tuple) else (eos,), input_ids.dtype)
        hit = jnp.any(input_ids[..., None] == eos_ids, axis=-1)
        return jnp.argmax(hit.astype(jnp.int32), axis=-1)

    def __call__(self, input_ids, attention_mask=None):
        """Returns (last_hidden_state (B, L, D), pooled (B, D)), both after final_layer_norm."""
        input_ids = jnp.asarray(input_ids)
        b, n = input_ids.shape
        if n > self.cfg.max_position_embeddings:
            raise ValueError(f"sequence length {n} exceeds max_position_embeddings "
                             f"{self.cfg.max_position_embeddings}")
        x = self.token_embedding(input_ids) + self.position_embedding[...][:n][None]
        mask = jnp.tril(jnp.ones((n, n), bool))[None, None]
        if attention_mask is not None:
            mask = mask & (jnp.asarray(attention_mask) > 0)[:, None, None, :]
        x = _run_layers(self.layers, x, mask, self.remat)
        x = self.final_layer_norm(x)
        pooled = jnp.take_along_axis(x, self.pool_index(input_ids)[:, None, None], axis=1)[:, 0]
        return x, pooled


class CLIPVisionTransformer(nnx.Module):
    def __init__(self, cfg: CLIPVisionConfig, *, dtype, rngs: nnx.Rngs, attn_impl="xla", remat="none"):
        self.cfg, self.remat = cfg, remat
        d, p, c = cfg.hidden_size, cfg.patch_size, cfg.num_channels
        self.class_embedding = nnx.Param(jax.random.normal(rngs.params(), (d,)).astype(dtype),
                                         axes=("vision_embed",))
        # the conv kernel flattened to (C * p * p, D), input order (channel, row, column)
        self.patch_embedding = Linear(c * p * p, d, use_bias=False, axes=("patch", "vision_embed"),
                                      dtype=dtype, rngs=rngs)
        self.position_embedding = nnx.Param(
            (jax.random.normal(rngs.params(), (cfg.num_patches + 1, d)) * 0.02).astype(dtype),
            axes=(None, "vision_embed"))
        self.pre_layrnorm = LayerNorm(d, eps=cfg.layer_norm_eps, dtype=dtype)
        self.layers = stack_layers(
            lambda r: CLIPEncoderLayer(cfg, prefix="vision_", dtype=dtype, rngs=r, attn_impl=attn_impl),
            cfg.num_hidden_layers, rngs)
        self.post_layernorm = LayerNorm(d, eps=cfg.layer_norm_eps, dtype=dtype)

    def __call__(self, pixel_values):
        """pixel_values (B, C, H, W) as Hugging Face. Returns (last_hidden_state, pooled)."""
        x = jnp.asarray(pixel_values)
        b, c, h, w = x.shape
        p, s = self.cfg.patch_size, self.cfg.image_size
        if (h, w) != (s, s) or c != self.cfg.num_channels:
            raise ValueError(f"expected pixel_values (B, {self.cfg.num_channels}, {s}, {s}), got {x.shape}")
        x = x.astype(self.patch_embedding.kernel[...].dtype)
        x = x.reshape(b, c, h // p, p, w // p, p).transpose(0, 2, 4, 1, 3, 5).reshape(b, -1, c * p * p)
        x = self.patch_embedding(x)
        cls = jnp.broadcast_to(self.class_embedding[...].astype(x.dtype), (b, 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1) + self.position_embedding[...][None]
        x = self.pre_layrnorm(x)
        x = _run_layers(self.layers, x, None, self.remat)
        return x, self.post_layernorm(x[:, 0])


class CLIPModel(nnx.Module):
    def __init__(self, config: CLIPConfig, *, dtype="float32", rngs: nnx.Rngs | None = None, remat="none"):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        dt = resolve_dtype(dtype)
        self.config = config
        self.text_model = CLIPTextTransformer(config.text, dtype=dt, rngs=rngs, attn_impl=config.attn_impl,
                                              remat=remat)
        self.vision_model = CLIPVisionTransformer(config.vision, dtype=dt, rngs=rngs,
                                                  attn_impl=config.attn_impl, remat=remat)
        self.visual_projection = Linear(config.vision.hidden_size, config.projection_dim, use_bias=False,
                                        axes=("vision_embed", None), dtype=dt, rngs=rngs)
        self.text_projection = Linear(config.text.hidden_size, config.projection_dim, use_bias=False,
                                      axes=("embed", None), dtype=dt, rngs=rngs)
        self.logit_scale = nnx.Param(jnp.asarray(config.logit_scale_init_value, jnp.float32), axes=())

    def get_image_features(self, pixel_values):
        """(B, 3, S, S) normalized pixels -> (B, projection_dim) unnormalized embeddings."""
        return self.visual_projection(self.vision_model(pixel_values)[1])

    def get_text_features(self, input_ids, attention_mask=None):
        """(B, L) ids (+ mask) -> (B, projection_dim) unnormalized embeddings."""
        return self.text_projection(self.text_model(input_ids, attention_mask)[1])

    def __call__(self, input_ids, pixel_values, attention_mask=None):
        """As ``transformers.CLIPModel.forward``: (logits_per_image, logits_per_text,
        image_embeds, text_embeds), the embeddings L2-normalized."""
        img = l2_normalize(self.get_image_features(pixel_values).astype(jnp.float32))
        txt = l2_normalize(self.get_text_features(input_ids, attention_mask).astype(jnp.float32))
        logits_per_text = jnp.exp(self.logit_scale[...]) * txt @ img.T
        return logits_per_text.T, logits_per_text, img, txt


def l2_normalize(x, eps: float = 1e-12):
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


# --------------------------------------------------------------------------------------------
# preprocessing, tokenizer, convenience encoders


def _pil_resample(name):
    from PIL import Image

    return {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST,
            "lanczos": Image.LANCZOS}[name]


def preprocess_frames(frames, size: int = 224, crop_size: int | None = None, *, mean=OPENAI_CLIP_MEAN,
                      std=OPENAI_CLIP_STD, resample: str = "bicubic") -> np.ndarray:
    """uint8 frames (N, H, W, 3) -> float32 pixel_values (N, 3, crop, crop), as
    ``CLIPImageProcessor`` (PIL backend) does: PIL resize of the short side to ``size`` with the
    long side ``int(size * long / short)``, center crop (top/left = floor((dim - crop) / 2)),
    x / 255 in float64 then float32, (x - mean) / std in float32.

    A single frame (H, W, 3) is accepted too. Crops larger than the resized image are zero-padded
    as transformers does."""
    from PIL import Image

    crop = size if crop_size is None else crop_size
    arr = np.asarray(frames)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"expected frames (N, H, W, 3), got shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames, got {arr.dtype}")
    mean32, std32 = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    out = np.empty((arr.shape[0], 3, crop, crop), np.float32)
    for i, fr in enumerate(arr):
        h, w = fr.shape[:2]
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = size, int(size * long / short)
        nh, nw = (new_long, new_short) if w <= h else (new_short, new_long)
        img = np.asarray(Image.fromarray(fr).resize((nw, nh), resample=_pil_resample(resample)))
        top, left = (nh - crop) // 2, (nw - crop) // 2
        if top >= 0 and left >= 0:
            img = img[top:top + crop, left:left + crop]
        else:  # pad (rare: crop larger than the resized image), as transformers' center_crop
            ph, pw = max(crop, nh), max(crop, nw)
            canvas = np.zeros((ph, pw, 3), np.uint8)
            t, l = -(-(ph - nh) // 2), -(-(pw - nw) // 2)
            canvas[t:t + nh, l:l + nw] = img
            top, left = (ph - crop) // 2, (pw - crop) // 2
            img = canvas[top:top + crop, left:left + crop]
        x = (img.astype(np.float64) * (1 / 255)).astype(np.float32)
        out[i] = ((x - mean32) / std32).transpose(2, 0, 1)
    return out


# PIL's resampling (Resample.c), emulated exactly on the device: the same filter weights, rounded
# to the same fixed-point integers, the same horizontal-then-vertical passes with uint8 results
_PIL_FILTERS = {"bicubic": (2.0, lambda x: np.where(x < 1.0, ((-0.5 + 2.0) * x - (-0.5 + 3.0)) * x * x + 1.0,
                                                     np.where(x < 2.0, (((x - 5.0) * x + 8.0) * x - 4.0) * -0.5,
                                                              0.0))),
                "bilinear": (1.0, lambda x: np.where(x < 1.0, 1.0 - x, 0.0))}
_PRECISION_BITS = 32 - 8 - 2


@functools.lru_cache(maxsize=64)
def _pil_weights(in_size: int, out_size: int, resample: str) -> np.ndarray:
    """(out_size, in_size) int32: PIL's fixed-point resampling coefficients (``precompute_coeffs``
    then ``normalize_coeffs_8bpc``) as a dense matrix."""
    support, fn = _PIL_FILTERS[resample]
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = support * filterscale
    w = np.zeros((out_size, in_size), np.float64)
    for o in range(out_size):
        center = (o + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        x = np.arange(lo, hi)
        k = fn(np.abs((x - center + 0.5) / filterscale))
        total = k.sum()
        w[o, lo:hi] = k / total if total != 0 else k
    one = float(1 << _PRECISION_BITS)
    return np.where(w < 0, np.trunc(-0.5 + w * one), np.trunc(0.5 + w * one)).astype(np.int32)


def _pil_pass(x, weights, axis: int):
    """One PIL pass over ``axis`` (1: rows, 2: columns) of int32 images (N, H, W, C)."""
    spec = "nhwc,oh->nowc" if axis == 1 else "nhwc,ow->nhoc"
    acc = jnp.einsum(spec, x, jnp.asarray(weights), preferred_element_type=jnp.int32)
    return jnp.clip((acc + (1 << (_PRECISION_BITS - 1))) >> _PRECISION_BITS, 0, 255)


def _resized_size(h: int, w: int, size: int) -> tuple[int, int]:
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    return (new_long, new_short) if w <= h else (new_short, new_long)


@functools.partial(jax.jit, static_argnames=("size", "crop", "resample"))
def _preprocess_on_device(frames, size: int, crop: int, resample: str, table):
    n, h, w, _ = frames.shape
    nh, nw = _resized_size(h, w, size)
    x = frames.astype(jnp.int32)
    if nw != w:  # PIL: horizontal pass first, then vertical; a pass is skipped when its size is kept
        x = _pil_pass(x, _pil_weights(w, nw, resample), 2)
    if nh != h:
        x = _pil_pass(x, _pil_weights(h, nh, resample), 1)
    ph, pw = max(crop, nh), max(crop, nw)
    if (ph, pw) != (nh, nw):  # crop larger than the image: zero padding, as transformers
        t, l = -(-(ph - nh) // 2), -(-(pw - nw) // 2)
        x = jnp.pad(x, ((0, 0), (t, ph - nh - t), (l, pw - nw - l), (0, 0)))
    top, left = (ph - crop) // 2, (pw - crop) // 2
    x = x[:, top:top + crop, left:left + crop]
    # the normalized value of each (channel, level), computed on the host exactly as the PIL path
    # does (a compiler may turn x / 255 into a multiply): a lookup keeps the two bit-identical
    return jnp.stack([table[c][x[..., c]] for c in range(3)], axis=1)


def preprocess_frames_on_device(frames, size: int = 224, crop_size: int | None = None, *, mean=OPENAI_CLIP_MEAN,
                                std=OPENAI_CLIP_STD, resample: str = "bicubic") -> jax.Array:
    """``preprocess_frames`` as one jitted device program on uint8 frames (N, H, W, 3) (a device
    array or numpy): PIL's resampling emulated exactly (its fixed-point filter coefficients and
    uint8 rounding after each pass), so the result is bit-identical to the PIL path (tested). The
    frames need not go to the host (rewards on rendered videos)."""
    if resample not in _PIL_FILTERS:
        raise ValueError(f"on-device CLIP preprocessing supports {sorted(_PIL_FILTERS)}, got {resample!r}")
    shape, dtype = tuple(frames.shape), frames.dtype
    if len(shape) != 4 or shape[-1] != 3:
        raise ValueError(f"expected frames (N, H, W, 3), got shape {shape}")
    if dtype != np.uint8:
        raise ValueError(f"expected uint8 frames, got {dtype}")
    crop = size if crop_size is None else crop_size
    levels = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)
    table = (levels[None] - np.asarray(mean, np.float32)[:, None]) / np.asarray(std, np.float32)[:, None]
    return _preprocess_on_device(frames, size=size, crop=crop, resample=resample, table=table)


def load_tokenizer(local_dir: str):
    """The CLIP tokenizer saved in ``local_dir`` (no download)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(local_dir, local_files_only=True)


# the ids of ``build_tiny_tokenizer``: a random CLIP's text config takes these
TINY_TOKENIZER_IDS = dict(vocab_size=54, bos_token_id=52, eos_token_id=53, pad_token_id=53)


def build_tiny_tokenizer(model_max_length: int = 77):
    """A character-level ``transformers.CLIPTokenizer`` (no merges, no files) for random CLIP
    models in tests and benchmarks: ids 0-25 the letters a-z, 26-51 the word-final letters
    (``a</w>``...), then ``<|startoftext|>`` and ``<|endoftext|>`` (``TINY_TOKENIZER_IDS``).
    ``save_pretrained(dir)`` writes a directory that ``load_tokenizer`` reads."""
    import string

    from transformers import CLIPTokenizer

    letters = string.ascii_lowercase
    vocab = {c: i for i, c in enumerate(letters)}
    vocab.update({c + "</w>": len(letters) + i for i, c in enumerate(letters)})
    vocab.update({"<|startoftext|>": TINY_TOKENIZER_IDS["bos_token_id"],
                  "<|endoftext|>": TINY_TOKENIZER_IDS["eos_token_id"]})
    tok = CLIPTokenizer(vocab=vocab, merges=[])
    tok.model_max_length = model_max_length
    return tok


def tokenize(tokenizer, texts: Sequence[str], max_length: int = 77) -> tuple[np.ndarray, np.ndarray]:
    """Pads (right) / truncates to ``max_length`` (fixed shape, one compilation):
    returns (input_ids int32 (B, L), attention_mask int32 (B, L))."""
    enc = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_length,
                    return_tensors="np")
    return enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)


@nnx.jit
def _image_features(model: CLIPModel, pixel_values):
    return model.get_image_features(pixel_values).astype(jnp.float32)


@nnx.jit
def _text_features(model: CLIPModel, input_ids, attention_mask):
    return model.get_text_features(input_ids, attention_mask).astype(jnp.float32)


def encode_frames(model: CLIPModel, frames, *, batch_size: int = 64) -> jax.Array:
    """uint8 frames (..., H, W, 3), e.g. videos (B, F, H, W, 3) -> fp32 features (..., D)
    (unnormalized; the reward functions normalize). The preprocessing runs on the device
    (``preprocess_frames_on_device``, bit-identical to the PIL path): device frames stay there."""
    shape = tuple(frames.shape)
    lead = shape[:-3]
    flat = (frames if isinstance(frames, jax.Array) else np.asarray(frames)).reshape((-1,) + shape[-3:])
    size = model.config.vision.image_size
    feats = []
    for s in range(0, flat.shape[0], batch_size):
        chunk = flat[s:s + batch_size]
        n = chunk.shape[0]
        if n < batch_size and flat.shape[0] > batch_size:  # keep one compiled shape
            pad = ((0, batch_size - n),) + ((0, 0),) * 3
            chunk = jnp.pad(chunk, pad) if isinstance(chunk, jax.Array) else np.pad(chunk, pad)
        feats.append(_image_features(model, preprocess_frames_on_device(chunk, size=size))[:n])
    return jnp.concatenate(feats).reshape(lead + (-1,))


def encode_texts(model: CLIPModel, tokenizer, texts: Sequence[str]) -> jax.Array:
    """Strings -> fp32 text features (B, D) (unnormalized)."""
    ids, mask = tokenize(tokenizer, texts, model.config.text.max_position_embeddings)
    return _text_features(model, jnp.asarray(ids), jnp.asarray(mask))
