"""The trainer on tiny random models in their real layouts (tests/train/conftest.py): one full step of
every mode and every reward ablation, what each stage trains (and what it must not touch), NaN/Inf
skipping, several policy updates per rollout, exports that load through the real loaders, and a run
killed with SIGKILL that resumes to the same final metrics as an uninterrupted one."""
import functools
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests.tiny import ROOT, make_config
from tests.utils import xla_flags
from vans_jax.train import core, loop
from vans_jax.rl.stages import reward_config

# two policy updates per rollout with a clip range that acts: what the stage tests need, and the same
# compiled programs (train.grpo caches them per settings) for every GRPO test in this file
SMALL = {"video.height": 32, "video.width": 32, "train.steps": 1, "train.checkpoint_every": 0,
         "train.grpo.num_updates": 2, "train.grpo.clip_eps": 0.2}


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _changed(a, b):
    return any(not np.array_equal(x, y) for x, y in zip(_leaves(a), _leaves(b)))


def _examples(cfg, mode, n):
    from vans_jax.data.loader import make_dataset
    ds = make_dataset(loop.data_source(cfg, mode), batch_size=n, seed=0, num_epochs=None, shard_index=0,
                      shard_count=1)
    return loop.uncollate(next(iter(ds)))


# ----------------------------------------------------------------------------- unit pieces


def test_update_step_skips_non_finite_loss():
    opt = optax.adam(0.1)
    params = {"w": jnp.ones((3,))}
    state = core.init_state(params, opt, seed=0)

    def loss_fn(p, graphdef, frozen, batch, rng):
        return jnp.sum(p["w"] * batch["x"]), {}

    step = core.make_update_step(loss_fn, opt, None)
    state, m = step(state, {}, {"x": jnp.array([1.0, 2.0, 3.0])})
    assert int(state.step) == 1 and int(state.skipped) == 0 and float(m["skipped_step"]) == 0
    before = _leaves(state)
    state, m = step(state, {}, {"x": jnp.array([1.0, jnp.nan, 3.0])})
    assert float(m["skipped_step"]) == 1 and int(state.skipped) == 1 and int(state.step) == 1
    after = _leaves(state)
    for a, b in zip(before[:-1], after[:-1]):   # everything but the skip counter is untouched
        np.testing.assert_array_equal(a, b)
    state, m = step(state, {}, {"x": jnp.array([jnp.inf, 0.0, 0.0])})
    assert int(state.skipped) == 2


def test_reward_config_per_mode():
    assert set(reward_config("grpo_stage1").active) == {"format", "t1", "v1"}
    assert set(reward_config("grpo_stage1", ("t1",)).active) == {"format", "v1"}
    assert set(reward_config("grpo_stage2", ("c2",)).active) == {"v2"}
    assert set(reward_config("grpo_vlm").active) == {"format", "t1"}
    assert set(reward_config("grpo_all_in_one").active) == {"format", "t1", "v1", "c2"}
    with pytest.raises(ValueError, match="cannot disable"):
        reward_config("grpo_stage2", ("t1",))


def _tiny_stage2_batch(n=4, s=3):
    """A tiny DiT, its reference, and a stage-2 batch of ``n`` SDE rollouts over ``s`` steps."""
    from flax import nnx
    from vans_jax.models.wan.dit import WanConfig, WanTransformer3D
    from vans_jax.sampling import flow

    cfg = WanConfig(dim=32, num_layers=1, num_heads=2, ffn_dim=32, in_channels=4, out_channels=4,
                    text_dim=8, freq_dim=16, text_len=4, patch_size=(1, 2, 2))
    dit = WanTransformer3D(cfg, rngs=nnx.Rngs(0))
    graphdef, params, frozen = core.split_model(dit, "full")
    ref = jax.tree.map(lambda x: x + 0.01, params)
    k = jax.random.split(jax.random.key(1), 8)
    noise = jax.random.normal(k[0], (n, 4, 2, 4, 4))
    ctx = jax.random.normal(k[1], (n, 4, 8))
    ref_lat = jax.random.normal(k[2], (n, 4, 1, 4, 4))
    lat, traj = flow.sample(nnx.merge(graphdef, params, frozen), noise, ctx, guidance_scale=1.0, ref_latents=ref_lat,
                            num_steps=s + 1, shift=3.0, mode="sde", rng=k[3], sde_window=(0, s),
                            return_trajectory=True)
    adv = jnp.array([1.0, -0.5, 2.0, -2.5])[:n]
    idx = np.arange(s)
    batch = dict(x=traj.latents[idx], x_next=traj.latents[idx + 1], old_logp=traj.log_probs[idx] - 0.003,
                 steps=jnp.asarray(idx, jnp.int32), timesteps=traj.timesteps[idx], sigmas=traj.sigmas, context=ctx,
                 cfg=jnp.float32(1.0), ref_latents=ref_lat, advantages=adv)
    return graphdef, params, frozen, ref, batch, traj


def test_stage2_accumulated_gradient_equals_whole_trajectory_loss():
    """The per-timestep gradient accumulation of the stage-2 update equals the gradient of the loss
    averaged over the trajectory at once (and its metrics, per timestep too)."""
    from flax import nnx
    from vans_jax.rl.grpo import vdm_grpo_loss
    from vans_jax.sampling import flow
    from vans_jax.train.grpo import make_stage2_update

    n, s = 4, 3
    graphdef, params, frozen, ref, batch, traj = _tiny_stage2_batch(n, s)
    ctx, ref_lat, adv = batch["context"], batch["ref_latents"], batch["advantages"]
    opt = optax.sgd(1.0)
    kw = dict(beta=0.5, clip_eps=0.2, advantage_clip=2.0, noise_level=0.7, std_form="flow_grpo")
    update = make_stage2_update(graphdef, opt, **kw)
    state = core.init_state(params, opt, 0)
    p0 = jax.tree.map(jnp.copy, params)
    new, m = update(state, frozen, ref, batch)

    def whole(p):
        lps, means, rmeans = [], [], []
        for j in range(s):
            v = flow.guided_velocity(nnx.merge(graphdef, p, frozen), batch["x"][j], batch["timesteps"][j], ctx,
                                     None, 1.0, ref_lat)
            out = flow.sde_step(batch["x"][j], v, traj.sigmas, j, prev_sample=batch["x_next"][j])
            vr = flow.guided_velocity(nnx.merge(graphdef, ref, frozen), batch["x"][j], batch["timesteps"][j], ctx,
                                      None, 1.0, ref_lat)
            lps.append(out.log_prob)
            means.append(out.mean)
            rmeans.append(flow.sde_step(batch["x"][j], vr, traj.sigmas, j, prev_sample=batch["x_next"][j]).mean)
            std = out.std
        stdv = jnp.stack([flow.sde_step(batch["x"][j], jnp.zeros_like(batch["x"][j]), traj.sigmas, j,
                                        prev_sample=batch["x_next"][j]).std for j in range(s)])
        del std
        t = vdm_grpo_loss(jnp.stack(lps, 1), batch["old_logp"].T, jnp.stack(means, 1), jnp.stack(rmeans, 1), stdv,
                          adv, **{k: v for k, v in kw.items() if k in ("beta", "clip_eps", "advantage_clip")})
        return t.loss, t

    (loss, terms), grads = jax.jit(jax.value_and_grad(whole, has_aux=True))(p0)
    np.testing.assert_allclose(float(m["loss"]), float(loss), rtol=1e-5, atol=1e-7)
    # per timestep: ratio exp(logp - old) averaged over the rollouts; its mean is the overall ratio
    lp = jnp.stack([flow.sde_step(batch["x"][j], flow.guided_velocity(nnx.merge(graphdef, p0, frozen), batch["x"][j],
                                                                      batch["timesteps"][j], ctx, None, 1.0, ref_lat),
                                  traj.sigmas, j, prev_sample=batch["x_next"][j]).log_prob for j in range(s)])
    np.testing.assert_allclose(np.asarray(m["ratio_per_step"]), np.exp(lp - batch["old_logp"]).mean(1), rtol=1e-5)
    assert m["grad_norm_per_step"].shape == (s,) and (np.asarray(m["grad_norm_per_step"]) > 0).all()
    np.testing.assert_allclose(float(m["ratio"]), float(np.mean(m["ratio_per_step"])), rtol=1e-6)
    np.testing.assert_allclose(float(m["kl"]), float(terms.kl), rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(float(m["clip_fraction"]), float(terms.clip_fraction), atol=1e-6)
    expect = jax.tree.map(lambda a, g: a - g, p0, grads)   # sgd(1.0)
    for a, b in zip(_leaves(new.params), _leaves(expect)):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)
    assert _changed(new.params, p0)


# ----------------------------------------------------------------------------- every mode, one step


@pytest.mark.parametrize("mode", loop.MODES)
def test_one_step_of_every_mode(tiny_world, tmp_path, mode):
    cfg = make_config(tiny_world, str(tmp_path / mode), mode, **SMALL)
    final = loop.train(cfg, progress=False)
    assert final["step"] == 1
    for k, v in final.items():
        if not isinstance(v, dict):
            assert np.isfinite(v), (k, v)
    assert final["skipped_total"] == 0
    lines = open(tmp_path / mode / "metrics.jsonl").read().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["step"] == 1
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / mode / "tb"))
    exports = final["exports"]
    if mode in ("sft_vlm", "grpo_stage1", "grpo_vlm", "grpo_all_in_one"):
        from vans_jax.models import qwen2_5_vl as qwen
        from vans_jax.models.qwen2_5_vl import tokenizer as qtok
        qwen.from_pretrained(exports["vlm"])
        qtok.load_tokenizer(exports["vlm"])
    if mode in ("sft_vdm", "grpo_stage2", "grpo_vdm", "grpo_all_in_one"):
        from vans_jax.sampling import wan as wp
        wp.from_pretrained(exports["vdm"])
    expected = {"grpo_stage1": {"format", "t1", "v1"}, "grpo_vlm": {"format", "t1"}, "grpo_stage2": {"v2", "c2"},
                "grpo_vdm": {"v2", "c2"}, "grpo_all_in_one": {"format", "t1", "v1", "c2"}}.get(mode, set())
    assert {k.split("/")[1] for k in final if k.startswith("reward/") and k != "reward/total"} == expected
    if mode == "grpo_vdm":
        assert final["anchor/rouge_l"] == 1.0   # ground-truth captions are the anchors
    if mode == "grpo_stage2":
        assert "anchor/resamples" in final and "anchor/failed" in final


@pytest.fixture(scope="module")
def stage_runners(tiny_world, tmp_path_factory):
    out = {}
    for mode in ("grpo_stage1", "grpo_stage2"):
        cfg = make_config(tiny_world, str(tmp_path_factory.mktemp(mode)), mode, **SMALL)
        mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
        out[mode] = (cfg, loop.build_runner(cfg, mode, mesh))
    return out


@pytest.mark.parametrize("mode,disabled", [("grpo_stage1", ()), ("grpo_stage1", ("t1",)), ("grpo_stage1", ("v1",)),
                                           ("grpo_stage2", ()), ("grpo_stage2", ("c2",)), ("grpo_stage2", ("v2",))])
def test_stage_trains_only_its_part_and_reward_ablations(stage_runners, mode, disabled):
    cfg, runner = stage_runners[mode]
    runner.rewards = reward_config(mode, disabled)
    examples = _examples(cfg, mode, 2)
    if mode == "grpo_stage1":
        trained, frozen_before = runner.vlm, _leaves(runner.vlm.frozen)
        from vans_jax.models.layers import LoRAParam
        assert all(isinstance(v, LoRAParam) for v in jax.tree.leaves(
            trained.state.params, is_leaf=lambda x: hasattr(x, "get_metadata")))
        from flax import nnx
        dit_before = _leaves(nnx.state(runner.vdm.dit))
    else:
        trained, frozen_before = runner.dit, _leaves(runner.dit.frozen)
        vlm_before = _leaves(runner.vlm.state.params)
    params_before = jax.tree.map(jnp.copy, trained.state.params)
    m = runner.step(examples, 1, jax.random.key(3))
    assert m["skipped_rewards"] == 0
    active = set(reward_config(mode, disabled).active)
    assert {k.split("/")[1] for k in m if k.startswith("reward/") and k != "reward/total"} == active
    name = "vlm" if mode == "grpo_stage1" else "dit"
    assert _changed(trained.state.params, params_before), "the trained part did not change"
    for a, b in zip(frozen_before, _leaves(trained.frozen)):
        np.testing.assert_array_equal(a, b)
    if mode == "grpo_stage1":
        for a, b in zip(dit_before, _leaves(nnx.state(runner.vdm.dit))):
            np.testing.assert_array_equal(a, b)
    else:
        for a, b in zip(vlm_before, _leaves(runner.vlm.state.params)):
            np.testing.assert_array_equal(a, b)
    # two policy updates per rollout: the first has ratio 1 (same parameters), the second does not
    first = 2 * m[f"{name}/ratio"] - m[f"{name}/ratio_last_update"]   # metrics average the 2 updates
    assert abs(first - 1.0) < 1e-4, first
    assert m[f"{name}/ratio_last_update"] != 1.0


# ----------------------------------------------------------------------------- resumption


def _train_cmd(world, workdir, steps):
    cfg_args = [f"--config.vlm.path={world['vlm']}", f"--config.data.train_csv={world['train_csv']}",
                f"--config.data.video_root={world['video_root']}", f"--config.train.workdir={workdir}",
                "--config.train.mode=sft_vlm", f"--config.train.steps={steps}", "--config.train.checkpoint_every=1",
                "--config.train.export=False"]
    cfg_args += [f"--config.{k}={v}" for k, v in world["overrides"].items()]
    return [sys.executable, "-m", "vans_jax.apps.cli", "train", "--config", os.path.join(ROOT, "configs", "tiny.py")] + cfg_args


@pytest.mark.parametrize("mode", ["grpo_stage1", "grpo_stage2"])
def test_user_and_world_rewards_in_a_step(stage_runners, tmp_path, mode):
    """train.grpo.rewards: a user function (a file) sees the rollouts (RewardInputs) and the world's
    exact reward scores them; both are logged and drive the update."""
    seen = tmp_path / "seen.json"
    user = tmp_path / "user_reward.py"
    user.write_text(
        "import json, numpy as np\n"
        "def redness(inputs):\n"
        f"    json.dump({{'frames': list(inputs.frames.shape), 'gt': list(inputs.gt_frames.shape),\n"
        f"               'captions': len(inputs.captions), 'texts': inputs.texts is not None,\n"
        f"               'g': inputs.group_size}}, open({str(seen)!r}, 'w'))\n"
        "    f = inputs.frames.astype(np.float32)\n"
        "    return (f[..., 0] - f[..., 1:].mean(-1)).mean(axis=(1, 2, 3)) / 255.0\n")
    cfg, runner = stage_runners[mode]
    runner.rewards = reward_config(mode, (), f"world=0.5,{user}:redness")
    m = runner.step(_examples(cfg, mode, 2), 1, jax.random.key(5))
    assert m["skipped_rewards"] == 0 and np.isfinite(m["reward/world"])
    assert f"reward/{user}:redness" in m
    got = json.loads(seen.read_text())
    g = cfg.train.grpo.group_size
    assert got["frames"] == got["gt"] == [2 * g, int(cfg.video.num_frames), 32, 32, 3]
    assert got["captions"] == 2 * g and got["g"] == g and got["texts"] == (mode == "grpo_stage1")


def test_sigkill_then_restart_matches_uninterrupted(tiny_world, tmp_path):
    steps = 5
    base = {"train.steps": steps, "train.checkpoint_every": 1, "train.export": False}
    full = loop.train(make_config(tiny_world, str(tmp_path / "full"), "sft_vlm", **base), progress=False)

    work = str(tmp_path / "killed")
    env = dict(os.environ, XLA_FLAGS=xla_flags(), PYTHONPATH=ROOT)   # the same code generation as in here
    proc = subprocess.Popen(_train_cmd(tiny_world, work, steps), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    ckdir = os.path.join(work, "checkpoints")
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if os.path.isdir(os.path.join(ckdir, "2")):
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(int(d) for d in os.listdir(ckdir) if d.isdigit())
    assert done and max(done) < steps, done
    resumed = loop.train(make_config(tiny_world, work, "sft_vlm", **base), progress=False)
    for k in ("loss", "grad_norm", "token_accuracy", "target_tokens"):
        assert resumed[k] == full[k], (k, resumed[k], full[k])
    lines = [json.loads(x) for x in open(os.path.join(work, "metrics.jsonl")).read().splitlines()]
    assert lines[-1]["step"] == steps


def test_grpo_resume_in_process_matches(tiny_world, tmp_path):
    """Stage 2 (rollout RNG, data iterator, DiT + optimizer state) stopped after 1 of 2 steps and
    restarted ends exactly where the uninterrupted run does."""
    base = dict(SMALL, **{"train.steps": 2, "train.checkpoint_every": 1, "train.export": False})
    full = loop.train(make_config(tiny_world, str(tmp_path / "a"), "grpo_stage2", **base), progress=False)
    cfg = make_config(tiny_world, str(tmp_path / "b"), "grpo_stage2", **base)
    loop.train(cfg, progress=False, stop_after=1)
    resumed = loop.train(cfg, progress=False)
    for k in ("dit/loss", "dit/kl", "reward/total", "reward/v2", "reward/c2", "anchor/rouge_l"):
        assert resumed[k] == full[k], (k, resumed[k], full[k])


def test_stage2_half_batch_agreement_and_variance_split():
    """The gate's cosine: identical halves agree (+1), halves with negated advantages oppose (-1)
    (beta 0: the gradient is linear in the advantages); the control is computed on the shuffled
    advantages. The variance split recovers a known decomposition."""
    from vans_jax.rl.stages import reward_variance_split, stage2_half_batch_agreement
    graphdef, params, frozen, ref, batch, _ = _tiny_stage2_batch(2, 2)
    twice = {k: (jnp.concatenate([v, v], axis=1) if k in ("x", "x_next", "old_logp") else
                 jnp.concatenate([v, v]) if k in ("context", "ref_latents", "advantages") else v)
             for k, v in batch.items()}
    kw = dict(graphdef=graphdef, beta=0.0, clip_eps=0.2, advantage_clip=5.0, noise_level=0.7, std_form="flow_grpo")
    agree = jax.jit(functools.partial(stage2_half_batch_agreement, **kw))
    adv = twice["advantages"]
    same = agree(params, frozen=frozen, ref_params=ref, batch=twice, shuffled_advantages=adv[::-1])
    np.testing.assert_allclose(float(same["grad_cos_halves"]), 1.0, atol=1e-5)
    opposite = dict(twice, advantages=jnp.concatenate([adv[:2], -adv[:2]]))
    neg = agree(params, frozen=frozen, ref_params=ref, batch=opposite, shuffled_advantages=adv)
    np.testing.assert_allclose(float(neg["grad_cos_halves"]), -1.0, atol=1e-5)
    np.testing.assert_allclose(float(neg["grad_cos_halves_shuffled"]), 1.0, atol=1e-5)   # the given control
    assert float(same["grad_norm_half"]) > 0
    groups = [k.split("/", 1)[1] for k in same if k.startswith("grad_cos_halves/")]
    assert "proj_out" in groups and "blocks.attn1" in groups, groups
    for g in groups:   # every group's halves agree / oppose as the whole does
        np.testing.assert_allclose(float(same[f"grad_cos_halves/{g}"]), 1.0, atol=1e-4)
        np.testing.assert_allclose(float(neg[f"grad_cos_halves/{g}"]), -1.0, atol=1e-4)
        np.testing.assert_allclose(float(neg[f"grad_cos_halves_shuffled/{g}"]), 1.0, atol=1e-4)
    rng = np.random.default_rng(0)
    r = rng.normal(0, 2.0, (400, 1)) + rng.normal(0, 0.5, (400, 300))   # noise part 4, SDE part 0.25
    split = reward_variance_split(r)
    assert abs(split["noise"] - 4.0) < 0.6 and abs(split["sde"] - 0.25) < 0.01
    np.testing.assert_allclose(split["sde_share"], split["sde"] / (split["noise"] + split["sde"]))
    with pytest.raises(ValueError, match=r"\(3,\)"):
        reward_variance_split(np.zeros(3))


def test_stage2_diagnostics_in_a_step(stage_runners, monkeypatch):
    """train.grpo.diagnostics_every: the step logs the gate and the variance split of each reward,
    and the per-timestep ratio / clip fraction / gradient norm of the update."""
    import dataclasses
    cfg, runner = stage_runners["grpo_stage2"]
    monkeypatch.setattr(runner, "s", dataclasses.replace(runner.s, diagnostics_every=1, diagnostics_noises=2,
                                                         diagnostics_sde_draws=2))
    monkeypatch.setattr(runner, "rewards", reward_config("grpo_stage2"))
    m = runner.step(_examples(cfg, "grpo_stage2", 2), 1, jax.random.key(6))
    for k in ("diag/grad_cos_halves", "diag/grad_cos_halves_shuffled"):
        assert -1.0 <= float(m[k]) <= 1.0, (k, m[k])
    for name in ("v2", "c2"):
        assert float(m[f"diag/reward_var_noise/{name}"]) >= 0 and float(m[f"diag/reward_var_sde/{name}"]) >= 0
    lo, hi = runner.env.sde_window()
    for j in range(lo, hi):
        assert np.isfinite(float(m[f"dit/ratio_step{j}"])) and float(m[f"dit/grad_norm_step{j}"]) > 0
        assert f"dit/clip_fraction_step{j}" in m
    assert f"dit/ratio_step{hi}" not in m


def test_same_noise_grad_accum_and_std_dt_in_a_stage2_step(stage_runners, monkeypatch):
    """A Stage-2 step with the three levers on: one initial noise per group, two rollout batches per
    update (their rewards all logged), std_t / sqrt(-dt) weights; the DiT changes, metrics finite."""
    import dataclasses
    cfg, runner = stage_runners["grpo_stage2"]
    g = runner.s.group_size
    monkeypatch.setattr(runner, "s", dataclasses.replace(runner.s, same_noise=True))
    noise = np.asarray(runner._initial_noise(jax.random.key(0), 2 * g))
    assert noise.shape[0] == 2 * g
    for i in range(2):
        for j in range(1, g):
            np.testing.assert_array_equal(noise[i * g], noise[i * g + j])
    assert not np.array_equal(noise[0], noise[g])
    monkeypatch.setattr(runner, "s", dataclasses.replace(runner.s, same_noise=False))
    assert runner._initial_noise(jax.random.key(0), 2 * g) is None

    monkeypatch.setattr(runner, "s", dataclasses.replace(runner.s, same_noise=True, grad_accum=2,
                                                         timestep_weight="std_dt", num_updates=1))
    before = jax.tree.map(jnp.copy, runner.dit.state.params)
    m = runner.step(_examples(cfg, "grpo_stage2", 2), 1, jax.random.key(4))
    assert m["skipped_rewards"] == 0 and m["rollouts_per_update"] == 2 * 2 * g
    assert m["time/accum_rollouts_s"] > 0
    assert _changed(runner.dit.state.params, before)
    for k in ("dit/loss", "dit/grad_norm", "dit/ratio", "reward/total"):
        assert np.isfinite(float(m[k])), (k, m[k])
    assert abs(float(m["dit/ratio"]) - 1.0) < 1e-4     # one update: ratio 1 on every batch


def test_stage1_single_update_takes_its_own_logprobs_as_old(stage_runners, monkeypatch):
    """One update per rollout: the loss's own forward, stop-gradient, is the old policy's log-probs
    (same loss and gradient as with a separate scoring forward, ratio exactly 1), and the trainer
    runs no scoring forward for them (nor for the reference when beta is 0)."""
    import dataclasses
    import functools
    from vans_jax.rl import rollouts as ro
    from vans_jax.rl.stages import stage1_loss
    cfg, runner = stage_runners["grpo_stage1"]
    ex = _examples(cfg, "grpo_stage1", 2)
    s = runner.s
    prompt = ro.build_prompt_batch(ex, runner.tokenizer, runner.vlm_cfg, runner.vcfg, s.pad_multiple, mesh=runner.mesh)
    out = runner._generate(runner._policy_sampling)(prompt, jax.random.key(0))
    comp, cmask = jnp.asarray(out.tokens), jnp.asarray(out.mask)
    params = runner.vlm.state.params
    base = dict(prompt=prompt, completions=comp, completion_mask=cmask,
                advantages=jnp.linspace(-1.0, 1.0, comp.shape[0]),
                ref_logp=runner._score(runner.vlm.ref_params(), prompt, comp, cmask))
    loss = functools.partial(stage1_loss, graphdef=runner.vlm.graphdef, frozen=runner.vlm.frozen, rng=None,
                             beta=s.beta, clip_eps=s.clip_eps, temperature=s.temperature, aggregation=s.aggregation)
    grad = jax.value_and_grad(lambda p, b: loss(p, batch=b), has_aux=True)
    (l_old, m_old), g_old = grad(params, dict(base, old_logp=runner._score(params, prompt, comp, cmask)))
    (l_own, m_own), g_own = grad(params, base)
    assert float(m_own["ratio"]) == 1.0 and float(m_own["clip_fraction"]) == 0.0
    np.testing.assert_allclose(float(l_own), float(l_old), rtol=1e-5, atol=1e-7)
    for a, b in zip(_leaves(g_own), _leaves(g_old)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
    assert any(np.abs(a).max() > 0 for a in _leaves(g_own))
    with pytest.raises(ValueError, match="ref_logp"):
        loss(params, batch={k: v for k, v in base.items() if k != "ref_logp"})
    # the trainer with one update: one scoring forward (the reference's, beta > 0), not two
    assert s.beta > 0
    calls, real = [], runner._score
    monkeypatch.setattr(runner, "_score", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(runner, "s", dataclasses.replace(s, num_updates=1))
    before = jax.tree.map(jnp.copy, runner.vlm.state.params)
    m = runner.step(ex, 1, jax.random.key(4))
    assert len(calls) == 1 and m["skipped_rewards"] == 0 and float(m["vlm/ratio"]) == 1.0
    assert _changed(runner.vlm.state.params, before)


def test_sft_weight_in_a_stage2_step(stage_runners, monkeypatch):
    """train.grpo.sft_weight in a real Stage-2 step: the step's ground truth (target latents, caption
    embeddings, reference latents) feeds the flow-matching term; logged as dit/sft_loss; the DiT moves."""
    import dataclasses
    cfg, runner = stage_runners["grpo_stage2"]
    monkeypatch.setattr(runner, "s", dataclasses.replace(runner.s, sft_weight=0.5, num_updates=1))
    examples = _examples(cfg, "grpo_stage2", 2)
    before = jax.tree.map(jnp.copy, runner.dit.state.params)
    m = runner.step(examples, 1, jax.random.key(8))
    assert m["skipped_rewards"] == 0 and _changed(runner.dit.state.params, before)
    assert float(m["dit/sft_loss"]) > 0 and np.isfinite(float(m["dit/loss"]))
    bad = [dict(e, target=np.asarray(e["target"])[:1]) for e in examples]
    with pytest.raises(ValueError, match=r"sft_weight: the examples' target videos are \(1, "):
        runner.step(bad, 2, jax.random.key(9))


def test_stage2_rewards_set_only_stage_2s_list():
    """train.grpo.stage2_rewards: grpo_stage2's list when set (the demo runs both stages from one
    config); every other mode keeps train.grpo.rewards; empty: rewards for stage 2 too."""
    from vans_jax.apps.configlib import load_config

    cfg = load_config("tiny_world", ["--config.train.grpo.rewards=c2", "--config.train.grpo.stage2_rewards=v2,c2,world"])
    assert loop.grpo_settings(cfg, "grpo_stage2").rewards == "v2,c2,world"
    for mode in ("grpo_stage1", "grpo_vlm", "grpo_vdm", "grpo_all_in_one"):
        assert loop.grpo_settings(cfg, mode).rewards == "c2", mode
    cfg.train.grpo.stage2_rewards = ""
    assert loop.grpo_settings(cfg, "grpo_stage2").rewards == "c2"


def test_stage2_batch_size_sets_only_stage_2s_batch():
    """train.grpo.stage2_batch_size: grpo_stage2's prompts a step when > 0; an impossible one is an
    error that names it."""
    from vans_jax.apps.configlib import load_config

    cfg = load_config("tiny_world", ["--config.train.batch_size=2", "--config.train.grpo.stage2_batch_size=4"])
    assert loop.global_batch(cfg, "grpo_stage2") == (4, "train.grpo.stage2_batch_size")
    for mode in ("grpo_stage1", "grpo_vdm", "sft_vlm"):
        assert loop.global_batch(cfg, mode) == (2, "train.batch_size"), mode
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    assert loop.check_batching(cfg, "grpo_stage2", mesh)[0] == 4
    cfg.train.grpo.stage2_batch_size = -1
    with pytest.raises(ValueError, match="train.grpo.stage2_batch_size must be >= 0"):
        loop.check_batching(cfg, "grpo_stage2", mesh)
    cfg.train.grpo.stage2_batch_size = 0
    assert loop.global_batch(cfg, "grpo_stage2") == (2, "train.batch_size")
