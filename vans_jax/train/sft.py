"""Supervised fine-tuning losses of VANS (paper appendix C) as pure functions, and the host-side
batch builders that turn data-pipeline examples into their array batches.

* SFT-VLM: next-token cross-entropy on the assistant part
  (``[Think]..[/Think][Ans]..[/Ans]<|im_end|>``), LoRA by default.
* SFT-VDM: flow-matching velocity MSE, timestep uniform then Wan-shifted, the clean reference
  latents of the input clip in front of the noisy target on the time axis (VANS conditioning),
  text dropped to the negative-prompt embedding with probability ``text_dropout`` (for CFG).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .. import parallel
from ..models.qwen2_5_vl import prepare_inputs
from ..models.qwen2_5_vl import tokenizer as qtok
from ..rl.format import format_response
from ..rl.rollouts import vlm_video_inputs
from ..sampling.flow import shift_sigmas


# ----------------------------------------------------------------------------- VLM


def token_nll(logits, targets, mask):
    """Masked mean negative log-likelihood and accuracy of ``targets`` under ``logits`` (fp32)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), -1)[..., 0]
    m = mask.astype(jnp.float32)
    n = jnp.maximum(m.sum(), 1.0)
    acc = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
    return jnp.sum(nll * m) / n, jnp.sum(acc * m) / n, m.sum()


def sft_vlm_loss(params, graphdef, frozen, batch, rng, *, dropout: bool = True):
    """Cross-entropy of each next token where ``loss_mask`` marks the assistant target."""
    model = nnx.merge(graphdef, params, frozen)
    ids = batch["input_ids"]
    logits = model.forward_arrays(ids, batch["attention_mask"], batch["position_ids"], batch.get("video"),
                                  batch.get("image"), rng=rng if dropout else None)
    loss, acc, ntok = token_nll(logits[:, :-1], ids[:, 1:], batch["loss_mask"][:, 1:])
    return loss, {"token_accuracy": acc, "target_tokens": ntok}


def build_sft_vlm_batch(examples: Sequence[dict], tokenizer, model_cfg, vcfg, pad_to_multiple: int = 16,
                        max_len: int = 0, *, mesh=None) -> dict:
    """Right-padded SFT batch (prompt + target) with M-RoPE positions and the video patches.
    ``max_len`` > 0: every batch is exactly that long (one compiled shape); longer sequences lose
    the end of their target (counted in ``batch["truncated"]``); else lengths are rounded up to
    ``pad_to_multiple``. ``mesh``: global arrays on it (``prepare_inputs``); with several processes
    ``examples`` are this process's rows, the length is the longest of every process's and
    ``truncated`` counts every process's."""
    pixels, grid, seconds = vlm_video_inputs(examples, vcfg)
    merge = model_cfg.vision.spatial_merge_size
    rows = [qtok.sft_example(tokenizer, e["question"], format_response(e["think"], e["caption"]), grid[i], merge)
            for i, e in enumerate(examples)]
    length = max(len(r["input_ids"]) for r in rows)
    truncated = 0
    if max_len > 0:
        too_short = [int(r["prompt_len"]) for r in rows if int(r["prompt_len"]) >= max_len]
        if too_short:
            raise ValueError(f"max_len={max_len} does not even hold the prompt ({max(too_short)} tokens)")
        truncated = sum(len(r["input_ids"]) > max_len for r in rows)
        rows = [{k: (v[:max_len] if k in ("input_ids", "loss_mask") else v) for k, v in r.items()} for r in rows]
        length = max_len
    else:
        length = -(-length // pad_to_multiple) * pad_to_multiple
    if mesh is not None and jax.process_count() > 1:
        every = parallel.process_allgather_objects((length, truncated))
        length, truncated = max(n for n, _ in every), sum(t for _, t in every)
    pad = qtok._pad_id(tokenizer)
    ids = np.full((len(rows), length), pad, np.int32)
    amask = np.zeros((len(rows), length), np.int32)
    lmask = np.zeros((len(rows), length), np.int32)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n], amask[i, :n], lmask[i, :n] = r["input_ids"], 1, r["loss_mask"]
    batch = prepare_inputs(model_cfg, ids, amask, pixels, grid, seconds, mesh=mesh)
    batch.pop("rope_deltas")
    batch["loss_mask"] = jnp.asarray(lmask) if mesh is None else parallel.host_local_batch_to_global(lmask, mesh)
    batch["truncated"] = truncated
    return batch


# ----------------------------------------------------------------------------- VDM


def sample_sigmas(rng, batch: int, shift: float):
    """sigma = shift(u) with u ~ U(0, 1): Wan's shifted timestep distribution (continuous)."""
    u = jax.random.uniform(rng, (batch,), jnp.float32, 1e-3, 1.0)
    return shift_sigmas(u, shift)


def foreground_latents(x0, threshold: float = 0.5):
    """(B, T, h, w) bool: the latent cells of ``x0`` (B, C, T, h, w; normalized latents) away from the
    clip's background, i.e. whose mean squared distance over channels from the per-clip, per-channel
    median latent (the background fills most cells) exceeds ``threshold``. On the tiny world's VAE,
    0.5 marks about a quarter of the cells (a median cell is at 0.14, objects at 1-50)."""
    b = jnp.median(x0.reshape(x0.shape[0], x0.shape[1], -1), axis=-1)[:, :, None, None, None]
    return jnp.mean((x0 - b) ** 2, axis=1) > threshold


def sft_vdm_loss(params, graphdef, frozen, batch, rng, *, shift: float = 5.0, text_dropout: float = 0.1,
                 dropout: bool = True, fg_weight: float = 0.0, fg_threshold: float = 0.5):
    """Velocity MSE: x_t = (1 - s) x0 + s n, target v = n - x0, timestep = 1000 s; the clean
    ``ref_latents`` (B, C, n_ref, h, w) go in front on the time axis and their outputs are dropped;
    ``context_pad`` (optional): ``context`` and ``null_context`` were trimmed (``sampling.wan.trim_batch_text``).

    ``fg_weight`` > 0 (off by default, Wan's plain objective): each latent cell's error is weighted
    ``1 + fg_weight`` where it is foreground (``foreground_latents(x0, fg_threshold)``), 1 elsewhere,
    and the loss divided by the mean weight (its scale stays that of the plain MSE): small objects on
    a flat background otherwise get a small share of the gradient."""
    model = nnx.merge(graphdef, params, frozen)
    x0 = batch["latents"].astype(jnp.float32)
    b = x0.shape[0]
    k_t, k_n, k_d, k_m = jax.random.split(rng, 4)
    sigma = sample_sigmas(k_t, b, shift)
    noise = jax.random.normal(k_n, x0.shape, jnp.float32)
    s = sigma[:, None, None, None, None]
    xt = (1.0 - s) * x0 + s * noise
    ctx = batch["context"]
    if text_dropout > 0:
        drop = jax.random.bernoulli(k_d, text_dropout, (b,))
        null = jnp.broadcast_to(batch["null_context"].astype(ctx.dtype), ctx.shape)
        ctx = jnp.where(drop[:, None, None], null, ctx)
    ref = batch.get("ref_latents")
    n_ref = 0 if ref is None else ref.shape[2]
    x_in = xt if ref is None else jnp.concatenate([ref.astype(xt.dtype), xt], axis=2)
    kw = {} if batch.get("context_pad") is None else {"context_pad": batch["context_pad"]}   # trimmed text
    v = model(x_in, sigma * 1000.0, ctx, n_ref=n_ref, rng=k_m if dropout else None, **kw).astype(jnp.float32)
    err = (v - (noise - x0)) ** 2
    if fg_weight > 0:
        fg = foreground_latents(x0, fg_threshold).astype(jnp.float32)
        w = (1.0 + fg_weight * fg)[:, None]
        loss = jnp.mean(err * w) / jnp.mean(w)
        return loss, {"sigma_mean": jnp.mean(sigma), "fg_fraction": jnp.mean(fg)}
    loss = jnp.mean(err)
    return loss, {"sigma_mean": jnp.mean(sigma)}


def clip_to_video(frames) -> np.ndarray:
    """uint8 (B, F, H, W, 3) -> float (B, 3, F, H, W) in [-1, 1] for the VAE."""
    a = np.asarray(frames)
    return (a.astype(np.float32) / 127.5 - 1.0).transpose(0, 4, 1, 2, 3)
