"""The synthetic world's tiny Wan video VAE: ``models.wan.vae.WanVAE`` (the diffusers
``AutoencoderKLWan`` architecture: causal 3D convs, 8x spatial / 4x temporal compression, 16 latent
channels) trained for reconstruction on the world's 9-frame clips, then its latent statistics
measured and written into the config (the DiT works on ``(mu - latents_mean) / latents_std``).

Training (``train_vae``), from ``init_for_training`` (zero biases, time kernels inflated from 2D):
first single frames (cheap steps that teach the spatial code), then 9-frame clips (each training
sample's target clip and the last 9 frames of its input clip). Loss: posterior mean -> decode
(unclamped) -> L1 + ``mse_weight`` * MSE on pixels in [-1, 1] with the foreground pixels weighted up,
plus ``kl_weight`` * KL(posterior || N(0, 1)) (per-element means); Adam with warmup + cosine decay.

The output ``vae/`` directory is a diffusers ``AutoencoderKLWan`` folder (config.json +
diffusion_pytorch_model.safetensors) that ``convert.wan_vae.load_vae`` and
``diffusers.AutoencoderKLWan.from_pretrained`` load.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from vans_jax.convert.safetensors_io import save_file
from vans_jax.convert.wan_dit import diffusers_version
from vans_jax.convert.wan_vae import key_table, load_vae
from vans_jax.data.video_io import check_vae_frames
from vans_jax.models.wan.vae import WanVAE, WanVAEConfig
from tools.tiny_world.clips import WorldClips, load_world_clips


@dataclasses.dataclass(frozen=True)
class TinyVAESpec:
    """The tiny VAE's architecture (Wan2.1 layout: 8x spatial, 4x temporal compression)."""
    base_dim: int = 8
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 1
    temperal_downsample: tuple[bool, ...] = (False, True, True)

    def config(self, **kw) -> WanVAEConfig:
        return WanVAEConfig(base_dim=self.base_dim, z_dim=self.z_dim, dim_mult=self.dim_mult,
                            num_res_blocks=self.num_res_blocks, attn_scales=(),
                            temperal_downsample=self.temperal_downsample,
                            latents_mean=(0.0,) * self.z_dim, latents_std=(1.0,) * self.z_dim, **kw)


@dataclasses.dataclass(frozen=True)
class VAETrainConfig:
    image_steps: int = 3000         # phase 1: single frames (the causal VAE's first-frame path)
    image_batch_size: int = 16
    steps: int = 300                # phase 2: clips of ``num_frames`` frames
    batch_size: int = 4
    lr: float = 2e-3
    # the clip phase's peak learning rate (None: ``lr``); each phase warms up and decays on its own
    clip_lr: float | None = None
    warmup_steps: int = 20
    # the cosine decay ends at ``lr * lr_end_ratio``
    lr_end_ratio: float = 0.05
    l1_weight: float = 1.0
    mse_weight: float = 1.0
    # an edge term: L1 between the horizontal / vertical pixel differences of the reconstruction and of
    # the target (the world's flat shapes are all edges; a plain pixel loss is satisfied by a blur)
    edge_weight: float = 0.0
    # extra weight of foreground pixels (any channel above ~25/255): the world's objects cover a few
    # percent of a black frame, and an unweighted loss first settles on "black frame + walls" (measured:
    # every object erased after 250 clip steps, eval PSNR 18.7 dB)
    foreground_weight: float = 10.0
    kl_weight: float = 1e-6
    # decode a posterior sample (a VAE) instead of the posterior mean (an autoencoder, the default):
    # in a few hundred steps from a random init the sampling noise (std ~1 at init) drowns the
    # encoder's small means and the decoder learns to ignore the latents; the pipeline only ever uses
    # the mean.
    sample_posterior: bool = False
    # what the encoder sees in training: "render" (the exact frames) or "video" (the decoded mp4s, what
    # the pipeline encodes: H.264 yuv420p blurs the chroma of the world's sharp coloured edges, 34.9 dB
    # against the exact frames on the eval split, worst clip 28.9). The target is always the exact render,
    # so with "video" the VAE learns to undo the codec (a denoising autoencoder).
    input_source: str = "render"
    # start from a trained VAE (a diffusers ``AutoencoderKLWan`` directory) instead of the random init
    init_from: str | None = None
    # what trains: "all", or "decoder" (``post_quant_conv`` + the decoder; the encoder and the latent
    # statistics stay those of ``init_from``, so the latent space a DiT was trained on does not move and
    # the DiT needs no retraining: only its renders' decoding improves)
    trainable: str = "all"


# --------------------------------------------------------------------------------------------
# export

_TO_TORCH = {
    "identity": lambda a: a,
    "conv3d": lambda a: np.transpose(a, (4, 3, 0, 1, 2)),        # (T, H, W, I, O) -> (O, I, T, H, W)
    "conv2d": lambda a: np.transpose(a, (3, 2, 0, 1)),           # (H, W, I, O) -> (O, I, H, W)
    "conv1x1": lambda a: np.transpose(a)[:, :, None, None],      # (I, O) -> (O, I, 1, 1)
    "gamma_image": lambda a: a.reshape(-1, 1, 1),
    "gamma_video": lambda a: a.reshape(-1, 1, 1, 1),
}


def vae_state_dict(vae: WanVAE, dtype=np.float32) -> dict[str, np.ndarray]:
    """diffusers ``AutoencoderKLWan`` state dict of ``vae`` (the inverse of ``convert.wan_vae``'s table)."""
    params = {".".join(str(p) for p in path): np.asarray(jax.device_get(v.get_value()))
              for path, v in nnx.to_flat_state(nnx.state(vae, nnx.Param))}
    out = {}
    for key, (path, transform, torch_shape) in key_table(vae.cfg, vae).items():
        a = np.ascontiguousarray(_TO_TORCH[transform](params[path])).astype(dtype)
        if a.shape != tuple(torch_shape):
            raise AssertionError(f"{key}: exported shape {a.shape} != expected {tuple(torch_shape)}")
        out[key] = a
    return out


def save_vae(vae: WanVAE, out_dir: str, *, dtype=np.float32) -> str:
    """Writes ``vae`` as a diffusers ``AutoencoderKLWan`` directory (config.json with its
    latents_mean / latents_std + diffusion_pytorch_model.safetensors); returns out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    save_file(vae_state_dict(vae, dtype), os.path.join(out_dir, "diffusion_pytorch_model.safetensors"))
    cfg = vae.cfg.to_diffusers_config()
    cfg["_diffusers_version"] = diffusers_version()
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    return out_dir


# --------------------------------------------------------------------------------------------
# data


def vae_clips(clips: WorldClips, num_frames: int | None = None) -> np.ndarray:
    """uint8 (2N, F, H, W, 3): every target clip and the last F frames of every input clip
    (F = ``num_frames``, default the target length; must be 4k+1)."""
    f = clips.targets.shape[1] if num_frames is None else int(num_frames)
    check_vae_frames(f, "vae_clips")
    if clips.inputs.shape[1] < f or clips.targets.shape[1] < f:
        raise ValueError(f"vae_clips: clips of {clips.inputs.shape[1]} / {clips.targets.shape[1]} frames are "
                         f"shorter than {f}")
    return np.concatenate([clips.targets[:, :f], clips.inputs[:, -f:]])


def _to_unit(x):
    return x.astype(jnp.float32) / 127.5 - 1.0


# --------------------------------------------------------------------------------------------
# training


def init_for_training(vae: WanVAE) -> WanVAE:
    """The training start (in place; returns ``vae``), from the random init:

    * every bias zero, and every residual branch's last layer zero (residual blocks' ``conv2``, the
      attention blocks' ``proj``: each block starts as the identity, as in Fixup / SkipInit and the
      zero-initialised output layers of diffusion U-Nets). From the default init the blocks' outputs
      pile a common component onto the residual stream that swamps the colour of a region (measured
      on the encoder: the cosine distance between the features of five discs that differ only in
      colour falls from 0.43 after ``conv_in`` to 0.0003 at the latent), and in a few hundred steps
      the decoder only learns "a brown object here";
    * "inflated" time kernels (as I3D inflates 2D filters): the causal 3x3x3 convs keep only their
      current-frame tap (the two earlier taps zero), the encoder's temporal downsampling convs take
      the later frame of each pair and the decoder's temporal upsampling convs copy their frame
      twice (identity on the current-frame tap). The VAE starts as a per-frame 2D autoencoder, which
      the single-frame phase trains (its path only touches the current-frame taps), and the clip
      phase starts from a model that repeats each latent frame's decode 4 times.
    """
    from vans_jax.models.wan.vae import AttentionBlock, CausalConv3d, Resample, ResidualBlock

    for path, var in nnx.to_flat_state(nnx.state(vae, nnx.Param)):
        if path[-1] == "bias":
            var.set_value(jnp.zeros_like(var.get_value()))
    for _, m in nnx.iter_modules(vae):
        last = m.conv2 if isinstance(m, ResidualBlock) else m.proj if isinstance(m, AttentionBlock) else None
        if last is not None:
            last.kernel.set_value(jnp.zeros_like(last.kernel.get_value()))
    time_convs = set()
    for _, m in nnx.iter_modules(vae):
        if isinstance(m, Resample) and m.time_conv is not None:
            k = m.time_conv.kernel
            kt, _, _, cin, cout = k.shape
            eye = jnp.eye(cin, dtype=k.dtype)
            tap = eye if cout == cin else jnp.concatenate([eye] * (cout // cin), axis=1)   # upsample: [I, I]
            k.set_value(jnp.zeros_like(k.get_value()).at[kt - 1, 0, 0].set(tap))
            time_convs.add(id(m.time_conv))
    for _, m in nnx.iter_modules(vae):
        if isinstance(m, CausalConv3d) and id(m) not in time_convs and m.kernel.shape[0] > 1:
            k = m.kernel.get_value()
            m.kernel.set_value(k.at[:-1].set(0.0))
    return vae


DECODER_PARTS = ("post_quant_conv", "decoder")


def _trainable_filter(trainable: str):
    """nnx filter of the trained variables: every one ("all") or the decoder side ("decoder")."""
    if trainable == "all":
        return lambda path, x: True
    if trainable == "decoder":
        return lambda path, x: bool(path) and str(path[0]) in DECODER_PARTS
    raise ValueError(f"VAETrainConfig.trainable must be 'all' or 'decoder', got {trainable!r}")


def _phase_optimizer(cfg: VAETrainConfig, steps: int, lr: float):
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adam(_schedule(cfg, steps, lr)))


# every setting of VAETrainConfig that a phase's optimizer (besides its steps and peak lr) and step read
_STEP_FIELDS = ("warmup_steps", "lr_end_ratio", "sample_posterior", "foreground_weight", "l1_weight", "mse_weight",
                "kl_weight", "edge_weight")


def _phase_step(graphdef, cfg: VAETrainConfig, steps: int, lr: float):
    """(optimizer, jitted step) of a training phase, shared by every call with the same model layout,
    loss and schedule: a resumed or repeated run (several sittings in one process, the tests) compiles
    its step once."""
    return _cached_phase_step(graphdef, VAETrainConfig(**{k: getattr(cfg, k) for k in _STEP_FIELDS}),
                              int(steps), float(lr))


@functools.lru_cache(maxsize=16)
def _cached_phase_step(graphdef, cfg: VAETrainConfig, steps: int, lr: float):
    tx = _phase_optimizer(cfg, steps, lr)
    return tx, _make_step(graphdef, tx, cfg)


def _make_step(graphdef, tx, cfg: VAETrainConfig):
    def loss_fn(params, frozen, batch, key):
        vae = nnx.merge(graphdef, params, frozen)
        inp, tgt = batch                                                       # uint8 (B, F, H, W, 3) each
        x = _to_unit(tgt)
        post = vae.encode(_to_unit(inp), channels_last=True)
        # unclamped: the clamp would stop the gradient wherever the output is out of [-1, 1] (a decoder
        # that outputs "blacker than black" would never learn the objects)
        y = vae.decode(post.sample(key) if cfg.sample_posterior else post.mean, channels_last=True, clamp=False)
        w = 1.0 + cfg.foreground_weight * jnp.any(x > -0.8, axis=-1, keepdims=True).astype(jnp.float32)
        w = w / jnp.mean(w)
        l1 = jnp.mean(w * jnp.abs(y - x))
        mse = jnp.mean(w * (y - x) ** 2)
        kl = 0.5 * jnp.mean(post.mean ** 2 + jnp.exp(post.logvar) - 1.0 - post.logvar)
        loss = cfg.l1_weight * l1 + cfg.mse_weight * mse + cfg.kl_weight * kl
        aux = {"l1": l1, "mse": mse, "kl": kl}
        if cfg.edge_weight:
            d = y - x
            edge = (jnp.mean(jnp.abs(jnp.diff(d, axis=-2))) + jnp.mean(jnp.abs(jnp.diff(d, axis=-3)))) / 2
            loss, aux["edge"] = loss + cfg.edge_weight * edge, edge
        return loss, aux

    def step(params, frozen, opt_state, batch, key):
        (loss, aux), g = jax.value_and_grad(loss_fn, has_aux=True)(params, frozen, batch, key)
        updates, opt_state = tx.update(g, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, {"loss": loss, **aux}

    return jax.jit(step, donate_argnums=(0, 2))


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _encode_mean(graphdef, state, clips_u8):
    return nnx.merge(graphdef, state).encode(_to_unit(clips_u8), channels_last=True).mean


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _reconstruct(graphdef, state, clips_u8):
    vae = nnx.merge(graphdef, state)
    y = vae.decode(vae.encode(_to_unit(clips_u8), channels_last=True).mean, channels_last=True)
    return jnp.round((y + 1.0) * 127.5).clip(0, 255).astype(jnp.uint8)


def _batches(x: np.ndarray, batch_size: int):
    """Fixed-size batches (the last one padded by repeating the first clip), with their real sizes."""
    for s in range(0, len(x), batch_size):
        chunk = x[s:s + batch_size]
        n = len(chunk)
        if n < batch_size and len(x) > batch_size:
            chunk = np.concatenate([chunk, np.repeat(chunk[:1], batch_size - n, 0)])
        yield jnp.asarray(chunk), n


def latent_stats(vae: WanVAE, clips_u8: np.ndarray, batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of the posterior means of ``clips_u8`` (N, F, H, W, 3) (float64)."""
    graphdef, state = nnx.split(vae)
    s1 = s2 = 0.0
    count = 0
    for batch, n in _batches(clips_u8, batch_size):
        mu = np.asarray(_encode_mean(graphdef, state, batch))[:n].astype(np.float64)
        mu = mu.reshape(-1, mu.shape[-1])
        s1, s2, count = s1 + mu.sum(0), s2 + (mu ** 2).sum(0), count + mu.shape[0]
    mean = s1 / count
    return mean, np.sqrt(np.maximum(s2 / count - mean ** 2, 1e-12))


def _psnr_db(mse) -> float:
    """PSNR in dB (255 peak) of a mean squared error in uint8 units."""
    return float(10.0 * np.log10(255.0 ** 2 / np.maximum(float(mse), 1e-10)))


def reconstruction_psnr(vae: WanVAE, clips_u8: np.ndarray, batch_size: int = 16,
                        targets_u8: np.ndarray | None = None) -> dict:
    """Encode (posterior mean) -> decode -> uint8, against ``targets_u8`` (default ``clips_u8`` itself;
    e.g. the exact renders of decoded clips): PSNR in dB (255 peak) over all pixels (``psnr``), the
    mean of the per-clip PSNRs (``psnr_clip_mean``), the worst clip and the PSNR of each frame index
    over all clips (``psnr_per_frame``: the causal VAE codes frame 0 alone, then chunks of 4)."""
    if targets_u8 is not None and targets_u8.shape != clips_u8.shape:
        raise ValueError(f"reconstruction_psnr: targets of shape {targets_u8.shape} != clips {clips_u8.shape}")
    graphdef, state = nnx.split(vae)
    per_frame = []                                                              # (clip, frame) MSEs
    for s, (batch, n) in zip(range(0, len(clips_u8), batch_size), _batches(clips_u8, batch_size)):
        rec = np.asarray(_reconstruct(graphdef, state, batch))[:n].astype(np.float64)
        ref = (np.asarray(batch) if targets_u8 is None else targets_u8[s:s + batch_size])[:n].astype(np.float64)
        per_frame.extend(np.mean((rec - ref) ** 2, axis=(2, 3, 4)))
    per_frame = np.asarray(per_frame)
    mse = per_frame.mean(axis=1)
    return {"psnr": _psnr_db(mse.mean()), "psnr_clip_mean": float(np.mean([_psnr_db(m) for m in mse])),
            "psnr_worst_clip": _psnr_db(mse.max()), "num_clips": int(len(mse)),
            "psnr_per_frame": [round(_psnr_db(m), 2) for m in per_frame.mean(axis=0)]}


def _phase_lr(cfg: VAETrainConfig, phase: str) -> float:
    """The peak learning rate of a training phase ("image" or "clip")."""
    return cfg.clip_lr if phase == "clip" and cfg.clip_lr is not None else cfg.lr


def _schedule(cfg: VAETrainConfig, steps: int, lr: float | None = None):
    lr = cfg.lr if lr is None else lr
    return optax.warmup_cosine_decay_schedule(0.0, lr, min(cfg.warmup_steps, max(steps - 1, 1)), max(steps, 2),
                                              lr * cfg.lr_end_ratio)


# --------------------------------------------------------------------------------------------
# resumable training: the trained variables, the optimizer state, the batch sampler's state and the
# loss history after a step, in ``<checkpoint_dir>/{state.npz, meta.json}`` (each written atomically)


def _run_fingerprint(spec: TinyVAESpec, cfg: VAETrainConfig, seed: int, n: int, f: int, frames_shape) -> dict:
    """What a checkpoint must share with the run that resumes it (the same steps would follow)."""
    return json.loads(json.dumps({"spec": dataclasses.asdict(spec), "train_config": dataclasses.asdict(cfg),
                                  "seed": int(seed), "clips": [int(n), int(f)],
                                  "frames": [int(x) for x in frames_shape]}, default=str))


# settings that only the clip phase reads: a run that changes only these continues from the end of
# an image phase trained with the rest (``<checkpoint_dir>/image_phase``, written when that phase ends)
_CLIP_ONLY = ("steps", "batch_size", "clip_lr")
IMAGE_PHASE_DIR = "image_phase"


def _image_fingerprint(fingerprint: dict) -> dict:
    """The part of a run's fingerprint the image phase depends on."""
    return dict(fingerprint, train_config={k: v for k, v in (fingerprint.get("train_config") or {}).items()
                                           if k not in _CLIP_ONLY})


def _save_checkpoint(d: str, params, opt_state, meta: dict) -> None:
    from vans_jax._files import atomic_path, write_atomic
    os.makedirs(d, exist_ok=True)
    leaves = [np.asarray(jax.device_get(x)) for x in jax.tree.leaves((params, opt_state))]
    with atomic_path(os.path.join(d, "state.npz")) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, *leaves)
    write_atomic(os.path.join(d, "meta.json"), json.dumps(meta))


def _load_checkpoint(d: str, params, opt_state, fingerprint: dict):
    """(params, opt_state, meta) from ``d``, or None when it holds no checkpoint. A checkpoint of
    another run (other settings or data) is an error naming the directory and the settings, unless the
    runs differ only in the clip phase's settings (``_CLIP_ONLY``) and ``d`` kept the end of the image
    phase (``d/image_phase``): then that is where this run continues (its clip phase from step 0)."""
    mp, sp = os.path.join(d, "meta.json"), os.path.join(d, "state.npz")
    if not (os.path.exists(mp) and os.path.exists(sp)):
        return None
    with open(mp) as fh:
        meta = json.load(fh)
    if meta.get("fingerprint") != fingerprint:
        # only the clip phase's settings differ: a checkpoint still in the image phase continues as it is;
        # one in the clip phase goes back to the end of the image phase it kept
        cands = [(meta, sp)] if meta.get("phase") == "image" else []
        img = os.path.join(d, IMAGE_PHASE_DIR)
        if os.path.exists(os.path.join(img, "meta.json")) and os.path.exists(os.path.join(img, "state.npz")):
            with open(os.path.join(img, "meta.json")) as fh:
                cands.append((json.load(fh), os.path.join(img, "state.npz")))
        for m_, s_ in cands:
            if _image_fingerprint(m_.get("fingerprint") or {}) == _image_fingerprint(fingerprint):
                meta, sp = dict(m_, history={"image": m_["history"].get("image", [])},
                                seconds={"image": m_["seconds"].get("image", 0.0)}, reused_image_phase=True), s_
                break
    if meta.get("fingerprint") != fingerprint and not meta.get("reused_image_phase"):
        theirs = meta.get("fingerprint") or {}
        diff = []
        for k in sorted(set(theirs) | set(fingerprint)):
            a, b = theirs.get(k), fingerprint.get(k)
            if isinstance(a, dict) and isinstance(b, dict):
                diff += [f"{k}.{kk}" for kk in sorted(set(a) | set(b)) if a.get(kk) != b.get(kk)]
            elif a != b:
                diff.append(k)
        raise ValueError(f"{d} holds a checkpoint of another VAE run (it differs in {diff}): resume it with "
                         f"its settings, or remove it / use another checkpoint_dir")
    treedef = jax.tree.structure((params, opt_state))
    with np.load(sp, allow_pickle=False) as z:
        leaves = [z[f"arr_{i}"] for i in range(len(z.files))]
    if len(leaves) != treedef.num_leaves:
        raise ValueError(f"{sp}: {len(leaves)} arrays, this run's state has {treedef.num_leaves}")
    like = jax.tree.leaves((params, opt_state))
    for i, (a, b) in enumerate(zip(leaves, like)):
        if a.shape != np.shape(b):
            raise ValueError(f"{sp}: array {i} has shape {a.shape}, this run's has {np.shape(b)}")
    params, opt_state = jax.tree.unflatten(treedef, [jnp.asarray(a, dtype=np.asarray(b).dtype)
                                                     for a, b in zip(leaves, like)])
    return params, opt_state, meta


def train_vae(world_dir: str, out_dir: str, *, steps: int | None = None, seed: int = 0, batch_size: int | None = None,
              spec: TinyVAESpec = TinyVAESpec(), train_config: VAETrainConfig | None = None,
              train_clips: WorldClips | None = None, eval_clips: WorldClips | None = None,
              max_train_samples: int | None = None, max_eval_samples: int | None = 200, stats_clips: int = 512,
              num_frames: int | None = None, train_source: str = "render",
              checkpoint_dir: str | None = None, checkpoint_every: int = 500, stop_after: int | None = None,
              log: Callable[[str], None] | None = print) -> dict:
    """Trains the tiny VAE on ``<world_dir>``'s train split, measures its latent statistics (on up
    to ``stats_clips`` training clips), writes the diffusers ``AutoencoderKLWan`` directory
    ``out_dir`` (e.g. ``<vdm>/vae``), reloads it with ``convert.wan_vae.load_vae`` and measures the
    reconstruction PSNR on the eval split's clips. Returns the metrics.

    Two phases from ``init_for_training``: ``image_steps`` on single frames (any frame of any clip;
    cheap steps that teach the spatial code), then ``steps`` on clips of ``num_frames`` (4k+1,
    default the target length): every target clip and the last ``num_frames`` of every input clip.
    ``steps`` / ``batch_size`` override the clip phase of ``train_config``.
    The training clips are rendered from the scenes (``train_source="render"``, ~25x faster than
    decoding the mp4s; ``"video"`` decodes them); the eval clips are the decoded mp4s, what the
    pipeline encodes. ``train_clips`` / ``eval_clips`` (``clips.load_world_clips``) skip loading.

    ``checkpoint_dir``: the run is resumable. Every ``checkpoint_every`` steps and at the end of each
    phase the trained variables, the optimizer state, the batch sampler's state and the history are
    written there; a later call with the same settings and data continues from the last one (the
    same batches and updates as an uninterrupted run: tested), one with other settings is an error.
    ``stop_after``: return ``{"stopped_at": ...}`` after that many steps of this call, without
    exporting (a run spread over several sittings; tests)."""
    t0 = time.time()
    log = log or (lambda s: None)
    cfg = train_config or VAETrainConfig()
    if steps is not None or batch_size is not None:
        cfg = dataclasses.replace(cfg, **{k: v for k, v in (("steps", steps), ("batch_size", batch_size))
                                          if v is not None})
    if not 0.0 <= cfg.lr_end_ratio <= 1.0:
        raise ValueError(f"VAETrainConfig.lr_end_ratio must be in [0, 1], got {cfg.lr_end_ratio}")
    if min(cfg.l1_weight, cfg.mse_weight, cfg.edge_weight) < 0 or cfg.l1_weight + cfg.mse_weight <= 0:
        raise ValueError(f"VAETrainConfig: loss weights must be >= 0 with l1_weight + mse_weight > 0, got "
                         f"l1_weight={cfg.l1_weight}, mse_weight={cfg.mse_weight}, edge_weight={cfg.edge_weight}")
    if cfg.input_source not in ("render", "video"):
        raise ValueError(f"VAETrainConfig.input_source must be 'render' or 'video', got {cfg.input_source!r}")
    _trainable_filter(cfg.trainable)
    if cfg.trainable != "all" and not cfg.init_from:
        raise ValueError(f"VAETrainConfig.trainable={cfg.trainable!r} trains part of a trained VAE: set init_from")
    if cfg.init_from and not os.path.isdir(cfg.init_from):
        raise FileNotFoundError(f"VAETrainConfig.init_from: no VAE directory at {cfg.init_from}")
    if cfg.input_source == "video" and train_source != "render":
        raise ValueError("VAETrainConfig.input_source='video' trains against the exact frames: train_source must "
                         f"be 'render', got {train_source!r}")
    train = (train_clips if train_clips is not None
             else load_world_clips(world_dir, "train", max_train_samples, source=train_source))
    train_in = train
    if cfg.input_source == "video":       # the decoded mp4s as the encoder's input, the exact frames as target
        train_in = load_world_clips(world_dir, "train", len(train), source="video")
        if train_in.inputs.shape != train.inputs.shape or train_in.targets.shape != train.targets.shape:
            raise ValueError(f"{world_dir}: decoded train clips {train_in.inputs.shape}/{train_in.targets.shape} "
                             f"differ in shape from the rendered ones {train.inputs.shape}/{train.targets.shape}")
    evalc = eval_clips if eval_clips is not None else load_world_clips(world_dir, "eval", max_eval_samples)
    eval_exact = load_world_clips(world_dir, "eval", len(evalc), source="render")
    data, data_in = vae_clips(train, num_frames), vae_clips(train_in, num_frames)
    n, f = data.shape[:2]
    t_data = time.time() - t0

    # unrolled chunk scans: XLA:CPU runs the scan's backward pass ~10x slower
    if cfg.init_from:
        vae = load_vae(cfg.init_from, scan_unroll=True)
        log(f"[vae] starting from {cfg.init_from}; training {cfg.trainable}")
    else:
        vae = init_for_training(WanVAE(spec.config(scan_unroll=True), rngs=nnx.Rngs(seed)))
    init_stats = (vae.cfg.latents_mean, vae.cfg.latents_std)
    graphdef, params, frozen = nnx.split(vae, _trainable_filter(cfg.trainable), ...)
    rng = np.random.default_rng(seed)
    key = jax.random.key(seed)
    frames = np.concatenate([train.inputs, train.targets], axis=1)              # (N, F_in + F_out, H, W, 3)
    frames_in = np.concatenate([train_in.inputs, train_in.targets], axis=1)

    def image_batch(b):
        i, j = rng.integers(0, frames.shape[0], b), rng.integers(0, frames.shape[1], b)
        return frames_in[i, j][:, None], frames[i, j][:, None]

    def clip_batch(b):
        i = rng.choice(n, b, replace=False)
        return data_in[i], data[i]

    phases = (("image", cfg.image_steps, min(cfg.image_batch_size, frames.shape[0] * frames.shape[1]), image_batch),
              ("clip", cfg.steps, min(cfg.batch_size, n), clip_batch))
    history, seconds = {}, {}
    order = [p[0] for p in phases]
    ck_phase, ck_step, ck_opt = None, 0, None      # where the checkpoint this call continues stopped
    if checkpoint_dir:
        fingerprint = _run_fingerprint(spec, cfg, seed, n, f, frames.shape)
        like = _phase_optimizer(cfg, 2, cfg.lr).init(params)       # the optimizer state's layout (both phases')
        got = _load_checkpoint(checkpoint_dir, params, like, fingerprint)
        if got is not None:
            params, ck_opt, meta = got
            history, seconds = meta["history"], meta["seconds"]
            rng.bit_generator.state = meta["rng"]
            ck_phase, ck_step = meta["phase"], int(meta["step"])
            log(f"[vae] resuming from {checkpoint_dir}: {ck_phase} step {ck_step}"
                + (" (its image phase: only the clip phase's settings changed)"
                   if meta.get("reused_image_phase") else ""))
    done_here = 0
    for phase, steps_, b, sample in phases:
        if steps_ <= 0 or (ck_phase is not None and order.index(phase) < order.index(ck_phase)):
            continue                                 # (a phase the checkpoint had finished)
        tx, step_fn = _phase_step(graphdef, cfg, steps_, _phase_lr(cfg, phase))
        opt_state, start = tx.init(params), 0
        if phase == ck_phase:
            opt_state, start = ck_opt, ck_step
        hist = history.setdefault(phase, [])
        t1 = time.time() - seconds.get(phase, 0.0)       # the phase's time over every sitting
        t_here = time.time()

        def save(i, where=None):
            _save_checkpoint(where or checkpoint_dir, params, opt_state, {
                "fingerprint": fingerprint, "phase": phase, "step": i, "history": history,
                "seconds": dict(seconds, **{phase: time.time() - t1}), "rng": rng.bit_generator.state})

        for i in range(start, steps_):
            if stop_after is not None and done_here >= stop_after:      # (its checkpoint is written)
                return {"stopped_at": {"phase": phase, "step": i}}
            params, opt_state, m = step_fn(params, frozen, opt_state, tuple(jnp.asarray(a) for a in sample(b)),
                                           jax.random.fold_in(key, len(hist) + (0 if phase == "image" else 1 << 20)))
            hist.append({k: float(v) for k, v in m.items()})
            done_here += 1
            if i == 0 or (i + 1) % 100 == 0 or i + 1 == steps_:
                el = time.time() - t1
                log(f"[vae] {phase} step {i + 1}/{steps_} loss {hist[-1]['loss']:.4f} (l1 {hist[-1]['l1']:.4f}, "
                    f"kl {hist[-1]['kl']:.2f})  {el:.0f}s, eta {(time.time() - t_here) / (i + 1 - start) * (steps_ - i - 1):.0f}s")
            last = i + 1 == steps_
            if checkpoint_dir and ((i + 1) % max(1, int(checkpoint_every)) == 0 or last or done_here == stop_after):
                save(i + 1)
                if last and phase == "image":        # kept: a run with other clip settings continues from here
                    save(i + 1, os.path.join(checkpoint_dir, IMAGE_PHASE_DIR))
        seconds[phase] = time.time() - t1

    vae = nnx.merge(graphdef, params, frozen)
    if cfg.trainable == "decoder":              # the encoder did not move: its latent space stays as it was
        mean, std = (np.asarray(v, np.float64) for v in init_stats)
    else:
        stats_idx = np.random.default_rng(seed + 1).permutation(n)[:stats_clips]
        mean, std = latent_stats(vae, data_in[np.sort(stats_idx)])     # what the encoder sees at run time
    final_cfg = dataclasses.replace(vae.cfg, latents_mean=tuple(round(float(v), 4) for v in mean),
                                    latents_std=tuple(round(float(v), 4) for v in std), scan_unroll=1)
    vae.cfg = final_cfg
    save_vae(vae, out_dir)
    loaded = load_vae(out_dir)
    ev, ev_exact = vae_clips(evalc, f), vae_clips(eval_exact, f)
    k = len(evalc)
    rec_t, rec_i = reconstruction_psnr(loaded, ev[:k]), reconstruction_psnr(loaded, ev[k:])
    ex_t = reconstruction_psnr(loaded, ev[:k], targets_u8=ev_exact[:k])
    ex_i = reconstruction_psnr(loaded, ev[k:], targets_u8=ev_exact[k:])
    codec = (ev.astype(np.float64) - ev_exact) ** 2
    codec_clip = codec.mean(axis=(1, 2, 3, 4))
    metrics = {}
    for phase, hist in history.items():       # means over the first / last min(10, steps // 3) steps
        k = max(1, min(10, len(hist) // 3))
        for name, key_, sl in (("loss_first", "loss", slice(0, k)), ("loss_last", "loss", slice(-k, None)),
                               ("l1_last", "l1", slice(-k, None))):
            metrics[f"{phase}_{name}"] = float(np.mean([hh[key_] for hh in hist[sl]]))
    metrics.update({
        "eval_psnr_target": rec_t["psnr"], "eval_psnr_input": rec_i["psnr"],
        "eval_psnr_worst_clip": min(rec_t["psnr_worst_clip"], rec_i["psnr_worst_clip"]),
        # the decoded mp4s' reconstructions against the exact frames the world rendered (what was meant)
        "eval_psnr_exact_target": ex_t["psnr"], "eval_psnr_exact_input": ex_i["psnr"],
        "eval_psnr_exact_worst_clip": min(ex_t["psnr_worst_clip"], ex_i["psnr_worst_clip"]),
        "eval_psnr_exact_per_frame": [round(_psnr_db((10 ** (-a / 10) + 10 ** (-b / 10)) / 2 * 255.0 ** 2), 2)
                                      for a, b in zip(ex_t["psnr_per_frame"], ex_i["psnr_per_frame"])],
        # the codec alone: decoded mp4 vs exact frames (the ceiling of a VAE that reproduces its input)
        "eval_codec_psnr": _psnr_db(codec.mean()), "eval_codec_psnr_worst_clip": _psnr_db(codec_clip.max()),
        "input_source": cfg.input_source, "init_from": cfg.init_from, "trainable": cfg.trainable,
        "latents_mean": list(final_cfg.latents_mean), "latents_std": list(final_cfg.latents_std),
        "image_steps": cfg.image_steps, "steps": cfg.steps, "batch_size": min(cfg.batch_size, n),
        "train_clips": int(n), "num_frames": int(f),
        "num_params": int(sum(x.size for x in jax.tree.leaves(nnx.state(vae, nnx.Param)))),
        "file_bytes": int(sum(os.path.getsize(os.path.join(out_dir, p)) for p in os.listdir(out_dir))),
        "seconds_data": t_data, "seconds_image_phase": seconds.get("image", 0.0),
        "seconds_clip_phase": seconds.get("clip", 0.0), "seconds_total": time.time() - t0,
    })
    log(f"[vae] eval PSNR target clips {metrics['eval_psnr_target']:.2f} dB, input clips "
        f"{metrics['eval_psnr_input']:.2f} dB (worst clip {metrics['eval_psnr_worst_clip']:.2f}); against the exact "
        f"frames {metrics['eval_psnr_exact_target']:.2f} / {metrics['eval_psnr_exact_input']:.2f} dB (worst "
        f"{metrics['eval_psnr_exact_worst_clip']:.2f}; codec alone {metrics['eval_codec_psnr']:.2f}); latent std "
        f"{np.min(std):.3f}..{np.max(std):.3f}  ({metrics['seconds_total']:.0f}s)")
    return metrics
