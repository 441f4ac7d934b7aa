"""``vans-jax demo``: Joint-GRPO on the embedded synthetic world, end to end on a CPU.

From the shipped SFT models (data/models/tiny_world): evaluate on the world's eval split, run a
short Joint-GRPO (stage 1: the VLM's LoRA with r_format + r_t1 + r_v1 through the frozen VDM; stage
2: the DiT with r_v2 + r_c2 and anchors from the stage-1 VLM), evaluate again, and write to
``--output_dir``:

    index.html                the page to look at: per eval sample input | truth | before | after videos
                              side by side, the captions, the metrics table (videos linked, not copied)
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
(the four rewards Joint-GRPO optimizes, each in [0, 1]-ish units), scored by the evaluation's own
core (``eval.runner.score_predictions``) on the videos the pipeline just decoded; and two exact
diagnostics that need no learned model (``rl.render_accuracy``): ``render_iou`` (foreground IoU
of the generated frames with the true next event's) and ``render_color`` (the fraction of objects
rendered in their colour, pooled over frames and samples).

Each model is loaded once: the SFT models are handed to stage 1 in memory, stage 1's VLM (its LoRA
merged, as its export reloads) to stage 2, and both stages' models to the final evaluation
(``train.loop.train(models=...)``); the exports under ``runs/*/export`` are still written.

``vans-jax demo --vlm_only`` (``run_vlm_only``): the VLM half alone on one clip, with a tiny random
Qwen2.5-VL when ``vlm.path`` is empty (no shipped models needed).
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Sequence

import jax
import numpy as np

from vans_jax import parallel
from vans_jax._files import write_json
from vans_jax.apps import compile_cache
from vans_jax.data import synthetic
from vans_jax.data.csv_format import read_vnep_csv
from vans_jax.data.video_io import read_video, target_clip
from vans_jax.eval import runner as eval_runner
from vans_jax.rl.render_accuracy import pool_render_accuracy, render_accuracy

REWARDS = ("format", "rouge_l", "clip_v", "clip_t")
# the four rewards, their sum, and two exact diagnostics of the world (rl.render_accuracy: the
# foreground IoU and the object-colour accuracy of the generated video against the true next event;
# not in total_reward)
METRICS = REWARDS + ("total_reward", "render_iou", "render_color")


def settings_from_config(cfg) -> dict:
    v = cfg.video
    return dict(height=int(v.height), width=int(v.width), num_frames=int(v.num_frames), fps=float(v.fps),
                num_steps=int(v.num_steps), cfg_scale=float(v.cfg_scale), shift=float(v.shift), n_ref=int(v.n_ref),
                reference_frames=int(cfg.data.pipeline.reference_frames), vlm_num_frames=int(cfg.vlm.num_frames),
                vlm_sample_fps=float(cfg.vlm.sample_fps), video_min_pixels=int(cfg.vlm.video_min_pixels),
                video_max_pixels=int(cfg.vlm.video_max_pixels), max_new_tokens=int(cfg.generation.max_new_tokens),
                temperature=0.0, top_p=1.0, negative_prompt=str(v.get("negative_prompt", "")), sampler="euler")


def training_settings(cfg) -> dict:
    """The Joint-GRPO settings a demo's ``metrics.json`` / ``compare.json`` record."""
    g = cfg.train.grpo
    return dict(stage1_steps=int(g.stage1_steps), stage2_steps=int(g.stage2_steps), group_size=int(g.group_size),
                lr=float(g.lr), vlm_lr=g.get("vlm_lr"), dit_lr=g.get("dit_lr"), num_updates=int(g.num_updates),
                clip_eps=float(g.clip_eps), prompts_per_step=int(cfg.train.batch_size),
                **{k: g.get(k) for k in ("ema_decay", "vlm_ema_decay", "dit_ema_decay", "dit_objective", "nft_beta",
                                         "nft_timesteps", "rewards", "stage2_rewards", "stage2_batch_size")})


def eval_config(settings) -> eval_runner.EvalConfig:
    """The evaluation geometry of the demo: the generated videos' own (``VANSSettings``)."""
    return eval_runner.EvalConfig(num_frames=int(settings.num_frames), height=int(settings.height),
                                  width=int(settings.width), fps=float(settings.fps))


def predict_and_score(pipe, eval_models: eval_runner.Models, csv_path: str, video_root: str, out_dir: str | None, *,
                      num_samples: int | None = None, batch_size: int = 8, seed: int = 0,
                      progress: bool = True) -> dict:
    """Runs the VANS pipeline on the first ``num_samples`` rows and scores its answers with the
    evaluation's core (``eval.runner.score_predictions``: the ground truth through
    ``read_ground_truth``, CLIP features of the decoded videos as they are, ROUGE-L in float32 as
    the Joint-GRPO reward) a batch of ``batch_size`` rows at a time. Writes each prediction under
    ``out_dir/<row index>/`` when ``out_dir`` is given. Returns ``{"metrics": {...}, "per_sample":
    [...], "videos": {index: uint8 frames}}``."""
    from vans_jax.apps.predict import write_prediction
    from vans_jax.pipeline import Clip

    rows = list(read_vnep_csv(csv_path))[:num_samples]
    s = pipe.settings
    config = eval_config(s)
    per, videos = [], {}
    t0 = time.perf_counter()
    for b in range(0, len(rows), batch_size):
        chunk = rows[b:b + batch_size]
        clips = [read_video(os.path.join(video_root, r.input_video_path)) for r in chunk]
        gts = [eval_runner.read_ground_truth(os.path.join(video_root, r.output_video_path), config) for r in chunk]
        out = pipe([Clip(f, fps) for f, fps in clips], [r.question for r in chunk], seed=seed + b)
        scores = eval_runner.score_predictions([a.text for a in out], [a.caption for a in out],
                                               [r.caption for r in chunk], [a.video for a in out], gts,
                                               models=eval_models, config=config, rouge_dtype=np.float32)
        for i, (r, a, sc) in enumerate(zip(chunk, out, scores)):
            rec = dict(index=int(r.index), question=r.question, gt_caption=r.caption, caption=a.caption,
                       text=a.text, **{k: sc[k] for k in REWARDS})
            rec["total_reward"] = rec["format"] + rec["rouge_l"] + rec["clip_v"] + rec["clip_t"]
            ra = render_accuracy(eval_runner.to_eval_geometry(np.asarray(a.video), config), gts[i])
            rec.update({k: ra[k] for k in ("render_iou", "render_color", "render_color_groups", "render_color_right")})
            per.append(rec)
            videos[int(r.index)] = a.video
            if out_dir is not None:
                write_prediction(os.path.join(out_dir, str(r.index)), a,
                                 {"seed": seed + b, "metrics": {k: rec[k] for k in METRICS}}, s.fps,
                                 input_frames=clips[i][0])
        if progress:
            print(f"  evaluated {min(b + batch_size, len(rows))}/{len(rows)} ({time.perf_counter() - t0:.0f}s)",
                  flush=True)
    metrics = {k: float(np.mean([p[k] for p in per])) for k in METRICS if k != "render_color"}
    metrics["render_color"] = pool_render_accuracy(per)["render_color"]   # pooled over (frame, object colour)
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


_HTML_CSS = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; }
table.metrics { border-collapse: collapse; margin: 8px 0 20px; }
table.metrics td, table.metrics th { border: 1px solid #ccc; padding: 4px 10px; text-align: right; }
table.metrics th:first-child, table.metrics td:first-child { text-align: left; }
.sample { border-top: 1px solid #ddd; padding: 12px 0; }
.clips { display: flex; gap: 14px; flex-wrap: wrap; }
figure { margin: 0; }
figure video { width: 192px; height: 192px; background: #000; image-rendering: pixelated; display: block; }
figcaption { width: 192px; font-size: 13px; margin-top: 4px; }
figcaption b { display: block; }
.up { color: #087f23; } .down { color: #b00020; }
"""


def _esc(x) -> str:
    import html
    return html.escape(str(x), quote=True)


def write_index(output_dir: str, result: dict, before: Sequence[dict], after: Sequence[dict], rows,
                video_root: str, max_samples: int = 16) -> str:
    """``output_dir/index.html``: a self-contained page (inline style, no scripts, no network) with
    the before/after metrics table and, per eval sample (at most ``max_samples``), the input, the
    ground truth, the SFT (before) and Joint-GRPO (after) videos side by side, looping, with the
    question, the captions and each side's metrics. The videos are linked by relative paths (the
    data's own mp4s and ``before/<i>/answer.mp4``, ``after/<i>/answer.mp4``), so the folder can be
    copied or served as it is. ``before`` / ``after``: ``predict_and_score``'s ``per_sample``;
    ``rows``: the eval CSV's rows (``read_vnep_csv``)."""
    out = os.path.abspath(output_dir)
    by_index = {int(r.index): r for r in rows}
    after_by = {int(a["index"]): a for a in after}

    def rel(path):
        return _esc(os.path.relpath(os.path.abspath(path), out).replace(os.sep, "/"))

    def video(path, label, text, metrics=None):
        m = "" if metrics is None else "<br>" + " ".join(f"{k}={metrics[k]:.3f}" for k in
                                                          ("total_reward", "rouge_l", "clip_v", "clip_t"))
        return (f'<figure><video src="{rel(path)}" autoplay loop muted playsinline controls preload="auto"></video>'
                f"<figcaption><b>{_esc(label)}</b>{_esc(text)}{m}</figcaption></figure>")

    head = "".join(f"<th>{_esc(k)}</th>" for k in METRICS)
    lines = []
    for name, key in (("SFT (before)", "before"), ("Joint-GRPO (after)", "after")):
        lines.append(f"<tr><td>{_esc(name)}</td>" + "".join(f"<td>{result[key][k]:.4f}</td>" for k in METRICS)
                     + "</tr>")
    delta = "".join(f'<td class="{"up" if result["after"][k] >= result["before"][k] else "down"}">'
                    f'{result["after"][k] - result["before"][k]:+.4f}</td>' for k in METRICS)
    lines.append(f"<tr><td>change</td>{delta}</tr>")
    samples = []
    for b in list(before)[:max_samples]:
        i = int(b["index"])
        a, r = after_by.get(i), by_index.get(i)
        if a is None or r is None:
            continue
        samples.append(
            f'<div class="sample" id="sample-{i}"><h3>#{i}: {_esc(r.question)}</h3><div class="clips">'
            + video(os.path.join(video_root, r.input_video_path), "input", "")
            + video(os.path.join(video_root, r.output_video_path), "ground truth", r.caption)
            + video(os.path.join(out, "before", str(i), "answer.mp4"), "SFT (before)", b["caption"], b)
            + video(os.path.join(out, "after", str(i), "answer.mp4"), "Joint-GRPO (after)", a["caption"], a)
            + "</div></div>")
    st = result.get("settings", {})
    info = ", ".join(f"{k} {st[k]}" for k in ("stage1_steps", "stage2_steps", "group_size", "num_steps", "quick")
                     if k in st)
    page = (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>VANS demo: before / after Joint-GRPO"
            f"</title><style>{_HTML_CSS}</style></head><body><h1>VANS demo: Joint-GRPO on the synthetic world</h1>"
            f"<p>{_esc(info)}; {len(samples)} eval sample(s) shown. Means over "
            f"{int(result['before'].get('num_samples', len(before)))} eval samples:</p>"
            f'<table class="metrics"><tr><th></th>{head}</tr>{"".join(lines)}</table>'
            + ('<p><a href="contact_sheet.png">contact sheet</a> &middot; TensorBoard: '
               "<code>tensorboard --logdir runs</code></p>" if os.path.exists(os.path.join(out, "contact_sheet.png"))
               else "")
            + "".join(samples) + "</body></html>\n")
    from vans_jax._files import write_atomic
    return write_atomic(os.path.join(out, "index.html"), page)


def markdown(before: dict, after: dict) -> str:
    lines = ["| | " + " | ".join(METRICS) + " |", "|---|" + "---|" * len(METRICS)]
    for name, m in (("SFT (before)", before), ("Joint-GRPO (after)", after)):
        lines.append(f"| {name} | " + " | ".join(f"{m[k]:.4f}" for k in METRICS) + " |")
    return "\n".join(lines) + "\n"


def _pipeline(vlm_dir, vdm_dir, settings: dict):
    """The pipeline from model directories (``tools.tiny_world.build``)."""
    from vans_jax.pipeline import VANSPipeline, VANSSettings
    return VANSPipeline.from_pretrained(vlm_dir, vdm_dir, dtype="float32",
                                        settings=VANSSettings.from_dict(settings), attn_impl="xla")


def _pipeline_from(models, settings: dict):
    """The pipeline from models in memory (``train.loop.LoadedModels``)."""
    from vans_jax.pipeline import VANSPipeline, VANSSettings
    return VANSPipeline(models.vlm, models.tokenizer, models.vdm, settings=VANSSettings.from_dict(settings),
                        sources={"vlm": "in memory", "vdm": "in memory"})


def _load_models(cfg):
    """The SFT models, each loaded once (as training loads them: ``vlm.*``, ``vdm.*``, ``clip.*``
    of ``cfg``; the tiny world's config: float32, XLA attention)."""
    from vans_jax.train import loop

    mesh = parallel.make_mesh(dict(cfg.mesh))
    vlm, tok = loop.load_vlm(cfg, mesh, lora=False)
    vdm = loop.load_vdm(cfg, mesh)
    clip_model, clip_tok = loop.load_clip(cfg, mesh)
    return loop.LoadedModels(vlm=vlm, tokenizer=tok, vdm=vdm, clip=clip_model, clip_tokenizer=clip_tok)


def _prepare(cfg, output_dir: str, quick: bool):
    """What the demo and the comparison share: the shipped models' paths (a clear error if they are
    missing), the demo settings (shortened by ``quick``), freshly generated rl / eval splits, which
    ``cfg``'s data section is pointed at, the models (``_load_models``) and the generation settings."""
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
    models = _load_models(cfg)
    return dict(paths=paths, d=d, csvs=csvs, video_root=video_root, settings=settings_from_config(cfg),
                models=models, eval_models=eval_runner.Models(clip=models.clip, tokenizer=models.clip_tokenizer,
                                                              clip_source=cfg.clip.path))


def _score(models, env: dict, out_dir: str | None, progress: bool) -> dict:
    """``predict_and_score`` of the pipeline made of ``models`` on the demo's eval split."""
    d = env["d"]
    return predict_and_score(_pipeline_from(models, env["settings"]), env["eval_models"], env["csvs"]["eval"],
                             env["video_root"], out_dir, num_samples=int(d["eval_samples"]),
                             batch_size=int(d["eval_batch"]), progress=progress)


def run(cfg, output_dir: str, *, quick: bool = False, progress: bool = True) -> dict:
    """The whole demo (module docstring). ``quick``: a shortened form (CI): fewer samples and steps."""
    from vans_jax.train import loop

    t_start = time.perf_counter()
    env = _prepare(cfg, output_dir, quick)
    d, csvs, video_root, settings = env["d"], env["csvs"], env["video_root"], env["settings"]

    def say(msg):
        if progress:
            print(msg, flush=True)

    say(f"[demo] 1/4 evaluating the SFT models on {d['eval_samples']} eval samples")
    before = _score(env["models"], env, os.path.join(output_dir, "before"), progress)
    say("[demo] before: " + ", ".join(f"{k}={before['metrics'][k]:.4f}" for k in METRICS))

    runs = os.path.join(output_dir, "runs")
    timings = {}
    say(f"[demo] 2/4 Joint-GRPO stage 1 ({cfg.train.grpo.stage1_steps} steps: VLM LoRA, VDM frozen)")
    c1 = _copy(cfg)
    c1.train.mode, c1.train.workdir = "grpo_stage1", os.path.join(runs, "grpo_stage1")
    t = time.perf_counter()
    f1 = loop.train(c1, progress=progress, models=env["models"])
    timings["stage1_s"] = time.perf_counter() - t
    stage1 = f1.pop("models")          # the VLM with its LoRA merged: what the export reloads as
    say(f"[demo] 3/4 Joint-GRPO stage 2 ({cfg.train.grpo.stage2_steps} steps: DiT, stage-1 VLM frozen as anchor)")
    c2 = _copy(cfg)
    c2.vlm.path = f1.get("exports", {}).get("vlm", c2.vlm.path)   # a record: the VLM itself comes in memory
    c2.train.mode, c2.train.workdir = "grpo_stage2", os.path.join(runs, "grpo_stage2")
    t = time.perf_counter()
    f2 = loop.train(c2, progress=progress, models=stage1)
    timings["stage2_s"] = time.perf_counter() - t
    stage2 = f2.pop("models")

    say("[demo] 4/4 evaluating the Joint-GRPO models")
    after = _score(stage2, env, os.path.join(output_dir, "after"), progress)
    say("[demo] after:  " + ", ".join(f"{k}={after['metrics'][k]:.4f}" for k in METRICS))
    rows = list(read_vnep_csv(csvs["eval"]))
    from vans_jax.pipeline import VANSSettings
    sheet = contact_sheet(os.path.join(output_dir, "contact_sheet.png"), rows, video_root, before["videos"],
                          after["videos"], VANSSettings.from_dict(settings))
    timings["total_s"] = time.perf_counter() - t_start
    result = {"before": before["metrics"], "after": after["metrics"],
              "training": {"stage1": _last(f1), "stage2": _last(f2)},
              "settings": dict(settings, **training_settings(cfg), quick=bool(quick)),
              "timings": {k: round(v, 1) for k, v in timings.items()},
              "files": {"contact_sheet": sheet, "before": os.path.join(output_dir, "before"),
                        "after": os.path.join(output_dir, "after"), "tensorboard": [os.path.join(runs, r, "tb")
                                                                                   for r in ("grpo_stage1",
                                                                                             "grpo_stage2")]},
              "samples": [{"before": b, "after": a} for b, a in zip(before["per_sample"], after["per_sample"])][:8],
              "device": jax.devices()[0].platform}
    result["files"]["index"] = os.path.join(output_dir, "index.html")
    write_json(os.path.join(output_dir, "metrics.json"), result)
    with open(os.path.join(output_dir, "metrics.md"), "w") as f:
        f.write(markdown(before["metrics"], after["metrics"]))
    write_index(output_dir, result, before["per_sample"], after["per_sample"], rows, video_root)
    say(markdown(before["metrics"], after["metrics"]))
    say(f"[demo] wrote {output_dir}/index.html (open it in a browser), metrics.json, contact_sheet.png, before/ "
        f"after/ (predictions), runs/*/tb (TensorBoard) in {timings['total_s']:.0f}s")
    return result


# A variant: (its name in the table, its runs in order). A run is (mode, overrides of train.grpo); each
# run starts from the models the run before it trained (the first from the shipped SFT models), and a
# run's models pass through the parts its mode does not train. Runs with the same history are trained
# once per seed and shared (Joint-GRPO reuses stage 1's run).
VARIANTS = {
    "grpo_vlm": ("GRPO on the VLM only (r_format + r_t1)", (("grpo_vlm", {}),)),
    "stage1": ("Joint-GRPO stage 1 only", (("grpo_stage1", {}),)),
    "joint_grpo": ("Joint-GRPO (stage 1 + stage 2)", (("grpo_stage1", {}), ("grpo_stage2", {}))),
}
# the rest of the paper's Table 2 (``--variants table2`` runs all of them)
TABLE2_VARIANTS = {
    "grpo_vdm": ("GRPO on the VDM only (r_v2 + r_c2)", (("grpo_vdm", {}),)),
    "isolated_cascaded": ("GRPO on both, isolated then cascaded",
                          (("grpo_vlm", {}), ("grpo_vdm", {}))),
    "stage1_no_t1": ("Stage 1 without r_t1", (("grpo_stage1", {"disabled_rewards": "t1"}),)),
    "stage1_no_v1": ("Stage 1 without r_v1", (("grpo_stage1", {"disabled_rewards": "v1"}),)),
    "joint_no_c2": ("Joint-GRPO without r_c2", (("grpo_stage1", {}), ("grpo_stage2", {"disabled_rewards": "c2"}))),
    "joint_no_v2": ("Joint-GRPO without r_v2", (("grpo_stage1", {}), ("grpo_stage2", {"disabled_rewards": "v2"}))),
    "all_in_one": ("All-in-one (one stage, both models, one joint reward)", (("grpo_all_in_one", {}),)),
}
# the nulls (``--variants nulls``): a DiT-training row with its advantages shuffled within groups
# (``train.grpo.shuffle_advantages``): the same updates with the rewards' link to the rollouts cut, so
# what a row gains beyond its null is what the rewards taught
NULL_VARIANTS = {
    "grpo_vdm_null": ("GRPO on the VDM only, shuffled advantages (null)",
                      (("grpo_vdm", {"shuffle_advantages": True}),)),
    "joint_grpo_null": ("Joint-GRPO, stage 2 with shuffled advantages (null)",
                        (("grpo_stage1", {}), ("grpo_stage2", {"shuffle_advantages": True}))),
}
ALL_VARIANTS = {**VARIANTS, **TABLE2_VARIANTS, **NULL_VARIANTS}
# the table's row order: the paper's Table 2 order, each null after its row
TABLE2_ORDER = ("grpo_vlm", "grpo_vdm", "isolated_cascaded", "stage1", "stage1_no_t1", "stage1_no_v1",
                "joint_no_c2", "joint_no_v2", "all_in_one", "joint_grpo")
ORDER = ("grpo_vlm", "grpo_vdm", "grpo_vdm_null", "isolated_cascaded", "stage1", "stage1_no_t1", "stage1_no_v1",
         "joint_no_c2", "joint_no_v2", "all_in_one", "joint_grpo", "joint_grpo_null")
VARIANT_NAMES = {"sft": "SFT", **{k: v[0] for k, v in ALL_VARIANTS.items()}}


def resolve_variants(names: Sequence[str] | None) -> tuple[str, ...]:
    """``--variants``: names of ``ALL_VARIANTS`` (in ``ORDER``), ``default`` (the three of
    ``VARIANTS``), ``table2`` (all ten) or ``nulls`` (``NULL_VARIANTS``); None = default. Unknown names are an error naming them."""
    if not names:
        return tuple(VARIANTS)
    want: list[str] = []
    for n in names:
        for part in str(n).replace(",", " ").split():
            if part == "table2":
                want += list(TABLE2_ORDER)
            elif part == "default":
                want += list(VARIANTS)
            elif part == "nulls":
                want += list(NULL_VARIANTS)
            elif part in ALL_VARIANTS:
                want.append(part)
            else:
                raise ValueError(f"--variants: unknown variant {part!r}; known: default, table2, nulls, "
                                 + ", ".join(ORDER))
    return tuple(v for v in ORDER if v in want)


def compare(cfg, output_dir: str, *, seeds: Sequence[int] = (0, 1, 2), quick: bool = False,
            progress: bool = True, variants: Sequence[str] | None = None) -> dict:
    """``vans-jax demo --compare``: SFT against GRPO on the VLM only, Joint-GRPO stage 1 only and the
    full Joint-GRPO (``variants``: any rows of the paper's Table 2, see ``ALL_VARIANTS``), each trained
    with every seed in ``seeds`` (the seed sets the RL sampling and the data order) from the shipped
    SFT models and evaluated on the same eval split with the same generation noise. Writes
    ``compare.json`` ({"sft": metrics, "runs": {variant: {seed: metrics}}, "summary": {variant:
    {metric: {mean, std, min, max}}}}) and ``compare.md``. Resumable: finished (variant, seed) pairs
    are kept, also those of variants not asked for this time."""
    from vans_jax.train import loop

    variants = resolve_variants(variants)
    t_start = time.perf_counter()
    env = _prepare(cfg, output_dir, quick)
    d, settings = env["d"], env["settings"]

    def say(msg):
        if progress:
            print(msg, flush=True)

    def score(models):
        return _score(models, env, None, False)["metrics"]

    result_path = os.path.join(output_dir, "compare.json")
    result = {"sft": None, "runs": {v: {} for v in variants}, "seeds": [int(x) for x in seeds]}
    if os.path.exists(result_path):            # resumable: finished (variant, seed) pairs are kept
        with open(result_path) as f:
            old = json.load(f)
        result["sft"] = old.get("sft")
        for v, per_seed in old.get("runs", {}).items():
            if v in ALL_VARIANTS:
                result["runs"].setdefault(v, {}).update(per_seed)
        result["runs"] = {v: result["runs"][v] for v in ORDER if v in result["runs"]}

    def save():
        result["summary"] = summarize(result)
        result["settings"] = dict(settings, **training_settings(cfg), eval_samples=int(d["eval_samples"]),
                                  quick=bool(quick))
        result["variants"] = {v: dict(name=ALL_VARIANTS[v][0],
                                      runs=[dict(mode=m, overrides=dict(o)) for m, o in ALL_VARIANTS[v][1]])
                              for v in result["runs"]}
        result["wall_s"] = round(time.perf_counter() - t_start, 1)
        write_json(result_path, result)
        with open(os.path.join(output_dir, "compare.md"), "w") as f:
            f.write(compare_markdown(result))

    if result["sft"] is None:
        say("[compare] evaluating the SFT models")
        result["sft"] = score(env["models"])
        save()
    for seed in seeds:
        trained: dict = {}                 # run history (tuple of runs) -> the final metrics of its last run
        for variant in variants:
            if str(seed) in result["runs"][variant]:
                continue
            models, history, exports = env["models"], (), {}
            for mode, overrides in ALL_VARIANTS[variant][1]:
                history = history + ((mode, tuple(sorted(overrides.items()))),)
                if history not in trained:
                    c = _copy(cfg)
                    c.seed = int(seed)
                    for k, v in overrides.items():
                        c.train.grpo[k] = v
                    tag = mode + "".join(f"-{k}={v}" for k, v in sorted(overrides.items())).replace(",", "+")
                    prefix = "__".join(h[0] for h in history[:-1])
                    c.train.mode = mode
                    c.train.workdir = os.path.join(output_dir, "runs", f"seed{seed}",
                                                   f"{prefix}__{tag}" if prefix else tag)
                    if exports.get("vlm"):        # a record: the VLM trained before comes in memory
                        c.vlm.path = exports["vlm"]
                    say(f"[compare] seed {seed}: training {' -> '.join(h[0] for h in history)}"
                        + (f" ({', '.join(f'{k}={v}' for k, v in overrides.items())})" if overrides else ""))
                    trained[history] = loop.train(c, progress=progress, models=models)
                models = trained[history]["models"]
                exports = {**exports, **(trained[history].get("exports") or {})}
            say(f"[compare] seed {seed}: evaluating {variant}")
            result["runs"][variant][str(seed)] = score(models)
            m = result["runs"][variant][str(seed)]
            say(f"[compare] seed {seed} {variant}: " + ", ".join(f"{k}={m[k]:.4f}" for k in METRICS))
            save()
            # each variant compiles its own programs (10,300 memory mappings after the SFT evaluation and
            # three variants): many variants x seeds in one process would reach the kernel's mapping
            # limit and crash inside XLA's compiler
            released = compile_cache.release_compiled_programs()
            if released:
                say(f"[compare] released compiled programs: {released[0]} -> {released[1]} memory mappings")
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


# ----------------------------------------------------------------------------- --vlm_only


def _tiny_model(cfg, ids, seed):
    from flax import nnx
    from vans_jax.models import qwen2_5_vl as qwen

    model_dict = dict(cfg.vlm.model.to_dict() if hasattr(cfg.vlm.model, "to_dict") else cfg.vlm.model)
    model_dict.update(vocab_size=ids["vocab_size"], image_token_id=ids["image_pad"], video_token_id=ids["video_pad"],
                      vision_start_token_id=ids["vision_start"], vision_end_token_id=ids["vision_end"],
                      eos_token_id=ids["eos"], pad_token_id=ids["pad"])
    mcfg = qwen.Qwen2_5_VLConfig.from_hf_dict(model_dict, dtype=cfg.vlm.dtype, attn_impl=cfg.vlm.attn_impl,
                                              remat=cfg.vlm.remat)
    return qwen.Qwen2_5_VLModel(mcfg, rngs=nnx.Rngs(seed))


def run_vlm_only(cfg, question: str, output: str | None = None, video: str | None = None) -> dict:
    """``vans-jax demo --vlm_only``: the VLM half of VANS on one clip (``video``, else
    ``data.synthetic.moving_square``) -> ``generation.num_return_sequences`` sampled answers, with timings.

    With ``vlm.path`` empty, a tiny random Qwen2.5-VL and a tiny tokenizer are built on the fly (no
    weights, no network), so the whole path - frame sampling, the Qwen processor, the chat template
    with the VANS system prompt, M-RoPE, the jitted prefill + decode loop - runs anywhere. With
    ``vlm.path`` set, the checkpoint and its tokenizer are loaded from that local directory."""
    from vans_jax.models import qwen2_5_vl as qwen
    from vans_jax.models.qwen2_5_vl import processor, tokenizer as tok_lib
    from vans_jax.rl.format import TAGS, format_response, parse_response

    seed = int(cfg.seed)
    mesh = parallel.make_mesh(dict(cfg.mesh))
    t0 = time.perf_counter()
    if cfg.vlm.path:
        tokenizer = tok_lib.load_tokenizer(cfg.vlm.path)
        model = qwen.from_pretrained(cfg.vlm.path, dtype=cfg.vlm.dtype, mesh=mesh, attn_impl=cfg.vlm.attn_impl)
    else:
        tok_dir = tempfile.mkdtemp(prefix="vans_tok_")
        ids = tok_lib.build_tiny_tokenizer(
            tok_dir, vocab_texts=[question, format_response(" the square moves right. ", " the square keeps moving right.")],
            added_tokens=TAGS)
        tokenizer = tok_lib.load_tokenizer(tok_dir)
        model = parallel.shard_module(_tiny_model(cfg, ids, seed), mesh)
    load_s = time.perf_counter() - t0

    if video:
        frames, fps = read_video(video)
    else:
        frames, fps = synthetic.moving_square(12, 84, 112, seed=seed), 4.0
    vlm_frames, vlm_fps = processor.sample_frames_for_vlm(frames, fps, num_frames=cfg.vlm.num_frames,
                                                          sample_fps=cfg.vlm.sample_fps)
    pixels, grid, seconds = processor.preprocess_videos([vlm_frames], vlm_fps, min_pixels=cfg.vlm.video_min_pixels,
                                                        max_pixels=cfg.vlm.video_max_pixels)
    enc = tok_lib.encode_prompts(tokenizer, [question], grid, merge_size=model.config.vision.spatial_merge_size)
    batch = qwen.prepare_inputs(model.config, enc["input_ids"], enc["attention_mask"], pixels, grid, seconds)
    g = cfg.generation
    kwargs = dict(max_new_tokens=int(g.max_new_tokens), temperature=float(g.temperature), top_p=float(g.top_p),
                  top_k=int(g.top_k), num_return_sequences=int(g.num_return_sequences))
    t1 = time.perf_counter()
    out = qwen.generate(model, batch, rng=jax.random.key(seed), **kwargs)
    jax.block_until_ready(out.tokens)
    first_s = time.perf_counter() - t1
    t2 = time.perf_counter()
    out = qwen.generate(model, batch, rng=jax.random.key(seed), **kwargs)
    jax.block_until_ready(out.tokens)
    steady_s = time.perf_counter() - t2
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    texts = [tokenizer.decode(tokens[i, :lengths[i]], skip_special_tokens=True) for i in range(len(tokens))]
    n_new = int(lengths.sum())
    result = dict(
        question=question,
        model="random tiny Qwen2.5-VL" if not cfg.vlm.path else cfg.vlm.path,
        video=video or "synthetic moving square",
        vlm_frames=int(vlm_frames.shape[0]), video_grid_thw=grid.tolist(), prompt_tokens=int(enc["input_ids"].shape[1]),
        answers=[dict(text=t, logprob=float(np.asarray(out.logprobs)[i].sum()), tokens=int(lengths[i]),
                      **parse_response(t)) for i, t in enumerate(texts)],
        timings=dict(load_s=round(load_s, 3), first_call_s=round(first_s, 3), steady_s=round(steady_s, 3),
                     new_tokens=n_new, tokens_per_s=round(n_new / steady_s, 1)),
        device=str(jax.devices()[0].platform), num_devices=len(jax.devices()),
    )
    if output:
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        with open(output, "w") as f:
            json.dump(result, f, indent=2)
    return result


def _last(final: dict) -> dict:
    return {k: v for k, v in final.items() if k.startswith(("reward/", "vlm/", "dit/", "anchor/"))}


def _copy(cfg):
    import copy
    return copy.deepcopy(cfg)


__all__ = ["run", "compare", "run_vlm_only", "predict_and_score", "eval_config", "contact_sheet", "write_index",
           "METRICS"]
