"""The Joint-GRPO trainer: one object for every mode (``rl.stages.MODE_REWARDS``). It owns the
trained parts (optimizer states, reference policies) and the compiled updates; the rollouts are
``rl.rollouts``, the losses ``rl.stages``.

Stage 1 (VLM tuned, VDM frozen): G captions per prompt with one prefill; the [Ans] of each rendered
by the frozen VDM (ODE sampler); rewards r_format + r_t1 + r_v1; the token-level loss.
Stage 2 (VDM tuned, stage-1 VLM frozen): anchors resampled while ROUGE-L < threshold; G videos per
anchor from the SDE sampler with stored trajectories; rewards r_v2 + r_c2; the per-timestep loss.
All-in-one (ablation): the policy VLM's captions rendered by the policy DiT with the SDE sampler,
one joint reward updates both.

Every jitted function is built once per (model structure, settings) and shared across instances
(a second trainer in the same process, e.g. the demo's stage 2 or the next test, reuses the
compiled programs). ``num_updates`` policy updates run per batch of rollouts. ``step`` returns the
update metrics as device arrays (the loop fetches them on log steps) next to the host-side reward
metrics.
"""
from __future__ import annotations

import copy
import functools
import json
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .. import parallel
from ..models.lora import without_lora
from ..rl import rollouts as ro
from ..rl.rewards import RewardInputs, compute_rewards, stage_advantages
from ..rl.stages import (GRPO_MODES, GRPOSettings, finite_rewards, reward_config, reward_metrics,
                         nft_grads, reward_variance_split, stage1_loss, stage2_grads,
                         stage2_half_batch_agreement)
from ..sampling import wan as wp
from ..sampling.text import SamplingSettings
from . import media
from .sft import clip_to_video, sft_vdm_loss
from .core import (TrainState, apply_gradients, ema_params, init_state, jit_sharded, make_optimizer, make_update_step,
                   optimizer_settings, place, replicated, split_model)

RenderSettings = ro.RenderSettings


# ----------------------------------------------------------------------------- trainable parts


def optim_key(optim_cfg) -> str:
    """A hashable description of optimizer settings (the compiled-step caches key on it)."""
    return json.dumps(optimizer_settings(optim_cfg), sort_keys=True, default=str)


class Part:
    """A model split into its trainable state (in a donated TrainState) and the frozen rest, with
    the reference policy: the LoRA-disabled model for LoRA, else a frozen copy of the start."""

    def __init__(self, model: nnx.Module, trainable: str, optim_cfg, seed: int, *, reference: bool = True,
                 mesh=None):
        self.graphdef, params, frozen = split_model(model, trainable)
        self.trainable = trainable
        self.optim_key = optim_key(optim_cfg)
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

    def cache_key(self) -> tuple:
        """What a compiled update of this part depends on besides its loss: structure, optimizer,
        shardings."""
        sh = (self.state_shardings, self.frozen_shardings)
        return (self.graphdef, self.optim_key, jax.tree.structure(sh), tuple(jax.tree.leaves(sh)))

    def ref_params(self):
        return without_lora(self.state.params) if self.trainable == "lora" else self._ref

    def model(self, params=None) -> nnx.Module:
        return nnx.merge(self.graphdef, self.state.params if params is None else params, self.frozen)

    def export_model(self) -> nnx.Module:
        """The model to sample with and export: the parameter EMA when the optimizer keeps one
        (``ema_decay`` > 0, ``core.param_ema``), else the trained parameters."""
        ema = ema_params(self.state)
        return self.model(ema if ema is not None else None)

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


def shuffle_within_groups(adv: np.ndarray, group_size: int, rng: np.random.Generator) -> np.ndarray:
    """The shuffled-advantage control: each group's advantages permuted among its rollouts (every
    group statistic kept, the link between a rollout and its reward cut)."""
    a = np.asarray(adv).reshape(-1, group_size)
    return np.stack([row[rng.permutation(group_size)] for row in a]).reshape(np.shape(adv))


_STEPS: dict = {}


def cached_update_step(part: Part, loss_fn, loss_key: tuple, **kw):
    """``core.make_update_step`` for ``part`` with ``loss_fn``, built once per (loss, part structure,
    optimizer, shardings): ``loss_key`` names the loss and its static settings."""
    key = ("update", loss_key, part.cache_key())
    if key not in _STEPS:
        _STEPS[key] = make_update_step(loss_fn, part.optimizer, part.graphdef, shardings=part.shardings(), **kw)
    return _STEPS[key]


def with_sft_term(grads, m, params, graphdef, frozen, sft, *, sft_weight: float, shift: float):
    """``train.grpo.sft_weight``: the stage-2 gradient plus ``sft_weight`` x the gradient of the SFT-VDM
    flow-matching loss (``train.sft.sft_vdm_loss``, no text dropout, no model dropout) on ``sft``, the
    step's ground truth: ``latents`` (B, z, T, h, w) of the target videos, ``context`` of their
    captions, ``ref_latents``, ``null_context``, ``rng``. The loss becomes the stage-2 loss plus
    ``sft_weight`` x it (``loss``); ``sft_loss`` is the flow-matching term alone. ``sft`` None: unchanged."""
    if sft is None or sft_weight == 0.0:
        return grads, m
    fm = functools.partial(sft_vdm_loss, shift=shift, text_dropout=0.0, dropout=False)
    (l_sft, _), g_sft = jax.value_and_grad(fm, has_aux=True)(params, graphdef, frozen, sft, sft["rng"])
    grads = jax.tree.map(lambda a, b: a + sft_weight * b.astype(a.dtype), grads, g_sft)
    return grads, dict(m, loss=m["loss"] + sft_weight * l_sft, sft_loss=l_sft)


def make_stage2_update(graphdef, optimizer, *, beta, clip_eps, advantage_clip, noise_level, std_form,
                       aggregation="sequence_mean", timestep_weight="none", sft_weight=0.0, shift=5.0,
                       shardings=None):
    """jit(update)(state, frozen, ref_params, batch) -> (state, metrics): ``rl.stages.stage2_grads``
    (plus ``with_sft_term`` on ``batch["sft"]`` when ``sft_weight`` > 0) then one optimizer update
    (skipped on a non-finite loss or gradient). ``shardings``: (state, frozen, ref_params) shardings
    for explicit in/out shardings (the batch's taken from the batch, ``core.jit_sharded``; metrics
    replicated); None: inferred."""
    grads_fn = functools.partial(stage2_grads, graphdef=graphdef, beta=beta, clip_eps=clip_eps,
                                 advantage_clip=advantage_clip, noise_level=noise_level, std_form=std_form,
                                 aggregation=aggregation, timestep_weight=timestep_weight)
    return _dit_update(grads_fn, graphdef, optimizer, sft_weight=sft_weight, shift=shift, shardings=shardings)


def _dit_update(grads_fn, graphdef, optimizer, *, sft_weight, shift, shardings):
    """The compiled DiT update around ``grads_fn(params, frozen=, ref_params=, batch=)`` -> (gradient,
    metrics): ``with_sft_term`` on ``batch["sft"]``, one optimizer update, donated state, explicit
    shardings when given (``make_stage2_update``)."""
    def update(state: TrainState, frozen, ref_params, batch):
        batch = dict(batch)
        sft = batch.pop("sft", None)
        grads, m = grads_fn(state.params, frozen=frozen, ref_params=ref_params, batch=batch)
        grads, m = with_sft_term(grads, m, state.params, graphdef, frozen, sft, sft_weight=sft_weight, shift=shift)
        new, extra = apply_gradients(state, grads, m["loss"], optimizer)
        return new, dict(m, **extra)

    if shardings is None:
        return jax.jit(update, donate_argnums=(0,))
    st, fr, ref = shardings
    return jit_sharded(update, (st, fr, ref, None), (st, replicated(st)), donate_argnums=(0,))


def make_stage2_accumulated_update(graphdef, optimizer, *, beta, clip_eps, advantage_clip, noise_level, std_form,
                                   aggregation="sequence_mean", timestep_weight="none", sft_weight=0.0, shift=5.0,
                                   shardings=None):
    """``train.grpo.grad_accum``: update(state, frozen, ref_params, batches) -> (state, metrics) with
    ``batches`` a list of K stage-2 batches (K rollout batches): the mean of their
    ``rl.stages.stage2_grads`` (each accumulated into a donated buffer by one compiled program, one
    batch's gradient live at a time), then one optimizer update (one compiled program); the
    metrics are the batches' mean. Equal to ``make_stage2_update`` on the K batches as one when
    every batch has as many rollouts (tested). ``sft_weight`` > 0: the first batch's ``sft`` (the
    step's ground truth) adds ``with_sft_term`` once, to the accumulated gradient."""
    grads_fn = functools.partial(stage2_grads, graphdef=graphdef, beta=beta, clip_eps=clip_eps,
                                 advantage_clip=advantage_clip, noise_level=noise_level, std_form=std_form,
                                 aggregation=aggregation, timestep_weight=timestep_weight)

    def accumulate(acc, params, frozen, ref_params, batch, scale):
        grads, m = grads_fn(params, frozen=frozen, ref_params=ref_params, batch=batch)
        return jax.tree.map(lambda a, g: a + scale * g, acc, grads), m

    def apply(state: TrainState, grads, loss):
        return apply_gradients(state, grads, loss, optimizer)

    def add_sft(grads, params, frozen, sft):
        g, m = with_sft_term(grads, {"loss": jnp.float32(0.0)}, params, graphdef, frozen, sft,
                             sft_weight=sft_weight, shift=shift)
        return g, m["sft_loss"]

    if shardings is None:
        acc_fn = jax.jit(accumulate, donate_argnums=(0,))
        apply_fn = jax.jit(apply, donate_argnums=(0,))
        sft_fn = jax.jit(add_sft, donate_argnums=(0,))
    else:
        st, fr, ref = shardings
        rep = replicated(st)
        acc_fn = jit_sharded(accumulate, (st.params, st.params, fr, ref, None, rep), (st.params, rep),
                             donate_argnums=(0,))
        apply_fn = jit_sharded(apply, (st, st.params, rep), (st, rep), donate_argnums=(0,))
        sft_fn = jit_sharded(add_sft, (st.params, st.params, fr, None), (st.params, rep), donate_argnums=(0,))

    def update(state: TrainState, frozen, ref_params, batches):
        k = len(batches)
        sft = batches[0].get("sft")
        batches = [{key: v for key, v in b.items() if key != "sft"} for b in batches]
        acc = jax.tree.map(jnp.zeros_like, state.params)
        scale = jnp.float32(1.0 / k)
        ms = []
        for b in batches:
            acc, m = acc_fn(acc, state.params, frozen, ref_params, b, scale)
            ms.append(m)
        m = {key: jnp.mean(jnp.stack([x[key] for x in ms]), axis=0) for key in ms[0]}
        if sft is not None and sft_weight > 0:
            acc, l_sft = sft_fn(acc, state.params, frozen, sft)
            m = dict(m, loss=m["loss"] + sft_weight * l_sft, sft_loss=l_sft)
        state, extra = apply_fn(state, acc, m["loss"])
        return state, dict(m, **extra)

    return update


def make_nft_update(graphdef, optimizer, *, nft_beta, beta, shift, num_timesteps, group_size, advantage_clip,
                    sft_weight=0.0, shardings=None):
    """``train.grpo.dit_objective="nft"``: jit(update)(state, frozen, ref_params, batch) -> (state,
    metrics): ``rl.stages.nft_grads`` on ``batch`` (``x0`` the rollouts' final latents, ``context``,
    ``uncond_context``, ``cfg``, ``ref_latents``, ``advantages``, ``rng`` key data), plus
    ``with_sft_term`` on ``batch["sft"]`` when ``sft_weight`` > 0, then one optimizer update."""
    def grads_fn(params, *, frozen, ref_params, batch):
        batch = dict(batch)
        rng = batch.pop("rng")
        return nft_grads(params, graphdef, frozen, ref_params, batch, rng, nft_beta=nft_beta, beta=beta, shift=shift,
                         num_timesteps=num_timesteps, group_size=group_size, advantage_clip=advantage_clip)

    return _dit_update(grads_fn, graphdef, optimizer, sft_weight=sft_weight, shift=shift, shardings=shardings)


def _key_data(rng) -> np.ndarray:
    """A PRNG key (typed or raw uint32) as raw key data on the host."""
    return np.asarray(jax.random.key_data(rng)) if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else np.asarray(rng)


PART_OPTIM_KEYS = ("lr", "ema_decay")


def part_optim_cfg(optim_cfg, part: str):
    """The optimizer settings of one part: ``optim_cfg`` with ``lr`` / ``ema_decay`` replaced by
    ``<part>_lr`` / ``<part>_ema_decay`` where those are set (``train.grpo.vlm_lr``, ``dit_lr``,
    ``vlm_ema_decay``, ``dit_ema_decay``: the VLM's LoRA and the DiT's full weights usually want
    different rates, and an evaluation EMA may suit one part and not the other)."""
    if optim_cfg is None:
        return None
    found = {k: optim_cfg.get(f"{part}_{k}", None) for k in PART_OPTIM_KEYS}
    found = {k: float(v) for k, v in found.items() if v is not None and v != ""}
    if not found:
        return optim_cfg
    c = copy.deepcopy(optim_cfg)
    for k, v in found.items():
        c[k] = v
    return c


def _mean_updates(ms: list[dict], first_step: int = 0) -> dict:
    """Per-update metrics (device arrays) -> their mean over the updates, plus the last ratio; a
    per-timestep metric ``<name>_per_step`` (S,) becomes ``<name>_step<j>`` for each trained
    timestep j (counted from ``first_step``, the SDE window's start)."""
    out = {}
    for k in ms[0]:
        v = jnp.mean(jnp.stack([m[k] for m in ms]), axis=0)
        if k.endswith("_per_step"):
            out.update({f"{k[:-len('_per_step')]}_step{first_step + j}": v[j] for j in range(v.shape[0])})
        else:
            out[k] = v
    if "ratio" in ms[0]:
        out["ratio_last_update"] = ms[-1]["ratio"]
    return out


class JointGRPO:
    """One object for every Joint-GRPO mode. ``step(examples, step_index, rng)`` runs one rollout +
    its policy updates and returns the metrics; ``parts`` are the trained models."""

    def __init__(self, s: GRPOSettings, render: RenderSettings, *, vlm=None, vlm_tokenizer=None, vlm_vcfg=None,
                 vdm: wp.WanModels | None = None, clip_model=None, clip_tokenizer=None,
                 vlm_trainable="lora", dit_trainable="full", optim_cfg=None, seed: int = 0, mesh=None):
        if s.mode not in GRPO_MODES:
            raise ValueError(f"unknown Joint-GRPO mode {s.mode!r}; expected one of {GRPO_MODES}")
        self.s, self.r, self.seed = s, render, int(seed)
        self.rewards = reward_config(s.mode, s.disabled_rewards, s.rewards)
        self.tokenizer, self.vcfg, self.vdm = vlm_tokenizer, vlm_vcfg, vdm
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
        self.env = ro.RolloutEnv(render, mesh=mesh, tokenizer=vlm_tokenizer, vdm=vdm, clip_model=clip_model,
                                 clip_tokenizer=clip_tokenizer)
        self.parts: dict[str, Part] = {}
        if self.needs_vlm:
            self.vlm_cfg = vlm.config
            self.vlm = (Part(vlm, vlm_trainable, part_optim_cfg(optim_cfg, "vlm"), seed, mesh=mesh) if self.train_vlm
                        else FrozenPart(vlm))
            if self.train_vlm:
                self.parts["vlm"] = self.vlm
            pad = vlm.config.pad_token_id
            eos = tuple(np.atleast_1d(vlm.config.eos_token_id).tolist())
            self._policy_sampling = SamplingSettings(
                max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                num_return_sequences=s.group_size if s.mode != "grpo_stage2" else 1, eos_token_id=eos,
                pad_token_id=pad)
            self._anchor_sampling = SamplingSettings(
                max_new_tokens=s.max_new_tokens, temperature=s.anchor_temperature, top_p=s.top_p, top_k=s.top_k,
                num_return_sequences=1, eos_token_id=eos, pad_token_id=pad)
            if self.train_vlm:
                self._vlm_update = cached_update_step(
                    self.vlm, functools.partial(stage1_loss, beta=s.beta, clip_eps=s.clip_eps,
                                                temperature=s.temperature, aggregation=s.aggregation),
                    ("stage1", s.beta, s.clip_eps, s.temperature, s.aggregation))
        if self.train_dit:
            self.dit = Part(vdm.dit, dit_trainable, part_optim_cfg(optim_cfg, "dit"), seed + 1, mesh=mesh)
            self.parts["dit"] = self.dit
            self._dit_update_fn()    # built (and settings checked) now, not at the first step

    # -- the policies as the rollouts see them

    def _generate(self, settings, params=None):
        vlm = self.vlm
        return lambda prompt, rng: ro.generate_completions(vlm.graphdef, vlm.state.params if params is None else
                                                           params, vlm.frozen, prompt, rng, settings)

    def _score(self, params, prompt, comp, cmask):
        return ro.score_completions(self.vlm.graphdef, params, self.vlm.frozen, prompt, comp, cmask,
                                    self.s.temperature)

    def _dit_module(self):
        return self.dit.model() if self.train_dit else self.vdm.dit

    def _rewards(self, batch_in: dict, frames, caps, gt_caps, gt_feats, gt_frames, group_size: int) -> dict:
        """The active rewards of rollouts: ``batch_in`` (text inputs) completed with the video
        inputs of ``frames`` (a device array of the rendered videos, or None): CLIP features on the
        device, frames to the host only for rewards that read them."""
        batch_in = dict(batch_in)
        if frames is not None:
            batch_in.update(gen_video_feats=self.env.frame_feats(frames), gt_video_feats=gt_feats)
            if "c2" in self.rewards.active:
                batch_in["caption_feats"] = self.env.caption_feats(caps)
        if set(self.rewards.required_inputs()) & {"frames", "gt_frames", "reward_inputs"}:
            if frames is not None:
                batch_in.update(frames=ro.host_values(frames), gt_frames=gt_frames)
            batch_in["reward_inputs"] = RewardInputs(
                frames=batch_in.get("frames"), gt_frames=batch_in.get("gt_frames"), captions=list(caps),
                gt_captions=list(gt_caps), texts=batch_in.get("texts"), group_size=group_size)
        return compute_rewards(self.rewards, **batch_in)

    def _stage2_diagnostics(self, db, adv, ref_params, caps, ref_rep, gt_feat, target, rng, step_index) -> dict:
        """``train.grpo.diagnostics_every``: (1) the half-batch gradient agreement of this rollout
        batch against its shuffled-advantage control (``rl.stages.stage2_half_batch_agreement``),
        at the parameters that sampled it; (2) the first anchor's reward variance split into its
        initial-noise and SDE parts (``rl.stages.reward_variance_split``) from K initial noises x M
        SDE draws. Costs about two gradient passes of the batch plus K x M renders."""
        s, r, env = self.s, self.r, self.env
        key = ("stage2_agreement", s.beta, s.clip_eps, s.advantage_clip, r.noise_level, r.std_form, s.aggregation,
               s.timestep_weight, self.dit.cache_key())
        if key not in _STEPS:
            _STEPS[key] = jax.jit(functools.partial(
                stage2_half_batch_agreement, graphdef=self.dit.graphdef, beta=s.beta, clip_eps=s.clip_eps,
                advantage_clip=s.advantage_clip, noise_level=r.noise_level, std_form=r.std_form,
                aggregation=s.aggregation, timestep_weight=s.timestep_weight))
        shuffled = shuffle_within_groups(adv, s.group_size, np.random.default_rng([self.seed, int(step_index), 7]))
        out = {f"diag/{k}": v for k, v in _STEPS[key](self.dit.state.params, frozen=self.dit.frozen,
                                                        ref_params=ref_params, batch=db,
                                                        shuffled_advantages=env.whole(shuffled)).items()}
        k, m = int(s.diagnostics_noises), int(s.diagnostics_sde_draws)
        shape = ro.latent_shape(self.vdm, k * m, r)
        base = np.asarray(jax.random.normal(rng, (k,) + shape[1:], jnp.float32))
        noise = env.whole(np.repeat(base, m, axis=0))
        frames, _, _, _ = env.render_sde(self._dit_module(), [caps[0]] * (k * m),
                                         jnp.repeat(ref_rep[:1], k * m, axis=0), jax.random.fold_in(rng, 1),
                                         noise=noise)
        gt_caps = [caps[0]] * (k * m)
        rewards = self._rewards({"gt_captions": gt_caps}, frames, gt_caps, gt_caps,
                                np.repeat(gt_feat[:1], k * m, axis=0), np.repeat(target[:1], k * m, axis=0), m)
        for name, v in rewards.items():
            split = reward_variance_split(np.asarray(v).reshape(k, m))
            out.update({f"diag/reward_var_{part}/{name}": val for part, val in split.items()})
        return out

    def _dit_update_fn(self):
        """The compiled stage-2 update for the current settings (``make_stage2_update``, or with
        ``grad_accum`` > 1 ``make_stage2_accumulated_update``), built once per settings."""
        s, r = self.s, self.r
        if s.grad_accum > 1 and s.mode not in ("grpo_stage2", "grpo_vdm"):
            raise ValueError(f"train.grpo.grad_accum={s.grad_accum}: only the DiT-only modes (grpo_stage2, "
                             f"grpo_vdm) accumulate rollout batches, not {s.mode}")
        shardings = (self.dit.state_shardings, self.dit.frozen_shardings, self.dit.state_shardings.params)
        if s.dit_objective == "nft":
            key = ("nft", s.nft_beta, s.nft_timesteps, s.group_size, s.beta, s.advantage_clip, float(s.sft_weight),
                   float(r.shift), self.dit.cache_key())
            if key not in _STEPS:
                _STEPS[key] = make_nft_update(
                    self.dit.graphdef, self.dit.optimizer, nft_beta=float(s.nft_beta), beta=s.beta,
                    shift=float(r.shift), num_timesteps=int(s.nft_timesteps), group_size=s.group_size,
                    advantage_clip=s.advantage_clip, sft_weight=float(s.sft_weight), shardings=shardings)
            return _STEPS[key]
        accum = s.grad_accum > 1
        key = ("stage2_accum" if accum else "stage2", s.beta, s.clip_eps, s.advantage_clip, r.noise_level,
               r.std_form, s.aggregation, s.timestep_weight, float(s.sft_weight), float(r.shift), self.dit.cache_key())
        if key not in _STEPS:
            _STEPS[key] = (make_stage2_accumulated_update if accum else make_stage2_update)(
                self.dit.graphdef, self.dit.optimizer, beta=s.beta, clip_eps=s.clip_eps,
                advantage_clip=s.advantage_clip, noise_level=r.noise_level, std_form=r.std_form,
                aggregation=s.aggregation, timestep_weight=s.timestep_weight, sft_weight=float(s.sft_weight),
                shift=float(r.shift), shardings=shardings)
        return _STEPS[key]

    def _sft_batch(self, examples, ref_lat, rng) -> dict:
        """``train.grpo.sft_weight``: the step's ground truth for the flow-matching term: the VAE
        latents of the target videos, the embeddings of their captions, the reference latents (one
        row a prompt, global arrays) and the key of its noise and timesteps."""
        target = np.stack([np.asarray(e["target"]) for e in examples])
        want = (self.r.num_frames, self.r.height, self.r.width)
        if target.shape[1:4] != want:
            raise ValueError(f"train.grpo.sft_weight: the examples' target videos are {target.shape[1:4]} "
                             f"(frames, height, width); the flow-matching term needs the render geometry {want}")
        env = self.env
        sft = dict(latents=wp.encode_video(self.vdm, env.rows(clip_to_video(target))),
                   context=wp.encode_text(self.vdm, [e["caption"] for e in examples], to_device=env.rows),
                   null_context=self.vdm.negative_embeddings("", 1), ref_latents=ref_lat,
                   rng=env.const(_key_data(rng)))
        return wp.trim_batch_text(self.vdm.dit, sft, training=True, place=env.const)

    def _initial_noise(self, rng, n: int):
        """The initial latents of ``n`` = prompts x G stage-2 rollouts: None (``render_sde`` draws
        them, every rollout its own), or with ``same_noise`` one draw per group repeated over its G
        members (DanceGRPO: the group's rewards then differ by the SDE noise alone)."""
        if not self.s.same_noise:
            return None
        g = self.s.group_size
        shape = ro.latent_shape(self.vdm, n // g, self.r)
        base = np.asarray(jax.random.normal(jax.random.split(rng)[0], shape, jnp.float32))
        return self.env.whole(np.repeat(base, g, axis=0))

    def _stage2_batch(self, traj, ctx, unc, ref_rep, adv) -> dict:
        """The stage-2 loss's batch of one rollout batch: the SDE window's stored transitions."""
        env = self.env
        lo, hi = env.sde_window()
        idx = np.arange(lo, hi)
        db = dict(x=traj.latents[idx], x_next=traj.latents[idx + 1], old_logp=traj.log_probs[idx],
                  steps=env.const(idx.astype(np.int32)), timesteps=traj.timesteps[idx], sigmas=traj.sigmas,
                  context=ctx, uncond_context=unc, cfg=env.const(np.float32(self.r.cfg_scale)),
                  ref_latents=ref_rep, advantages=env.whole(adv))
        if unc is None:
            db.pop("uncond_context")
        return wp.trim_batch_text(self.vdm.dit, db, training=True, place=env.const)   # the used text positions

    def _nft_batch(self, lat, ctx, unc, ref_rep, adv, rng) -> dict:
        """The ``dit_objective="nft"`` loss's batch: the ODE renders' final latents, their contexts and
        reference latents, the advantages and the key of the forward-process draws."""
        env = self.env
        db = dict(x0=lat, context=ctx, uncond_context=unc, cfg=env.const(np.float32(self.r.cfg_scale)),
                  ref_latents=ref_rep, advantages=env.whole(adv), rng=env.const(_key_data(rng)))
        if unc is None:
            db.pop("uncond_context")
        return wp.trim_batch_text(self.vdm.dit, db, training=True, place=env.const)   # the used text positions

    # -- one step

    def step(self, examples: Sequence[dict], step_index: int, rng) -> dict:
        s, g, env = self.s, self.s.group_size, self.env
        t0 = time.perf_counter()
        metrics: dict[str, Any] = {}
        k_gen, k_vid, k_anchor = jax.random.split(rng, 3)
        # host values cover the whole global batch (every process's examples, in process order);
        # device arrays are global (this process's rows placed on its devices)
        gt_caps = ro.gather_list([e["caption"] for e in examples])
        prompt = None
        if self.needs_vlm:
            prompt = ro.build_prompt_batch(examples, self.tokenizer, self.vlm_cfg, self.vcfg, s.pad_multiple,
                                           mesh=self.mesh)
        if self.needs_video:
            ref_lat = ro.reference_latents(self.vdm, examples, self.r, to_device=env.rows)
            target = np.stack([np.asarray(e["target"]) for e in examples])
            if jax.process_count() > 1:   # the whole global batch's, on every process
                target = ro.host_values(env.rows(target))
            gt_feat = env.gt_frame_feats(target)
        sft = None
        if self.train_dit and s.sft_weight > 0:    # the flow-matching term's ground truth (checked before rollouts)
            sft = self._sft_batch(examples, ref_lat, jax.random.fold_in(k_vid, 11))
        new_tokens = 0
        if self.train_vlm:
            out = self._generate(self._policy_sampling)(prompt, k_gen)
            lengths = ro.host_values(out.lengths)
            texts = ro.decode_texts(self.tokenizer, ro.host_values(out.tokens), lengths)
            caps = ro.captions_of(texts, s.caption_fallback)
            new_tokens = int(lengths.sum())
            batch_in = dict(texts=texts, gt_captions=[c for c in gt_caps for _ in range(g)])
            metrics["think_tokens"] = float(ro.think_lengths(texts, self.tokenizer).mean())
            metrics["completion_tokens"] = float(lengths.mean())
            metrics["sample_text"] = texts[0]
        else:
            if s.mode == "grpo_vdm":
                anchors = list(gt_caps)
                am = {"anchor/resamples": 0.0, "anchor/failed": 0.0, "anchor/rouge_l": 1.0}
            else:
                anchors, am = env.anchors(self._generate(self._anchor_sampling), prompt, gt_caps, k_anchor,
                                          threshold=s.anchor_rouge_threshold, max_tries=s.anchor_max_tries,
                                          fallback=s.caption_fallback)
            metrics.update(am)
            caps = [c for c in anchors for _ in range(g)]
            batch_in = {}
            metrics["sample_text"] = anchors[0]
        t_text = time.perf_counter()
        frames = traj = None
        if self.needs_video:
            ref_rep = jnp.repeat(ref_lat, g, axis=0)
            if self.train_dit and s.dit_objective == "nft":    # the policy's own ODE renders (no SDE)
                frames, traj, ctx, unc = env.render_ode(caps, ref_rep, k_vid, dit=self._dit_module(),
                                                        return_latents=True)
            elif self.train_dit:
                frames, traj, ctx, unc = env.render_sde(self._dit_module(), caps, ref_rep, k_vid,
                                                        noise=self._initial_noise(k_vid, len(caps)))
            else:
                frames = env.render_ode(caps, ref_rep, k_vid)
            jax.block_until_ready(frames)
        t_video = time.perf_counter()
        rewards = self._rewards(batch_in, frames, caps, [c for c in gt_caps for _ in range(g)],
                                None if frames is None else np.repeat(gt_feat, g, axis=0),
                                None if frames is None else np.repeat(target, g, axis=0), g)
        if frames is not None:
            metrics["gt_feature_cache_hits"] = float(env.gt_cache_hits)
        t_reward = time.perf_counter()
        if not finite_rewards(rewards):
            return dict(metrics, skipped_rewards=1.0, step_time_s=time.perf_counter() - t0)
        adv = np.asarray(stage_advantages(self.rewards, rewards, g))
        if s.shuffle_advantages:          # the control: rewards no longer tied to their rollouts
            adv = shuffle_within_groups(adv, g, np.random.default_rng([self.seed, int(step_index)]))
        rollouts = [(traj, ctx, unc, adv)] if self.train_dit else []
        if self.train_dit and s.grad_accum > 1:
            # train.grpo.grad_accum: more rollout batches of the same prompts (fresh noise), one update
            t_acc = time.perf_counter()
            all_rewards, all_adv = {k: [np.asarray(v)] for k, v in rewards.items()}, [adv]
            for a in range(1, s.grad_accum):
                k_a = jax.random.fold_in(k_vid, a)
                fr_a, traj_a, ctx_a, unc_a = env.render_sde(self._dit_module(), caps, ref_rep, k_a,
                                                            noise=self._initial_noise(k_a, len(caps)))
                rw_a = self._rewards(batch_in, fr_a, caps, [c for c in gt_caps for _ in range(g)],
                                     np.repeat(gt_feat, g, axis=0), np.repeat(target, g, axis=0), g)
                if not finite_rewards(rw_a):
                    return dict(metrics, skipped_rewards=1.0, step_time_s=time.perf_counter() - t0)
                adv_a = np.asarray(stage_advantages(self.rewards, rw_a, g))
                if s.shuffle_advantages:
                    adv_a = shuffle_within_groups(adv_a, g, np.random.default_rng([self.seed, int(step_index), a]))
                rollouts.append((traj_a, ctx_a, unc_a, adv_a))
                for k, v in rw_a.items():
                    all_rewards[k].append(np.asarray(v))
                all_adv.append(adv_a)
            rewards_all = {k: np.concatenate(v) for k, v in all_rewards.items()}
            adv_all = np.concatenate(all_adv)
            metrics["time/accum_rollouts_s"] = time.perf_counter() - t_acc
            metrics["rollouts_per_update"] = float(len(adv_all))
        else:
            rewards_all, adv_all = rewards, adv
        metrics.update(reward_metrics(rewards_all, adv_all))
        metrics["skipped_rewards"] = 0.0

        upd: dict[str, list] = {}
        if self.train_vlm:
            comp = jnp.asarray(out.tokens)
            cmask = jnp.asarray(out.mask)
            vb = dict(prompt=prompt, completions=comp, completion_mask=cmask, advantages=env.whole(adv))
            if s.num_updates > 1:   # one update: the loss takes its own forward, stop-gradient, as old
                vb["old_logp"] = self._score(self.vlm.state.params, prompt, comp, cmask)
            if s.beta != 0:
                vb["ref_logp"] = self._score(self.vlm.ref_params(), prompt, comp, cmask)
            for u in range(s.num_updates):
                self.vlm.state, m = self._vlm_update(self.vlm.state, self.vlm.frozen,
                                                     dict(vb, update_index=env.const(np.int32(u))))
                upd.setdefault("vlm", []).append(m)
        if self.train_dit:
            if s.dit_objective == "nft":   # one rollout batch; its "trajectory" is the final latents
                (lat, cx, uc, ad), = rollouts
                dbs = [self._nft_batch(lat, cx, uc, ref_rep, ad, jax.random.fold_in(k_vid, 13))]
            else:
                dbs = [self._stage2_batch(tr, cx, uc, ref_rep, ad) for tr, cx, uc, ad in rollouts]
            if sft is not None:        # the flow-matching term on the step's ground truth (one per update)
                dbs[0]["sft"] = sft
            db = dbs[0]
            ref_params = self.dit.ref_params()
            if s.diagnostics_every > 0 and (int(step_index) - 1) % s.diagnostics_every == 0:
                metrics.update(self._stage2_diagnostics({k: v for k, v in db.items() if k != "sft"}, adv, ref_params, caps, ref_rep, gt_feat, target,
                                                        jax.random.fold_in(k_vid, 7), step_index))
            for u in range(s.num_updates):
                self.dit.state, m = self._dit_update_fn()(self.dit.state, self.dit.frozen, ref_params,
                                                          dbs if s.grad_accum > 1 else db)
                upd.setdefault("dit", []).append(m)
        for name, ms in upd.items():
            first = env.sde_window()[0] if name == "dit" else 0
            metrics.update({f"{name}/{k}": v for k, v in _mean_updates(ms, first).items()})
        # the next rollout needs the updated policy anyway: waiting here costs no overlap and makes
        # time/update_s the updates' time (not their dispatch, with the work landing in the next step)
        jax.block_until_ready([p.state.params for p in self.parts.values()])
        t1 = time.perf_counter()
        n_frames = 0 if frames is None else int(np.prod(frames.shape[:2]))
        metrics.update({"time/step_s": t1 - t0, "time/text_s": t_text - t0, "time/video_s": t_video - t_text,
                        "time/reward_s": t_reward - t_video, "time/update_s": t1 - t_reward, "throughput/tokens_per_s": new_tokens / max(t_text - t0, 1e-9),
                        "throughput/frames_per_s": n_frames / max(t_video - t_text, 1e-9)})
        if media.due(getattr(self, "media_every", 0), step_index):     # train.media: TensorBoard rollouts
            metrics["media"] = media.grpo_media(examples, caps, frames, rewards, adv, g,
                                                texts if self.train_vlm else None)
        return metrics
