"""Joint-GRPO rewards and group advantages on hand-checked values."""
import math

import jax.numpy as jnp
import numpy as np
import pytest

from vans_jax.rl import rewards as R

GOOD = "[Think]the ball rolls toward the edge[/Think][Ans]The ball falls off the table.[/Ans]"


def test_format_reward():
    texts = [
        GOOD,
        "  [Think]a\nb[/Think]\n[Ans] c [/Ans]\n",          # whitespace around blocks is fine
        "[Ans]c[/Ans]",                                       # no think block
        "[Think]a[/Think]c",                                  # no answer block
        "[Ans]c[/Ans][Think]a[/Think]",                       # wrong order
        "[Think]a[/Think][Ans]c[/Ans] trailing",              # text outside the blocks
        "[Think]a[/Think][Ans]c[/Ans][Ans]d[/Ans]",           # duplicated tag
        "[Think]a[/Think][Ans]   [/Ans]",                     # empty answer
        "[Think] [/Think][Ans]c[/Ans]",                       # empty reasoning
        "[Think]a[/Think][Ans]c",                             # unclosed answer
        "",
    ]
    np.testing.assert_array_equal(R.format_reward(texts), [1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0])
    assert R.format_reward(texts).dtype == np.float32
    assert R.format_reward(["[Think] [/Think][Ans]c[/Ans]"], require_nonempty=False)[0] == 1


def test_extract_answer():
    assert R.extract_answer(GOOD) == "The ball falls off the table."
    assert R.extract_answer("[Think]x[/Think][Ans] open ended") == "open ended"
    assert R.extract_answer("[Think]x[/Think] after think") == "after think"
    assert R.extract_answer(" plain caption ") == "plain caption"
    assert R.extract_answer("plain", fallback="empty") == ""
    assert R.extract_answer("[Ans]first[/Ans][Ans]second[/Ans]") == "first"


def test_rouge_l_reward():
    # LCS("the cat sat on the mat", "the cat is on the mat") = 5 of 6 tokens each way -> F = 5/6
    preds = ["[Think]..[/Think][Ans]The cat sat on the mat.[/Ans]", "a b c d", "", "x y"]
    refs = ["the cat is on the mat", "a c", "a b", "x y"]
    out = R.rouge_l_reward(preds, refs)
    np.testing.assert_allclose(out, [5 / 6, 2 * 0.5 * 1 / 1.5, 0.0, 1.0], rtol=1e-6)
    # without extraction the tags' words count (tokens "think", "ans" ...), lowering the score
    assert R.rouge_l_reward(preds[:1], refs[:1], extract=False)[0] < 5 / 6
    with pytest.raises(ValueError):
        R.rouge_l_reward(["a"], [])


def test_clip_video_similarity_and_clip_score():
    gen = np.array([[[1.0, 0.0], [0.0, 2.0]]], np.float32)       # (B=1, F=2, D=2)
    gt = np.array([[[3.0, 0.0], [1.0, 0.0]]], np.float32)
    sim = R.clip_video_similarity(gen, gt)
    assert sim.shape == (1,) and sim.dtype == jnp.float32
    np.testing.assert_allclose(sim, [0.5], atol=1e-6)                # cos 1 and cos 0
    np.testing.assert_allclose(R.clip_video_similarity(gen, gt, frame_mask=[[1, 0]]), [1.0], atol=1e-6)

    frames = np.array([[[1.0, 0.0], [1.0, 1.0]], [[-1.0, 0.0], [-2.0, 0.0]]], np.float32)
    text = np.array([[5.0, 0.0], [1.0, 0.0]], np.float32)
    cs = R.clip_score(frames, text)
    np.testing.assert_allclose(cs, [(1 + 1 / math.sqrt(2)) / 2, -1.0], atol=1e-6)   # raw cosine, no clamp
    with pytest.raises(ValueError):
        R.clip_video_similarity(gen, gt[:, :1])
    with pytest.raises(ValueError):
        R.clip_score(frames, text[:1])


def test_group_normalize_values_and_zero_variance():
    r = np.array([1, 2, 3, 4, 0.3, 0.3, 0.3, 0.3], np.float32)
    adv = np.asarray(R.group_normalize(r, 4, eps=0.0))
    std = math.sqrt(1.25)
    np.testing.assert_allclose(adv[:4], np.array([-1.5, -0.5, 0.5, 1.5]) / std, rtol=1e-6)
    assert (adv[4:] == 0).all() and np.isfinite(adv).all()
    adv1 = np.asarray(R.group_normalize(r, 4, eps=0.0, ddof=1))
    np.testing.assert_allclose(adv1[:4], np.array([-1.5, -0.5, 0.5, 1.5]) / math.sqrt(5 / 3), rtol=1e-6)
    assert (adv1[4:] == 0).all()
    np.testing.assert_allclose(R.group_normalize(r, 4)[:4], np.array([-1.5, -0.5, 0.5, 1.5]) / (std + 1e-4),
                               rtol=1e-6)
    assert (np.asarray(R.group_normalize(r, 1)) == 0).all()          # singleton groups: no signal, no NaN
    with pytest.raises(ValueError):
        R.group_normalize(r, 3)


def test_normalize_then_sum_vs_sum_then_normalize():
    # group of 2: component a prefers sample 1 by 1, component b prefers sample 0 by 10
    rewards = {"a": [0.0, 1.0], "b": [10.0, 0.0]}
    nts = np.asarray(R.group_advantages(rewards, 2, eps=0.0))
    stn = np.asarray(R.group_advantages(rewards, 2, eps=0.0, mode="sum_then_normalize"))
    np.testing.assert_allclose(nts, [0.0, 0.0], atol=1e-6)          # scale-free: the two cancel
    np.testing.assert_allclose(stn, [1.0, -1.0], atol=1e-6)         # the larger-scale b dominates
    w = np.asarray(R.group_advantages(rewards, 2, {"a": 2.0, "b": 0.0}, eps=0.0))
    np.testing.assert_allclose(w, [-2.0, 2.0], atol=1e-6)
    # a component constant in a group adds nothing there (format all 1), never NaN
    r2 = {"format": [1, 1, 1, 1, 0, 1, 0, 1], "t1": [0.1, 0.2, 0.2, 0.1, 0.5, 0.5, 0.5, 0.5]}
    a2 = np.asarray(R.group_advantages(r2, 4, eps=0.0))
    np.testing.assert_allclose(a2[:4], [-1, 1, 1, -1], atol=1e-6)
    np.testing.assert_allclose(a2[4:], [-1, 1, -1, 1], atol=1e-6)
    for mode in R.MODES:
        flat = R.group_advantages({"a": np.full(6, 0.7), "b": np.full(6, 0.1)}, 3, mode=mode)
        assert (np.asarray(flat) == 0).all()
    with pytest.raises(KeyError):
        R.group_advantages(rewards, 2, {"a": 1.0})
    with pytest.raises(ValueError):
        R.group_advantages(rewards, 2, mode="mean")


def _stage1_batch():
    texts = [GOOD, "no tags at all", GOOD, "[Think]t[/Think][Ans]the ball stays[/Ans]"]
    gts = ["the ball falls off the table"] * 4
    rs = np.random.RandomState(0)
    gen, gt = rs.randn(4, 3, 8).astype(np.float32), rs.randn(4, 3, 8).astype(np.float32)
    return dict(texts=texts, gt_captions=gts, gen_video_feats=gen, gt_video_feats=gt)


def test_reward_config_ablations():
    cfg = R.RewardConfig.stage(1)
    assert cfg.active == {"format": 1.0, "t1": 1.0, "v1": 1.0}
    assert R.RewardConfig.stage(2).active == {"v2": 1.0, "c2": 1.0}
    batch = _stage1_batch()
    rw = R.compute_rewards(cfg, **batch)
    assert set(rw) == {"format", "t1", "v1"}
    np.testing.assert_array_equal(rw["format"], [1, 0, 1, 1])
    np.testing.assert_allclose(rw["t1"][0], 1.0)                     # punctuation/case ignored
    np.testing.assert_allclose(rw["v1"], R.clip_video_similarity(batch["gen_video_feats"],
                                                                 batch["gt_video_feats"]), rtol=1e-6)
    full = np.asarray(R.stage_advantages(cfg, rw, 2))
    no_t1 = cfg.without("t1")
    assert no_t1.active == {"format": 1.0, "v1": 1.0} and no_t1.required_inputs() == (
        "texts", "gen_video_feats", "gt_video_feats")
    assert set(R.compute_rewards(no_t1, **batch)) == {"format", "v1"}
    ab = np.asarray(R.stage_advantages(no_t1, rw, 2))                # t1 in rw is ignored
    expect = np.asarray(R.group_advantages({k: rw[k] for k in ("format", "v1")}, 2))
    np.testing.assert_allclose(ab, expect, rtol=1e-6)
    assert not np.allclose(ab, full)
    only_v = cfg.without("format", "t1")
    np.testing.assert_allclose(R.stage_advantages(only_v, rw, 2), R.group_normalize(rw["v1"], 2), rtol=1e-6)
    weighted = R.RewardConfig.stage(1, weights={"t1": 0.5}, mode="sum_then_normalize")
    np.testing.assert_allclose(
        R.stage_advantages(weighted, rw, 2),
        R.group_normalize(rw["format"] + 0.5 * rw["t1"] + rw["v1"], 2), rtol=1e-5)
    with pytest.raises(KeyError):
        R.RewardConfig.stage(1).without("r_t9")
    with pytest.raises(KeyError):
        R.compute_rewards(R.RewardConfig.stage(2), **batch)             # caption_feats missing
    with pytest.raises(ValueError):
        R.stage_advantages(cfg.without("format", "t1", "v1"), rw, 2)


def test_stage2_clip_score_component():
    rs = np.random.RandomState(1)
    gen, gt, cap = rs.randn(4, 2, 8), rs.randn(4, 2, 8), rs.randn(4, 8)
    rw = R.compute_rewards(R.RewardConfig.stage(2), gen_video_feats=gen, gt_video_feats=gt, caption_feats=cap)
    np.testing.assert_allclose(rw["c2"], R.clip_score(gen, cap), rtol=1e-6)
    np.testing.assert_allclose(rw["v2"], R.clip_video_similarity(gen, gt), rtol=1e-6)
