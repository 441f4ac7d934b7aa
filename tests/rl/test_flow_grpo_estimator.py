"""Is the Flow-GRPO policy gradient right? The gradient of the trainer's own Stage-2 loss
(``rl.stages.stage2_grads`` at ratio 1, raw rewards as advantages, averaged over many SDE rollouts)
against the true gradient of the expected reward along a random parameter direction, measured by
central finite differences with common random numbers (the same initial noises and SDE noises at
theta +- h d).

The score-function identity: grad E[R] = E[R * sum_t grad log p(x_{t+1} | x_t)] over the STOCHASTIC
steps. The trainer's per-step log-prob is a mean over the D latent elements and its loss a mean over
the S trained steps and the N rollouts, so  -grad(loss) * S * D  estimates grad E[R].

A tiny stand-in velocity model (the DiT's call signature: reference latents in front on the time
axis, CFG on) keeps it fast; the estimate's sampling error comes from the spread over chunks.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vans_jax.rl.stages import stage2_grads
from vans_jax.sampling import flow

C, T, H, W, N_REF, TEXT = 2, 1, 2, 2, 1, 3
D = C * T * H * W


class TinyVelocity(nnx.Module):
    """v = U tanh(A x + b + P ctx + q t / 1000 + r * mean_time(x incl. references)), targets only."""

    def __init__(self, rngs: nnx.Rngs):
        k = rngs.params
        self.A = nnx.Param(0.6 * jax.random.normal(k(), (C, C)))
        self.U = nnx.Param(0.6 * jax.random.normal(k(), (C, C)))
        self.b = nnx.Param(0.3 * jax.random.normal(k(), (C,)))
        self.P = nnx.Param(0.5 * jax.random.normal(k(), (TEXT, C)))
        self.q = nnx.Param(0.5 * jax.random.normal(k(), (C,)))
        self.r = nnx.Param(0.5 * jax.random.normal(k(), (C,)))

    def __call__(self, x, t, context, n_ref=0):
        cond = context.mean(1) @ self.P + (t / 1000.0)[:, None] * self.q + self.b     # (B, C)
        h = jnp.einsum("oc,bcthw->bothw", self.A, x) + cond[:, :, None, None, None]
        h = h + self.r[None, :, None, None, None] * x.mean(2, keepdims=True)
        v = jnp.einsum("oc,bcthw->bothw", self.U, jnp.tanh(h))
        return v[:, :, n_ref:]


NUM_STEPS, SHIFT, NOISE_LEVEL, CFG = 4, 3.0, 0.7, 2.0


def _setup(n, seed=0):
    model = TinyVelocity(nnx.Rngs(seed))
    graphdef, params, frozen = nnx.split(model, nnx.Param, ...)
    k = jax.random.split(jax.random.key(seed + 1), 4)
    ctx = jnp.broadcast_to(jax.random.normal(k[0], (1, 2, TEXT)), (n, 2, TEXT))
    unc = jnp.zeros((n, 2, TEXT))
    ref = jnp.broadcast_to(jax.random.normal(k[1], (1, C, N_REF, H, W)), (n, C, N_REF, H, W))
    noise = jax.random.normal(k[2], (n, C, T, H, W))
    leaves, tdef = jax.tree.flatten(params)
    direction = jax.tree.unflatten(tdef, [jax.random.normal(jax.random.fold_in(k[3], i), p.shape)
                                          for i, p in enumerate(leaves)])
    return graphdef, params, frozen, ctx, unc, ref, noise, direction


def _reward(x0):
    return x0.mean(axis=(1, 2, 3, 4))     # the mean of the final sample


def _sample(graphdef, params, frozen, noise, ctx, unc, ref, rng, window, last_params=None):
    """Final latents and the trajectory; ``last_params``: the deterministic steps after the window
    use these parameters instead (holds the post-window map fixed)."""
    model = nnx.merge(graphdef, params, frozen)
    x, traj = flow.sample(model, noise, ctx, uncond_context=unc, guidance_scale=CFG, ref_latents=ref,
                          num_steps=NUM_STEPS, shift=SHIFT, mode="sde", rng=rng, sde_window=window,
                          noise_level=NOISE_LEVEL, return_trajectory=True)
    if last_params is not None and window[1] < NUM_STEPS:
        m0 = nnx.merge(graphdef, last_params, frozen)
        sig = traj.sigmas
        x = traj.latents[window[1]]
        for i in range(window[1], NUM_STEPS):
            v = flow.guided_velocity(m0, x, traj.timesteps[i], ctx, unc, CFG, ref)
            x = flow.euler_step(x, v, sig[i], sig[i + 1])
    return x, traj


def _estimate(graphdef, params, frozen, ctx, unc, ref, noise, rng, window, chunks):
    """-grad(loss) * S * D along each chunk of rollouts (raw rewards as advantages)."""
    x0, traj = _sample(graphdef, params, frozen, noise, ctx, unc, ref, rng, window)
    rewards = _reward(x0)
    idx = np.arange(*window)
    s = len(idx)
    n = noise.shape[0]
    grads_fn = jax.jit(lambda p, b: stage2_grads(p, graphdef, frozen, p, b, beta=0.0, clip_eps=0.2,
                                                 advantage_clip=None, noise_level=NOISE_LEVEL,
                                                 std_form="flow_grpo"))
    out, ratios = [], []
    m = n // chunks
    for c in range(chunks):
        rows = slice(c * m, (c + 1) * m)
        batch = dict(x=traj.latents[idx][:, rows], x_next=traj.latents[idx + 1][:, rows],
                     old_logp=traj.log_probs[idx][:, rows], steps=jnp.asarray(idx, jnp.int32),
                     timesteps=traj.timesteps[idx], sigmas=traj.sigmas, context=ctx[rows], uncond_context=unc[rows],
                     cfg=jnp.float32(CFG), ref_latents=ref[rows], advantages=rewards[rows])
        g, metrics = grads_fn(params, batch)
        out.append(jax.tree.map(lambda a: -a * s * D, g))
        ratios.append(float(metrics["ratio"]))
    return out, ratios, rewards


def _dot(a, b):
    return float(sum(jnp.sum(x * y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))))


def _fd(graphdef, params, frozen, ctx, unc, ref, noise, rng, window, direction, h, hold_last=False):
    """Central finite difference of the mean reward along ``direction`` with common random numbers;
    per-rollout differences (their mean and standard error)."""
    plus = jax.tree.map(lambda p, d: p + h * d, params, direction)
    minus = jax.tree.map(lambda p, d: p - h * d, params, direction)
    last = params if hold_last else None
    rp = _reward(_sample(graphdef, plus, frozen, noise, ctx, unc, ref, rng, window, last)[0])
    rm = _reward(_sample(graphdef, minus, frozen, noise, ctx, unc, ref, rng, window, last)[0])
    d = np.asarray((rp - rm) / (2 * h))
    return float(d.mean()), float(d.std() / np.sqrt(len(d)))


def directional_check(window, n=4096, chunks=16, h=1e-2, seed=0, hold_last=False):
    graphdef, params, frozen, ctx, unc, ref, noise, direction = _setup(n, seed)
    rng = jax.random.key(seed + 7)
    ests, ratios, rewards = _estimate(graphdef, params, frozen, ctx, unc, ref, noise, rng, window, chunks)
    e = np.asarray([_dot(g, direction) for g in ests])
    fd, fd_se = _fd(graphdef, params, frozen, ctx, unc, ref, noise, rng, window, direction, h, hold_last)
    return dict(estimate=float(e.mean()), estimate_se=float(e.std(ddof=1) / np.sqrt(chunks)), fd=fd, fd_se=fd_se,
                ratio=ratios, reward_std=float(np.std(np.asarray(rewards))))


def test_estimator_matches_finite_differences_all_steps_stochastic():
    """Every step stochastic and trained: the policy gradient is unbiased for grad E[R]."""
    r = directional_check((0, NUM_STEPS))
    assert np.allclose(r["ratio"], 1.0, atol=1e-5)   # the stored log-probs are the loss's own
    se = np.hypot(r["estimate_se"], r["fd_se"])
    assert abs(r["fd"]) > 6 * r["fd_se"], r            # the true slope is clearly non-zero
    assert abs(r["estimate"] - r["fd"]) < 4 * se, r    # and the estimate agrees within sampling error
    assert np.sign(r["estimate"]) == np.sign(r["fd"]), r


def test_estimator_with_deterministic_last_step_targets_the_stochastic_part():
    """The trainer's default window (all steps but the last, the last an Euler step): the policy
    gradient covers how theta moves the distribution of the stochastic steps only. It matches the
    finite difference that holds the deterministic last step at theta, not the full one."""
    r = directional_check((0, NUM_STEPS - 1), hold_last=True)
    se = np.hypot(r["estimate_se"], r["fd_se"])
    assert abs(r["fd"]) > 6 * r["fd_se"], r
    assert abs(r["estimate"] - r["fd"]) < 4 * se, r
