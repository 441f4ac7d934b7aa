"""Flow samplers: schedule + UniPC vs diffusers, Flow-GRPO SDE log-prob / KL, CFG, and the
jitted ``sample`` loop with a tiny Wan DiT (with and without VANS reference frames)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from vans_jax.models.wan import WanConfig, WanTransformer3D
from vans_jax.sampling.flow import (_sample_jit, cfg_combine, euler_step, flow_sigmas, gaussian_kl, guided_velocity,
                                    sample, sde_std_t, sde_step, unipc_init, unipc_step)

diffusers = pytest.importorskip("diffusers")


def make_scheduler(shift):
    return diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                             flow_shift=shift)


@pytest.mark.parametrize("num_steps,shift", [(12, 5.0), (10, 3.0), (2, 1.0)])
def test_schedule_matches_diffusers(num_steps, shift):
    sch = make_scheduler(shift)
    sch.set_timesteps(num_steps)
    sigmas, timesteps = flow_sigmas(num_steps, shift)
    np.testing.assert_array_equal(sigmas, sch.sigmas.numpy())
    np.testing.assert_array_equal(timesteps, sch.timesteps.numpy().astype(np.float32))
    assert sigmas[-1] == 0 and len(sigmas) == num_steps + 1


@pytest.mark.parametrize("num_steps,shift", [(12, 5.0), (15, 3.0)])
def test_unipc_matches_diffusers_in_scan(num_steps, shift):
    rng = np.random.default_rng(num_steps)
    x0 = rng.standard_normal((2, 4, 3, 4, 6)).astype(np.float32)
    outs = rng.standard_normal((num_steps,) + x0.shape).astype(np.float32)
    sch = make_scheduler(shift)
    sch.set_timesteps(num_steps)
    ref, xt = [], torch.from_numpy(x0)
    for i, t in enumerate(sch.timesteps):
        xt = sch.step(torch.from_numpy(outs[i]), t, xt).prev_sample
        ref.append(xt.numpy())
    sigmas, _ = flow_sigmas(num_steps, shift)

    @jax.jit
    def run(x, outs):
        def body(carry, inp):
            x, st = carry
            i, v = inp
            x, st = unipc_step(st, v, x, i, sigmas)
            return (x, st), x
        return jax.lax.scan(body, (x, unipc_init(x)), (jnp.arange(num_steps), outs))[1]

    ours = np.asarray(run(jnp.asarray(x0), jnp.asarray(outs)))
    errs = np.abs(ours - np.stack(ref)).max(axis=tuple(range(1, ours.ndim)))
    assert errs.max() < 1e-5, errs


def closed_form_logp(x_next, x, v, sigma, sigma_next, std_t):
    """Independent float64 recomputation of the SDE transition density (mean over elements)."""
    x, v, x_next = (np.asarray(a, np.float64) for a in (x, v, x_next))
    sigma, sigma_next, std_t = float(sigma), float(sigma_next), float(std_t)
    dt = sigma_next - sigma
    mean = x * (1 + std_t ** 2 / (2 * sigma) * dt) + v * (1 + std_t ** 2 * (1 - sigma) / (2 * sigma)) * dt
    s = std_t * math.sqrt(-dt)
    logpdf = -0.5 * ((x_next - mean) / s) ** 2 - math.log(s) - 0.5 * math.log(2 * math.pi)
    return logpdf.reshape(x.shape[0], -1).mean(1), mean, s


@pytest.mark.parametrize("std_form", ["flow_grpo", "wan"])
def test_sde_logprob_closed_form(std_form):
    sigmas, _ = flow_sigmas(10, 5.0)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 4, 2, 4, 4)).astype(np.float32)
    v = rng.standard_normal(x.shape).astype(np.float32)
    for i in (0, 4, 9):
        out = sde_step(jnp.asarray(x), jnp.asarray(v), sigmas, i, rng=jax.random.key(i), std_form=std_form)
        if std_form == "flow_grpo":
            denom = sigmas[1] if i == 0 else sigmas[i]   # sigma == 1 (diffusers' 1 - 1e-6) -> sigmas[1]
            std_t = math.sqrt(float(sigmas[i]) / (1 - float(denom))) * 0.7
        else:
            std_t = float(sigmas[-1]) + (float(sigmas[1]) - float(sigmas[-1])) * float(sigmas[i])
        lp, mean, s = closed_form_logp(out.prev_sample, x, v, sigmas[i], sigmas[i + 1], std_t)
        np.testing.assert_allclose(np.asarray(out.mean), mean, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(float(out.std), s, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(out.log_prob), lp, rtol=1e-5, atol=1e-5)
        # the sampled x' really is mean + std * N(0, 1)
        z = (np.asarray(out.prev_sample, np.float64) - mean) / s
        assert abs(z.mean()) < 0.2 and abs(z.std() - 1) < 0.2
        # scoring a given transition reproduces the same log-prob
        again = sde_step(jnp.asarray(x), jnp.asarray(v), sigmas, i, prev_sample=out.prev_sample, std_form=std_form)
        np.testing.assert_allclose(np.asarray(again.log_prob), np.asarray(out.log_prob), rtol=1e-6)


def test_sde_std_forms():
    sigmas, _ = flow_sigmas(10, 5.0)
    assert np.isclose(float(sde_std_t(sigmas[3], sigmas, 0.7, "flow_grpo")),
                      math.sqrt(sigmas[3] / (1 - sigmas[3])) * 0.7, rtol=1e-6)
    assert np.isclose(float(sde_std_t(1.0, sigmas, 0.7, "flow_grpo")), math.sqrt(1 / (1 - sigmas[1])) * 0.7,
                      rtol=1e-6)
    assert np.isclose(float(sde_std_t(0.5, sigmas, 0.7, "wan")), sigmas[1] * 0.5, rtol=1e-6)


def test_deterministic_equals_euler_and_kl():
    sigmas, _ = flow_sigmas(8, 3.0)
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((2, 4, 2, 4, 4)), jnp.float32)
    v = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    out = sde_step(x, v, sigmas, 3, deterministic=True)
    np.testing.assert_allclose(np.asarray(out.prev_sample), np.asarray(euler_step(x, v, sigmas[3], sigmas[4])),
                               rtol=0, atol=1e-6)
    assert bool(jnp.all(jnp.isfinite(out.log_prob)))
    np.testing.assert_array_equal(np.asarray(gaussian_kl(out.mean, out.mean, out.std)), 0.0)
    other = out.mean + 0.1
    np.testing.assert_allclose(np.asarray(gaussian_kl(out.mean, other, out.std)),
                               0.01 / (2 * float(out.std) ** 2), rtol=1e-5)


def test_cfg_combine():
    c, u = jnp.array([2.0, 1.0]), jnp.array([1.0, 1.0])
    np.testing.assert_allclose(np.asarray(cfg_combine(c, u, 5.0)), [6.0, 1.0])


# ----------------------------------------------------------------------------- with a tiny DiT


@pytest.fixture(scope="module")
def tiny():
    cfg = WanConfig(dim=64, num_layers=2, num_heads=2, ffn_dim=96, in_channels=4, out_channels=4, text_dim=48,
                    freq_dim=32)
    model = WanTransformer3D(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(3)
    noise = jnp.asarray(rng.standard_normal((2, 4, 3, 4, 6)), jnp.float32)
    refs = jnp.asarray(rng.standard_normal((2, 4, 2, 4, 6)), jnp.float32)
    ctx = jnp.asarray(rng.standard_normal((2, 7, 48)), jnp.float32)
    uctx = jnp.zeros_like(ctx)
    return model, noise, refs, ctx, uctx


def test_guided_velocity_batches_cfg(tiny):
    model, noise, refs, ctx, uctx = tiny
    f = nnx.jit(lambda m, x, r, c, u: (guided_velocity(m, x, 500.0, c, u, 4.0, r),
                                       guided_velocity(m, x, 500.0, c, None, 1.0, r),
                                       guided_velocity(m, x, 500.0, u, None, 1.0, r)))
    g, cond, unc = f(model, noise, refs, ctx, uctx)
    np.testing.assert_allclose(np.asarray(g), np.asarray(unc + 4.0 * (cond - unc)), rtol=1e-4, atol=1e-5)


def test_sample_unipc_matches_diffusers_loop(tiny):
    """The jitted scan == a python loop with diffusers' scheduler around the same model."""
    model, noise, refs, ctx, uctx = tiny
    n, shift, g = 4, 5.0, 3.0
    out = sample(model, noise, ctx, uncond_context=uctx, guidance_scale=g, ref_latents=refs, num_steps=n,
                 shift=shift, mode="unipc")
    assert out.shape == noise.shape
    vel = nnx.jit(lambda m, x, t: guided_velocity(m, x, t, ctx, uctx, g, refs))
    sch = make_scheduler(shift)
    sch.set_timesteps(n)
    x = torch.from_numpy(np.array(noise))
    for t in sch.timesteps:
        v = vel(model, jnp.asarray(x.numpy()), jnp.float32(t.item()))
        x = sch.step(torch.from_numpy(np.array(v)), t, x).prev_sample
    assert np.abs(np.asarray(out) - x.numpy()).max() / np.abs(x.numpy()).max() < 1e-4


def test_sample_sde_trajectory(tiny):
    model, noise, refs, ctx, uctx = tiny
    n = 4
    x, traj = sample(model, noise, ctx, uncond_context=uctx, guidance_scale=2.0, ref_latents=refs, num_steps=n,
                     mode="sde", rng=jax.random.key(7), sde_window=(1, 3), std_form="wan", return_trajectory=True)
    assert traj.latents.shape == (n + 1,) + noise.shape and traj.log_probs.shape == (n, 2)
    assert traj.means.shape == (n,) + noise.shape and traj.sigmas.shape == (n + 1,)
    np.testing.assert_array_equal(np.asarray(traj.sde_mask), [False, True, True, False])
    np.testing.assert_array_equal(np.asarray(traj.latents[-1]), np.asarray(x))
    np.testing.assert_array_equal(np.asarray(traj.latents[0]), np.asarray(noise))
    lp = np.asarray(traj.log_probs)
    assert np.all(lp[[0, 3]] == 0) and np.all(np.isfinite(lp)) and np.all(lp[[1, 2]] != 0)
    # re-scoring the stored transitions with the same model reproduces the recorded log-probs
    vel = nnx.jit(lambda m, x, t: guided_velocity(m, x, t, ctx, uctx, 2.0, refs))
    for i in (1, 2):
        v = vel(model, traj.latents[i], traj.timesteps[i])
        again = sde_step(traj.latents[i], v, traj.sigmas, i, prev_sample=traj.latents[i + 1], std_form="wan")
        np.testing.assert_allclose(np.asarray(again.log_prob), lp[i], rtol=1e-4, atol=1e-4)
    # outside the window the step is the deterministic Euler step
    v0 = vel(model, traj.latents[0], traj.timesteps[0])
    np.testing.assert_allclose(np.asarray(traj.latents[1]),
                               np.asarray(euler_step(traj.latents[0], v0, traj.sigmas[0], traj.sigmas[1])),
                               rtol=1e-4, atol=1e-4)
    # a different key gives a different sample; euler mode (plain T2V, no CFG) runs too
    x2 = sample(model, noise, ctx, uncond_context=uctx, guidance_scale=2.0, ref_latents=refs, num_steps=n,
                mode="sde", rng=jax.random.key(8), sde_window=(1, 3), std_form="wan")
    assert np.abs(np.asarray(x2) - np.asarray(x)).max() > 1e-3
    xe = sample(model, noise, ctx, num_steps=n, mode="euler")
    assert xe.shape == noise.shape and bool(jnp.all(jnp.isfinite(xe)))


def test_sample_on_trimmed_text_context(tiny, monkeypatch):
    """``sample`` runs the DiT on the positions the captions use (``trim_text_context``): the same
    latents and SDE trajectory as on all of them (Wan zero-pads each caption to 512 positions)."""
    model, noise, refs, _, _ = tiny
    rng = np.random.default_rng(5)
    ctx = np.zeros((2, 64, 48), np.float32)
    ctx[0, :6], ctx[1, :11] = rng.standard_normal((6, 48)), rng.standard_normal((11, 48))
    uctx = np.zeros((2, 64, 48), np.float32)
    uctx[:, :1] = rng.standard_normal((1, 48))
    ctx, uctx = jnp.asarray(ctx), jnp.asarray(uctx)
    assert model.trims_text_context()
    kw = dict(uncond_context=uctx, guidance_scale=3.0, ref_latents=refs, num_steps=4, shift=5.0)
    seen = []           # the context lengths the DiT is traced with
    original = WanTransformer3D.text_context
    monkeypatch.setattr(WanTransformer3D, "text_context",
                        lambda self, c, pad=None: seen.append((c.shape[1], pad is not None)) or original(self, c, pad))
    _sample_jit.clear_cache()
    out = sample(model, noise, ctx, mode="unipc", **kw)
    assert seen == [(16, True)]                  # 11 used positions -> 16 kept, plus the pad key
    _sample_jit.clear_cache()
    ref = sample(model, noise, ctx, mode="unipc", trim_context=False, **kw)
    assert seen[-1] == (64, False)
    assert np.abs(np.asarray(out - ref)).max() / np.abs(np.asarray(ref)).max() < 1e-5
    x, tr = sample(model, noise, ctx, mode="sde", rng=jax.random.key(1), return_trajectory=True, **kw)
    xr, trr = sample(model, noise, ctx, mode="sde", rng=jax.random.key(1), return_trajectory=True,
                     trim_context=False, **kw)
    np.testing.assert_allclose(np.asarray(tr.log_probs), np.asarray(trr.log_probs), rtol=1e-4, atol=1e-3)
    assert np.abs(np.asarray(x - xr)).max() / np.abs(np.asarray(xr)).max() < 1e-5
