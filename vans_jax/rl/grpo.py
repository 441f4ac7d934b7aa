"""GRPO objectives of Joint-GRPO (paper eq. 2) as small pure functions.

Per unit (a token of the VLM's answer, or a trained timestep of the VDM's sampler):

    J = min(r * A, clip(r, 1 - eps, 1 + eps) * A) - beta * KL,   r = exp(logp - logp_old)

averaged over the trajectory, then over the group; the loss is -J. The VLM's KL is the
per-token k3 estimator against the reference policy (LoRA disabled); the VDM's is the closed
form for equal-variance Gaussians. Aggregations are selectable by name (``AGGREGATIONS``).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from ..sampling.flow import gaussian_kl


class GRPOTerms(NamedTuple):
    loss: jax.Array
    policy_objective: jax.Array   # mean clipped surrogate
    kl: jax.Array                 # mean KL
    clip_fraction: jax.Array      # fraction of units whose ratio left [1-eps, 1+eps]
    ratio_mean: jax.Array


def k3_kl(logp, ref_logp):
    """Per-token k3 estimator of KL(pi || pi_ref): exp(ref - logp) - (ref - logp) - 1 (>= 0)."""
    d = ref_logp - logp
    return jnp.exp(d) - d - 1.0


def _seq_mean(x, mask):
    """Mean over each row's valid units, then over rows (rows with no units count as 0)."""
    per_row = jnp.sum(x * mask, axis=-1) / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)
    return jnp.mean(per_row)


def _token_mean(x, mask):
    """Mean over all valid units of the batch (long answers weigh more)."""
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


AGGREGATIONS: dict[str, Callable] = {
    "sequence_mean": _seq_mean,  # the paper's: over the trajectory, then over the group
    "token_mean": _token_mean,
}


def grpo_loss(logp, old_logp, advantages, mask=None, *, kl=None, beta: float = 0.004, clip_eps: float = 1e-3,
              aggregation: str = "sequence_mean") -> GRPOTerms:
    """Clipped-ratio GRPO loss.

    logp, old_logp: (N, U) log-probs of the taken actions under the current policy and the
    policy that sampled them (U = tokens, or trained timesteps). advantages: (N,) or (N, U).
    mask: (N, U), 1 for real units. kl: (N, U) per-unit KL to the reference (or None).
    """
    logp = logp.astype(jnp.float32)
    mask = jnp.ones_like(logp) if mask is None else mask.astype(jnp.float32)
    adv = advantages.astype(jnp.float32)
    adv = adv[:, None] if adv.ndim == 1 else adv
    ratio = jnp.exp(logp - jax.lax.stop_gradient(old_logp.astype(jnp.float32)))
    clipped = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    surrogate = jnp.minimum(ratio * adv, clipped * adv)
    kl = jnp.zeros_like(logp) if kl is None else kl.astype(jnp.float32)
    try:
        agg = AGGREGATIONS[aggregation]
    except KeyError:
        raise ValueError(f"unknown aggregation {aggregation!r}; expected one of {sorted(AGGREGATIONS)}") from None
    objective = agg(surrogate - beta * kl, mask)
    outside = ((ratio < 1.0 - clip_eps) | (ratio > 1.0 + clip_eps)).astype(jnp.float32)
    return GRPOTerms(loss=-objective, policy_objective=agg(surrogate, mask), kl=agg(kl, mask),
                     clip_fraction=_token_mean(outside, mask), ratio_mean=_token_mean(ratio, mask))


def vlm_grpo_loss(logp, old_logp, ref_logp, advantages, mask, *, beta=0.004, clip_eps=1e-3,
                  aggregation="sequence_mean") -> GRPOTerms:
    """Stage 1 (VLM): token-level clipped ratio with the k3 KL to the LoRA-disabled reference."""
    kl = k3_kl(logp.astype(jnp.float32), jax.lax.stop_gradient(ref_logp.astype(jnp.float32)))
    return grpo_loss(logp, old_logp, advantages, mask, kl=kl, beta=beta, clip_eps=clip_eps, aggregation=aggregation)


def vdm_grpo_loss(logp, old_logp, mean, ref_mean, std, advantages, mask=None, *, beta=0.004, clip_eps=1e-3,
                  advantage_clip: float | None = 5.0, aggregation="sequence_mean") -> GRPOTerms:
    """Stage 2 (VDM): per-timestep clipped ratio with the closed-form Gaussian KL to the reference
    DiT. logp/old_logp: (N, S) over S trained timesteps; mean/ref_mean: (N, S, ...) SDE means;
    std: (S,) or (N, S) the step's std_t * sqrt(-dt)."""
    n, s = logp.shape
    std = jnp.broadcast_to(jnp.asarray(std, jnp.float32), (n, s)).reshape(-1)
    kl = gaussian_kl(mean.reshape((n * s,) + mean.shape[2:]),
                     jax.lax.stop_gradient(ref_mean.reshape((n * s,) + ref_mean.shape[2:])), std).reshape(n, s)
    if advantage_clip is not None:
        advantages = jnp.clip(advantages, -advantage_clip, advantage_clip)
    return grpo_loss(logp, old_logp, advantages, mask, kl=kl, beta=beta, clip_eps=clip_eps, aggregation=aggregation)
