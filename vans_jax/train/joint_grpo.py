"""Joint-GRPO (paper section 3.3 / appendix B-C): the two stages, the ablations, and the jitted
rollouts and policy updates they are made of.

Stage 1 (VLM tuned, VDM frozen): G captions per prompt sampled from the policy VLM with one
prefill; the [Ans] of each is rendered by the frozen VDM (ODE sampler); rewards
r_format + r_t1 (ROUGE-L) + r_v1 (CLIP-V vs the ground-truth video); group advantages;
token-level clipped-ratio loss with the k3 KL to the LoRA-disabled reference.

Stage 2 (VDM tuned, stage-1 VLM frozen): the VLM writes an anchor caption per prompt, resampled
while ROUGE-L < threshold (bounded, counted); G videos per anchor from the Flow-GRPO SDE sampler
with stored trajectories; rewards r_v2 (CLIP-V) + r_c2 (CLIPScore vs the anchor); per-timestep
clipped-ratio loss with the closed-form Gaussian KL to the reference DiT, gradients accumulated
timestep by timestep (memory of one DiT forward/backward), advantage and grad-norm clipping.

All-in-one (ablation): one stage; the policy VLM's G captions are rendered by the policy DiT with
the SDE sampler and one joint reward (format + t1 + v1 + c2) updates both.

Every rollout and every update is a jitted pure function of (graphdef, state, frozen, batch);
``num_updates`` policy updates run per batch of rollouts (the ratio departs from 1 after the first).

Several processes (``jax.distributed``): each process holds its own examples (``loop.HostBatches``).
Every jitted input is a global array on the mesh (this process's rows of the prompts and reference
latents; the values of the whole global batch for caption embeddings, advantages, noise), so
generation, rendering, VAE decoding, scoring and the updates run once over the global batch. What
the host needs (completion tokens, the frames CLIP scores, ground-truth captions) is gathered from
every process, so every process decodes the same texts and computes the same rewards,
advantages and anchor decisions for the whole global batch (cheap, duplicated host work); the
RNG keys derive from the step alone, the same on every process, and the metrics are the global
batch's. One process runs the same code (its rows are the whole batch).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from ..models import clip as clip_lib
from ..models.lora import without_lora
from ..models.qwen2_5_vl.generation import SamplingSettings, completion_logprobs, generate_arrays
from ..models.qwen2_5_vl.tokenizer import parse_response
from ..models.wan import pipeline as wp
from ..rl.grpo import vdm_grpo_loss, vlm_grpo_loss
from ..rl.rewards import RewardConfig, compute_rewards, rouge_l_reward, stage_advantages
from ..sampling import flow
from .. import parallel
from .core import (TrainState, apply_gradients, init_state, jit_sharded, make_optimizer, make_update_step, place,
                   replicated, split_model)
from .sft import build_prompt_batch

# which reward components each mode uses (all weights 1, the paper's B.1 normalize-then-sum rule)
MODE_REWARDS = {
    "grpo_stage1": ("format", "t1", "v1"),
    "grpo_vlm": ("format", "t1"),          # standard GRPO on the VLM alone: text rewards only
    "grpo_stage2": ("v2", "c2"),
    "grpo_vdm": ("v2", "c2"),              # standard GRPO on the VDM alone: ground-truth captions
    "grpo_all_in_one": ("format", "t1", "v1", "c2"),
}
GRPO_MODES = tuple(MODE_REWARDS)


def reward_config(mode: str, disabled: Sequence[str] = (), **kw) -> RewardConfig:
    names = MODE_REWARDS[mode]
    bad = [d for d in disabled if d not in names]
    if bad:
        raise ValueError(f"cannot disable reward(s) {bad} in mode {mode}: it uses {list(names)}")
    return RewardConfig(weights={k: 1.0 for k in names}, **kw).without(*disabled)


# ----------------------------------------------------------------------------- trainable parts


class Part:
    """A model split into its trainable state (in a donated TrainState) and the frozen rest, with
    the reference policy: the LoRA-disabled model for LoRA, else a frozen copy of the start."""

    def __init__(self, model: nnx.Module, trainable: str, optim_cfg, seed: int, *, reference: bool = True,
                 mesh=None):
        self.graphdef, params, frozen = split_model(model, trainable)
        self.trainable = trainable
        self.optimizer = make_optimizer(optim_cfg)
        self.mesh = mesh if mesh is not None else parallel.make_mesh({"data": -1})
        state = init_state(params, self.optimizer, seed, self.mesh)
        self.state, self.state_shardings = place(state, self.mesh)
        self.frozen, self.frozen_shardings = place(frozen, self.mesh)
        # the reference is the starting point, which a restarted run loads again: never checkpointed
        self._ref = (jax.device_put(jax.tree.map(jnp.copy, self.state.params), self.state_shardings.params)
                     if reference and trainable != "lora" else None)

    def shardings(self, batch_sharding=None):
        """(state, frozen, batch) shardings for ``make_update_step``."""
        return self.state_shardings, self.frozen_shardings, batch_sharding

    def ref_params(self):
        return without_lora(self.state.params) if self.trainable == "lora" else self._ref

    def model(self, params=None) -> nnx.Module:
        return nnx.merge(self.graphdef, self.state.params if params is None else params, self.frozen)

    def ckpt_items(self) -> dict:
        return {"state": self.state}

    def restore_items(self, items: dict):
        self.state = items["state"]


class FrozenPart:
    """A model that only samples (the stage-2 anchor VLM): same interface for generation."""

    def __init__(self, model: nnx.Module):
        self.graphdef, params, self.frozen = nnx.split(model, nnx.Param, ...)
        self.state = TrainState(step=jnp.int32(0), params=params, opt_state=None, rng=jax.random.key_data(
            jax.random.key(0)), skipped=jnp.int32(0))


# ----------------------------------------------------------------------------- pure functions


def stage1_loss(params, graphdef, frozen, batch, rng, *, beta, clip_eps, temperature, aggregation):
    """Token-level GRPO loss of the VLM on stored completions (no LoRA dropout: ratio 1 at the
    first update)."""
    model = nnx.merge(graphdef, params, frozen)
    logp = completion_logprobs(model, batch["prompt"], batch["completions"], batch["completion_mask"],
                               temperature)
    t = vlm_grpo_loss(logp, batch["old_logp"], batch["ref_logp"], batch["advantages"], batch["completion_mask"],
                      beta=beta, clip_eps=clip_eps, aggregation=aggregation)
    return t.loss, {"kl": t.kl, "clip_fraction": t.clip_fraction, "ratio": t.ratio_mean,
                    "policy_objective": t.policy_objective}


def _make_generate(graphdef, settings: SamplingSettings):
    @jax.jit
    def gen(params, frozen, batch, rng):
        return generate_arrays(nnx.merge(graphdef, params, frozen), batch, rng, settings)
    return gen


def _make_score(graphdef, temperature: float):
    @jax.jit
    def score(params, frozen, batch, completions, mask):
        return completion_logprobs(nnx.merge(graphdef, params, frozen), batch, completions, mask, temperature)
    return score


def _dit_velocity(graphdef, params, frozen, x, t, ctx, unc, g, ref_lat):
    return flow.guided_velocity(nnx.merge(graphdef, params, frozen), x, t, ctx, unc, g, ref_lat)


def make_stage2_update(graphdef, optimizer, *, beta, clip_eps, advantage_clip, noise_level, std_form,
                       aggregation="sequence_mean", shardings=None):
    """jit(update)(state, frozen, ref_params, batch) -> (state, metrics). The loss is the mean over
    the S trained timesteps of the per-timestep GRPO terms; the gradient is accumulated one timestep
    at a time in a ``lax.scan`` (one DiT forward + backward live at once). ``shardings``: (state,
    frozen, ref_params) shardings for explicit in/out shardings (the batch's taken from the batch,
    ``core.jit_sharded``; metrics replicated); None: inferred."""

    def update(state: TrainState, frozen, ref_params, batch):
        s = batch["x"].shape[0]
        ctx, unc, g, ref_lat = batch["context"], batch.get("uncond_context"), batch["cfg"], batch.get("ref_latents")
        sigmas, adv = batch["sigmas"], batch["advantages"]

        def one(carry, xs):
            gsum, msum = carry
            x, xn, olp, j, t = xs

            def lossf(params):
                v = _dit_velocity(graphdef, params, frozen, x, t, ctx, unc, g, ref_lat)
                out = flow.sde_step(x, v, sigmas, j, prev_sample=xn, noise_level=noise_level, std_form=std_form)
                if beta > 0:
                    v_ref = _dit_velocity(graphdef, ref_params, frozen, x, t, ctx, unc, g, ref_lat)
                    ref_mean = jax.lax.stop_gradient(
                        flow.sde_step(x, v_ref, sigmas, j, prev_sample=xn, noise_level=noise_level,
                                      std_form=std_form).mean)
                else:
                    ref_mean = jax.lax.stop_gradient(out.mean)
                terms = vdm_grpo_loss(out.log_prob[:, None], olp[:, None], out.mean[:, None], ref_mean[:, None],
                                      out.std, adv, beta=beta, clip_eps=clip_eps, advantage_clip=advantage_clip,
                                      aggregation=aggregation)
                return terms.loss / s, terms

            (_, terms), grads = jax.value_and_grad(lossf, has_aux=True)(state.params)
            m = jnp.stack([terms.loss, terms.kl, terms.clip_fraction, terms.ratio_mean, terms.policy_objective]) / s
            return (jax.tree.map(jnp.add, gsum, grads), msum + m), None

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        (grads, m), _ = jax.lax.scan(one, (zeros, jnp.zeros(5, jnp.float32)),
                                     (batch["x"], batch["x_next"], batch["old_logp"], batch["steps"],
                                      batch["timesteps"]))
        new, extra = apply_gradients(state, grads, m[0], optimizer)
        return new, dict(loss=m[0], kl=m[1], clip_fraction=m[2], ratio=m[3], policy_objective=m[4], **extra)

    if shardings is None:
        return jax.jit(update, donate_argnums=(0,))
    st, fr, ref = shardings
    return jit_sharded(update, (st, fr, ref, None), (st, replicated(st)), donate_argnums=(0,))


# ----------------------------------------------------------------------------- host helpers


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
    """The [Ans] caption of each response; ``fallback``: "full" -> the whole text (stripped of tags)
    when no caption parses, "empty" -> ""."""
    out = []
    for t in texts:
        c = parse_response(t)["caption"]
        if not c and fallback == "full":
            c = t
            for tag in ("[Think]", "[/Think]", "[Ans]", "[/Ans]", "<|im_end|>", "<|endoftext|>"):
                c = c.replace(tag, " ")
            c = " ".join(c.split())
        out.append(c)
    return out


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


def gt_features(clip_model, examples) -> jax.Array:
    return clip_lib.encode_frames(clip_model, np.stack([np.asarray(e["target"]) for e in examples]))


def _summary(prefix: str, x) -> dict:
    x = np.asarray(x, np.float64)
    return {f"{prefix}_mean": float(x.mean()), f"{prefix}_std": float(x.std()), f"{prefix}_min": float(x.min()),
            f"{prefix}_max": float(x.max())}


def reward_metrics(rewards: dict, adv) -> dict:
    out = {f"reward/{k}": float(np.mean(v)) for k, v in rewards.items()}
    out["reward/total"] = float(sum(np.mean(v) for v in rewards.values()))
    out.update({f"advantage/{k}": v for k, v in _summary("adv", adv).items()})
    return out


def finite_rewards(rewards: dict) -> bool:
    return all(np.all(np.isfinite(np.asarray(v))) for v in rewards.values())


# ----------------------------------------------------------------------------- the stages


@dataclasses.dataclass
class GRPOSettings:
    mode: str
    group_size: int = 8
    beta: float = 0.004
    clip_eps: float = 1e-3
    num_updates: int = 1
    aggregation: str = "sequence_mean"
    advantage_clip: float = 5.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    anchor_rouge_threshold: float = 0.6
    anchor_max_tries: int = 4
    anchor_temperature: float = 1.0
    caption_fallback: str = "full"
    disabled_rewards: tuple[str, ...] = ()
    pad_multiple: int = 64


def part_optim_cfg(optim_cfg, part: str):
    """The optimizer settings of one part: ``optim_cfg`` with ``lr`` replaced by ``<part>_lr`` when that
    is set (``train.grpo.vlm_lr`` / ``dit_lr``: the VLM's LoRA and the DiT's full weights usually want
    different rates)."""
    if optim_cfg is None:
        return None
    lr = optim_cfg.get(f"{part}_lr", None)
    if lr is None or lr == "":
        return optim_cfg
    import copy
    c = copy.deepcopy(optim_cfg)
    c.lr = float(lr)
    return c


class JointGRPO:
    """One object for every Joint-GRPO mode. ``step(examples, step_index)`` runs one rollout + its
    policy updates and returns the metrics; ``parts`` are the trained models."""

    def __init__(self, s: GRPOSettings, render: RenderSettings, *, vlm=None, vlm_tokenizer=None, vlm_vcfg=None,
                 vdm: wp.WanModels | None = None, clip_model=None, clip_tokenizer=None,
                 vlm_trainable="lora", dit_trainable="full", optim_cfg=None, seed: int = 0, mesh=None):
        if s.mode not in GRPO_MODES:
            raise ValueError(f"unknown Joint-GRPO mode {s.mode!r}; expected one of {GRPO_MODES}")
        self.s, self.r = s, render
        self.rewards = reward_config(s.mode, s.disabled_rewards)
        self.tokenizer, self.vcfg, self.vdm = vlm_tokenizer, vlm_vcfg, vdm
        self.clip_model, self.clip_tokenizer = clip_model, clip_tokenizer
        self.train_vlm = s.mode in ("grpo_stage1", "grpo_vlm", "grpo_all_in_one")
        self.train_dit = s.mode in ("grpo_stage2", "grpo_vdm", "grpo_all_in_one")
        self.needs_video = s.mode != "grpo_vlm"
        self.needs_vlm = s.mode != "grpo_vdm"
        if self.needs_vlm and vlm is None:
            raise ValueError(f"mode {s.mode} needs the VLM")
        if self.needs_video and (vdm is None or clip_model is None):
            raise ValueError(f"mode {s.mode} needs the VDM and the CLIP reward model")
        self.mesh = mesh if mesh is not None else parallel.make_mesh({"data": -1})
        mesh = self.mesh
        self._noise_fns: dict = {}
        self.parts: dict[str, Part] = {}
        if self.needs_vlm:
            self.vlm_cfg = vlm.config
            self.vlm = (Part(vlm, vlm_trainable, part_optim_cfg(optim_cfg, "vlm"), seed, mesh=mesh) if self.train_vlm
                        else FrozenPart(vlm))
            if self.train_vlm:
                self.parts["vlm"] = self.vlm
            pad = vlm.config.pad_token_id
            eos = tuple(np.atleast_1d(vlm.config.eos_token_id).tolist())
            self._gen_policy = _make_generate(self.vlm.graphdef, SamplingSettings(
                max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                num_return_sequences=s.group_size if s.mode != "grpo_stage2" else 1, eos_token_id=eos,
                pad_token_id=pad))
            self._gen_anchor = _make_generate(self.vlm.graphdef, SamplingSettings(
                max_new_tokens=s.max_new_tokens, temperature=s.anchor_temperature, top_p=s.top_p, top_k=s.top_k,
                num_return_sequences=1, eos_token_id=eos, pad_token_id=pad))
            self._score = _make_score(self.vlm.graphdef, s.temperature)
            if self.train_vlm:
                self._vlm_update = make_update_step(
                    lambda p, g, f, b, k: stage1_loss(p, g, f, b, k, beta=s.beta, clip_eps=s.clip_eps,
                                                      temperature=s.temperature, aggregation=s.aggregation),
                    self.vlm.optimizer, self.vlm.graphdef, shardings=self.vlm.shardings())
        if self.train_dit:
            self.dit = Part(vdm.dit, dit_trainable, part_optim_cfg(optim_cfg, "dit"), seed + 1, mesh=mesh)
            self.parts["dit"] = self.dit
            self._dit_update = make_stage2_update(self.dit.graphdef, self.dit.optimizer, beta=s.beta,
                                                  clip_eps=s.clip_eps, advantage_clip=s.advantage_clip,
                                                  noise_level=render.noise_level, std_form=render.std_form,
                                                  aggregation=s.aggregation,
                                                  shardings=(self.dit.state_shardings, self.dit.frozen_shardings,
                                                             self.dit.state_shardings.params))

    # -- global arrays (see the module docstring)

    def _batch_sharding(self, rows: int, dim: int = 0) -> NamedSharding:
        return NamedSharding(self.mesh, parallel.batch_spec(self.mesh, dim, rows))

    def _rows(self, x):
        """This process's rows (of the global batch) -> global arrays sharded over the batch axes."""
        return parallel.host_local_batch_to_global(x, self.mesh)

    def _whole(self, x):
        """Values of the whole global batch, alike on every process (host arrays) -> global arrays
        sharded over the batch axes (each process places its own shards)."""
        return parallel.device_put_global(x, jax.tree.map(lambda a: self._batch_sharding(np.shape(a)[0]), x))

    def _const(self, x):
        """A host value alike on every process -> a replicated global array."""
        return parallel.device_put_global(np.asarray(x), NamedSharding(self.mesh, P()))

    def _normal(self, rng, shape):
        """Standard normal noise of ``shape``, sharded over the batch (dim 0): the same values as
        ``jax.random.normal(rng, shape)`` (threefry is partitionable), drawn where they live."""
        key = (tuple(shape),)
        if key not in self._noise_fns:
            self._noise_fns[key] = jax.jit(lambda k: jax.random.normal(k, shape, jnp.float32),
                                           out_shardings=self._batch_sharding(shape[0]))
        return self._noise_fns[key](rng)

    def _frame_feats(self, frames) -> np.ndarray:
        """CLIP image features (N, F, D) of the whole global batch's videos (N, F, H, W, 3) uint8
        (``frames``: numpy or a global array), as host values. With several processes the frames
        are gathered and every process runs ``clip.encode_frames`` on all of them, exactly as one
        process does (the same chunks, the same programs: rewards bit-identical to a 1-process run;
        advantages normalize within groups of near-equal rewards and would magnify any last-bit
        difference). The cost: an all-gather of the uint8 frames, and CLIP (small next to the
        DiT) repeated on every host."""
        return np.asarray(clip_lib.encode_frames(self.clip_model, host_values(frames)))

    # -- pieces

    def _caption_feats(self, captions):
        return host_values(clip_lib.encode_texts(self.clip_model, self.clip_tokenizer, list(captions)))

    def _dit_module(self):
        return self.dit.model() if self.train_dit else self.vdm.dit

    def _context(self, captions, n):
        """``captions``: the whole global batch's (every process the same list)."""
        ctx = wp.encode_text(self.vdm, captions, to_device=self._whole)
        unc = self.vdm.negative_embeddings(self.r.negative_prompt, n) if self.r.cfg_scale > 1.0 else None
        return ctx, unc

    def _render_ode(self, captions, ref_lat, rng):
        """Frozen-VDM rendering (stage 1): ODE sampler, returns uint8 frames (a device array)."""
        n = len(captions)
        ctx, unc = self._context(captions, n)
        noise = self._normal(rng, latent_shape(self.vdm, n, self.r))
        lat = flow.sample(self.vdm.dit, noise, ctx, uncond_context=unc, guidance_scale=self.r.cfg_scale,
                          ref_latents=ref_lat, num_steps=self.r.num_steps, shift=self.r.shift, mode=self.r.mode)
        return wp.decode_latents(self.vdm, lat, to_host=False)

    def _sde_window(self):
        return self.r.sde_window or (0, self.r.num_steps - 1)

    def _render_sde(self, captions, ref_lat, rng):
        n = len(captions)
        ctx, unc = self._context(captions, n)
        k_noise, k_sde = jax.random.split(rng)
        noise = self._normal(k_noise, latent_shape(self.vdm, n, self.r))
        lat, traj = flow.sample(self._dit_module(), noise, ctx, uncond_context=unc, guidance_scale=self.r.cfg_scale,
                                ref_latents=ref_lat, num_steps=self.r.num_steps, shift=self.r.shift, mode="sde",
                                rng=k_sde, sde_window=self._sde_window(), noise_level=self.r.noise_level,
                                std_form=self.r.std_form, return_trajectory=True)
        return wp.decode_latents(self.vdm, lat, to_host=False), traj, ctx, unc

    def _anchors(self, prompt, gts, rng):
        """Stage 2: one caption per prompt from the frozen VLM, resampled while ROUGE-L < threshold.
        ``gts``: the global batch's ground-truth captions (every process decides alike)."""
        if self.s.mode == "grpo_vdm":
            return list(gts), {"anchor/resamples": 0.0, "anchor/failed": 0.0, "anchor/rouge_l": 1.0}
        best = [""] * len(gts)
        best_r = np.full(len(gts), -1.0)
        resamples = 0
        todo = np.arange(len(gts))
        for attempt in range(max(1, self.s.anchor_max_tries)):
            out = self._gen_anchor(self.vlm.state.params, self.vlm.frozen, prompt, jax.random.fold_in(rng, attempt))
            texts = decode_texts(self.tokenizer, host_values(out.tokens), host_values(out.lengths))
            caps = captions_of(texts, self.s.caption_fallback)
            r = np.asarray(rouge_l_reward(caps, gts, extract=False))
            better = r > best_r
            for i in np.nonzero(better)[0]:
                best[i], best_r[i] = caps[i], r[i]
            todo = np.nonzero(best_r < self.s.anchor_rouge_threshold)[0]
            if not len(todo):
                break
            resamples += len(todo) if attempt + 1 < self.s.anchor_max_tries else 0
        return best, {"anchor/resamples": float(resamples), "anchor/failed": float(len(todo)),
                      "anchor/rouge_l": float(best_r.mean())}

    # -- one step

    def step(self, examples: Sequence[dict], step_index: int, rng) -> dict:
        s, g = self.s, self.s.group_size
        t0 = time.perf_counter()
        metrics: dict[str, Any] = {}
        k_gen, k_vid, k_anchor = jax.random.split(rng, 3)
        # host values cover the whole global batch (every process's examples, in process order);
        # device arrays are global (this process's rows placed on its devices)
        gt_caps = gather_list([e["caption"] for e in examples])
        prompt = None
        if self.needs_vlm:
            prompt = build_prompt_batch(examples, self.tokenizer, self.vlm_cfg, self.vcfg, s.pad_multiple,
                                        mesh=self.mesh)
        if self.needs_video:
            ref_lat = reference_latents(self.vdm, examples, self.r, to_device=self._rows)
            target = np.stack([np.asarray(e["target"]) for e in examples])
            gt_feat = self._frame_feats(target if jax.process_count() == 1 else self._rows(target))
        new_tokens = 0
        texts = None
        if s.mode in ("grpo_stage1", "grpo_vlm", "grpo_all_in_one"):
            out = self._gen_policy(self.vlm.state.params, self.vlm.frozen, prompt, k_gen)
            lengths = host_values(out.lengths)
            texts = decode_texts(self.tokenizer, host_values(out.tokens), lengths)
            caps = captions_of(texts, s.caption_fallback)
            new_tokens = int(lengths.sum())
            batch_in = dict(texts=texts, gt_captions=[c for c in gt_caps for _ in range(g)])
            metrics["think_tokens"] = float(think_lengths(texts, self.tokenizer).mean())
            metrics["completion_tokens"] = float(lengths.mean())
            metrics["sample_text"] = texts[0]
        else:
            anchors, am = self._anchors(prompt, gt_caps, k_anchor)
            metrics.update(am)
            caps = [c for c in anchors for _ in range(g)]
            batch_in = {}
            metrics["sample_text"] = anchors[0]
        t_text = time.perf_counter()
        frames = traj = None
        if self.needs_video:
            rep = lambda x: jnp.repeat(x, g, axis=0)
            ref_rep = rep(ref_lat)
            if self.train_dit:
                frames, traj, ctx, unc = self._render_sde(caps, ref_rep, k_vid)
            else:
                frames = self._render_ode(caps, ref_rep, k_vid)
            feats = self._frame_feats(frames)
            batch_in.update(gen_video_feats=feats, gt_video_feats=np.repeat(gt_feat, g, axis=0))
            if any(k in self.rewards.active for k in ("c2",)):
                batch_in["caption_feats"] = self._caption_feats(caps)
        t_video = time.perf_counter()
        rewards = compute_rewards(self.rewards, **batch_in)
        if not finite_rewards(rewards):
            return dict(metrics, skipped_rewards=1.0, step_time_s=time.perf_counter() - t0)
        adv = np.asarray(stage_advantages(self.rewards, rewards, g))
        metrics.update(reward_metrics(rewards, adv))
        metrics["skipped_rewards"] = 0.0

        upd: dict[str, list] = {}
        if self.train_vlm:
            comp = jnp.asarray(out.tokens)
            cmask = jnp.asarray(out.mask)
            old = self._score(self.vlm.state.params, self.vlm.frozen, prompt, comp, cmask)
            ref = old if s.beta == 0 else self._score(self.vlm.ref_params(), self.vlm.frozen, prompt, comp, cmask)
            vb = dict(prompt=prompt, completions=comp, completion_mask=cmask, old_logp=old, ref_logp=ref,
                      advantages=self._whole(adv))
            for u in range(s.num_updates):
                self.vlm.state, m = self._vlm_update(self.vlm.state, self.vlm.frozen,
                                                     dict(vb, update_index=self._const(np.int32(u))))
                upd.setdefault("vlm", []).append(m)
        if self.train_dit:
            lo, hi = self._sde_window()
            idx = np.arange(lo, hi)
            db = dict(x=traj.latents[idx], x_next=traj.latents[idx + 1], old_logp=traj.log_probs[idx],
                      steps=self._const(idx.astype(np.int32)), timesteps=traj.timesteps[idx], sigmas=traj.sigmas,
                      context=ctx, uncond_context=unc, cfg=self._const(np.float32(self.r.cfg_scale)),
                      ref_latents=ref_rep, advantages=self._whole(adv))
            if unc is None:
                db.pop("uncond_context")
            ref_params = self.dit.ref_params()
            for u in range(s.num_updates):
                self.dit.state, m = self._dit_update(self.dit.state, self.dit.frozen, ref_params, db)
                upd.setdefault("dit", []).append(m)
        for name, ms in upd.items():
            host = jax.device_get(ms)
            for k in host[0]:
                vals = np.asarray([h[k] for h in host], np.float64)
                metrics[f"{name}/{k}"] = float(vals.mean())
                if k == "ratio":
                    metrics[f"{name}/ratio_last_update"] = float(vals[-1])
        t1 = time.perf_counter()
        n_frames = 0 if frames is None else int(np.prod(frames.shape[:2]))
        metrics.update({"time/step_s": t1 - t0, "time/text_s": t_text - t0, "time/video_s": t_video - t_text,
                        "time/update_s": t1 - t_video, "throughput/tokens_per_s": new_tokens / max(t_text - t0, 1e-9),
                        "throughput/frames_per_s": n_frames / max(t_video - t_text, 1e-9)})
        return metrics
