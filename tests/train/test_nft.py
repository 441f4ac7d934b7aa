"""``train.grpo.dit_objective="nft"`` (DiffusionNFT on the DiT, ``rl.stages.nft_grads``): the loss is
the paper's negative-aware flow-matching objective, its gradient the advantage-weighted flow-matching
step, groups share their forward noise, it raises a reward on a stand-in beyond its shuffled control,
and it runs as a Stage-2 step of the trainer."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from tests.rl.test_flow_grpo_estimator import CFG, NUM_STEPS, SHIFT, _setup
from tests.train.test_trainer import _changed, _examples, stage_runners  # noqa: F401 (fixture)
from vans_jax.rl.stages import GRPOSettings, nft_grads, nft_optimality
from vans_jax.sampling import flow

G = 4


def _close(a, b, rtol=2e-4, atol=1e-7):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def _norm(t):
    return float(np.sqrt(sum(np.sum(np.square(np.asarray(x))) for x in jax.tree.leaves(t))))


def _ode(graphdef, params, frozen, noise, ctx, unc, ref):
    return flow.sample(nnx.merge(graphdef, params, frozen), noise, ctx, uncond_context=unc, guidance_scale=CFG,
                       ref_latents=ref, num_steps=NUM_STEPS, shift=SHIFT, mode="euler")


def _batch(n=8, seed=0):
    graphdef, params, frozen, ctx, unc, ref, noise, _ = _setup(n, seed)
    x0 = _ode(graphdef, params, frozen, noise, ctx, unc, ref)
    batch = dict(x0=x0, context=ctx, uncond_context=unc, cfg=jnp.float32(CFG), ref_latents=ref,
                 advantages=jnp.asarray(np.tile([-1.5, -0.5, 0.5, 1.5], n // G), jnp.float32))
    return graphdef, params, frozen, batch


def _grads(graphdef, frozen, ref_params, *, beta=0.0, nft_beta=1.0, timesteps=2, clip=5.0):
    return jax.jit(lambda p, b, k: nft_grads(p, graphdef, frozen, ref_params, b, k, nft_beta=nft_beta, beta=beta,
                                             shift=SHIFT, num_timesteps=timesteps, group_size=G,
                                             advantage_clip=clip))


def test_nft_loss_is_the_negative_aware_objective():
    """One forward-noise draw, rebuilt by hand: r |v+ - v|^2 + (1 - r) |v- - v|^2 with the implicit
    policies v+- = v_old +- beta_nft (v_theta - v_old), v_old the sampling policy (frozen), plus the
    velocity KL to the reference; the same gradient and loss as nft_grads."""
    graphdef, params, frozen, batch = _batch()
    ref = jax.tree.map(lambda x: x + 0.05, params)
    rng = jax.random.key(11)
    k_t, k_n = jax.random.split(jax.random.split(rng, 1)[0])
    n = batch["x0"].shape[0]
    sig = jnp.repeat(flow.shift_sigmas(jax.random.uniform(k_t, (n // G,), jnp.float32, 1e-3, 1.0), SHIFT), G)
    noise = jnp.repeat(jax.random.normal(k_n, (n // G,) + batch["x0"].shape[1:]), G, axis=0)
    s = sig[:, None, None, None, None]
    xt = (1 - s) * batch["x0"] + s * noise
    target = noise - batch["x0"]
    r = nft_optimality(batch["advantages"], 5.0)[:, None, None, None, None]

    def vel(p):
        return flow.guided_velocity(nnx.merge(graphdef, p, frozen), xt, sig * 1000.0, batch["context"],
                                    batch["uncond_context"], CFG, batch["ref_latents"])

    v_old, v_ref = vel(params), vel(ref)
    for beta, nft_beta in ((0.0, 1.0), (0.3, 0.5)):
        def loss(p):
            v = vel(p)
            pos, neg = v_old + nft_beta * (v - v_old), v_old - nft_beta * (v - v_old)
            return jnp.mean(r * (pos - target) ** 2 + (1 - r) * (neg - target) ** 2) + beta * jnp.mean((v - v_ref) ** 2)

        want_l, want_g = jax.value_and_grad(loss)(params)
        got_g, m = _grads(graphdef, frozen, ref, beta=beta, nft_beta=nft_beta, timesteps=1)(params, batch, rng)
        _close(got_g, want_g)
        np.testing.assert_allclose(float(m["loss"]), float(want_l), rtol=1e-5)
        np.testing.assert_allclose(float(m["flow_matching"]), float(jnp.mean((v_old - target) ** 2)), rtol=1e-5)
        assert _norm(got_g) > 0


def test_nft_gradient_follows_the_advantages():
    """Zero advantages: no gradient; the gradient is linear in (2r - 1) inside the clip range (sign
    flip, doubling); a group whose rollouts end on the same latents gives none either (its terms
    share timestep and forward noise and their weights sum to zero)."""
    graphdef, params, frozen, batch = _batch()
    grads = _grads(graphdef, frozen, params)
    rng = jax.random.key(3)
    g = grads(params, batch, rng)[0]
    assert _norm(g) > 0
    assert _norm(grads(params, dict(batch, advantages=jnp.zeros_like(batch["advantages"])), rng)[0]) == 0.0
    _close(grads(params, dict(batch, advantages=-batch["advantages"]), rng)[0], jax.tree.map(jnp.negative, g))
    _close(grads(params, dict(batch, advantages=2 * batch["advantages"]), rng)[0], jax.tree.map(lambda x: 2 * x, g))
    same = jnp.repeat(batch["x0"][::G], G, axis=0)    # every group: one x0 repeated
    g_same = grads(params, dict(batch, x0=same), rng)[0]
    assert _norm(g_same) < 1e-6 * _norm(g), _norm(g_same)
    # clipped at advantage_clip: beyond it the weight saturates
    big = grads(params, dict(batch, advantages=100 * batch["advantages"]), rng)[0]
    _close(big, grads(params, dict(batch, advantages=100 * jnp.sign(batch["advantages"])), rng)[0])


def test_nft_raises_a_reward_beyond_its_shuffled_control():
    """The stand-in velocity model, reward = the mean of the final (ODE) sample: 30 NFT updates on
    fresh groups of G rollouts raise it; the same run with advantages shuffled within groups does not
    move it as far (the learning check of issue 15, on a model that compiles in seconds)."""
    n, steps = 32, 30
    graphdef, params0, frozen, ctx, unc, ref, _, _ = _setup(n, 0)
    grads = _grads(graphdef, frozen, params0, timesteps=2)
    ode = jax.jit(lambda p, z: _ode(graphdef, p, frozen, z, ctx, unc, ref))
    eval_noise = jax.random.normal(jax.random.key(99), (256,) + (2, 1, 2, 2))
    ev_ctx, ev_unc, ev_ref = (jnp.broadcast_to(a[:1], (256,) + a.shape[1:]) for a in (ctx, unc, ref))
    score = jax.jit(lambda p: jnp.mean(_ode(graphdef, p, frozen, eval_noise, ev_ctx, ev_unc, ev_ref)))

    def run(shuffle: bool):
        opt = optax.adam(3e-3)
        p, st = params0, opt.init(params0)
        perm_rng = np.random.default_rng(5)
        for i in range(steps):
            z = jax.random.normal(jax.random.key(1000 + i), (n, 2, 1, 2, 2))
            x0 = ode(p, z)
            rw = np.asarray(x0.mean(axis=(1, 2, 3, 4))).reshape(-1, G)
            adv = (rw - rw.mean(1, keepdims=True)) / (rw.std(1, keepdims=True) + 1e-4)
            if shuffle:
                adv = np.stack([a[perm_rng.permutation(G)] for a in adv])
            b = dict(x0=x0, context=ctx, uncond_context=unc, cfg=jnp.float32(CFG), ref_latents=ref,
                     advantages=jnp.asarray(adv.reshape(-1), jnp.float32))
            g, _ = grads(p, b, jax.random.key(i))
            upd, st = opt.update(g, st, p)
            p = optax.apply_updates(p, upd)
        return float(score(p))

    before = float(score(params0))
    real, control = run(False), run(True)
    assert real - before > 0.05, (before, real, control)
    assert real - before > 3 * abs(control - before), (before, real, control)


def test_nft_settings_are_checked():
    GRPOSettings(mode="grpo_stage2", dit_objective="nft", num_updates=1)
    with pytest.raises(ValueError, match="unknown train.grpo.dit_objective 'dpo'"):
        GRPOSettings(mode="grpo_stage2", dit_objective="dpo")
    with pytest.raises(ValueError, match="one update a rollout.*num_updates=2"):
        GRPOSettings(mode="grpo_stage2", dit_objective="nft", num_updates=2)
    with pytest.raises(ValueError, match="grad_accum is a Flow-GRPO"):
        GRPOSettings(mode="grpo_stage2", dit_objective="nft", grad_accum=2)
    with pytest.raises(ValueError, match="nft_beta must be > 0"):
        GRPOSettings(mode="grpo_stage2", dit_objective="nft", nft_beta=0.0)
    with pytest.raises(ValueError, match="nft_timesteps must be >= 1"):
        GRPOSettings(mode="grpo_stage2", dit_objective="nft", nft_timesteps=0)


def test_nft_in_a_stage2_step(stage_runners, monkeypatch):
    """A Stage-2 step with dit_objective="nft": the policy's ODE renders are rewarded, the DiT moves,
    the NFT metrics are logged and finite; with the flow-matching term on too."""
    cfg, runner = stage_runners["grpo_stage2"]
    for sft_weight in (0.0, 0.5):
        monkeypatch.setattr(runner, "s", dataclasses.replace(runner.s, dit_objective="nft", num_updates=1,
                                                             nft_timesteps=2, sft_weight=sft_weight))
        before = jax.tree.map(jnp.copy, runner.dit.state.params)
        m = runner.step(_examples(cfg, "grpo_stage2", 2), 1, jax.random.key(5))
        assert m["skipped_rewards"] == 0 and _changed(runner.dit.state.params, before)
        for k in ("dit/loss", "dit/flow_matching", "dit/optimality_mean", "dit/grad_norm", "reward/total"):
            assert np.isfinite(float(m[k])), (k, m[k])
        assert float(m["dit/flow_matching"]) > 0 and 0.0 < float(m["dit/optimality_spread"]) <= 1.0
        assert abs(float(m["dit/optimality_mean"]) - 0.5) < 1e-5     # advantages sum to zero per group
        assert ("dit/sft_loss" in m) == (sft_weight > 0)
