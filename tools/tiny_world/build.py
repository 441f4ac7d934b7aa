"""Builds the tiny VANS models of the synthetic world that ship in ``data/models/tiny_world``.

    python -m tools.tiny_world.build [--out data/models/tiny_world] [--work /tmp/vans_world_build]
                                   [--train_samples 1500] [--quick] [--chains parallel|sequential]

Steps (all on CPU, minutes): generate the world's train / eval splits; train a tokenizer on the
world's text and start a random Qwen2.5-VL from it; SFT it (``vans-jax train`` mode sft_vlm); train
a tiny CLIP contrastively on the world's frames and captions (the reward model); train a tiny Wan VAE
on the world's clips, then its decoder alone on the decoded mp4s (``vae_decoder_recipe``), and assemble a diffusers Wan directory (random tiny DiT, a tiny UMT5, UniPC
scheduler); SFT the DiT (mode sft_vdm). The results are written in their real checkpoint layouts
(Hugging Face Qwen2.5-VL + tokenizer, diffusers Wan, Hugging Face CLIP) with ``defaults.json`` (the
world's generation settings) and ``BUILD.json`` (what was run and the measured quality).

The VLM's chain (tokenizer, SFT-VLM, CLIP) and the DiT's (VAE, its decoder, SFT-VDM) are independent: by default
they run side by side in two processes on disjoint CPUs (``--chains parallel``, logs in
``<work>/chain_vlm.log`` and ``chain_vdm.log``), so the build takes about as long as the longer chain.
Every stage is resumable: run the same command again after a stop.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time

import numpy as np

from vans_jax.apps.configlib import load_config
from vans_jax.data import synthetic

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(REPO, "configs", "tiny_world.py")


def write_vdm_dir(out_dir: str, *, dit_config: dict, vae_dir: str, texts, seed: int = 0, shift: float = 3.0,
                  umt5: dict | None = None) -> str:
    """A complete diffusers Wan directory: a random DiT (``dit_config``, our export), the trained VAE
    (copied), a tiny random UMT5 encoder and a T5 tokenizer over the world's words (built with
    transformers + torch: the build needs the test extra), a UniPC flow scheduler config and
    model_index.json. Loads with ``vans_jax.models.wan.from_pretrained``."""
    import re

    import torch
    import transformers
    from flax import nnx

    from vans_jax.convert.wan_dit import diffusers_version, export_dit_diffusers
    from vans_jax.models.wan.dit import WanConfig, WanTransformer3D

    os.makedirs(out_dir, exist_ok=True)
    dc = dict(dit_config)
    cfg = WanConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in dc.items()})
    os.makedirs(os.path.join(out_dir, "transformer"), exist_ok=True)
    export_dit_diffusers(WanTransformer3D(cfg, rngs=nnx.Rngs(seed)), os.path.join(out_dir, "transformer"))
    shutil.copytree(vae_dir, os.path.join(out_dir, "vae"), dirs_exist_ok=True)
    words = sorted({w.lower() for t in texts for w in re.findall(r"[A-Za-z]+", t)})
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + w, -3.0) for w in words] + [(c, -6.0) for c in "abcdefghijklmnopqrstuvwxyz.,?'"]
    tok = transformers.T5Tokenizer(vocab=vocab, extra_ids=0)
    tok.save_pretrained(os.path.join(out_dir, "tokenizer"))
    u = dict(vocab_size=len(vocab), d_model=int(cfg.text_dim), d_kv=16, num_heads=4, d_ff=2 * int(cfg.text_dim),
             num_layers=2, relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.0)
    u.update(umt5 or {})
    torch.manual_seed(seed)
    te = transformers.UMT5EncoderModel(transformers.UMT5Config(**u)).eval()
    with torch.no_grad():   # random init has tiny outputs after the final norm; give the embeddings scale
        te.shared.weight.normal_(0.0, 1.0)
    te.save_pretrained(os.path.join(out_dir, "text_encoder"), safe_serialization=True)
    os.makedirs(os.path.join(out_dir, "scheduler"), exist_ok=True)
    sched = {"_class_name": "UniPCMultistepScheduler", "_diffusers_version": diffusers_version(),
             "prediction_type": "flow_prediction", "use_flow_sigmas": True, "flow_shift": float(shift),
             "num_train_timesteps": 1000, "solver_order": 2, "predict_x0": True, "solver_type": "bh2",
             "lower_order_final": True, "timestep_spacing": "linspace"}
    with open(os.path.join(out_dir, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(sched, f, indent=2)
    index = {"_class_name": "WanPipeline", "_diffusers_version": diffusers_version(),
             "scheduler": ["diffusers", "UniPCMultistepScheduler"], "text_encoder": ["transformers", "UMT5EncoderModel"],
             "tokenizer": ["transformers", "T5Tokenizer"], "transformer": ["diffusers", "WanTransformer3DModel"],
             "vae": ["diffusers", "AutoencoderKLWan"]}
    with open(os.path.join(out_dir, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2)
    return out_dir


# The SFT runs of the build, in order: each phase starts from the previous phase's export (the first
# from the random init) with a fresh cosine schedule. Tiny models learn the world's grounding (which
# object, which colour, which event) slowly: one short run left the VLM answering the most common
# caption (1/32 exact on eval after 800 x 2); 5000 x 4 then 4000 x 8 examples are about 35 epochs.
SFT_PHASES = {
    "sft_vlm": ({"steps": 5000, "batch_size": 4, "lr": 2e-3}, {"steps": 4000, "batch_size": 8, "lr": 1e-3}),
    # the third phase (issue 14): 48,000 more examples (32 epochs, cheap once the latents are cached) at a
    # lower lr with a parameter EMA (what is exported); measured on 32 eval clips, renders of the true
    # caption: CLIP-V 0.227 -> 0.346, render IoU 0.376 -> 0.445, object colour 0.433 -> 0.450 (old CLIP,
    # old colour rule). Phases 4 and 5 (56,000 more examples at 5e-5, EMA), same measure with the
    # current CLIP and colour rule: CLIP-V 0.610 -> 0.634 -> 0.653, IoU 0.445 -> 0.453 -> 0.465,
    # colour 0.525 -> 0.574 -> 0.571. Phases 6 and 7 (128,000 more examples at 5e-5, EMA; 36 min each on one
    # core), renders of the true caption at CFG 2 on 96 eval clips x noise seeds 0-2: CLIP-V 0.596 -> 0.630 ->
    # 0.649, IoU 0.473 -> 0.492 -> 0.503, colour 0.510 -> 0.539 -> 0.560. Phase 8 (eighth session of
    # 2026-12-05, the 3.9M DiT on the decoder stage's VAE; 40,000 more examples, the loss weighting
    # foreground latent cells 5x: train.sft_vdm.fg_weight 4), 96 x 3 as above: CLIP-V 0.757 -> 0.765,
    # IoU 0.593 -> 0.594, colour 0.762 -> 0.777 by the current colour rule (the numbers before it are by
    # earlier rules; README), every seed up in CLIP-V and colour; the same phase with the plain loss:
    # 0.762 / 0.596 / 0.772
    "sft_vdm": ({"steps": 1500, "batch_size": 2, "lr": 1e-3}, {"steps": 3000, "batch_size": 4, "lr": 5e-4},
                {"steps": 6000, "batch_size": 8, "lr": 1e-4, "ema_decay": 0.999, "warmup_steps": 200},
                {"steps": 3000, "batch_size": 8, "lr": 5e-5, "ema_decay": 0.999, "warmup_steps": 100},
                {"steps": 4000, "batch_size": 8, "lr": 5e-5, "ema_decay": 0.999, "warmup_steps": 100},
                {"steps": 8000, "batch_size": 8, "lr": 5e-5, "ema_decay": 0.999, "warmup_steps": 100},
                {"steps": 8000, "batch_size": 8, "lr": 5e-5, "ema_decay": 0.999, "warmup_steps": 100},
                {"steps": 5000, "batch_size": 8, "lr": 5e-5, "ema_decay": 0.999, "warmup_steps": 100, "fg_weight": 4.0}),
}


def vae_recipe(quick: bool = False) -> dict:
    """The build's VAE: ``spec`` (architecture) and ``train_config`` for ``train_vae`` (empty: their
    defaults, z16 base 8, what ships). The DiT's ``in_channels`` / ``out_channels`` follow the trained
    VAE's ``z_dim`` (``build``), so a recipe with other latent channels needs no other change.
    Measured and not yet the recipe (README, "More latent channels"): z32 base 16, 40,000 image steps."""
    from tools.tiny_world.vae_train import VAETrainConfig

    return {"train_config": VAETrainConfig(image_steps=4, steps=4, batch_size=2)} if quick else {}


def vae_decoder_recipe(quick: bool = False):
    """The build's second VAE stage, ``vae_decoder``: ``train_vae`` from the first stage's VAE with only
    the decoder (and ``post_quant_conv``) training, on the decoded mp4s' latents against the exact
    frames, with the edge term. The encoder and the latent statistics stay, so the DiT's latent space
    (and SFT-VDM, which sees only latents) is the same; what improves is how every latent, the DiT's
    renders included, is decoded. Measured (seventh session of 2026-12-05, README): eval PSNR 24.8 ->
    26.5 dB against the mp4s; the shipped DiT's renders of the true caption (96 eval clips x 3 noise
    seeds) CLIP-V 0.714 -> 0.757, render IoU 0.543 -> 0.593, object colour 0.642 -> 0.700."""
    from tools.tiny_world.vae_train import VAETrainConfig

    common = dict(image_steps=0, lr=5e-4, edge_weight=1.0, input_source="video", trainable="decoder")
    if quick:
        return VAETrainConfig(steps=4, batch_size=2, warmup_steps=1, **common)
    return VAETrainConfig(steps=2500, batch_size=4, warmup_steps=100, **common)


def _recipe_key(recipe) -> dict:
    """A ``VAETrainConfig`` as JSON-stable data (the ``vae_decoder`` stage's key)."""
    return json.loads(json.dumps(dataclasses.asdict(recipe)))


def _train(cfg, mode, workdir, *, steps=None, batch_size=None, lr=None, **settings):
    """``vans-jax train`` in ``mode``; ``settings``: ``section__key`` set ``cfg[section][key]`` (paths),
    any other key sets ``cfg.train[mode][key]`` (e.g. ``ema_decay``, ``warmup_steps``)."""
    import copy

    from vans_jax.train import loop
    c = copy.deepcopy(cfg)
    c.train.mode, c.train.workdir, c.train.export_link = mode, workdir, False
    if steps is not None:
        c.train[mode].steps = int(steps)
    if batch_size is not None:
        c.train.batch_size = int(batch_size)
    if lr is not None:
        c.train[mode].lr = float(lr)
    for k, v in settings.items():
        if "__" in k:
            section, key = k.split("__")
            c[section][key] = v
        else:
            c.train[mode][k] = v
    return loop.train(c)


def _spearman(a, b) -> float:
    """Spearman rank correlation (average ranks for ties); nan when either side is constant."""
    from scipy.stats import rankdata

    ra, rb = rankdata(a), rankdata(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def measure_quality(world_dir: str, data_dir: str, *, num_samples: int = 32, batch_size: int = 8,
                    seeds=(0,)) -> dict:
    """What the shipped SFT models can do on the first ``num_samples`` eval clips, each part alone:
    the VLM's greedy answers (exact-caption accuracy, ROUGE-L, valid format) and the DiT's renderings
    of the ground-truth captions with the input's reference latents (seed 0 noise), scored against
    the ground-truth next event by CLIP-V and by the world's exact render accuracy
    (``rl.render_accuracy``: foreground IoU, object colour), next to a control that needs no
    model: the input's last frame repeated, and the ceiling the VAE sets for any DiT on its latents
    (``vae_recon_*``: the true next event encoded and decoded by the VAE, scored the same way).
    ``vdm_clip_v_vs_iou_spearman``: how CLIP-V ranks the renders against how the exact IoU does.
    ``*_render_color_confusion``: which colour each true colour group was read as
    (``rl.render_accuracy``; rows the world's colours, columns ``render_color_confusion_labels``).

    ``seeds``: the DiT's noise seeds; each clip is rendered once per seed, and the ``vdm_*`` numbers
    are over all those renders (with several seeds also ``vdm_*_per_seed``, in the order of
    ``noise_seeds``), so a difference between two DiTs can be told from the sampling noise."""
    seeds = [int(x) for x in seeds]
    if not seeds:
        raise ValueError("measure_quality: seeds must name at least one noise seed")
    from vans_jax.data.csv_format import read_vnep_csv
    from vans_jax.data.video_io import read_video
    from vans_jax.convert import clip as clip_ckpt
    from vans_jax.models import clip as clip_lib
    from vans_jax.pipeline import Clip
    from vans_jax.rl.rewards import clip_video_similarity, format_reward, rouge_l_reward
    from vans_jax.apps.tiny_world import load_defaults, tiny_world_paths
    from vans_jax.apps.demo import _pipeline, eval_config
    from vans_jax.eval import runner as eval_runner
    from vans_jax.rl.render_accuracy import CONFUSION_LABELS, mean_render_accuracy
    from vans_jax.data.video_io import resize_center_crop
    from vans_jax.sampling import wan

    paths = tiny_world_paths(world_dir)
    defaults = load_defaults(world_dir)
    settings = {k: v for k, v in defaults.items() if k != "world"}
    settings.update(temperature=0.0)
    pipe = _pipeline(paths["vlm"], paths["vdm"], settings)
    config = eval_config(pipe.settings)
    clip_model = clip_ckpt.from_pretrained(paths["clip"])
    rows = list(read_vnep_csv(os.path.join(data_dir, "eval.csv")))[:num_samples]
    root = os.path.join(data_dir, "videos")
    texts, caps, sims_last, sims_rec, pairs_last, pairs_rec = [], [], [], [], [], []
    sims, pairs = {sd: [] for sd in seeds}, {sd: [] for sd in seeds}
    s = pipe.settings

    def vae_roundtrip(path):
        frames = np.asarray(read_video(path)[0])[:s.num_frames]
        if frames.shape[0] != s.num_frames:
            raise ValueError(f"{path}: {frames.shape[0]} frames, the VAE round trip needs {s.num_frames}")
        if frames.shape[1:3] != (s.height, s.width):
            frames = resize_center_crop(frames, s.height, s.width)
        video = (frames.astype(np.float32) / 127.5 - 1.0).transpose(3, 0, 1, 2)[None]
        return eval_runner.to_eval_geometry(wan.decode_latents(pipe.vdm, wan.encode_video(pipe.vdm, video))[0], config)

    def clip_v(a, b):
        return np.asarray(clip_video_similarity(clip_lib.encode_frames(clip_model, a),
                                                clip_lib.encode_frames(clip_model, b))).tolist()

    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        clips = [Clip(*read_video(os.path.join(root, r.input_video_path))) for r in chunk]
        ans = pipe.answer(clips, [r.question for r in chunk])
        texts += ans.texts
        caps += ans.captions
        gt = np.stack([eval_runner.read_ground_truth(os.path.join(root, r.output_video_path), config)
                       for r in chunk])
        for sd in seeds:
            gen = np.stack([eval_runner.to_eval_geometry(np.asarray(v), config)
                            for v in pipe.render(clips, [r.caption for r in chunk], seed=sd)])
            f = min(gen.shape[1], gt.shape[1])
            sims[sd] += clip_v(gen[:, :f], gt[:, :f])
            pairs[sd] += [(g[:f], t[:f]) for g, t in zip(gen, gt)]
        last = np.stack([np.repeat(eval_runner.to_eval_geometry(c.frames[-1:], config), gt.shape[1], 0)
                         for c in clips])
        rec = np.stack([vae_roundtrip(os.path.join(root, r.output_video_path)) for r in chunk])
        fr = min(rec.shape[1], gt.shape[1])
        sims_last += clip_v(last, gt)
        sims_rec += clip_v(rec[:, :fr], gt[:, :fr])
        pairs_last += list(zip(last, gt))
        pairs_rec += [(g[:fr], t[:fr]) for g, t in zip(rec, gt)]
    gts = [r.caption for r in rows]
    all_sims = [x for sd in seeds for x in sims[sd]]
    ra = mean_render_accuracy([p for sd in seeds for p in pairs[sd]])
    ra_last, ra_rec = mean_render_accuracy(pairs_last), mean_render_accuracy(pairs_rec)
    per_seed = {}
    if len(seeds) > 1:
        ra_seed = [mean_render_accuracy(pairs[sd]) for sd in seeds]
        per_seed = {"vdm_clip_v_gt_caption_per_seed": [float(np.mean(sims[sd])) for sd in seeds],
                    "vdm_render_iou_gt_caption_per_seed": [r["render_iou"] for r in ra_seed],
                    "vdm_render_color_gt_caption_per_seed": [r["render_color"] for r in ra_seed]}
    return {"num_samples": len(rows),
            "noise_seeds": seeds,
            "vlm_exact_caption": float(np.mean([c == g for c, g in zip(caps, gts)])),
            "vlm_rouge_l": float(np.mean(rouge_l_reward(caps, gts, extract=False))),
            "vlm_format": float(np.mean(format_reward(texts))),
            "vdm_clip_v_gt_caption": float(np.mean(all_sims)),
            "vdm_render_iou_gt_caption": ra["render_iou"],
            "vdm_render_color_gt_caption": ra["render_color"],
            **per_seed,
            "vdm_clip_v_vs_iou_spearman": _spearman(all_sims, ra["render_iou_per_clip"]),
            "last_frame_clip_v": float(np.mean(sims_last)),
            "last_frame_render_iou": ra_last["render_iou"],
            "last_frame_render_color": ra_last["render_color"],
            "vae_recon_clip_v": float(np.mean(sims_rec)),
            "vae_recon_render_iou": ra_rec["render_iou"],
            "vae_recon_render_color": ra_rec["render_color"],
            # where each true colour went (rows COLOR_NAMES, columns CONFUSION_LABELS), renders and VAE round trip
            "render_color_confusion_labels": list(CONFUSION_LABELS),
            "vdm_render_color_confusion": ra["render_color_confusion"],
            "vae_recon_render_color_confusion": ra_rec["render_color_confusion"]}


def _timed(fn, *a, **kw) -> dict:
    start, t = time.time(), time.perf_counter()
    rep = fn(*a, **kw)
    rep["wall_s"] = time.perf_counter() - t
    rep["started_at"], rep["ended_at"] = start, time.time()     # epoch seconds: when chains overlapped
    return rep


# The build's two independent chains of stages (after the world's data, before the assembly): the VLM's
# (tokenizer, SFT-VLM phases, then the CLIP reward model, which needs only the data) and the DiT's (VAE,
# its decoder fine-tune, then the SFT-VDM phases on its latents). Neither reads the other's output, so ``--chains parallel`` (the
# default) runs them side by side, each in its own process on its own cores; the build then takes as
# long as the longer chain instead of the sum.
# the report entries (stages) of each chain, in order; a chain's time is the sum of theirs
CHAIN_REPORTS = {"vlm": ("tokenizer", "sft_vlm", "clip"), "vdm": ("vae", "vae_decoder", "sft_vdm")}
CHAINS = tuple(CHAIN_REPORTS)


def split_cpus(cpus) -> dict:
    """``{"vlm": [...], "vdm": [...]}``: the CPUs each chain runs on, the larger half to the DiT's chain
    (the longer one: 209 min against 78 on one core each by the shipped build's stage times). Needs 2 CPUs or more."""
    cpus = sorted(cpus)
    if len(cpus) < 2:
        raise ValueError(f"split_cpus: running the chains side by side needs 2 CPUs, this process may use {cpus}")
    k = (len(cpus) + 1) // 2
    return {"vdm": cpus[:k], "vlm": cpus[k:]}


def chain_env(cpus, env=None) -> dict:
    """The environment of a chain's process on ``cpus``: on one CPU, XLA's CPU backend without its
    multi-threaded Eigen pool and OpenMP with one thread (two pools on one core slow each other), unless
    the user's ``XLA_FLAGS`` already says; on more, the thread count of OpenMP set to them."""
    env = dict(os.environ if env is None else env)
    env["OMP_NUM_THREADS"] = str(len(cpus))
    if len(cpus) == 1 and "xla_cpu_multi_thread_eigen" not in env.get("XLA_FLAGS", ""):
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()
    return env


def run_chains(commands: dict, work: str, cpus: dict, *, poll_s: float = 2.0) -> dict:
    """Runs each chain's command (``{name: argv}``) in its own process, pinned to ``cpus[name]`` (Linux),
    its output appended to ``<work>/chain_<name>.log``, all at once; waits for them. When one fails the
    others are stopped (their finished stages stay done: the build resumes from them) and a
    ``RuntimeError`` names the chain, its exit status and log, with the log's last lines. Returns
    ``{name: {"cpus", "log", "wall_s", "started_at", "ended_at"}}``."""
    import subprocess

    procs, info = {}, {}
    try:
        for name, argv in commands.items():
            log = os.path.join(work, f"chain_{name}.log")
            mine = sorted(cpus[name])
            f = open(log, "a")
            f.write(f"\n[build] chain {name} on CPUs {mine}: {' '.join(argv)}\n")
            f.flush()
            pin = (lambda c=mine: os.sched_setaffinity(0, c)) if hasattr(os, "sched_setaffinity") else None
            info[name] = {"cpus": mine, "log": log, "started_at": time.time(), "_t": time.perf_counter(), "_f": f}
            procs[name] = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=chain_env(mine),
                                           preexec_fn=pin, cwd=REPO)
            print(f"[build] chain {name} started on CPUs {mine} (log: {log})", flush=True)
        running = dict(procs)
        while running:
            time.sleep(poll_s)
            for name, p in list(running.items()):
                rc = p.poll()
                if rc is None:
                    continue
                del running[name]
                i = info[name]
                i["wall_s"], i["ended_at"] = time.perf_counter() - i.pop("_t"), time.time()
                i.pop("_f").close()
                if rc != 0:
                    raise RuntimeError(f"build chain {name!r} failed (exit status {rc}); its log: {i['log']}\n"
                                       + _tail(i["log"]) + "\nthe stages finished so far are kept: run the same "
                                       "command again to resume")
                print(f"[build] chain {name} done in {i['wall_s']:.0f}s", flush=True)
    finally:
        for name, p in procs.items():
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
                print(f"[build] chain {name} stopped (its finished stages are kept)", flush=True)
            f = info.get(name, {}).pop("_f", None)
            if f is not None:
                f.close()
    return {n: {k: v for k, v in i.items() if not k.startswith("_")} for n, i in info.items()}


def _tail(path: str, n: int = 20) -> str:
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-n:])


def chain_command(name: str, *, out: str, work: str, train_samples: int, eval_samples: int, quick: bool,
                  seed: int) -> list[str]:
    """The command line of one chain's process (``--chain name``): this build's own world arguments, so
    its stages' keys are the parent's."""
    argv = [sys.executable, "-m", "tools.tiny_world.build", "--chain", name, "--out", os.path.abspath(out),
            "--work", os.path.abspath(work),
            "--train_samples", str(train_samples), "--eval_samples", str(eval_samples), "--seed", str(seed)]
    return argv + (["--quick"] if quick else [])


KEEPABLE = ("vlm", "clip", "vdm")


def vdm_arch(vdm_dir: str) -> dict:
    """What the DiT of an SFT-VDM stage is, read from the diffusers directory it starts from: the
    transformer's and the VAE's configs (architecture, latent channels, latent statistics). Part of
    those stages' keys, so a build whose DiT size or VAE changed trains the phases again instead of
    reusing ones trained for another DiT."""
    arch = {}
    for sub in ("transformer", "vae"):
        path = os.path.join(vdm_dir, sub, "config.json")
        if os.path.isfile(path):
            with open(path) as f:
                arch[sub] = {k: v for k, v in json.load(f).items() if not k.startswith("_")}
    return arch


def keep_stages(parts, previous: str, work: str, key: dict) -> list[str]:
    """Seeds ``work`` with the stages of ``parts`` from a previous build's output directory ``previous``
    (its models and ``BUILD.json``), so that a rebuild reuses them and trains only the rest:

    * ``"vlm"``: the tokenizer and every SFT-VLM phase;
    * ``"clip"``: the CLIP reward model;
    * ``"vdm"``: the VAE (as the ``vae`` stage, and as the ``vae_decoder`` stage when the previous build
      had one) and the SFT-VDM phases the previous build ran; phases that ``SFT_PHASES`` adds after
      them then train on top of the previous DiT.

    The previous build must have had the same world (``train_samples``, ``eval_samples``, ``seed``) and
    its SFT phases must be the first ones of ``SFT_PHASES`` (steps, batch size, lr and any other
    setting). A stage already in ``work`` is left alone. Returns the stage names seeded."""
    if not parts:
        return []
    path = os.path.join(previous, "BUILD.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--keep needs a previous build: no BUILD.json in {previous}")
    with open(path) as f:
        prev = json.load(f)
    same = {k: prev.get(k) for k in ("train_samples", "eval_samples", "seed")}
    want = {k: key[k] for k in same}
    if same != want:
        raise ValueError(f"--keep: {path} was built with {same}, this build uses {want}")
    seeded = []
    kept_from = os.path.abspath(previous)

    def seed_stage(name, report, extra=None):
        marker = os.path.join(work, f"{name}.done.json")
        if os.path.exists(marker):
            return
        with open(marker, "w") as f:
            json.dump({"key": dict(key, **(extra or {})), "report": dict(report, kept_from=kept_from)},
                      f, indent=2, default=str)
        seeded.append(name)

    def seed_sft(mode, part, init, dst, arch=None):
        """The stages of the previous build's ``mode`` phases (a prefix of SFT_PHASES[mode]); ``arch``:
        the kept DiT's ``vdm_arch`` (sft_vdm)."""
        phases, done = SFT_PHASES[mode], prev[mode]["phases"]
        n = len(done)
        if n > len(phases) or any({k: d.get(k) for k in ph} != ph for ph, d in zip(phases, done)):
            raise ValueError(f"--keep: {path}'s {mode} phases {[{k: d.get(k) for k in ('steps', 'batch_size', 'lr')} for d in done]} "
                             f"are not the first phases of SFT_PHASES[{mode!r}] = {list(phases)}")
        src = init
        for i in range(n):
            last = i == n - 1
            export = dst if last else os.path.join(work, "kept", f"{part}_phase{i + 1}")
            report = dict(prev[mode] if last and n == len(phases) else done[i], wall_s=done[i]["wall_s"],
                          exports={part: export})
            seed_stage(mode if i == 0 else f"{mode}_{i + 1}", report,
                       extra={"phase": phases[i], "init": src, "after": list(phases[:i]),
                              **({"model": arch} if arch is not None else {})})
            src = export

    for part in parts:
        if part not in KEEPABLE:
            raise ValueError(f"--keep: unknown part {part!r}; choose from {', '.join(KEEPABLE)}")
        src = os.path.join(previous, part)
        if not os.path.isdir(src):
            raise FileNotFoundError(f"--keep {part}: no {src}")
        if part == "clip":
            shutil.copytree(src, os.path.join(work, "clip"), dirs_exist_ok=True)
            seed_stage("clip", prev["clip"])
        elif part == "vlm":
            dst = os.path.join(work, "kept", "vlm")
            shutil.copytree(src, dst, dirs_exist_ok=True)
            seed_stage("vlm_init", prev["tokenizer"])
            seed_sft("sft_vlm", "vlm", os.path.join(work, "vlm_init"), dst)
        else:
            dst = os.path.join(work, "kept", "vdm")
            shutil.copytree(src, dst, dirs_exist_ok=True, symlinks=False)
            shutil.copytree(os.path.join(src, "vae"), os.path.join(work, "vae"), dirs_exist_ok=True)
            seed_stage("vae", prev["vae"])
            if "vae_decoder" in prev:
                # the shipped VAE is the decoder stage's output: keep it as that stage's too (a previous build
                # without the stage has a first-stage VAE, on which this build's decoder stage then trains)
                shutil.copytree(os.path.join(src, "vae"), os.path.join(work, "vae_decoder"), dirs_exist_ok=True)
                seed_stage("vae_decoder", prev["vae_decoder"],
                           extra={"recipe": _recipe_key(vae_decoder_recipe(bool(key.get("quick"))))})
            seed_sft("sft_vdm", "vdm", os.path.join(work, "vdm_init"), dst, arch=vdm_arch(src))
    return seeded


def build(out: str, work: str, *, train_samples: int = 1500, eval_samples: int = 100, quick: bool = False,
          seed: int = 0, keep=(), previous: str | None = None, chains: str = "sequential",
          chain: str | None = None) -> dict:
    """Builds (or resumes building) the world's models into ``out``, the stages' work in ``work``.

    ``chains``: ``"sequential"`` runs every stage in this process; ``"parallel"`` (the command line's
    default) runs the two chains of ``CHAINS`` side by side in two processes on disjoint CPUs
    (``run_chains``; on one CPU it falls back to sequential), then assembles and measures here.
    ``chain``: run only that chain's stages (and the world's data) and return their reports, without
    assembling (what each process of a parallel build does)."""
    if chains not in ("sequential", "parallel"):
        raise ValueError(f"build: chains must be 'sequential' or 'parallel', got {chains!r}")
    if chain is not None and chain not in CHAINS:
        raise ValueError(f"build: chain must be one of {CHAINS}, got {chain!r}")
    from vans_jax.pipeline import VANSSettings
    from tools.tiny_world.clip_train import train_clip
    from tools.tiny_world.vae_train import train_vae
    from tools.tiny_world.vlm_init import init_vlm_dir
    from vans_jax.apps.demo import settings_from_config

    t0 = time.perf_counter()
    cfg = load_config(CONFIG)
    if quick:
        train_samples, eval_samples = 32, 8
    os.makedirs(work, exist_ok=True)
    wc = synthetic.WorldConfig()
    data = os.path.join(work, "data")
    # a stage whose ``<work>/<name>.done.json`` exists (same build arguments) is reused: a killed or
    # partly changed build reruns only what is missing (delete the file to redo a stage)
    key = {"train_samples": train_samples, "eval_samples": eval_samples, "quick": quick, "seed": seed}
    for name in keep_stages(keep, previous or out, work, key):
        print(f"[build] kept {name} from {previous or out}", flush=True)

    def stage(name, fn, extra=None):
        marker = os.path.join(work, f"{name}.done.json")
        skey = dict(key, **(extra or {}))
        if os.path.exists(marker):
            with open(marker) as f:
                done = json.load(f)
            if done.get("key") == skey:
                print(f"[build] reusing {name} ({marker})", flush=True)
                return done["report"]
        rep = fn()
        with open(marker + ".tmp", "w") as f:
            json.dump({"key": skey, "report": rep}, f, indent=2, default=str)
        os.replace(marker + ".tmp", marker)
        return rep

    def world():
        return {s: synthetic.generate_world(data, s, n, config=wc).csv_path
                for s, n in (("train", train_samples), ("eval", eval_samples))}

    def sft_phases(mode, part, init):
        """Every phase of SFT_PHASES[mode] (a stage each: ``sft_vlm``, ``sft_vlm_2``, ...); the report of
        the last one, with all phases listed."""
        phases = SFT_PHASES[mode] if not quick else ({"steps": 4, "batch_size": 2, "lr": 1e-3},)
        src, reps = init, []
        # the DiT's size and VAE are part of every SFT-VDM phase's key (a changed one reruns them all)
        arch = {"model": vdm_arch(init)} if part == "vdm" else {}
        for i, ph in enumerate(phases):
            name = mode if i == 0 else f"{mode}_{i + 1}"
            rep = stage(name, lambda: _timed(_train, cfg, mode, os.path.join(work, name), **ph,
                                             **{f"{part}__path": src}),
                        extra={"phase": ph, "init": src, "after": list(phases[:i]), **arch})   # a changed earlier phase reruns this
            reps.append(dict(ph, loss=rep.get("loss"), token_accuracy=rep.get("token_accuracy"),
                             wall_s=rep.get("wall_s")))
            src = rep["exports"][part]
        return dict(rep, phases=reps, wall_s=sum(float(r["wall_s"] or 0.0) for r in reps))

    csv = stage("world", world)
    chain_runs = None
    if chain is None and chains == "parallel":
        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
        if len(cpus) < 2:
            print(f"[build] one CPU ({cpus}): the chains run one after the other", flush=True)
        else:
            chain_runs = run_chains({name: chain_command(name, out=out, work=work, train_samples=train_samples,
                                                         eval_samples=eval_samples, quick=quick, seed=seed)
                                     for name in CHAINS}, work, split_cpus(cpus))
            # every stage of both chains is done now: what follows reuses them from their markers
    video_root = os.path.join(data, "videos")
    cfg.data.train_csv, cfg.data.video_root = csv["train"], video_root
    # one latent cache for every SFT-VDM phase: the VAE latents and caption embeddings once per build
    cfg.train.sft_vdm.latent_cache = os.path.join(work, "latent_cache")
    report: dict = {"train_samples": train_samples, "eval_samples": eval_samples, "seed": seed}

    clip_dir = os.path.join(work, "clip")
    vae_final = os.path.join(work, "vae_decoder")     # the VAE that ships (the decoder stage's)
    if chain in (None, "vlm"):
        print("[build] 1/5 tokenizer + random Qwen2.5-VL", flush=True)
        vlm_init = os.path.join(work, "vlm_init")
        report["tokenizer"] = stage("vlm_init", lambda: init_vlm_dir(vlm_init, cfg.vlm.model.to_dict(),
                                                                     synthetic.world_texts(wc), vocab_size=512, seed=seed))
        print("[build] 2/5 SFT of the VLM", flush=True)
        report["sft_vlm"] = sft_phases("sft_vlm", "vlm", vlm_init)

        print("[build] 3/5 CLIP reward model", flush=True)
        report["clip"] = stage("clip", lambda: _timed(train_clip, data, clip_dir, seed=seed,
                                                      **({"steps": 10, "batch_size": 16} if quick else {})))

    if chain in (None, "vdm"):
        print("[build] 4/5 VAE + text encoder + random DiT", flush=True)
        vae_dir = os.path.join(work, "vae")
        # resumable inside the stage too: a killed VAE run continues from its last checkpoint (every 500 steps)
        report["vae"] = stage("vae", lambda: _timed(train_vae, data, vae_dir, seed=seed,
                                                    checkpoint_dir=os.path.join(work, "vae_ckpt"), **vae_recipe(quick)))
        # the decoder fine-tune (vae_decoder_recipe): the shipped VAE; the latents are the first stage's
        dec_recipe = vae_decoder_recipe(quick)
        report["vae_decoder"] = stage("vae_decoder", lambda: _timed(
            train_vae, data, vae_final, seed=seed, train_config=dataclasses.replace(dec_recipe, init_from=vae_dir),
            checkpoint_dir=os.path.join(work, "vae_decoder_ckpt")), extra={"recipe": _recipe_key(dec_recipe)})
        vae_dir = vae_final
        vdm_init = os.path.join(work, "vdm_init")
        with open(os.path.join(vae_dir, "config.json")) as f:       # the DiT works in the VAE's latent channels
            z_dim = int(json.load(f)["z_dim"])
        write_vdm_dir(vdm_init, dit_config=dict(cfg.vdm.model, in_channels=z_dim, out_channels=z_dim), vae_dir=vae_dir,
                      texts=synthetic.world_texts(wc),
                      seed=seed, shift=float(cfg.video.shift))
        from vans_jax.sampling import wan as wp
        wp.from_pretrained(vdm_init)   # loads through the real loaders
        print("[build] 5/5 SFT of the DiT", flush=True)
        report["sft_vdm"] = sft_phases("sft_vdm", "vdm", vdm_init)

    if chain is not None:
        report["wall_s"] = time.perf_counter() - t0
        print(f"[build] chain {chain}: its stages are done ({report['wall_s']:.0f}s)", flush=True)
        return report

    tmp = out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    shutil.copytree(report["sft_vlm"]["exports"]["vlm"], os.path.join(tmp, "vlm"))
    shutil.copytree(report["sft_vdm"]["exports"]["vdm"], os.path.join(tmp, "vdm"), symlinks=False)
    # the SFT-VDM export copied the VAE of the directory it started from: ship the decoder stage's VAE
    # (the same encoder; SFT-VDM phases reused from an earlier build may carry an older decoder)
    shutil.rmtree(os.path.join(tmp, "vdm", "vae"))
    shutil.copytree(vae_final, os.path.join(tmp, "vdm", "vae"))
    shutil.copytree(clip_dir, os.path.join(tmp, "clip"))
    defaults = dict(VANSSettings.from_dict(settings_from_config(cfg)).to_dict())
    defaults["world"] = {"height": wc.height, "width": wc.width, "fps": wc.fps, "input_frames": wc.input_frames,
                         "target_frames": wc.target_frames}
    with open(os.path.join(tmp, "defaults.json"), "w") as f:
        json.dump(defaults, f, indent=2)
    print("[build] measuring the SFT models on the eval split", flush=True)
    report["quality"] = measure_quality(tmp, data, num_samples=8 if quick else 32)
    print(f"[build] quality: {report['quality']}", flush=True)
    report["wall_s"] = time.perf_counter() - t0      # this invocation (reused stages cost nothing)
    report["stages_wall_s"] = sum(float(v.get("wall_s", 0.0)) for v in report.values() if isinstance(v, dict))
    # what each chain's stages took (as recorded: a kept stage counts what it took when it was trained); a
    # parallel build of everything takes about the longer chain, a sequential one their sum
    chain_s = {n: sum(float(report[k].get("wall_s") or 0.0) for k in ks) for n, ks in CHAIN_REPORTS.items()}
    report["chains"] = {"mode": chains if chain_runs is not None else "sequential",
                        **{n: dict(stages_wall_s=chain_s[n], **((chain_runs or {}).get(n) or {})) for n in CHAINS}}
    report["critical_path_s"] = max(chain_s.values())
    report["command"] = " ".join(["python -m tools.tiny_world.build"] + sys.argv[1:])
    for k in ("sft_vlm", "sft_vdm"):
        report[k].pop("exports", None)
    with open(os.path.join(tmp, "BUILD.json"), "w") as f:
        json.dump(report, f, indent=2, default=str)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    print(f"[build] wrote {out} in {report['wall_s']:.0f}s", flush=True)
    return report


def measure_data(work: str, num_samples: int) -> str:
    """``<work>/measure_data``: the world's eval split with at least ``num_samples`` clips (generated
    again, larger, when an earlier call wrote fewer; the split is deterministic, so its first clips
    stay the same). Returns the directory."""
    from vans_jax.data.csv_format import read_vnep_csv

    data = os.path.join(work, "measure_data")
    csv = os.path.join(data, "eval.csv")
    have = sum(1 for _ in read_vnep_csv(csv)) if os.path.exists(csv) else 0
    if have < num_samples:
        synthetic.generate_world(data, "eval", max(num_samples, 8), config=synthetic.WorldConfig())
    return data


def parser() -> argparse.ArgumentParser:
    """The command line of ``python -m tools.tiny_world.build``."""
    p = argparse.ArgumentParser(prog="python -m tools.tiny_world.build", description=__doc__.split("\n\n")[0])
    from vans_jax.apps.tiny_world import tiny_world_dir
    p.add_argument("--out", default=tiny_world_dir())
    p.add_argument("--work", default=os.path.join("/tmp", "vans_world_build"))
    p.add_argument("--train_samples", type=int, default=1500)
    p.add_argument("--eval_samples", type=int, default=100)
    p.add_argument("--quick", action="store_true", help="a few steps of everything (tests)")
    p.add_argument("--chains", choices=("parallel", "sequential"), default="parallel",
                   help="parallel (default): the VLM's chain (tokenizer, SFT-VLM, CLIP) and the DiT's (VAE, its decoder, SFT-VDM) "
                        "side by side, each in its own process on half the CPUs (logs: <work>/chain_*.log); "
                        "sequential: one after the other in this process")
    p.add_argument("--chain", choices=CHAINS, default=None,
                   help="only this chain's stages, no assembly (what each process of a parallel build runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", default="", help="comma-separated parts (vlm, clip, vdm) to take from the previous build in "
                   "--previous (default --out) instead of training them again (vdm: the VAE and the SFT-VDM phases it ran; "
                   "phases SFT_PHASES adds train on top)")
    p.add_argument("--previous", default=None, help="the previous build's output directory for --keep")
    p.add_argument("--measure", action="store_true",
                   help="only measure the models in --out on a fresh eval split (written under --work) and print "
                        "the JSON; builds nothing")
    p.add_argument("--num_samples", type=int, default=32, help="eval clips measured by --measure")
    p.add_argument("--seeds", default="0", help="comma-separated noise seeds of the DiT's renders measured by "
                   "--measure (each clip rendered once per seed; the numbers are over all renders, and per seed)")
    return p


def main(argv=None):
    from vans_jax.apps.xla_env import apply_default_xla_flags
    apply_default_xla_flags()    # vans-jax's XLA defaults (faster CPU training), before JAX starts
    p = parser()
    a = p.parse_args(argv)
    if a.measure:
        data = measure_data(a.work, a.num_samples)
        try:
            seeds = [int(x) for x in a.seeds.split(",") if x.strip()]
        except ValueError:
            p.error(f"--seeds must be comma-separated integers, got {a.seeds!r}")
        if not seeds:
            p.error("--seeds names no seed")
        print(json.dumps(measure_quality(a.out, data, num_samples=a.num_samples, seeds=seeds), indent=2), flush=True)
        return 0
    if a.chain is not None and a.keep:
        p.error("--chain runs one chain of a build whose stages --keep has already seeded; give --keep to the build")
    build(a.out, a.work, train_samples=a.train_samples, eval_samples=a.eval_samples, quick=a.quick, seed=a.seed,
          keep=[k for k in a.keep.split(",") if k], previous=a.previous, chains=a.chains, chain=a.chain)
    return 0


if __name__ == "__main__":
    sys.exit(main())
