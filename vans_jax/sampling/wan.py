"""Wan2.1 text-to-video generation with VANS reference-frame conditioning.

* ``from_pretrained(path)`` loads a diffusers-format Wan directory (``transformer/``, ``vae/``,
  ``text_encoder/``, ``tokenizer/``, optional ``scheduler/``) into a ``WanModels`` holder; ``dit_path``
  swaps the transformer for any DiT checkpoint ``convert.wan_dit.load_dit`` reads (e.g. the released
  VANS ``vdm.safetensors``, original-Wan keys with a ``dit.`` prefix).
* ``reference_latents(models, clip)`` turns an input clip (uint8 frames) into the VANS conditioning:
  VAE posterior mean, normalized, at latent frames ``floor(linspace(0, T_lat - 1, n_ref))``.
* ``generate(models, captions, ref_latents=...)`` samples with ``sampling.flow.sample`` (one jitted
  scan; CFG batched; the clean references are prepended on the time axis at every step and their
  outputs dropped) and decodes with the VAE. Without ``ref_latents`` it is plain Wan T2V and matches
  diffusers' ``WanPipeline`` step for step (UniPC, same initial noise).

Every jitted piece (text encoder, sampler, VAE encode/decode) is a module-level function keyed on
the model's graph definition, so repeated calls with the same shapes never recompile.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import warnings
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..data.video_io import check_vae_frames
from ..models.wan.text import DEFAULT_MAX_LENGTH, NegativePromptCache, encode_prompts, load_tokenizer
from . import flow

__all__ = ["SchedulerSettings", "WanModels", "from_pretrained", "ref_frame_indices", "encode_video",
           "reference_latents", "encode_text", "decode_latents", "generate", "check_generation_size",
           "check_generation_size_of_dir",
           "DEFAULT_NUM_REF", "DEFAULT_HEIGHT", "DEFAULT_WIDTH", "DEFAULT_NUM_FRAMES"]

DEFAULT_NUM_REF = 6
DEFAULT_HEIGHT = 352
DEFAULT_WIDTH = 640
DEFAULT_NUM_FRAMES = 33
OUTPUT_TYPES = ("uint8", "float", "latent")
REQUIRED_SUBFOLDERS = ("transformer", "vae", "text_encoder", "tokenizer")


# ----------------------------------------------------------------------------- scheduler settings


@dataclasses.dataclass(frozen=True)
class SchedulerSettings:
    """The parts of a diffusers scheduler config the samplers here use or assume.

    ``flow.sample(mode="unipc")`` is diffusers' ``UniPCMultistepScheduler`` with exactly the
    values below except ``flow_shift`` (Wan's shipped config; VANS samples with shift 5).
    Without a ``scheduler/`` folder the defaults apply."""
    class_name: str = "UniPCMultistepScheduler"
    flow_shift: float = 5.0
    num_train_timesteps: int = 1000
    prediction_type: str = "flow_prediction"
    use_flow_sigmas: bool = True
    solver_order: int = 2
    solver_type: str = "bh2"
    lower_order_final: bool = True
    final_sigmas_type: str = "zero"

    @classmethod
    def from_config(cls, cfg: dict) -> "SchedulerSettings":
        kw = {f.name: cfg[f.name] for f in dataclasses.fields(cls) if f.name in cfg and cfg[f.name] is not None}
        if "_class_name" in cfg:
            kw["class_name"] = cfg["_class_name"]
        if "flow_shift" not in kw and cfg.get("shift") is not None:   # FlowMatchEulerDiscreteScheduler
            kw["flow_shift"] = cfg["shift"]
        kw["flow_shift"] = float(kw.get("flow_shift", cls.flow_shift))
        kw["num_train_timesteps"] = int(kw.get("num_train_timesteps", cls.num_train_timesteps))
        return cls(**kw)

    @classmethod
    def from_dir(cls, scheduler_dir: str) -> "SchedulerSettings":
        """From ``scheduler_dir/scheduler_config.json``; the defaults when it does not exist."""
        f = os.path.join(scheduler_dir, "scheduler_config.json")
        if not os.path.isfile(f):
            return cls()
        with open(f) as fh:
            return cls.from_config(json.load(fh))

    def unipc_mismatches(self) -> list[str]:
        """Settings in which this scheduler differs from what ``flow.sample(mode="unipc")`` computes."""
        ref = SchedulerSettings()
        return [f"{f.name}={getattr(self, f.name)!r} (sampler: {getattr(ref, f.name)!r})"
                for f in dataclasses.fields(self) if f.name != "flow_shift" and getattr(self, f.name) != getattr(ref, f.name)]


# ----------------------------------------------------------------------------- holder + loading


@dataclasses.dataclass
class WanModels:
    """Everything ``generate`` needs: the DiT, the VAE, the UMT5 encoder, its tokenizer and the
    scheduler settings. Negative-prompt embeddings are cached here (encoded once per prompt)."""
    dit: Any            # WanTransformer3D
    vae: Any            # WanVAE
    text_encoder: Any   # UMT5Encoder
    tokenizer: Any
    scheduler: SchedulerSettings = dataclasses.field(default_factory=SchedulerSettings)
    _negative: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    @property
    def latent_channels(self) -> int:
        return int(self.dit.cfg.in_channels)

    @property
    def temporal_factor(self) -> int:
        return int(self.vae.cfg.temporal_compression)

    @property
    def spatial_factor(self) -> int:
        return int(self.vae.cfg.spatial_compression)

    @property
    def size_multiple(self) -> int:
        """Height and width must be multiples of this (VAE factor x DiT patch: 16 for Wan)."""
        _, ph, pw = self.dit.cfg.patch_size
        return self.spatial_factor * int(np.lcm(ph, pw))

    @property
    def text_len(self) -> int:
        return int(getattr(self.dit.cfg, "text_len", DEFAULT_MAX_LENGTH))

    def negative_embeddings(self, negative_prompt: str = "", batch_size: int = 1, max_length: int | None = None):
        """(batch_size, max_length, d) embeddings of ``negative_prompt``, encoded once and cached."""
        max_length = self.text_len if max_length is None else int(max_length)
        key = (negative_prompt, max_length)
        if key not in self._negative:
            self._negative[key] = NegativePromptCache(self.text_encoder, self.tokenizer, negative_prompt, max_length)
        return self._negative[key].get(batch_size)


def _load_transformer(path: str, dit_path, dtype, mesh, **runtime):
    from vans_jax.convert.safetensors_io import CheckpointError
    from vans_jax.convert.wan_dit import load_dit
    from vans_jax.models.wan.dit import WanConfig

    if dit_path is None:
        return load_dit(os.path.join(path, "transformer"), dtype=dtype, mesh=mesh, **runtime)
    dit_path = os.fspath(dit_path)
    if not os.path.exists(dit_path):
        raise FileNotFoundError(f"dit_path {dit_path} does not exist")
    own_cfg = os.path.isdir(dit_path) and os.path.isfile(os.path.join(dit_path, "config.json"))
    base_cfg = os.path.join(path, "transformer", "config.json")
    if own_cfg or not os.path.isfile(base_cfg):
        return load_dit(dit_path, dtype=dtype, mesh=mesh, **runtime)   # own config.json, else from shapes
    # a bare checkpoint (e.g. VANS vdm.safetensors): a fine-tune of the base transformer, so take its
    # config (the head count cannot be read off tensor shapes); fall back to inference if it does not fit
    try:
        return load_dit(dit_path, config=WanConfig.from_diffusers_config(base_cfg), dtype=dtype, mesh=mesh,
                        **runtime)
    except CheckpointError as e:
        warnings.warn(f"{dit_path} does not fit {base_cfg} ({str(e)[:200]}); inferring the DiT config from "
                      f"tensor shapes (num_heads = dim / 128)")
        return load_dit(dit_path, dtype=dtype, mesh=mesh, **runtime)


def from_pretrained(path, dtype="float32", mesh=None, *, dit_path=None, vae_dtype="float32",
                    text_dtype=None, attn_impl: str | None = None, seq_parallel: str | None = None) -> WanModels:
    """Loads a local diffusers-format Wan pipeline directory into ``WanModels``.

    path: directory with ``transformer/``, ``vae/``, ``text_encoder/``, ``tokenizer/`` (all required,
    except ``transformer/`` when ``dit_path`` is given) and optionally ``scheduler/`` (its
    ``scheduler_config.json`` gives ``flow_shift`` etc.; defaults otherwise).
    dtype: DiT parameter/compute dtype; text_dtype defaults to ``dtype``; vae_dtype to float32 (as Wan's
    reference code and diffusers' examples run the VAE; None: follow ``dtype``).
    mesh: a ``jax.sharding.Mesh``; parameters are placed with their logical-axis sharding.
    dit_path: a DiT checkpoint replacing ``transformer/`` -- a diffusers model directory, or a
    safetensors file/directory in either key layout (``dit.`` prefixes stripped). A bare file takes
    its config from ``transformer/config.json`` when present.
    attn_impl: ``layers.attention`` implementation of the DiT, the VAE and UMT5 ("xla", "cudnn",
    "chunked", "splash", "auto"; UMT5's biased attention runs on xla under "splash"); None: "xla".
    seq_parallel: the DiT's self-attention over a ``sequence`` mesh axis ("none", "ring",
    "ulysses"; see ``parallel.sequence_parallel_attention``); None: "none".
    """
    from vans_jax.convert import umt5 as umt5_convert
    from vans_jax.convert.wan_vae import load_vae

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"Wan pipeline directory {path} does not exist")
    need = [s for s in REQUIRED_SUBFOLDERS if not (s == "transformer" and dit_path is not None)]
    missing = [s for s in need if not os.path.isdir(os.path.join(path, s))]
    if missing:
        hint = " (or pass dit_path= for the transformer)" if "transformer" in missing else ""
        raise FileNotFoundError(
            f"{path} is not a complete diffusers Wan directory: missing subfolder(s) "
            f"{', '.join(m + '/' for m in missing)}; expected transformer/, vae/, text_encoder/, tokenizer/ "
            f"and optionally scheduler/{hint}")
    scheduler = SchedulerSettings.from_dir(os.path.join(path, "scheduler"))
    impl = {} if attn_impl is None else {"attn_impl": attn_impl}
    dit_runtime = dict(impl, **({} if seq_parallel is None else {"seq_parallel": seq_parallel}))
    dit = _load_transformer(path, dit_path, dtype, mesh, **dit_runtime)
    vae = load_vae(os.path.join(path, "vae"), vae_dtype or dtype, mesh, **impl)
    text_encoder = umt5_convert.from_pretrained(os.path.join(path, "text_encoder"), text_dtype or dtype, mesh,
                                                **impl)
    tokenizer = load_tokenizer(os.path.join(path, "tokenizer"))
    if dit.cfg.in_channels != vae.cfg.z_dim:
        raise ValueError(f"the DiT takes {dit.cfg.in_channels} latent channels, the VAE has z_dim={vae.cfg.z_dim}")
    if dit.cfg.text_dim != text_encoder.config.d_model:
        raise ValueError(f"the DiT's text_dim {dit.cfg.text_dim} != the text encoder's d_model "
                         f"{text_encoder.config.d_model}")
    return WanModels(dit=dit, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)


# ----------------------------------------------------------------------------- jitted pieces


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _encode_jit(graphdef, state, video):
    vae = nnx.merge(graphdef, state)
    return vae.normalize_latents(vae.encode(video).mean.astype(jnp.float32))


@functools.partial(jax.jit, static_argnames=("graphdef", "output_type"))
def _decode_jit(graphdef, state, latents, output_type):
    vae = nnx.merge(graphdef, state)
    video = vae.decode(vae.denormalize_latents(latents.astype(jnp.float32)))      # (B, C, F, H, W) in [-1, 1]
    video = jnp.clip(video.astype(jnp.float32).transpose(0, 2, 3, 4, 1) * 0.5 + 0.5, 0.0, 1.0)
    if output_type == "uint8":
        return jnp.round(video * 255.0).astype(jnp.uint8)
    return video


# ----------------------------------------------------------------------------- references


def ref_frame_indices(num_latent_frames: int, n_ref: int = DEFAULT_NUM_REF) -> np.ndarray:
    """VANS reference latent frames: ``floor(linspace(0, T_lat - 1, n_ref))`` (repeats when n_ref > T_lat).
    For a 33-frame clip (9 latent frames) and n_ref = 6: [0, 1, 3, 4, 6, 8]."""
    if num_latent_frames < 1 or n_ref < 1:
        raise ValueError(f"need num_latent_frames >= 1 and n_ref >= 1, got {num_latent_frames}, {n_ref}")
    return np.floor(np.linspace(0.0, num_latent_frames - 1, n_ref)).astype(np.int64)


def encode_video(models: WanModels, video) -> jax.Array:
    """video (B, C, F, H, W) float in [-1, 1], F = 4k+1 -> normalized latents (B, z, 1+k, H/8, W/8)
    fp32 (posterior mean, then ``(mu - latents_mean) / latents_std``: the DiT's latent space)."""
    video = jnp.asarray(video)
    models.vae.check_video_shape(video.shape)
    graphdef, state = nnx.split(models.vae)
    return _encode_jit(graphdef, state, video)


def reference_latents(models: WanModels, clip, n_ref: int = DEFAULT_NUM_REF, *,
                      height: int | None = DEFAULT_HEIGHT, width: int | None = DEFAULT_WIDTH,
                      trim: bool = False, resample: str = "bicubic", to_device=None) -> jax.Array:
    """The VANS conditioning latents of an input clip: (B, z, n_ref, h, w) fp32.

    clip: uint8 frames (B, F, H, W, 3) or (F, H, W, 3). Frames are resized to cover
    ``height x width`` and centre-cropped (``data.video_io.resize_center_crop``, PIL bicubic) unless
    already that size (``height``/``width`` None: keep the clip's size), mapped to [-1, 1]
    (``x / 127.5 - 1``), VAE-encoded (posterior mean), normalized, and the latent frames
    ``ref_frame_indices(T_lat, n_ref)`` are taken.
    F must be 4k+1 (e.g. 33 -> 9 latent frames); ``trim=True`` keeps the LAST 4k+1 frames instead of
    raising (the context right before the cut).
    ``to_device``: how the host's float video becomes a device array (default ``jnp.asarray``;
    multi-host training: ``parallel.host_local_batch_to_global``, each process its own clips).
    """
    from vans_jax.data.video_io import resize_center_crop

    a = np.asarray(clip)
    if a.dtype != np.uint8:
        raise TypeError(f"clip must be uint8 frames (0..255), got dtype {a.dtype}; "
                        f"use encode_video for float video in [-1, 1]")
    if a.ndim == 4:
        a = a[None]
    if a.ndim != 5 or a.shape[-1] != 3:
        raise ValueError(f"clip must be (B, F, H, W, 3) or (F, H, W, 3) RGB frames, got shape {np.shape(clip)}")
    b, f, h, w, _ = a.shape
    temporal = models.temporal_factor
    if trim and f >= 1 and (f - 1) % temporal:
        f = (f - 1) // temporal * temporal + 1
        a = a[:, -f:]
    check_vae_frames(f, "reference_latents", temporal)
    th, tw = h if height is None else int(height), w if width is None else int(width)
    m = models.spatial_factor
    if th % m or tw % m:
        raise ValueError(f"reference_latents: height and width must be divisible by {m}; got height={th}, width={tw}")
    if (th, tw) != (h, w):
        a = np.stack([resize_center_crop(a[i], th, tw, resample=resample) for i in range(b)])
    video = (a.astype(np.float32) / 127.5 - 1.0).transpose(0, 4, 1, 2, 3)     # (B, 3, F, H, W)
    lat = encode_video(models, video if to_device is None else to_device(video))
    return lat[:, :, ref_frame_indices(lat.shape[2], n_ref)]


# ----------------------------------------------------------------------------- text / decode


def encode_text(models: WanModels, captions: Sequence[str], max_sequence_length: int | None = None, *,
                to_device=None) -> jax.Array:
    """(B, L, d) caption embeddings as diffusers' WanPipeline (zero after each caption's length).
    Captions longer than L = ``max_sequence_length`` (default: the DiT's text_len, 512) tokens are
    truncated to their first L - 1 tokens plus ``</s>``. ``to_device``: see ``text.encode_tokens``."""
    L = models.text_len if max_sequence_length is None else int(max_sequence_length)
    return encode_prompts(models.text_encoder, models.tokenizer, list(captions), L, to_device=to_device)


def trim_batch_text(dit, batch: dict, keys=("context", "uncond_context", "null_context"), *, training: bool,
                    place=None, host: dict | None = None) -> dict:
    """``batch`` with its text contexts ``keys`` (those present) cut to the positions any row uses and
    ``context_pad`` set (``models.wan.trim_text_context``: the DiT computes the same function on
    fewer keys), when the DiT allows it (``dit.trims_text_context(training)``); else unchanged.
    ``place``: puts the host scalar ``context_pad`` on the devices (default ``jnp.asarray``). ``host``:
    host (numpy) copies of some of the contexts, by key, read for the decision instead of the devices
    (the whole global batch's values: with several processes, only a copy every process holds)."""
    from ..models.wan.dit import trim_text_context
    present = [k for k in keys if batch.get(k) is not None]
    if not present or not getattr(dit, "trims_text_context", lambda training: False)(training):
        return batch
    trimmed, pad = trim_text_context(*(batch[k] for k in present), host=[(host or {}).get(k) for k in present])
    if pad is None:
        return batch
    out = dict(batch, **dict(zip(present, trimmed)))
    out["context_pad"] = (place or jnp.asarray)(np.float32(pad))
    return out


def decode_latents(models: WanModels, latents, output_type: str = "uint8", *, to_host: bool = True):
    """Normalized latents (B, z, T, h, w) -> video (B, 1+4(T-1), 8h, 8w, 3) as numpy:
    uint8 (``round(255 x)``) or float in [0, 1] (diffusers' ``output_type="np"``).
    ``to_host=False``: the device array (a global array for global latents, e.g. several processes)."""
    if output_type not in ("uint8", "float"):
        raise ValueError(f"decode_latents: output_type must be 'uint8' or 'float', got {output_type!r}")
    graphdef, state = nnx.split(models.vae)
    video = _decode_jit(graphdef, state, jnp.asarray(latents, jnp.float32), output_type)
    return np.asarray(video) if to_host else video


# ----------------------------------------------------------------------------- generation


def check_generation_size(models: WanModels, height: int, width: int, num_frames: int):
    """Raises ValueError unless height and width are multiples of 16 (VAE x patch) and
    num_frames is 4k+1. Returns the latent shape (T_lat, h, w)."""
    _check_size(height, width, num_frames, models.size_multiple, models.temporal_factor)
    s = models.spatial_factor
    return (num_frames - 1) // models.temporal_factor + 1, height // s, width // s


def _check_size(height: int, width: int, num_frames: int, multiple: int, temporal: int):
    if height <= 0 or width <= 0 or height % multiple or width % multiple:
        raise ValueError(f"height and width must be positive multiples of {multiple}; got height={height}, "
                         f"width={width}")
    check_vae_frames(num_frames, "generate: num_frames", temporal)


def check_generation_size_of_dir(path, height: int, width: int, num_frames: int, *, dit_path=None):
    """``check_generation_size`` against a diffusers Wan directory's config files alone (VAE factors,
    DiT patch), before any weight is loaded. A directory without them passes (loading names it)."""
    from ..models.wan.dit import WanConfig
    from ..models.wan.vae import WanVAEConfig

    vae_cfg = os.path.join(os.fspath(path), "vae", "config.json")
    if not os.path.isfile(vae_cfg):
        return
    vae = WanVAEConfig.from_diffusers_config(vae_cfg)
    dirs = ([os.fspath(dit_path)] if dit_path is not None and os.path.isdir(dit_path) else []) + \
        [os.path.join(os.fspath(path), "transformer")]
    cfgs = [os.path.join(d, "config.json") for d in dirs if os.path.isfile(os.path.join(d, "config.json"))]
    _, ph, pw = WanConfig.from_diffusers_config(cfgs[0]).patch_size if cfgs else WanConfig.patch_size
    _check_size(height, width, num_frames, vae.spatial_compression * int(np.lcm(ph, pw)), vae.temporal_compression)


def generate(models: WanModels, captions: Sequence[str] | str, *, ref_latents=None, seed: int = 0, noise=None,
             num_steps: int = 50, guidance_scale: float = 5.0, shift: float | None = 5.0,
             height: int = DEFAULT_HEIGHT, width: int = DEFAULT_WIDTH, num_frames: int = DEFAULT_NUM_FRAMES,
             negative_prompt: str = "", mode: str = "unipc", output_type: str = "uint8",
             max_sequence_length: int | None = None, rng=None, sde_window=None, noise_level: float = 0.7):
    """Text-to-video (plain Wan) or VANS video generation.

    captions: one string per sample (B). Longer than ``max_sequence_length`` tokens (default the
    DiT's text_len, 512): truncated, no error (see ``encode_text``).
    ref_latents: (B or 1, z, n_ref, h, w) from ``reference_latents`` (VANS), or None for T2V.
    noise: initial latents (B, z, T_lat, H/8, W/8); default ``jax.random.normal(key(seed), ...)``
    float32. T_lat = (num_frames - 1) / 4 + 1 (33 frames -> 9).
    guidance_scale: CFG with the cached ``negative_prompt`` embeddings when > 1 (as diffusers).
    shift: flow shift; None takes the scheduler config's ``flow_shift``.
    mode: "unipc" (diffusers-equal), "euler" or "sde" (``rng``, ``sde_window``, ``noise_level``;
    rng defaults to ``fold_in(key(seed), 1)``).
    output_type: "uint8" -> numpy (B, F, H, W, 3) uint8; "float" -> numpy float32 in [0, 1] (as
    diffusers' "np"); "latent" -> the final normalized latents (B, z, T_lat, h, w) as a jax array.
    """
    if isinstance(captions, str):
        captions = [captions]
    captions = list(captions)
    if not captions or not all(isinstance(c, str) for c in captions):
        raise ValueError("captions must be a non-empty list of strings")
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
    if mode not in flow.MODES:
        raise ValueError(f"unknown sampler mode {mode!r}; expected one of {flow.MODES}")
    b = len(captions)
    t_lat, h, w = check_generation_size(models, height, width, num_frames)
    shape = (b, models.latent_channels, t_lat, h, w)
    if noise is None:
        noise = jax.random.normal(jax.random.key(seed), shape, jnp.float32)
    else:
        noise = jnp.asarray(noise, jnp.float32)
        if noise.shape != shape:
            raise ValueError(f"noise has shape {noise.shape}; {b} caption(s) at {height}x{width}x{num_frames} "
                             f"need {shape}")
    if ref_latents is not None:
        ref_latents = jnp.asarray(ref_latents, jnp.float32)
        rb, rc, n_ref, rh, rw = ref_latents.shape if ref_latents.ndim == 5 else (None,) * 5
        if ref_latents.ndim != 5 or rb not in (1, b) or rc != shape[1] or (rh, rw) != (h, w) or n_ref < 1:
            raise ValueError(f"ref_latents must be (B or 1, {shape[1]}, n_ref, {h}, {w}) for {b} caption(s) at "
                             f"{height}x{width}; got {tuple(ref_latents.shape)}")
        ref_latents = jnp.broadcast_to(ref_latents, (b,) + ref_latents.shape[1:])
    if shift is None:
        shift = models.scheduler.flow_shift
    if mode == "unipc" and models.scheduler.unipc_mismatches():
        warnings.warn("the pipeline's scheduler config differs from the UniPC sampler used here: "
                      + "; ".join(models.scheduler.unipc_mismatches()))
    if mode == "sde" and rng is None:
        rng = jax.random.fold_in(jax.random.key(seed), 1)

    L = models.text_len if max_sequence_length is None else int(max_sequence_length)
    context = encode_text(models, captions, L)
    uncond = models.negative_embeddings(negative_prompt, b, L) if guidance_scale > 1.0 else None
    latents = flow.sample(models.dit, noise, context, uncond_context=uncond, guidance_scale=guidance_scale,
                          ref_latents=ref_latents, num_steps=num_steps, shift=shift, mode=mode, rng=rng,
                          sde_window=sde_window, noise_level=noise_level)
    if output_type == "latent":
        return latents
    return decode_latents(models, latents, output_type)
