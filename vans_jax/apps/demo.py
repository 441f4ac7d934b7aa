"""``vans-jax demo``: Joint-GRPO on the embedded synthetic world, end to end on a CPU.

From the shipped SFT models (data/models/tiny_world): evaluate on the world's eval split, run a
short Joint-GRPO (stage 1: the VLM's LoRA with r_format + r_t1 + r_v1 through the frozen VDM; stage
2: the DiT with r_v2 + r_c2 and anchors from the stage-1 VLM), evaluate again, and write to
``--output_dir``:

    metrics.json              {"before": {...}, "after": {...}, "settings": ..., "timings": ...}
    metrics.md                the before/after table
    before/<i>/answer.json    predictions (the layout `vans-jax eval` reads) + answer.mp4
    after/<i>/answer.json
    contact_sheet.png         per sample: input | ground truth | before | after (frames)
    runs/grpo_stage1, runs/grpo_stage2   training work dirs (TensorBoard logs in */tb, checkpoints, exports)
    data/                     the generated synthetic rl / eval splits

Metrics (means over the eval samples): ``format`` (valid [Think]/[Ans]), ``rouge_l`` (caption vs
ground truth), ``clip_v`` (CLIP frame-by-frame similarity to the ground-truth video), ``clip_t``
(CLIPScore of the generated video against the ground-truth caption), ``total_reward`` = their sum
(the four rewards Joint-GRPO optimizes, each in [0, 1]-ish units).
"""
from __future__ import annotations

import json
import os
import time
from typing import Sequence

import jax
import numpy as np

from vans_jax.data import synthetic
from vans_jax.data.csv_format import read_vnep_csv
from vans_jax.data.video_io import read_video, target_clip

METRICS = ("format", "rouge_l", "clip_v", "clip_t", "total_reward")


def settings_from_config(cfg) -> dict:
    v = cfg.video
    return dict(height=int(v.height), width=int(v.width), num_frames=int(v.num_frames), fps=float(v.fps),
                num_steps=int(v.num_steps), cfg_scale=float(v.cfg_scale), shift=float(v.shift), n_ref=int(v.n_ref),
                reference_frames=int(cfg.data.pipeline.reference_frames), vlm_num_frames=int(cfg.vlm.num_frames),
                vlm_sample_fps=float(cfg.vlm.sample_fps), video_min_pixels=int(cfg.vlm.video_min_pixels),
                video_max_pixels=int(cfg.vlm.video_max_pixels), max_new_tokens=int(cfg.generation.max_new_tokens),
                temperature=0.0, top_p=1.0, negative_prompt=str(v.get("negative_prompt", "")), sampler="euler")


def evaluate(pipe, clip_model, clip_tokenizer, csv_path: str, video_root: str, out_dir: str | None, *,
             num_samples: int | None = None, batch_size: int = 8, seed: int = 0, progress: bool = True) -> dict:
    """Runs the VANS pipeline on the first ``num_samples`` rows and scores them (module docstring).
    Writes each prediction under ``out_dir/<row index>/`` when ``out_dir`` is given. Returns
    ``{"metrics": {...}, "per_sample": [...], "videos": {index: uint8 frames}}``."""
    from vans_jax.models import clip as clip_lib
    from vans_jax.apps.predict import write_prediction
    from vans_jax.rl.rewards import clip_score, clip_video_similarity, format_reward, rouge_l_reward

    rows = list(read_vnep_csv(csv_path))[:num_samples]
    s = pipe.settings
    per, videos = [], {}
    t0 = time.perf_counter()
    for b in range(0, len(rows), batch_size):
        chunk = rows[b:b + batch_size]
        clips, gts = [], []
        for r in chunk:
            frames, fps = read_video(os.path.join(video_root, r.input_video_path))
            clips.append((frames, fps))
            tf, tfps = read_video(os.path.join(video_root, r.output_video_path))
            gts.append(target_clip(tf, tfps, s.num_frames, s.height, s.width, s.fps))
        from vans_jax.pipeline import Clip
        out = pipe([Clip(f, fps) for f, fps in clips], [r.question for r in chunk], seed=seed + b)
        gen = np.stack([a.video for a in out])
        gt = np.stack(gts)
        fg = clip_lib.encode_frames(clip_model, gen)
        ft = clip_lib.encode_frames(clip_model, gt)
        txt = clip_lib.encode_texts(clip_model, clip_tokenizer, [r.caption for r in chunk])
        texts = [a.text for a in out]
        fmt = np.asarray(format_reward(texts))
        rl = np.asarray(rouge_l_reward(texts, [r.caption for r in chunk]))
        cv = np.asarray(clip_video_similarity(fg, ft))
        ct = np.asarray(clip_score(fg, txt))
        for i, (r, a) in enumerate(zip(chunk, out)):
            rec = dict(index=int(r.index), question=r.question, gt_caption=r.caption, caption=a.caption,
                       text=a.text, format=float(fmt[i]), rouge_l=float(rl[i]), clip_v=float(cv[i]),
                       clip_t=float(ct[i]))
            rec["total_reward"] = rec["format"] + rec["rouge_l"] + rec["clip_v"] + rec["clip_t"]
            per.append(rec)
            videos[int(r.index)] = a.video
            if out_dir is not None:
                write_prediction(os.path.join(out_dir, str(r.index)), a,
                                 {"seed": seed + b, "metrics": {k: rec[k] for k in METRICS}}, s.fps,
                                 input_frames=clips[i][0])
        if progress:
            print(f"  evaluated {min(b + batch_size, len(rows))}/{len(rows)} ({time.perf_counter() - t0:.0f}s)",
                  flush=True)
    metrics = {k: float(np.mean([p[k] for p in per])) for k in METRICS}
    metrics["num_samples"] = len(per)
    return {"metrics": metrics, "per_sample": per, "videos": videos}


def contact_sheet(path: str, rows, video_root: str, before: dict, after: dict, settings, max_rows: int = 6,
                  frames: Sequence[int] | None = None):
    """PNG grid: one block per sample with four strips (input | ground truth | before | after)."""
    from PIL import Image, ImageDraw

    h, w = settings.height, settings.width
    n = settings.num_frames
    frames = list(frames) if frames is not None else sorted({0, n // 4, n // 2, 3 * n // 4, n - 1})
    label_w = 64
    rows = [r for r in rows if int(r.index) in before and int(r.index) in after][:max_rows]
    sheet = Image.new("RGB", (label_w + w * len(frames), (h + 2) * 4 * len(rows) + 14 * len(rows)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    y = 0
    for r in rows:
        inp, ifps = read_video(os.path.join(video_root, r.input_video_path))
        inp = inp[np.linspace(0, len(inp) - 1, len(frames)).round().astype(int)]
        tf, tfps = read_video(os.path.join(video_root, r.output_video_path))
        gt = target_clip(tf, tfps, n, h, w, settings.fps)[frames]
        draw.text((2, y), f"#{r.index}: {r.caption[:90]}", fill=(0, 0, 0))
        y += 14
        for name, strip in (("input", inp), ("truth", gt), ("before", before[int(r.index)][frames]),
                            ("after", after[int(r.index)][frames])):
            draw.text((2, y + h // 2 - 5), name, fill=(0, 0, 0))
            for j, f in enumerate(strip):
                im = Image.fromarray(np.asarray(f)).resize((w, h))
                sheet.paste(im, (label_w + j * w, y))
            y += h + 2
    sheet.save(path)
    return path


def markdown(before: dict, after: dict) -> str:
    lines = ["| | " + " | ".join(METRICS) + " |", "|---|" + "---|" * len(METRICS)]
    for name, m in (("SFT (before)", before), ("Joint-GRPO (after)", after)):
        lines.append(f"| {name} | " + " | ".join(f"{m[k]:.4f}" for k in METRICS) + " |")
    return "\n".join(lines) + "\n"


def _pipeline(vlm_dir, vdm_dir, settings: dict):
    from vans_jax.pipeline import VANSPipeline, VANSSettings
    return VANSPipeline.from_pretrained(vlm_dir, vdm_dir, dtype="float32",
                                        settings=VANSSettings.from_dict(settings), attn_impl="xla")


def _prepare(cfg, output_dir: str, quick: bool):
    """What the demo and the comparison share: the shipped models' paths (a clear error if they are
    missing), the demo settings (shortened by ``quick``), freshly generated rl / eval splits, which
    ``cfg``'s data section is pointed at, the CLIP reward model and the generation settings."""
    from vans_jax.convert import clip as clip_ckpt
    from vans_jax.models import clip as clip_lib
    from vans_jax.apps.tiny_world import load_defaults, tiny_world_paths

    root = os.path.dirname(cfg.vlm.path.rstrip("/"))
    defaults = load_defaults(root)          # clear error if the shipped models are missing
    paths = tiny_world_paths(root)
    d = dict(cfg.demo)
    if quick:
        d.update(eval_samples=4, rl_samples=16, eval_batch=4)
        cfg.train.grpo.update(dict(stage1_steps=2, stage2_steps=2, train_sampling_steps=3))
        cfg.video.num_steps = 4
    os.makedirs(output_dir, exist_ok=True)
    data_dir = os.path.join(output_dir, "data")
    wc = synthetic.WorldConfig(**defaults.get("world", {}))
    csvs = {split: synthetic.generate_world(data_dir, split, int(d[f"{split}_samples"]), config=wc).csv_path
            for split in ("rl", "eval")}
    video_root = os.path.join(data_dir, "videos")
    cfg.data.rl_csv = cfg.data.train_csv = csvs["rl"]
    cfg.data.video_root = video_root
    cfg.train.export_link = True
    return dict(paths=paths, d=d, csvs=csvs, video_root=video_root, settings=settings_from_config(cfg),
                clip_model=clip_ckpt.from_pretrained(paths["clip"]), clip_tok=clip_lib.load_tokenizer(paths["clip"]))


def run(cfg, output_dir: str, *, quick: bool = False, progress: bool = True) -> dict:
    """The whole demo (module docstring). ``quick``: a shortened form (CI): fewer samples and steps."""
    from vans_jax.train import loop

    t_start = time.perf_counter()
    env = _prepare(cfg, output_dir, quick)
    paths, d, csvs, video_root, settings = env["paths"], env["d"], env["csvs"], env["video_root"], env["settings"]
    clip_model, clip_tok = env["clip_model"], env["clip_tok"]

    def say(msg):
        if progress:
            print(msg, flush=True)

    say(f"[demo] 1/4 evaluating the SFT models on {d['eval_samples']} eval samples")
    pipe = _pipeline(paths["vlm"], paths["vdm"], settings)
    before = evaluate(pipe, clip_model, clip_tok, csvs["eval"], video_root, os.path.join(output_dir, "before"),
                      num_samples=int(d["eval_samples"]), batch_size=int(d["eval_batch"]), progress=progress)
    del pipe
    say("[demo] before: " + ", ".join(f"{k}={before['metrics'][k]:.4f}" for k in METRICS))

    runs = os.path.join(output_dir, "runs")
    timings = {}
    say(f"[demo] 2/4 Joint-GRPO stage 1 ({cfg.train.grpo.stage1_steps} steps: VLM LoRA, VDM frozen)")
    c1 = _copy(cfg)
    c1.train.mode, c1.train.workdir = "grpo_stage1", os.path.join(runs, "grpo_stage1")
    t = time.perf_counter()
    f1 = loop.train(c1, progress=progress)
    timings["stage1_s"] = time.perf_counter() - t
    vlm_after = f1["exports"]["vlm"]
    say(f"[demo] 3/4 Joint-GRPO stage 2 ({cfg.train.grpo.stage2_steps} steps: DiT, stage-1 VLM frozen as anchor)")
    c2 = _copy(cfg)
    c2.vlm.path = vlm_after
    c2.train.mode, c2.train.workdir = "grpo_stage2", os.path.join(runs, "grpo_stage2")
    t = time.perf_counter()
    f2 = loop.train(c2, progress=progress)
    timings["stage2_s"] = time.perf_counter() - t
    vdm_after = f2["exports"]["vdm"]

    say("[demo] 4/4 evaluating the Joint-GRPO models")
    pipe = _pipeline(vlm_after, vdm_after, settings)
    after = evaluate(pipe, clip_model, clip_tok, csvs["eval"], video_root, os.path.join(output_dir, "after"),
                     num_samples=int(d["eval_samples"]), batch_size=int(d["eval_batch"]), progress=progress)
    say("[demo] after:  " + ", ".join(f"{k}={after['metrics'][k]:.4f}" for k in METRICS))
    rows = list(read_vnep_csv(csvs["eval"]))
    sheet = contact_sheet(os.path.join(output_dir, "contact_sheet.png"), rows, video_root, before["videos"],
                          after["videos"], pipe.settings)
    timings["total_s"] = time.perf_counter() - t_start
    result = {"before": before["metrics"], "after": after["metrics"],
              "training": {"stage1": _last(f1), "stage2": _last(f2)},
              "settings": dict(settings, stage1_steps=int(cfg.train.grpo.stage1_steps),
                               stage2_steps=int(cfg.train.grpo.stage2_steps), group_size=int(cfg.train.grpo.group_size),
                               prompts_per_step=int(cfg.train.batch_size), quick=bool(quick)),
              "timings": {k: round(v, 1) for k, v in timings.items()},
              "files": {"contact_sheet": sheet, "before": os.path.join(output_dir, "before"),
                        "after": os.path.join(output_dir, "after"), "tensorboard": [os.path.join(runs, r, "tb")
                                                                                   for r in ("grpo_stage1",
                                                                                             "grpo_stage2")]},
              "samples": [{"before": b, "after": a} for b, a in zip(before["per_sample"], after["per_sample"])][:8],
              "device": jax.devices()[0].platform}
    with open(os.path.join(output_dir, "metrics.json"), "w") as f:
        json.dump(result, f, indent=2)
    with open(os.path.join(output_dir, "metrics.md"), "w") as f:
        f.write(markdown(before["metrics"], after["metrics"]))
    say(markdown(before["metrics"], after["metrics"]))
    say(f"[demo] wrote {output_dir}/metrics.json, contact_sheet.png, before/ after/ (predictions), runs/*/tb "
        f"(TensorBoard) in {timings['total_s']:.0f}s")
    return result


VARIANTS = {
    # name: (modes run in order; each later mode starts from the earlier one's exported VLM)
    "grpo_vlm": ("grpo_vlm",),
    "stage1": ("grpo_stage1",),
    "joint_grpo": ("grpo_stage1", "grpo_stage2"),
}
VARIANT_NAMES = {"sft": "SFT", "grpo_vlm": "GRPO on the VLM only (r_format + r_t1)",
                 "stage1": "Joint-GRPO stage 1 only", "joint_grpo": "Joint-GRPO (stage 1 + stage 2)"}


def compare(cfg, output_dir: str, *, seeds: Sequence[int] = (0, 1, 2), quick: bool = False,
            progress: bool = True) -> dict:
    """``vans-jax demo --compare``: SFT against GRPO on the VLM only, Joint-GRPO stage 1 only and the
    full Joint-GRPO, each trained with every seed in ``seeds`` (the seed sets the RL sampling and the
    data order) from the shipped SFT models and evaluated on the same eval split with the same
    generation noise. Writes ``compare.json`` ({"sft": metrics, "runs": {variant: {seed: metrics}},
    "summary": {variant: {metric: {mean, std, min, max}}}}) and ``compare.md``."""
    from vans_jax.train import loop

    t_start = time.perf_counter()
    env = _prepare(cfg, output_dir, quick)
    paths, d, csvs, video_root, settings = env["paths"], env["d"], env["csvs"], env["video_root"], env["settings"]
    clip_model, clip_tok = env["clip_model"], env["clip_tok"]

    def say(msg):
        if progress:
            print(msg, flush=True)

    def score(vlm_dir, vdm_dir):
        pipe = _pipeline(vlm_dir, vdm_dir, settings)
        return evaluate(pipe, clip_model, clip_tok, csvs["eval"], video_root, None,
                        num_samples=int(d["eval_samples"]), batch_size=int(d["eval_batch"]), progress=False)["metrics"]

    result_path = os.path.join(output_dir, "compare.json")
    result = {"sft": None, "runs": {v: {} for v in VARIANTS}, "seeds": [int(x) for x in seeds]}
    if os.path.exists(result_path):            # resumable: finished (variant, seed) pairs are kept
        with open(result_path) as f:
            old = json.load(f)
        result["sft"] = old.get("sft")
        for v in VARIANTS:
            result["runs"][v].update(old.get("runs", {}).get(v, {}))

    def save():
        result["summary"] = summarize(result)
        result["settings"] = dict(settings, stage1_steps=int(cfg.train.grpo.stage1_steps),
                                  stage2_steps=int(cfg.train.grpo.stage2_steps),
                                  group_size=int(cfg.train.grpo.group_size), lr=float(cfg.train.grpo.lr),
                                  vlm_lr=cfg.train.grpo.get("vlm_lr"), dit_lr=cfg.train.grpo.get("dit_lr"),
                                  prompts_per_step=int(cfg.train.batch_size), eval_samples=int(d["eval_samples"]),
                                  quick=bool(quick))
        result["wall_s"] = round(time.perf_counter() - t_start, 1)
        with open(result_path + ".tmp", "w") as f:
            json.dump(result, f, indent=2)
        os.replace(result_path + ".tmp", result_path)
        with open(os.path.join(output_dir, "compare.md"), "w") as f:
            f.write(compare_markdown(result))

    if result["sft"] is None:
        say("[compare] evaluating the SFT models")
        result["sft"] = score(paths["vlm"], paths["vdm"])
        save()
    for seed in seeds:
        exported: dict = {}
        for variant, modes in VARIANTS.items():
            if str(seed) in result["runs"][variant]:
                continue
            vlm_dir, vdm_dir = paths["vlm"], paths["vdm"]
            for mode in modes:
                workdir = os.path.join(output_dir, "runs", f"seed{seed}", mode)
                if mode not in exported:
                    c = _copy(cfg)
                    c.seed = int(seed)
                    c.train.mode, c.train.workdir = mode, workdir
                    if mode == "grpo_stage2":
                        c.vlm.path = exported["grpo_stage1"]["vlm"]
                    say(f"[compare] seed {seed}: training {mode}")
                    final = loop.train(c, progress=progress)
                    exported[mode] = final.get("exports") or {}
                vlm_dir = exported[mode].get("vlm", vlm_dir)
                vdm_dir = exported[mode].get("vdm", vdm_dir)
            say(f"[compare] seed {seed}: evaluating {variant}")
            result["runs"][variant][str(seed)] = score(vlm_dir, vdm_dir)
            m = result["runs"][variant][str(seed)]
            say(f"[compare] seed {seed} {variant}: " + ", ".join(f"{k}={m[k]:.4f}" for k in METRICS))
            save()
    save()
    say(compare_markdown(result))
    say(f"[compare] wrote {result_path} and compare.md in {result['wall_s']:.0f}s")
    return result


def summarize(result: dict) -> dict:
    out = {}
    for variant, per_seed in result["runs"].items():
        if not per_seed:
            continue
        out[variant] = {}
        for k in METRICS:
            xs = np.asarray([m[k] for m in per_seed.values()], np.float64)
            out[variant][k] = {"mean": float(xs.mean()), "std": float(xs.std()), "min": float(xs.min()),
                               "max": float(xs.max()), "n": int(xs.size)}
    return out


def compare_markdown(result: dict) -> str:
    lines = ["| model | seeds | " + " | ".join(METRICS) + " |", "|---|---|" + "---|" * len(METRICS)]
    if result.get("sft"):
        lines.append(f"| {VARIANT_NAMES['sft']} | - | " + " | ".join(f"{result['sft'][k]:.4f}" for k in METRICS) + " |")
    for variant, stats in result.get("summary", {}).items():
        n = next(iter(stats.values()))["n"]
        lines.append(f"| {VARIANT_NAMES[variant]} | {n} | "
                     + " | ".join(f"{stats[k]['mean']:.4f} ± {stats[k]['std']:.4f}" for k in METRICS) + " |")
    return "\n".join(lines) + "\n"


def _last(final: dict) -> dict:
    return {k: v for k, v in final.items() if k.startswith(("reward/", "vlm/", "dit/", "anchor/"))}


def _copy(cfg):
    import copy
    return copy.deepcopy(cfg)


__all__ = ["run", "compare", "evaluate", "contact_sheet", "METRICS"]
