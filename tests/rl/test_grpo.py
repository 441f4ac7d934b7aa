"""GRPO loss functions against hand-computed values."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vans_jax.rl import grpo


def test_k3_kl_properties():
    lp = jnp.array([-1.0, -2.0, -0.5])
    assert np.allclose(grpo.k3_kl(lp, lp), 0.0)
    ref = jnp.array([-1.5, -1.0, -0.5])
    d = np.array([-0.5, 1.0, 0.0])
    np.testing.assert_allclose(grpo.k3_kl(lp, ref), np.exp(d) - d - 1, rtol=1e-6)
    assert (np.asarray(grpo.k3_kl(lp, ref)) >= 0).all()


def test_ratio_one_gives_advantage_weighted_objective_and_gradient():
    # at the sampling policy the ratio is 1: objective = mean(A), d/dlogp = A / len
    logp = jnp.array([[-1.0, -2.0, -3.0], [-0.5, -0.5, 0.0]])
    mask = jnp.array([[1, 1, 1], [1, 1, 0]], jnp.float32)
    adv = jnp.array([2.0, -1.0])
    t = grpo.grpo_loss(logp, logp, adv, mask, beta=0.0)
    assert np.isclose(float(t.loss), -(2.0 + -1.0) / 2)
    assert float(t.clip_fraction) == 0.0 and np.isclose(float(t.ratio_mean), 1.0)
    g = jax.grad(lambda lp: grpo.grpo_loss(lp, logp, adv, mask, beta=0.0).loss)(logp)
    np.testing.assert_allclose(np.asarray(g), [[-2 / 3 / 2] * 3, [0.5 / 2, 0.5 / 2, 0.0]], rtol=1e-6)


def test_clipping_matches_hand_computation():
    eps = 0.2
    old = jnp.zeros((1, 4))
    logp = jnp.log(jnp.array([[0.5, 0.9, 1.1, 1.5]]))
    for a in (1.0, -1.0):
        t = grpo.grpo_loss(logp, old, jnp.array([a]), beta=0.0, clip_eps=eps)
        r = np.array([0.5, 0.9, 1.1, 1.5])
        expect = np.mean(np.minimum(r * a, np.clip(r, 0.8, 1.2) * a))
        assert np.isclose(float(t.policy_objective), expect, rtol=1e-6)
        assert np.isclose(float(t.clip_fraction), 0.5)


def test_kl_term_and_aggregations():
    logp = jnp.array([[-1.0, -1.0], [-1.0, 0.0]])
    ref = jnp.array([[-1.5, -1.0], [-1.0, -1.0]])
    mask = jnp.array([[1, 1], [1, 0]], jnp.float32)
    adv = jnp.zeros((2,))
    t = grpo.vlm_grpo_loss(logp, logp, ref, adv, mask, beta=0.5)
    kl = np.exp(np.asarray(ref - logp)) - np.asarray(ref - logp) - 1
    seq = (kl[0].mean() + kl[1, 0]) / 2
    assert np.isclose(float(t.kl), seq, rtol=1e-6) and np.isclose(float(t.loss), 0.5 * seq, rtol=1e-6)
    tok = grpo.vlm_grpo_loss(logp, logp, ref, adv, mask, beta=0.5, aggregation="token_mean")
    assert np.isclose(float(tok.kl), (kl[0].sum() + kl[1, 0]) / 3, rtol=1e-6)
    with pytest.raises(ValueError, match="unknown aggregation 'nope'"):
        grpo.grpo_loss(logp, logp, adv, mask, aggregation="nope")


def test_vdm_loss_gaussian_kl_and_advantage_clip():
    rng = np.random.default_rng(0)
    mean = jnp.asarray(rng.standard_normal((2, 3, 4, 5)), jnp.float32)
    ref = mean + 0.1
    std = jnp.array([0.5, 0.4, 0.3])
    logp = jnp.zeros((2, 3))
    t = grpo.vdm_grpo_loss(logp, logp, mean, ref, std, jnp.array([10.0, -10.0]), beta=1.0)
    expect_kl = np.mean(0.01 / (2 * np.asarray(std) ** 2))
    assert np.isclose(float(t.kl), expect_kl, rtol=1e-5)
    # advantages clipped to +-5 -> objective mean(5, -5) = 0
    assert np.isclose(float(t.policy_objective), 0.0, atol=1e-6)
    assert np.isclose(float(t.loss), expect_kl, rtol=1e-5)


def test_param_group_and_tree_cosine_by_group():
    """Per-group cosines: a group's cosine uses that group's leaves only; stacked ``blocks`` split
    by sub-module."""
    import jax.numpy as jnp

    from vans_jax.rl.stages import param_group, tree_cosine, tree_cosine_by_group
    a = {"blocks": {"attn1": {"kernel": jnp.ones((2, 3))}, "ffn_in": {"bias": jnp.ones((2, 4))}},
         "proj_out": {"bias": jnp.array([1.0, 0.0]), "kernel": jnp.array([[1.0, 2.0]])}}
    b = {"blocks": {"attn1": {"kernel": -jnp.ones((2, 3))}, "ffn_in": {"bias": 2 * jnp.ones((2, 4))}},
         "proj_out": {"bias": jnp.array([0.0, 1.0]), "kernel": jnp.array([[1.0, 2.0]])}}
    import jax
    paths = [param_group(p) for p, _ in jax.tree_util.tree_flatten_with_path(a)[0]]
    assert paths == ["blocks.attn1", "blocks.ffn_in", "proj_out", "proj_out"]
    cos = {k: float(v) for k, v in tree_cosine_by_group(a, b).items()}
    assert cos.keys() == {"blocks.attn1", "blocks.ffn_in", "proj_out"}
    assert abs(cos["blocks.attn1"] + 1) < 1e-6 and abs(cos["blocks.ffn_in"] - 1) < 1e-6
    assert abs(cos["proj_out"] - 5 / (6 ** 0.5 * 6 ** 0.5)) < 1e-6   # (0 + 1 + 4) / (|a| |b|)
    assert abs(float(tree_cosine(a["proj_out"], b["proj_out"])) - cos["proj_out"]) < 1e-6
