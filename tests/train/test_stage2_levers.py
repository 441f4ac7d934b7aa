"""Stage-2 levers (issue 15): ``train.grpo.timestep_weight`` (std_t / sqrt(-dt) per timestep),
``grad_accum`` (several rollout batches per optimizer update) and ``same_noise`` (one initial noise
per group), against hand-built equivalents; a Stage-2 step with all three on is in test_trainer.py."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests.train.test_trainer import _changed, _tiny_stage2_batch
from vans_jax.rl.stages import GRPOSettings, stage2_grads, timestep_weights
from vans_jax.sampling import flow
from vans_jax.train import core

KW = dict(clip_eps=0.2, advantage_clip=2.0, noise_level=0.7, std_form="flow_grpo")


def _close(a, b, rtol=2e-4, atol=1e-7):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def test_timestep_weights_values():
    sig, _ = flow.flow_sigmas(6, 3.0)
    steps = np.arange(5)
    assert np.array_equal(np.asarray(timestep_weights(sig, steps, noise_level=0.7, std_form="flow_grpo")), np.ones(5))
    w = np.asarray(timestep_weights(sig, steps, noise_level=0.7, std_form="flow_grpo", kind="std_dt"))
    std_t = np.asarray(flow.sde_std_t(jnp.asarray(sig[:5]), sig, 0.7, "flow_grpo"))
    raw = std_t / np.sqrt(sig[:5] - sig[1:6])
    np.testing.assert_allclose(w, raw / raw.mean(), rtol=1e-5)
    assert abs(w.mean() - 1) < 1e-6 and w[0] != w[-1]
    with pytest.raises(ValueError, match="unknown timestep_weight 'x'"):
        timestep_weights(sig, steps, noise_level=0.7, std_form="flow_grpo", kind="x")
    with pytest.raises(ValueError, match="timestep_weight 'nope'"):
        GRPOSettings(mode="grpo_vdm", timestep_weight="nope")
    with pytest.raises(ValueError, match="grad_accum must be >= 1, got 0"):
        GRPOSettings(mode="grpo_vdm", grad_accum=0)


def _one_step(batch, j):
    """The batch restricted to trained timestep j."""
    out = dict(batch)
    for k in ("x", "x_next", "old_logp", "steps", "timesteps"):
        out[k] = batch[k][j:j + 1]
    return out


def _stand_in_batch(n=6, seed=0):
    """A stage-2 batch of the tiny stand-in velocity model (fast to compile), CFG on, 3 trained steps."""
    from tests.rl.test_flow_grpo_estimator import NUM_STEPS, _sample, _setup
    graphdef, params, frozen, ctx, unc, ref_lat, noise, _ = _setup(n, seed)
    window = (0, NUM_STEPS - 1)
    _, traj = _sample(graphdef, params, frozen, noise, ctx, unc, ref_lat, jax.random.key(3), window)
    idx = np.arange(*window)
    batch = dict(x=traj.latents[idx], x_next=traj.latents[idx + 1], old_logp=traj.log_probs[idx] - 0.003,
                 steps=jnp.asarray(idx, jnp.int32), timesteps=traj.timesteps[idx], sigmas=traj.sigmas, context=ctx,
                 uncond_context=unc, cfg=jnp.float32(2.0), ref_latents=ref_lat,
                 advantages=jnp.linspace(-1.5, 1.5, n))
    ref = jax.tree.map(lambda x: x + 0.05, params)
    return graphdef, params, frozen, ref, batch


def test_std_dt_weighting_scales_each_timesteps_policy_term_not_the_kl():
    graphdef, params, frozen, ref, batch = _stand_in_batch()
    s = batch["x"].shape[0]
    w = np.asarray(timestep_weights(batch["sigmas"], batch["steps"], noise_level=0.7, std_form="flow_grpo",
                                    kind="std_dt"))
    grads = jax.jit(lambda b, beta, tw: stage2_grads(params, graphdef, frozen, ref, b, beta=beta, timestep_weight=tw,
                                                     **KW)[0], static_argnums=(1, 2))
    for beta in (0.0, 0.5):
        per_step = [grads(_one_step(batch, j), beta, "none") for j in range(s)]
        kl_only = [jax.tree.map(lambda a, b: a - b, g, grads(_one_step(batch, j), 0.0, "none"))
                   for j, g in enumerate(per_step)]
        # sum_j (w_j * policy_j + kl_j) / S  ==  sum_j (w_j * (g_j - kl_j) + kl_j) / S
        expect = jax.tree.map(lambda *xs: sum(w[j] * (xs[j] - xs[s + j]) + xs[s + j] for j in range(s)) / s,
                              *per_step, *kl_only)
        got = grads(batch, beta, "std_dt")
        _close(got, expect)
        assert _changed(got, grads(batch, beta, "none"))
    _close(grads(batch, 0.5, "none"), jax.tree.map(lambda *xs: sum(xs) / s,
                                                   *[grads(_one_step(batch, j), 0.5, "none") for j in range(s)]))


def _rows(batch, rows):
    out = dict(batch)
    for k in ("x", "x_next", "old_logp"):
        out[k] = batch[k][:, rows]
    for k in ("context", "ref_latents", "advantages"):
        out[k] = batch[k][rows]
    return out


@pytest.mark.parametrize("tw", ["none", "std_dt"])
def test_accumulated_update_equals_one_update_on_all_rollouts(tw):
    """grad_accum: K rollout batches accumulated into one optimizer update == one update on all of
    them at once (equal batch sizes, sequence_mean: the mean of the batch means)."""
    from vans_jax.train.grpo import make_stage2_accumulated_update, make_stage2_update
    n, s = 4, 3
    graphdef, params, frozen, ref, batch, _ = _tiny_stage2_batch(n, s)
    opt = optax.adam(1e-2)
    kw = dict(KW, beta=0.5, timestep_weight=tw)
    whole, m_whole = make_stage2_update(graphdef, opt, **kw)(core.init_state(jax.tree.map(jnp.copy, params), opt, 0),
                                                             frozen, ref, batch)
    acc_update = make_stage2_accumulated_update(graphdef, opt, **kw)
    parts, m_acc = acc_update(core.init_state(jax.tree.map(jnp.copy, params), opt, 0), frozen, ref,
                              [_rows(batch, slice(0, 2)), _rows(batch, slice(2, 4))])
    assert _changed(whole.params, params)
    _close(parts.params, whole.params, rtol=1e-4, atol=1e-6)
    for k in ("loss", "kl", "policy_objective", "grad_norm"):
        np.testing.assert_allclose(float(m_acc[k]), float(m_whole[k]), rtol=1e-4, atol=1e-7)
    assert int(parts.step) == 1


def test_grad_accum_only_in_dit_only_modes():
    import types
    from vans_jax.train.grpo import JointGRPO
    fake = types.SimpleNamespace(s=GRPOSettings(mode="grpo_all_in_one", grad_accum=2), r=None)
    with pytest.raises(ValueError, match="grad_accum=2: only the DiT-only modes .* not grpo_all_in_one"):
        JointGRPO._dit_update_fn(fake)


def test_trainable_module_groups():
    """``dit_trainable`` as module groups: only those groups train (the rest frozen), "blocks" takes
    every block sub-module, an unknown group names the model's groups."""
    from flax import nnx

    from vans_jax.models.wan.dit import WanConfig, WanTransformer3D
    cfg = WanConfig(dim=16, num_layers=2, num_heads=2, ffn_dim=32, text_dim=16, freq_dim=16, in_channels=4,
                    out_channels=4, patch_size=(1, 2, 2))
    model = WanTransformer3D(cfg, rngs=nnx.Rngs(0))
    total = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    _, params, frozen = core.split_model(model, "proj_out,scale_shift_table")
    assert set(params.keys()) == {"proj_out", "scale_shift_table"}
    n = sum(x.size for x in jax.tree.leaves(params))
    assert n == 2 * 16 + 16 * 16 + 16 and n + sum(x.size for x in jax.tree.leaves(frozen)) >= total
    _, blocks, _ = core.split_model(model, "blocks")
    _, ffn, _ = core.split_model(model, " blocks.ffn_in , blocks.ffn_out")
    assert set(blocks.keys()) == {"blocks"} and set(ffn["blocks"].keys()) == {"ffn_in", "ffn_out"}
    assert set(blocks["blocks"].keys()) > {"ffn_in", "ffn_out", "attn1", "scale_shift_table"}
    with pytest.raises(ValueError, match=r"trainable='head'.*groups: blocks.attn1, .*proj_out"):
        core.split_model(model, "head")


def _sft_of(batch, seed=5):
    """The step's ground truth for ``sft_weight`` on the tiny stage-2 batch's DiT: target latents
    (one row a prompt), caption context, reference latents, a null context, a key."""
    k = jax.random.split(jax.random.key(seed), 2)
    n = batch["context"].shape[0]
    return dict(latents=jax.random.normal(k[0], (n, 4, 2, 4, 4)), context=batch["context"],
                null_context=jnp.zeros((1,) + batch["context"].shape[1:]), ref_latents=batch["ref_latents"],
                rng=jax.random.key_data(k[1]))


def test_sft_weight_adds_the_flow_matching_gradient():
    """train.grpo.sft_weight: the update's gradient is the stage-2 gradient plus w x the gradient of
    the SFT-VDM loss on the ground truth (no dropout); the loss and sft_loss say so; with grad_accum
    the term is added once per update, and the split update equals the whole one."""
    from vans_jax.train.grpo import make_stage2_accumulated_update, make_stage2_update
    from vans_jax.train.sft import sft_vdm_loss
    graphdef, params, frozen, ref, batch, _ = _tiny_stage2_batch(4, 3)
    sft, w = _sft_of(batch), 0.7
    opt = optax.sgd(1.0)            # new params = params - gradient: the gradient is readable
    kw = dict(KW, beta=0.5, shift=3.0)
    fresh = lambda: core.init_state(jax.tree.map(jnp.copy, params), opt, 0)
    plain, m_plain = make_stage2_update(graphdef, opt, **kw)(fresh(), frozen, ref, batch)
    mixed, m_mixed = make_stage2_update(graphdef, opt, sft_weight=w, **kw)(fresh(), frozen, ref, dict(batch, sft=sft))
    (l_sft, _), g_sft = jax.value_and_grad(
        lambda p: sft_vdm_loss(p, graphdef, frozen, sft, sft["rng"], shift=3.0, text_dropout=0.0, dropout=False),
        has_aux=True)(params)
    expect = jax.tree.map(lambda a, g: a - w * g, plain.params, g_sft)
    assert _changed(mixed.params, plain.params)
    _close(mixed.params, expect, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(float(m_mixed["sft_loss"]), float(l_sft), rtol=1e-5)
    np.testing.assert_allclose(float(m_mixed["loss"]), float(m_plain["loss"]) + w * float(l_sft), rtol=1e-5)
    assert "sft_loss" not in m_plain
    # weight 0 or no ground truth: the plain update
    zero, _ = make_stage2_update(graphdef, opt, sft_weight=0.0, **kw)(fresh(), frozen, ref, dict(batch, sft=sft))
    _close(zero.params, plain.params, rtol=1e-6, atol=1e-8)
    # grad_accum: two half batches + the term once == the whole batch + the term
    acc, m_acc = make_stage2_accumulated_update(graphdef, opt, sft_weight=w, **kw)(
        fresh(), frozen, ref, [dict(_rows(batch, slice(0, 2)), sft=sft), _rows(batch, slice(2, 4))])
    _close(acc.params, mixed.params, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(float(m_acc["sft_loss"]), float(l_sft), rtol=1e-5)
    with pytest.raises(ValueError, match="sft_weight must be >= 0, got -1"):
        GRPOSettings(mode="grpo_vdm", sft_weight=-1)
