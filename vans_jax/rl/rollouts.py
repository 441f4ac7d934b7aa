"""Joint-GRPO rollouts: what the policies do before an update, as host-side code around jitted pure
functions (compiled once per model structure and settings, shared by every trainer instance).

* Prompts: ``build_prompt_batch`` (left-padded system prompt + video + question, global arrays).
* Text: ``generate_completions`` / ``score_completions`` (jitted; ``graphdef`` and settings static),
  ``decode_texts``, ``captions_of`` (the one response rule, ``rl.format.extract_answer``).
* Video: ``RolloutEnv`` holds the frozen VDM, the CLIP reward model and the mesh; it renders captions
  with the ODE sampler (stage 1) or the Flow-GRPO SDE sampler with stored trajectories (stage 2),
  scores frames and captions with CLIP, and draws the stage-2 anchors (resampled while ROUGE-L is
  under the threshold).

Several processes (``jax.distributed``): every jitted input is a global array on the mesh (this
process's rows of the prompts and reference latents; the values of the whole global batch for
caption embeddings, advantages, noise), so generation, rendering, VAE decoding and scoring run once
over the global batch. What the host needs (completion tokens, the frames CLIP scores,
ground-truth captions) is gathered from every process, so every process decodes the same texts and
computes the same rewards, advantages and anchor decisions.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from .. import parallel
from ..models import clip as clip_lib
from ..models.qwen2_5_vl import prepare_inputs
from ..models.qwen2_5_vl import processor as qproc
from ..models.qwen2_5_vl import tokenizer as qtok
from ..models.qwen2_5_vl.modeling import _vision_input
from ..sampling import flow
from ..sampling import wan as wp
from ..sampling.text import completion_logprobs, generate_arrays, left_pad
from .format import extract_answer, parse_response
from .rewards import rouge_l_reward

# ----------------------------------------------------------------------------- prompts


def vlm_video_inputs(examples: Sequence[dict], vcfg):
    """Qwen processor outputs for the VLM frames of each example: (pixels, grid_thw, seconds)."""
    fps = float(examples[0].get("vlm_fps", vcfg.sample_fps))
    return qproc.preprocess_videos([np.asarray(e["vlm_frames"]) for e in examples], fps,
                                   min_pixels=int(vcfg.video_min_pixels), max_pixels=int(vcfg.video_max_pixels))


def build_prompt_batch(examples: Sequence[dict], tokenizer, model_cfg, vcfg, pad_to_multiple: int = 16, *,
                       mesh=None) -> dict:
    """Left-padded generation prompts (system prompt, the video, the question). ``mesh``: global
    arrays on it (rows and vision patches over the batch axes); with several processes
    ``examples`` are this process's rows, the padded length is the longest of every process's and
    the vision layout covers every process's videos."""
    pixels, grid, seconds = vlm_video_inputs(examples, vcfg)
    questions = [e["question"] for e in examples]
    merge = model_cfg.vision.spatial_merge_size
    enc = qtok.encode_prompts(tokenizer, questions, grid, merge_size=merge)
    length = enc["input_ids"].shape[1]
    target = -(-length // pad_to_multiple) * pad_to_multiple
    if mesh is not None and jax.process_count() > 1:
        target = max(parallel.process_allgather_objects(target))
    if target != length:
        enc = qtok.encode_prompts(tokenizer, questions, grid, merge_size=merge, pad_to=target)
    batch = prepare_inputs(model_cfg, enc["input_ids"], enc["attention_mask"], pixels, grid, seconds)
    batch.pop("rope_deltas")
    if mesh is None:
        return left_pad(batch)
    # left padding needs host values: pad first, then place (the video layout is placed by itself)
    batch = left_pad({k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")})
    out = parallel.host_local_batch_to_global({k: np.asarray(batch[k]) for k in ("input_ids", "attention_mask")},
                                              mesh)
    pos = np.asarray(batch["position_ids"])
    out["position_ids"] = parallel.host_local_batch_to_global(pos, mesh, parallel.batch_spec(mesh, 1, pos.shape[1]))
    out["video"] = _vision_input(model_cfg, pixels, grid, "video", mesh)
    return out


# ----------------------------------------------------------------------------- text


@functools.partial(jax.jit, static_argnames=("graphdef", "settings"))
def generate_completions(graphdef, params, frozen, batch, rng, settings):
    """``settings.num_return_sequences`` completions per prompt (``sampling.text.generate_arrays``)."""
    return generate_arrays(nnx.merge(graphdef, params, frozen), batch, rng, settings)


@functools.partial(jax.jit, static_argnames=("graphdef", "temperature"))
def score_completions(graphdef, params, frozen, batch, completions, mask, temperature):
    """Per-token log-probs of stored completions under ``params`` (old policy / reference)."""
    return completion_logprobs(nnx.merge(graphdef, params, frozen), batch, completions, mask, temperature)


def host_values(x) -> np.ndarray:
    """The values of a (global) array on this host: the whole array, on every process (an
    all-gather across processes when its shards are spread over them: a collective then, call it
    on every process)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def gather_list(items: Sequence) -> list:
    """Every process's ``items`` concatenated in process order (the global batch's order), on every
    process; ``list(items)`` with one process. A collective with several processes."""
    if jax.process_count() == 1:
        return list(items)
    return [x for part in parallel.process_allgather_objects(list(items)) for x in part]


def decode_texts(tokenizer, tokens, lengths) -> list[str]:
    tokens, lengths = np.asarray(tokens), np.asarray(lengths)
    return [tokenizer.decode(tokens[i, :lengths[i]].tolist(), skip_special_tokens=False) for i in range(len(tokens))]


def captions_of(texts: Sequence[str], fallback: str = "full") -> list[str]:
    """The caption of each response (``rl.format.extract_answer``: the [Ans] text, else ``fallback``)."""
    return [extract_answer(t, fallback=fallback) for t in texts]


def think_lengths(texts: Sequence[str], tokenizer) -> np.ndarray:
    return np.asarray([len(tokenizer.encode(parse_response(t)["think"], add_special_tokens=False)) if t else 0
                       for t in texts], np.float32)


@dataclasses.dataclass
class RenderSettings:
    height: int
    width: int
    num_frames: int
    num_steps: int
    cfg_scale: float
    shift: float
    negative_prompt: str = ""
    mode: str = "euler"          # stage-1 rendering (ODE); stage 2 always samples with the SDE
    noise_level: float = 0.7
    std_form: str = "flow_grpo"
    sde_window: tuple[int, int] | None = None   # None: all steps but the last
    n_ref: int = 6


def latent_shape(vdm: wp.WanModels, n: int, r: RenderSettings):
    t, h, w = wp.check_generation_size(vdm, r.height, r.width, r.num_frames)
    return (n, vdm.latent_channels, t, h, w)


def reference_latents(vdm: wp.WanModels, examples, r: RenderSettings, to_device=None):
    clips = np.stack([np.asarray(e["reference"]) for e in examples])
    return wp.reference_latents(vdm, clips, r.n_ref, height=r.height, width=r.width, to_device=to_device)


@functools.lru_cache(maxsize=None)
def _normal_fn(shape: tuple, sharding: NamedSharding):
    return jax.jit(lambda k: jax.random.normal(k, shape, jnp.float32), out_shardings=sharding)


class RolloutEnv:
    """The frozen side of a rollout: the mesh placement of host values, the frozen VDM (its VAE and
    text encoder always; its DiT when the DiT is not trained), the CLIP reward model, the
    tokenizer. The trained modules are passed in (``dit``, ``generate``)."""

    def __init__(self, render: RenderSettings, *, mesh, tokenizer=None, vdm: wp.WanModels | None = None,
                 clip_model=None, clip_tokenizer=None, gt_cache_size: int = 4096):
        self.r, self.mesh, self.tokenizer, self.vdm = render, mesh, tokenizer, vdm
        self.clip_model, self.clip_tokenizer = clip_model, clip_tokenizer
        self._gt_feats: collections.OrderedDict[bytes, np.ndarray] = collections.OrderedDict()
        self.gt_cache_size = int(gt_cache_size)
        self.gt_cache_hits = self.gt_cache_misses = 0

    # -- global arrays (see the module docstring)

    def batch_sharding(self, rows: int, dim: int = 0) -> NamedSharding:
        return NamedSharding(self.mesh, parallel.batch_spec(self.mesh, dim, rows))

    def rows(self, x):
        """This process's rows (of the global batch) -> global arrays sharded over the batch axes."""
        return parallel.host_local_batch_to_global(x, self.mesh)

    def whole(self, x):
        """Values of the whole global batch, alike on every process (host arrays) -> global arrays
        sharded over the batch axes (each process places its own shards)."""
        return parallel.device_put_global(x, jax.tree.map(lambda a: self.batch_sharding(np.shape(a)[0]), x))

    def const(self, x):
        """A host value alike on every process -> a replicated global array."""
        return parallel.device_put_global(np.asarray(x), NamedSharding(self.mesh, P()))

    def normal(self, rng, shape):
        """Standard normal noise of ``shape``, sharded over the batch (dim 0): the same values as
        ``jax.random.normal(rng, shape)`` (threefry is partitionable), drawn where they live."""
        return _normal_fn(tuple(shape), self.batch_sharding(shape[0]))(rng)

    def frame_feats(self, frames) -> np.ndarray:
        """CLIP image features (N, F, D) of the whole global batch's videos (N, F, H, W, 3) uint8
        (``frames``: numpy or a global array), as host values. One process: the frames stay on the
        device (preprocessing there too, ``clip.preprocess_frames_on_device``); only the features
        come back. Several processes: the frames are gathered and every process runs
        ``clip.encode_frames`` on all of them, exactly as one process does (the same chunks, the
        same programs: rewards bit-identical to a 1-process run; advantages normalize within groups
        of near-equal rewards and would magnify any last-bit difference). The cost: an all-gather
        of the uint8 frames, and CLIP (small next to the DiT) repeated on every host."""
        if isinstance(frames, jax.Array) and not frames.is_fully_addressable:
            frames = host_values(frames)
        return np.asarray(clip_lib.encode_frames(self.clip_model, frames))

    def gt_frame_feats(self, targets: np.ndarray) -> np.ndarray:
        """``frame_feats`` of ground-truth videos (N, F, H, W, 3) (host values of the whole global
        batch, alike on every process), cached by content: an example seen again (the next epoch,
        a repeated prompt) costs a hash, not a CLIP forward. The cache holds ``gt_cache_size``
        videos' features (least recently used dropped); it lives as long as this environment,
        whose CLIP model is frozen."""
        targets = np.ascontiguousarray(targets)
        keys = [hashlib.blake2b(t.tobytes(), digest_size=16,
                                person=repr(t.shape).encode()[:16]).digest() for t in targets]
        missing = [i for i, k in enumerate(keys) if k not in self._gt_feats]
        self.gt_cache_hits += len(keys) - len(missing)
        self.gt_cache_misses += len(missing)
        if missing:
            new = self.frame_feats(targets[missing])
            for i, f in zip(missing, new):
                self._gt_feats[keys[i]] = f
        out = np.stack([self._gt_feats[k] for k in keys])
        for k in keys:
            self._gt_feats.move_to_end(k)
        while len(self._gt_feats) > self.gt_cache_size:
            self._gt_feats.popitem(last=False)
        return out

    # -- pieces

    def caption_feats(self, captions):
        return host_values(clip_lib.encode_texts(self.clip_model, self.clip_tokenizer, list(captions)))

    def context(self, captions, n):
        """``captions``: the whole global batch's (every process the same list)."""
        ctx = wp.encode_text(self.vdm, captions, to_device=self.whole)
        unc = self.vdm.negative_embeddings(self.r.negative_prompt, n) if self.r.cfg_scale > 1.0 else None
        return ctx, unc

    def render_ode(self, captions, ref_lat, rng, *, dit=None, return_latents=False):
        """ODE rendering (the render sampler ``r.mode``) with the frozen VDM (stage 1) or ``dit`` (the
        policy of ``dit_objective="nft"``): uint8 frames (a device array), or with ``return_latents``
        (frames, final latents, text contexts)."""
        n = len(captions)
        ctx, unc = self.context(captions, n)
        noise = self.normal(rng, latent_shape(self.vdm, n, self.r))
        lat = flow.sample(self.vdm.dit if dit is None else dit, noise, ctx, uncond_context=unc,
                          guidance_scale=self.r.cfg_scale, ref_latents=ref_lat, num_steps=self.r.num_steps,
                          shift=self.r.shift, mode=self.r.mode)
        frames = wp.decode_latents(self.vdm, lat, to_host=False)
        return (frames, lat, ctx, unc) if return_latents else frames

    def sde_window(self):
        return self.r.sde_window or (0, self.r.num_steps - 1)

    def render_sde(self, dit, captions, ref_lat, rng, noise=None):
        """Rendering with ``dit`` (the policy) and the Flow-GRPO SDE sampler over the window: uint8
        frames (a device array), the stored trajectory, the text contexts. ``noise``: the initial
        latents (a global array; default drawn from ``rng``)."""
        n = len(captions)
        ctx, unc = self.context(captions, n)
        k_noise, k_sde = jax.random.split(rng)
        if noise is None:
            noise = self.normal(k_noise, latent_shape(self.vdm, n, self.r))
        lat, traj = flow.sample(dit, noise, ctx, uncond_context=unc, guidance_scale=self.r.cfg_scale,
                                ref_latents=ref_lat, num_steps=self.r.num_steps, shift=self.r.shift, mode="sde",
                                rng=k_sde, sde_window=self.sde_window(), noise_level=self.r.noise_level,
                                std_form=self.r.std_form, return_trajectory=True)
        return wp.decode_latents(self.vdm, lat, to_host=False), traj, ctx, unc

    def anchors(self, generate, prompt, gts, rng, *, threshold: float, max_tries: int, fallback: str):
        """Stage 2: one caption per prompt from the frozen VLM (``generate(prompt, rng)``), resampled
        while ROUGE-L < ``threshold`` (at most ``max_tries`` draws). ``gts``: the global batch's
        ground-truth captions (every process decides alike)."""
        best = [""] * len(gts)
        best_r = np.full(len(gts), -1.0)
        resamples = 0
        todo = np.arange(len(gts))
        for attempt in range(max(1, max_tries)):
            out = generate(prompt, jax.random.fold_in(rng, attempt))
            texts = decode_texts(self.tokenizer, host_values(out.tokens), host_values(out.lengths))
            caps = captions_of(texts, fallback)
            r = np.asarray(rouge_l_reward(caps, gts, extract=False))
            better = r > best_r
            for i in np.nonzero(better)[0]:
                best[i], best_r[i] = caps[i], r[i]
            todo = np.nonzero(best_r < threshold)[0]
            if not len(todo):
                break
            resamples += len(todo) if attempt + 1 < max_tries else 0
        return best, {"anchor/resamples": float(resamples), "anchor/failed": float(len(todo)),
                      "anchor/rouge_l": float(best_r.mean())}

