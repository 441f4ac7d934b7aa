"""The sign of the stage-2 policy gradient: one update with a positive advantage on one SDE
trajectory and a negative one on another makes the first more likely under the updated DiT and the
second less likely (log-probabilities of the same stored transitions, recomputed). A sign error
anywhere in the SDE log-prob, the ratio or the clipped objective would fail this."""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vans_jax.train import core


def test_stage2_update_moves_log_probs_with_the_advantages():
    from flax import nnx
    from vans_jax.models.wan.dit import WanConfig, WanTransformer3D
    from vans_jax.sampling import flow
    from vans_jax.train.grpo import make_stage2_update

    cfg = WanConfig(dim=32, num_layers=1, num_heads=2, ffn_dim=32, in_channels=4, out_channels=4,
                    text_dim=8, freq_dim=16, text_len=4, patch_size=(1, 2, 2))
    graphdef, params, frozen = core.split_model(WanTransformer3D(cfg, rngs=nnx.Rngs(0)), "full")
    k = jax.random.split(jax.random.key(3), 4)
    n, s = 4, 3
    ctx = jax.random.normal(k[1], (n, 4, 8))
    ref_lat = jax.random.normal(k[2], (n, 4, 1, 4, 4))
    _, traj = flow.sample(nnx.merge(graphdef, params, frozen), jax.random.normal(k[0], (n, 4, 2, 4, 4)), ctx,
                          guidance_scale=1.0, ref_latents=ref_lat, num_steps=s + 1, shift=3.0, mode="sde", rng=k[3],
                          sde_window=(0, s), return_trajectory=True)
    idx = np.arange(s)
    adv = jnp.array([1.0, -1.0, 0.0, 0.0])
    batch = dict(x=traj.latents[idx], x_next=traj.latents[idx + 1], old_logp=traj.log_probs[idx],
                 steps=jnp.asarray(idx, jnp.int32), timesteps=traj.timesteps[idx], sigmas=traj.sigmas, context=ctx,
                 cfg=jnp.float32(1.0), ref_latents=ref_lat, advantages=adv)

    def logp(p):   # (n,) summed over the trained steps
        out = 0.0
        for j in range(s):
            v = flow.guided_velocity(nnx.merge(graphdef, p, frozen), batch["x"][j], batch["timesteps"][j], ctx,
                                     None, 1.0, ref_lat)
            out = out + flow.sde_step(batch["x"][j], v, traj.sigmas, j, prev_sample=batch["x_next"][j]).log_prob
        return np.asarray(out)

    before = logp(params)
    np.testing.assert_allclose(before, np.asarray(traj.log_probs[idx]).sum(0), rtol=1e-4)   # stored = recomputed
    update = make_stage2_update(graphdef, optax.sgd(1e-3), beta=0.0, clip_eps=0.2, advantage_clip=5.0,
                                noise_level=0.7, std_form="flow_grpo")
    new, m = update(core.init_state(params, optax.sgd(1e-3), 0), frozen, params, batch)
    delta = logp(new.params) - before
    assert float(m["clip_fraction"]) == 0.0
    assert delta[0] > 0 and delta[1] < 0, delta
