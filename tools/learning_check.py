"""The learning check: with one simple, verifiable reward, does a GRPO trainer raise it beyond its
shuffled-advantage control?

    python -m tools.learning_check --mode grpo_vdm --reward examples/rewards.py:redness \
        --steps 12 --seeds 0 1 2 --output_dir out/learning_check

From the shipped SFT models of the synthetic world (``configs/tiny_world.py``): for each seed, one
``--mode`` run with the reward (``train.grpo.rewards``) and the same run with the advantages
permuted within each group (``train.grpo.shuffle_advantages``: every statistic of the batch kept,
the link between a rollout and its reward cut). Each model is scored before and after on the first
``--eval_prompts`` eval clips, deterministically: ``grpo_vdm`` (Flow-GRPO on the DiT) renders the
ground-truth captions with the ODE sampler and fixed noise; ``grpo_vlm`` writes greedy captions.
The score is the mean of the reward over those samples. A trainer that learns raises the score
in the real runs more than in the controls, in every seed.

Writes ``learning_check.json`` ({"before", "runs": {seed: {"real", "shuffled"}}, "summary"}) and
``learning_check.md``.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import numpy as np

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny_world.py")


def score(models, env: dict, mode: str, reward_cfg, eval_prompts: int, seed: int = 1000) -> tuple[float, dict]:
    """(the mean reward of ``models``' deterministic eval samples (module docstring), extras): for
    ``grpo_vdm`` the extras are the renders' CLIP-V, CLIP-T and exact render IoU (the score itself
    for the CLIP rewards ``v2`` / ``c2``); {} for ``grpo_vlm``."""
    from vans_jax.apps import demo
    from vans_jax.data.csv_format import read_vnep_csv
    from vans_jax.data.video_io import read_video
    from vans_jax.eval import runner as eval_runner
    from vans_jax.pipeline import Clip
    from vans_jax.rl.render_accuracy import render_accuracy
    from vans_jax.rl.rewards import RewardInputs, compute_rewards

    settings = dict(env["settings"], temperature=0.0)
    pipe = demo._pipeline_from(models, settings)
    config = demo.eval_config(pipe.settings)
    rows = list(read_vnep_csv(env["csvs"]["eval"]))[:eval_prompts]
    clips = [Clip(*read_video(os.path.join(env["video_root"], r.input_video_path))) for r in rows]
    gt_frames = np.stack([eval_runner.read_ground_truth(os.path.join(env["video_root"], r.output_video_path), config)
                          for r in rows])
    gt_caps = [r.caption for r in rows]
    extras = {}
    if mode == "grpo_vdm":
        frames = np.stack([eval_runner.to_eval_geometry(np.asarray(v), config)
                           for v in pipe.render(clips, gt_caps, seed=seed)])
        texts, caps = None, gt_caps
        # the paper's video metrics and the world's exact one on the same renders, whatever the reward
        recs = eval_runner.score_predictions(
            [""] * len(rows), gt_caps, gt_caps, list(frames), list(gt_frames),
            models=eval_runner.Models(clip=models.clip, tokenizer=models.clip_tokenizer), config=config)
        extras = {"clip_v": float(np.mean([r["clip_v"] for r in recs])),
                  "clip_t": float(np.mean([r["clip_t"] for r in recs])),
                  "render_iou": float(np.mean([render_accuracy(f, g)["render_iou"]
                                               for f, g in zip(frames, gt_frames)]))}
        if set(reward_cfg.active) & {"v2", "c2"}:   # CLIP rewards: their eval form on the ODE renders
            return (extras["clip_v"] if "v2" in reward_cfg.active else extras["clip_t"]), extras
    else:
        ans = pipe.answer(clips, [r.question for r in rows])
        frames, texts, caps = None, list(ans.texts), list(ans.captions)
    inputs = RewardInputs(frames=frames, gt_frames=gt_frames if frames is not None else None, captions=caps,
                          gt_captions=gt_caps, texts=texts, group_size=1)
    out = compute_rewards(reward_cfg, reward_inputs=inputs, frames=frames, gt_frames=inputs.gt_frames, texts=texts,
                          gt_captions=gt_caps)
    return float(np.mean(next(iter(out.values())))), extras


def run(output_dir: str, *, mode: str = "grpo_vdm", reward: str = "examples/rewards.py:redness", steps: int = 12,
        seeds=(0, 1, 2), eval_prompts: int = 8, quick: bool = False, overrides=(), progress: bool = True) -> dict:
    from vans_jax.apps import demo
    from vans_jax.apps.configlib import load_config
    from vans_jax.rl.stages import reward_config
    from vans_jax.train import loop

    if mode not in ("grpo_vdm", "grpo_vlm"):
        raise ValueError(f"--mode must be grpo_vdm or grpo_vlm, got {mode!r}")
    say = print if progress else (lambda *a, **k: None)
    t0 = time.perf_counter()
    cfg = load_config(CONFIG, list(overrides))
    env = demo._prepare(cfg, output_dir, quick)
    rcfg = reward_config(mode, (), reward)
    if len(rcfg.active) != 1:
        raise ValueError(f"--reward: one reward, got {list(rcfg.active)}")
    result = {"mode": mode, "reward": reward, "steps": steps, "seeds": list(seeds), "eval_prompts": eval_prompts,
              "quick": quick, "settings": {"lr": float(cfg.train.grpo.get(f"{'dit' if mode == 'grpo_vdm' else 'vlm'}_lr")
                                                      or cfg.train.grpo.lr),
                                           "group_size": int(cfg.train.grpo.group_size),
                                           "prompts_per_step": int(cfg.train.batch_size),
                                           "num_updates": int(cfg.train.grpo.num_updates)}}
    result["before"], result["before_extras"] = score(env["models"], env, mode, rcfg, eval_prompts)
    say(f"[learning-check] before: {result['before']:.4f} {result['before_extras']}", flush=True)
    runs, extras = {}, {}
    for seed in seeds:
        runs[str(seed)], extras[str(seed)] = {}, {}
        for arm in ("real", "shuffled"):
            c = copy.deepcopy(cfg)
            c.seed = int(seed)
            c.train.mode, c.train.steps = mode, int(steps)
            c.train.workdir = os.path.join(output_dir, "runs", f"{arm}_s{seed}")
            c.train.export, c.train.checkpoint_every = False, 0
            c.train.grpo.rewards, c.train.grpo.shuffle_advantages = reward, arm == "shuffled"
            final = loop.train(c, progress=False, models=env["models"])
            runs[str(seed)][arm], extras[str(seed)][arm] = score(final["models"], env, mode, rcfg, eval_prompts)
            say(f"[learning-check] seed {seed} {arm}: {runs[str(seed)][arm]:.4f} {extras[str(seed)][arm]}",
                flush=True)
    result["runs"], result["extras"] = runs, extras
    real = np.asarray([r["real"] for r in runs.values()])
    shuf = np.asarray([r["shuffled"] for r in runs.values()])
    result["summary"] = {
        "real": {"mean": float(real.mean()), "std": float(real.std()), "min": float(real.min()), "max": float(real.max())},
        "shuffled": {"mean": float(shuf.mean()), "std": float(shuf.std()), "min": float(shuf.min()),
                     "max": float(shuf.max())},
        "real_minus_shuffled": [float(x) for x in real - shuf],
        "real_above_shuffled_in_every_seed": bool((real > shuf).all()),
    }
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "learning_check.json"), "w") as f:
        json.dump(result, f, indent=2)
    with open(os.path.join(output_dir, "learning_check.md"), "w") as f:
        f.write(markdown(result))
    say(markdown(result))
    return result


def markdown(r: dict) -> str:
    s = r["summary"]
    lines = [f"{r['mode']}, reward `{r['reward']}`, {r['steps']} steps, seeds {r['seeds']}, "
             f"{r['eval_prompts']} eval prompts (before: {r['before']:.4f})", "",
             "| seed | real | shuffled advantages | real - shuffled |", "|---|---|---|---|"]
    for seed, v in r["runs"].items():
        lines.append(f"| {seed} | {v['real']:.4f} | {v['shuffled']:.4f} | {v['real'] - v['shuffled']:+.4f} |")
    lines.append(f"| mean ± std | {s['real']['mean']:.4f} ± {s['real']['std']:.4f} | "
                 f"{s['shuffled']['mean']:.4f} ± {s['shuffled']['std']:.4f} | |")
    if r.get("before_extras"):   # grpo_vdm: the renders' CLIP-V and exact render IoU, real / shuffled
        b = r["before_extras"]
        lines += ["", f"The same renders' CLIP-V and render IoU (before: {b['clip_v']:.4f}, {b['render_iou']:.4f}):",
                  "", "| seed | CLIP-V real | CLIP-V shuffled | IoU real | IoU shuffled |", "|---|---|---|---|---|"]
        for seed, v in r["extras"].items():
            lines.append(f"| {seed} | {v['real']['clip_v']:.4f} | {v['shuffled']['clip_v']:.4f} | "
                         f"{v['real']['render_iou']:.4f} | {v['shuffled']['render_iou']:.4f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m tools.learning_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--output_dir", required=True)
    p.add_argument("--mode", default="grpo_vdm", choices=["grpo_vdm", "grpo_vlm"])
    p.add_argument("--reward", default="examples/rewards.py:redness")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--eval_prompts", type=int, default=8)
    p.add_argument("--quick", action="store_true", help="the demo's shortened settings (tests)")
    a, rest = p.parse_known_args(argv)
    run(a.output_dir, mode=a.mode, reward=a.reward, steps=a.steps, seeds=a.seeds, eval_prompts=a.eval_prompts,
        quick=a.quick, overrides=rest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
