"""The Joint-GRPO stages as data and pure functions (paper section 3.3 / appendix B-C).

* Which rewards each mode uses (``MODE_REWARDS``; the paper's normalize-then-sum rule, weights 1),
  the settings of a run (``GRPOSettings``).
* Stage 1 (VLM tuned through the frozen VDM): ``stage1_loss``, the token-level clipped-ratio loss
  with the k3 KL to the LoRA-disabled reference, on stored completions.
* Stage 2 (DiT tuned, anchored by the stage-1 VLM): ``stage2_grads``, the per-timestep Flow-GRPO
  loss with the closed-form Gaussian KL to the reference DiT, its gradient accumulated timestep by
  timestep.
* Stage 2 with ``dit_objective="nft"``: ``nft_grads``, DiffusionNFT's negative-aware flow-matching
  objective on the final latents of ODE rollouts (no SDE, no log-probs), the opt-in alternative.
* All-in-one (ablation): both, on one joint reward.

The rollouts that feed them are in ``rl.rollouts``; the trainer that owns the optimizer states
and compiles the updates is ``train.grpo``.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..sampling import flow
from ..sampling.text import completion_logprobs
from .grpo import vdm_grpo_loss, vlm_grpo_loss
from .rewards import REWARD_REGISTRY, RewardConfig, parse_rewards

# which reward components each mode uses (all weights 1, the paper's B.1 normalize-then-sum rule)
MODE_REWARDS = {
    "grpo_stage1": ("format", "t1", "v1"),
    "grpo_vlm": ("format", "t1"),          # standard GRPO on the VLM alone: text rewards only
    "grpo_stage2": ("v2", "c2"),
    "grpo_vdm": ("v2", "c2"),              # standard GRPO on the VDM alone: ground-truth captions
    "grpo_all_in_one": ("format", "t1", "v1", "c2"),
}
GRPO_MODES = tuple(MODE_REWARDS)


# what each mode's rollouts provide to rewards
_TEXT_INPUTS = ("texts",)
_VIDEO_INPUTS = ("frames", "gt_frames", "gen_video_feats", "gt_video_feats", "caption_feats")


def mode_inputs(mode: str) -> set:
    """The reward inputs a mode's rollouts have (``texts`` only where the VLM samples, video inputs
    only where videos are rendered)."""
    have = {"gt_captions", "reward_inputs"}
    if mode in ("grpo_stage1", "grpo_vlm", "grpo_all_in_one"):
        have |= set(_TEXT_INPUTS)
    if mode != "grpo_vlm":
        have |= set(_VIDEO_INPUTS)
    return have


def reward_config(mode: str, disabled: Sequence[str] = (), rewards: str = "", **kw) -> RewardConfig:
    """The mode's rewards: its paper default (``MODE_REWARDS``, weights 1) or ``rewards``, a
    ``train.grpo.rewards`` list (``rewards.parse_rewards``); ``disabled`` switches components off."""
    weights = parse_rewards(rewards) or {k: 1.0 for k in MODE_REWARDS[mode]}
    names = tuple(weights)
    bad = [d for d in disabled if d not in names]
    if bad:
        raise ValueError(f"cannot disable reward(s) {bad} in mode {mode}: it uses {list(names)}")
    cfg = RewardConfig(weights=weights, **kw).without(*disabled)
    lacking = {k: [i for i in REWARD_REGISTRY[k].inputs if i not in mode_inputs(mode)] for k in cfg.active}
    lacking = {k: v for k, v in lacking.items() if v}
    if lacking:
        raise ValueError(f"mode {mode} cannot compute reward(s) {sorted(lacking)}: its rollouts have no "
                         f"{sorted({i for v in lacking.values() for i in v})}")
    return cfg


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
    rewards: str = ""                 # train.grpo.rewards ("": the mode's paper default)
    shuffle_advantages: bool = False  # the control run: advantages permuted within each group
    diagnostics_every: int = 0        # stage 2: half-batch gradient agreement + reward variance split
    diagnostics_noises: int = 4       # the split: K initial noises x M SDE draws of one anchor
    diagnostics_sde_draws: int = 4
    grad_accum: int = 1               # stage 2: rollout batches (of the step's prompts) per optimizer update
    same_noise: bool = False          # stage 2: one initial noise for all G rollouts of a group (DanceGRPO)
    timestep_weight: str = "none"     # stage 2: "none" | "std_dt" (policy term x std_t / sqrt(-dt), flow_grpo's Wan)
    sft_weight: float = 0.0           # DiT updates: + this x the SFT-VDM flow-matching loss on the step's ground truth
    dit_objective: str = "flow_grpo"  # stage 2: "flow_grpo" (SDE rollouts, log-prob ratio) | "nft" (ODE rollouts, nft_grads)
    nft_beta: float = 1.0             # nft: the implicit policies' step (v+- = v_old +- nft_beta (v - v_old))
    nft_timesteps: int = 4            # nft: forward-process timesteps drawn per rollout and update

    def __post_init__(self):
        if self.dit_objective not in DIT_OBJECTIVES:
            raise ValueError(f"unknown train.grpo.dit_objective {self.dit_objective!r}; expected one of "
                             f"{DIT_OBJECTIVES}")
        if self.dit_objective == "nft":
            if not float(self.nft_beta) > 0.0:
                raise ValueError(f"train.grpo.nft_beta must be > 0, got {self.nft_beta}")
            if int(self.nft_timesteps) < 1:
                raise ValueError(f"train.grpo.nft_timesteps must be >= 1, got {self.nft_timesteps}")
            if int(self.num_updates) != 1:
                raise ValueError(f"train.grpo.dit_objective='nft' runs one update a rollout (its old policy is "
                                 f"the sampling one); got num_updates={self.num_updates}")
            for k, off in (("grad_accum", int(self.grad_accum) == 1), ("diagnostics_every", self.diagnostics_every == 0),
                           ("timestep_weight", self.timestep_weight == "none"), ("same_noise", not self.same_noise)):
                if not off:
                    raise ValueError(f"train.grpo.{k} is a Flow-GRPO (SDE) setting; it has no meaning with "
                                     f"dit_objective='nft'")
        if int(self.grad_accum) < 1:
            raise ValueError(f"train.grpo.grad_accum must be >= 1, got {self.grad_accum}")
        if not float(self.sft_weight) >= 0.0:
            raise ValueError(f"train.grpo.sft_weight must be >= 0, got {self.sft_weight}")
        if self.timestep_weight not in TIMESTEP_WEIGHTS:
            raise ValueError(f"unknown train.grpo.timestep_weight {self.timestep_weight!r}; expected one of "
                             f"{TIMESTEP_WEIGHTS}")


TIMESTEP_WEIGHTS = ("none", "std_dt")
DIT_OBJECTIVES = ("flow_grpo", "nft")


def timestep_weights(sigmas, steps, *, noise_level, std_form, kind: str = "none"):
    """Per trained timestep (``steps`` (S,) indices into ``sigmas``) the weight of its policy term:
    1 for ``"none"``; for ``"std_dt"`` std_t / sqrt(sigma_j - sigma_{j+1}) (flow_grpo's Wan trainer),
    normalized to mean 1 over the trained steps (the learning rate and gradient clip keep their
    meaning). Early, high-noise steps get more weight: their log-prob gradients are the smallest."""
    steps = jnp.asarray(steps, jnp.int32)
    if kind == "none":
        return jnp.ones(steps.shape, jnp.float32)
    if kind != "std_dt":
        raise ValueError(f"unknown timestep_weight {kind!r}; expected one of {TIMESTEP_WEIGHTS}")
    sigmas = jnp.asarray(sigmas, jnp.float32)
    std_t = flow.sde_std_t(sigmas[steps], sigmas, noise_level, std_form)
    w = std_t / jnp.sqrt(sigmas[steps] - sigmas[steps + 1])
    return w / jnp.mean(w)


def stage1_loss(params, graphdef, frozen, batch, rng, *, beta, clip_eps, temperature, aggregation):
    """Token-level GRPO loss of the VLM on stored completions (no LoRA dropout: ratio 1 at the
    first update). ``batch["old_logp"]`` may be absent: the update is the first on these
    completions (one update per rollout) and the sampling policy is the current one, so the old
    log-probs are this forward's own, stop-gradient (ratio exactly 1, its gradient that of logp),
    and the trainer skips the extra scoring forward. ``batch["ref_logp"]`` may be absent when
    ``beta`` is 0."""
    model = nnx.merge(graphdef, params, frozen)
    logp = completion_logprobs(model, batch["prompt"], batch["completions"], batch["completion_mask"],
                               temperature)
    own = jax.lax.stop_gradient(logp)
    old = batch.get("old_logp", own)
    ref = batch.get("ref_logp", own)
    if "ref_logp" not in batch and beta != 0:
        raise ValueError("stage1_loss: beta > 0 needs batch['ref_logp'] (the reference policy's log-probs)")
    t = vlm_grpo_loss(logp, old, ref, batch["advantages"], batch["completion_mask"],
                      beta=beta, clip_eps=clip_eps, aggregation=aggregation)
    return t.loss, {"kl": t.kl, "clip_fraction": t.clip_fraction, "ratio": t.ratio_mean,
                    "policy_objective": t.policy_objective}


def _dit_velocity(graphdef, params, frozen, x, t, ctx, unc, g, ref_lat, pad=None):
    return flow.guided_velocity(nnx.merge(graphdef, params, frozen), x, t, ctx, unc, g, ref_lat, pad)


def stage2_grads(params, graphdef, frozen, ref_params, batch, *, beta, clip_eps, advantage_clip, noise_level,
                 std_form, aggregation="sequence_mean", timestep_weight="none"):
    """Stage-2 (Flow-GRPO) gradient of the DiT on stored SDE trajectories: the mean over the S trained
    timesteps of the per-timestep clipped-ratio terms with the closed-form Gaussian KL to
    ``ref_params``, accumulated one timestep at a time in a ``lax.scan`` (one DiT forward + backward
    live at once). ``timestep_weight``: each step's policy term times ``timestep_weights`` (the KL
    term unweighted). Returns (gradient, metrics: loss, kl, clip_fraction, ratio, policy_objective)."""
    s = batch["x"].shape[0]
    ctx, unc, g, ref_lat = batch["context"], batch.get("uncond_context"), batch["cfg"], batch.get("ref_latents")
    pad = batch.get("context_pad")      # the contexts trimmed (sampling.wan.trim_batch_text)
    sigmas, adv = batch["sigmas"], batch["advantages"]
    weights = timestep_weights(sigmas, batch["steps"], noise_level=noise_level, std_form=std_form,
                               kind=timestep_weight)

    def one(carry, xs):
        gsum, msum = carry
        x, xn, olp, j, t, w = xs

        def lossf(params):
            v = _dit_velocity(graphdef, params, frozen, x, t, ctx, unc, g, ref_lat, pad)
            out = flow.sde_step(x, v, sigmas, j, prev_sample=xn, noise_level=noise_level, std_form=std_form)
            if beta > 0:
                v_ref = _dit_velocity(graphdef, ref_params, frozen, x, t, ctx, unc, g, ref_lat, pad)
                ref_mean = jax.lax.stop_gradient(
                    flow.sde_step(x, v_ref, sigmas, j, prev_sample=xn, noise_level=noise_level,
                                  std_form=std_form).mean)
            else:
                ref_mean = jax.lax.stop_gradient(out.mean)
            terms = vdm_grpo_loss(out.log_prob[:, None], olp[:, None], out.mean[:, None], ref_mean[:, None],
                                  out.std, adv, beta=beta, clip_eps=clip_eps, advantage_clip=advantage_clip,
                                  aggregation=aggregation)
            if timestep_weight == "none":
                return terms.loss / s, terms
            # loss = -policy + beta * kl (the aggregations are linear): weight the policy part only
            return (terms.loss + (1.0 - w) * terms.policy_objective) / s, terms

        (_, terms), grads = jax.value_and_grad(lossf, has_aux=True)(params)
        m = jnp.stack([terms.loss, terms.kl, terms.clip_fraction, terms.ratio_mean, terms.policy_objective]) / s
        per_step = jnp.stack([terms.ratio_mean, terms.clip_fraction, tree_norm(grads)])
        return (jax.tree.map(jnp.add, gsum, grads), msum + m), per_step

    zeros = jax.tree.map(jnp.zeros_like, params)
    (grads, m), per = jax.lax.scan(one, (zeros, jnp.zeros(5, jnp.float32)),
                                   (batch["x"], batch["x_next"], batch["old_logp"], batch["steps"],
                                    batch["timesteps"], weights))
    # per trained timestep (S,): its ratio and clip fraction, and the norm of its gradient term
    return grads, dict(loss=m[0], kl=m[1], clip_fraction=m[2], ratio=m[3], policy_objective=m[4],
                       ratio_per_step=per[:, 0], clip_fraction_per_step=per[:, 1], grad_norm_per_step=per[:, 2])


def nft_optimality(advantages, advantage_clip):
    """DiffusionNFT's optimality probability of each rollout from its group-normalized advantage:
    r = 0.5 + 0.5 clip(A / c, -1, 1) with c = ``advantage_clip`` (r = 0.5, no pull, at the group mean)."""
    c = jnp.float32(max(float(advantage_clip), 1e-6))
    return 0.5 + 0.5 * jnp.clip(jnp.asarray(advantages, jnp.float32) / c, -1.0, 1.0)


def nft_grads(params, graphdef, frozen, ref_params, batch, rng, *, nft_beta, beta, shift, num_timesteps,
              group_size, advantage_clip):
    """Stage-2 gradient of DiffusionNFT (Zheng et al. 2025, "Online Diffusion Reinforcement with
    Forward Process"): the final latents ``batch["x0"]`` (N, C, T, h, w) of the policy's own ODE
    rollouts are noised by the forward process, x_t = (1 - s) x0 + s n, target v = n - x0 (the SFT
    parametrization), and each rollout pulls an implicit positive policy towards its target and
    pushes an implicit negative one away, weighted by its optimality r (``nft_optimality``):

        loss = mean[ r |v+ - v|^2 + (1 - r) |v- - v|^2 ],  v+- = v_old +- nft_beta (v_theta - v_old)

    with v_theta the guided (CFG ``batch["cfg"]``) velocity given the clean reference latents, and
    v_old the sampling policy's: one update a rollout, so v_old = stop_gradient(v_theta) and the
    gradient is 2 nft_beta (2r - 1)(v_old - v) dv_theta, an advantage-weighted flow-matching step.
    The G rollouts of a group share the timestep and the forward noise (common random numbers: the
    group's terms differ by their x0 alone). ``beta`` > 0 adds beta |v_theta - v_ref|^2 (the
    velocity-space KL to ``ref_params``). ``num_timesteps`` draws (sigma ~ Wan's shifted uniform)
    are accumulated one at a time in a ``lax.scan``. Returns (gradient, metrics)."""
    x0 = batch["x0"].astype(jnp.float32)
    n = x0.shape[0]
    if n % group_size:
        raise ValueError(f"nft_grads: {n} rollouts is not a multiple of the group size {group_size}")
    ctx, unc, g, ref_lat = batch["context"], batch.get("uncond_context"), batch["cfg"], batch.get("ref_latents")
    pad = batch.get("context_pad")      # the contexts trimmed (sampling.wan.trim_batch_text)
    r = nft_optimality(batch["advantages"], advantage_clip)
    rb = r[:, None, None, None, None]
    groups = n // group_size

    def one(carry, k):
        gsum, msum = carry
        k_t, k_n = jax.random.split(k)
        u = jax.random.uniform(k_t, (groups,), jnp.float32, 1e-3, 1.0)
        sig = jnp.repeat(flow.shift_sigmas(u, shift), group_size)
        noise = jnp.repeat(jax.random.normal(k_n, (groups,) + x0.shape[1:], jnp.float32), group_size, axis=0)
        s = sig[:, None, None, None, None]
        xt = (1.0 - s) * x0 + s * noise
        target = noise - x0

        def lossf(p):
            v = _dit_velocity(graphdef, p, frozen, xt, sig * 1000.0, ctx, unc, g, ref_lat, pad)   # a timestep per row
            old = jax.lax.stop_gradient(v)
            pos = old + nft_beta * (v - old)
            neg = old - nft_beta * (v - old)
            lp = jnp.mean(rb * (pos - target) ** 2 + (1.0 - rb) * (neg - target) ** 2)
            kl = jnp.float32(0.0)
            if beta > 0:
                v_ref = jax.lax.stop_gradient(_dit_velocity(graphdef, ref_params, frozen, xt, sig * 1000.0, ctx, unc,
                                                            g, ref_lat, pad))
                kl = jnp.mean((v - v_ref) ** 2)
            fm = jnp.mean((old - target) ** 2)
            return (lp + beta * kl) / num_timesteps, (lp, kl, fm)

        (_, (lp, kl, fm)), grads = jax.value_and_grad(lossf, has_aux=True)(params)
        m = jnp.stack([lp + beta * kl, kl, fm]) / num_timesteps
        return (jax.tree.map(jnp.add, gsum, grads), msum + m), tree_norm(grads)

    zeros = jax.tree.map(jnp.zeros_like, params)
    (grads, m), norms = jax.lax.scan(one, (zeros, jnp.zeros(3, jnp.float32)), jax.random.split(rng, num_timesteps))
    return grads, dict(loss=m[0], kl=m[1], flow_matching=m[2], optimality_mean=jnp.mean(r),
                       optimality_spread=jnp.mean(jnp.abs(2.0 * r - 1.0)), grad_norm_mean_draw=jnp.mean(norms))


def tree_norm(tree):
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def tree_cosine(a, b):
    dot = sum(jnp.sum(x.astype(jnp.float32) * y.astype(jnp.float32)) for x, y in zip(jax.tree.leaves(a),
                                                                                        jax.tree.leaves(b)))
    return dot / jnp.maximum(tree_norm(a) * tree_norm(b), 1e-30)


def param_group(path) -> str:
    """The module group of a parameter path for per-group diagnostics: its top-level module, and
    inside ``blocks`` (the stacked transformer layers) the layer's sub-module (``blocks.attn1``)."""
    keys = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
    keys = [k for k in keys if k not in ("value", "raw_value")]
    if not keys:
        return "all"
    return ".".join(keys[:2]) if keys[0] == "blocks" and len(keys) >= 2 else keys[0]


def tree_cosine_by_group(a, b) -> dict:
    """``tree_cosine`` of ``a`` and ``b`` over each ``param_group`` separately: {group: cosine}."""
    fa, fb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)
    groups: dict = {}
    for (path, x), y in zip(fa, fb):
        groups.setdefault(param_group(path), ([], []))
        groups[param_group(path)][0].append(x)
        groups[param_group(path)][1].append(y)
    return {g: tree_cosine(xs, ys) for g, (xs, ys) in sorted(groups.items())}


# the rows of a stage-2 batch: trajectory arrays are (S, N, ...), per-rollout ones (N, ...)
_TRAJ_KEYS = ("x", "x_next", "old_logp")
_ROW_KEYS = ("context", "uncond_context", "ref_latents", "advantages")


def stage2_rows(batch: dict, rows: slice) -> dict:
    """The stage-2 batch restricted to rollouts ``rows``."""
    out = dict(batch)
    for k in _TRAJ_KEYS:
        out[k] = batch[k][:, rows]
    for k in _ROW_KEYS:
        if k in batch:
            out[k] = batch[k][rows]
    return out


def stage2_half_batch_agreement(params, graphdef, frozen, ref_params, batch, shuffled_advantages, **settings):
    """The signal gate of Stage 2: the cosine between the gradients of two independent halves of the
    rollouts (first and second half of the rows), and the same with ``shuffled_advantages`` (the
    control: the rollouts' advantages permuted within groups). A gradient that carries the
    rewards' signal agrees across halves more than its control does; cosines near 0 in both mean
    the batch is too small for the update to be more than noise; the same per module group
    (``grad_cos_halves/<group>``, ``param_group``). ``settings``: ``stage2_grads``'."""
    n = batch["advantages"].shape[0]
    a, b = slice(0, n // 2), slice(n // 2, 2 * (n // 2))
    grad = lambda bt: stage2_grads(params, graphdef, frozen, ref_params, bt, **settings)[0]
    ga, gb = grad(stage2_rows(batch, a)), grad(stage2_rows(batch, b))
    shuf = dict(batch, advantages=shuffled_advantages)
    sa, sb = grad(stage2_rows(shuf, a)), grad(stage2_rows(shuf, b))
    out = {"grad_cos_halves": tree_cosine(ga, gb), "grad_cos_halves_shuffled": tree_cosine(sa, sb),
           "grad_norm_half": 0.5 * (tree_norm(ga) + tree_norm(gb))}
    # per module group: where in the network the rewards' signal sits (a group whose halves agree
    # beyond the control's is one a restricted update, e.g. ``dit_trainable``, can learn with)
    real, ctrl = tree_cosine_by_group(ga, gb), tree_cosine_by_group(sa, sb)
    out.update({f"grad_cos_halves/{g}": c for g, c in real.items()})
    out.update({f"grad_cos_halves_shuffled/{g}": c for g, c in ctrl.items()})
    return out


def reward_variance_split(rewards: np.ndarray) -> dict:
    """Rewards of K initial noises x M SDE draws each (K, M) -> the law of total variance:
    ``noise`` = Var_k(E_m r) (the part the initial noise decides), ``sde`` = E_k(Var_m r) (the
    part the SDE noise adds), and ``sde_share`` = sde / (noise + sde)."""
    r = np.asarray(rewards, np.float64)
    if r.ndim != 2 or r.shape[0] < 2 or r.shape[1] < 2:
        raise ValueError(f"reward_variance_split needs rewards (K >= 2 noises, M >= 2 SDE draws), got {r.shape}")
    noise, sde = float(r.mean(1).var()), float(r.var(1).mean())
    return {"noise": noise, "sde": sde, "sde_share": sde / max(noise + sde, 1e-30)}


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
