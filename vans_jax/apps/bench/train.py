"""Bench sections ``train`` and ``predict``: our own heaviest CPU work, timed so that regressions
show. ``train``: one SFT-VLM and one SFT-VDM step of the world config (``configs/tiny_world.py``:
the shipped tiny models, the synthetic world's clips, the trainer's runners ``train.loop.SFTVLM`` /
``SFTVDM``); ``predict``: ``vans-jax predict`` end to end on one synthetic clip with the shipped
tiny models (VLM answer, video generation, answer.json + mp4 + strip written). No reference: VANS
ships no training code, and its inference needs the full-size checkpoints."""
from __future__ import annotations

import os
import time

import jax

from .common import BenchContext, figure, section, spread

TRAIN_WHAT = {
    "sft_vlm": "one SFT-VLM step (train.loop.SFTVLM.step): batch tokenized with the clips' frames, VLM forward + "
               "token NLL + gradient + optimizer update",
    "sft_vdm": "one SFT-VDM step (train.loop.SFTVDM.step): VAE encode of the target clips, caption encoding, "
               "reference latents, flow-matching loss + gradient + optimizer update of the DiT (no latent cache)",
}
NO_REFERENCE_TRAIN = "no PyTorch reference: the official VANS release ships no training code"
NO_REFERENCE_PREDICT = ("no PyTorch reference at this size: VANS' own inference runs the full-size checkpoints "
                        "(the vlm, dit, pipeline and vae sections compare the parts)")


def _world_config(ctx: BenchContext):
    from vans_jax.apps.configlib import load_config

    cfg = load_config(str(ctx.cfg.train.config))
    cfg.train.sft_vdm.latent_cache = "off"
    if int(ctx.cfg.train.batch_size):
        cfg.train.batch_size = int(ctx.cfg.train.batch_size)
    return cfg


def _world_examples(ctx: BenchContext, cfg, n: int) -> list[dict]:
    """``n`` samples of the synthetic world's train split (the shipped models' world settings), read
    through the training data pipeline as ``vans-jax train`` reads them."""
    from vans_jax.apps.tiny_world import load_defaults
    from vans_jax.data import PipelineConfig, VNEPSource, synthetic

    world = synthetic.WorldConfig(**load_defaults(os.path.dirname(str(cfg.vlm.path).rstrip("/"))).get("world", {}))
    split = synthetic.generate_world(ctx.tmpdir("train_world"), "train", n, config=world)
    source = VNEPSource(split.csv_path, split.video_root, PipelineConfig.from_experiment(cfg))
    return [source.load(i) for i in range(n)]


def _time_steps(ctx: BenchContext, runner, examples, repeats: int) -> dict:
    """One warm-up step (compilation included), then ``repeats`` timed steps; fetching the step's
    metrics waits for the update."""
    base = jax.random.key(ctx.seed)

    def one(i):
        t0 = time.perf_counter()
        m = jax.device_get(runner.step(examples, i, jax.random.fold_in(base, i)))
        return time.perf_counter() - t0, m

    warmup, _ = one(0)
    runs = [one(i) for i in range(1, 1 + max(1, repeats))]
    last = {k: float(v) for k, v in runs[-1][1].items() if not isinstance(v, str) and jax.numpy.ndim(v) == 0}
    return dict(warmup_s=warmup, **spread([t for t, _ in runs]), device=ctx.device), last


@section("train")
def bench_train(ctx: BenchContext) -> list[dict]:
    from vans_jax.parallel import make_mesh
    from vans_jax.train import loop

    c = ctx.cfg.train
    cfg = _world_config(ctx)
    n = int(cfg.train.batch_size)
    examples = _world_examples(ctx, cfg, n)
    mesh = make_mesh({"data": 1}, jax.devices()[:1])
    out = []
    for mode in c.modes:
        if mode not in TRAIN_WHAT:
            raise ValueError(f"train.modes: unknown mode {mode!r}; expected some of {list(TRAIN_WHAT)}")
        runner = loop.build_runner(cfg, mode, mesh)
        ours, metrics = _time_steps(ctx, runner, examples, int(c.steps))
        shape = dict(config=str(c.config), batch=n, trainable=str(cfg.train[mode].trainable))
        if mode == "sft_vdm":
            v = cfg.video
            m = cfg.vdm.model
            shape.update(video=[int(v.num_frames), int(v.height), int(v.width)], n_ref=int(v.n_ref),
                         dim=int(m.dim), layers=int(m.num_layers), heads=int(m.num_heads))
        else:
            shape.update(max_len=int(cfg.train.sft_vlm.max_len), frames=int(cfg.vlm.num_frames),
                         layers=int(cfg.vlm.model.num_hidden_layers), hidden=int(cfg.vlm.model.hidden_size))
        del runner
        out.append(figure(f"train_{mode}_step", "train", TRAIN_WHAT[mode], shape, "float32", ours, None,
                          NO_REFERENCE_TRAIN, metrics=metrics))
    return out


@section("predict")
def bench_predict(ctx: BenchContext) -> list[dict]:
    from vans_jax.apps import predict
    from vans_jax.pipeline import VANSPipeline

    c = ctx.cfg.predict
    vlm_dir, vdm_dir, settings, _ = predict.resolve_models()
    out_dir = ctx.tmpdir("predict")
    t0 = time.perf_counter()
    pipe = VANSPipeline.from_pretrained(vlm_dir, vdm_dir, settings=settings)
    load_s = time.perf_counter() - t0
    clip, question, extra = predict.prepare_input(None, None, out_dir, seed=ctx.seed, synthetic=True,
                                                  settings=settings)
    records = []

    def one():
        rec = predict.predict_one(pipe, clip, question, out_dir, seed=ctx.seed, extra=extra, log=lambda m: None)
        records.append(rec)
        return rec

    ours, _ = ctx.ours(one)
    last = records[-1]
    ours["load_s"] = load_s
    ours["phases_s"] = {k: float(v) for k, v in last["timings"].items() if isinstance(v, (int, float))}
    s = settings
    shape = dict(models="shipped tiny world (data/models/tiny_world)", input_frames=int(last["input_frames"]),
                 video=[int(s.num_frames), int(s.height), int(s.width)], steps=int(s.num_steps),
                 max_new_tokens=int(s.max_new_tokens))
    dtype = str(pipe.vdm.dit.cfg.dtype)
    return [figure("predict", "predict", "vans-jax predict on one synthetic clip: VLM answer, video generation, "
                   "answer.json + answer.mp4 + strip written (models loaded once: load_s)", shape, dtype,
                   ours, None, NO_REFERENCE_PREDICT)]
