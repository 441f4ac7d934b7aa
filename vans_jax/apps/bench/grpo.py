"""Bench section ``grpo``: one Joint-GRPO Stage-1 and one Stage-2 step with the trainer's own code
(no reference: the official VANS release is inference-only)."""
from __future__ import annotations

import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .common import BenchContext, build_wan, figure, random_model, section, spread


GRPO_NO_REFERENCE = ("no PyTorch reference: the official VANS release is inference-only (no Joint-GRPO training "
                     "code); the rollout's parts are compared with theirs in the vlm, dit, pipeline and vae sections")

GRPO_WHAT = {
    "grpo_stage1": "one Joint-GRPO Stage-1 step (JointGRPO.step): G captions per prompt from one prefill of the "
                   "policy VLM (LoRA), each rendered by the frozen VDM (ODE sampler with CFG) and VAE-decoded, CLIP "
                   "features, rewards r_format + r_t1 + r_v1, group advantages, old and reference log-probs, the "
                   "LoRA policy update(s)",
    "grpo_stage2": "one Joint-GRPO Stage-2 step: one anchor caption per prompt from the frozen Stage-1 VLM (LoRA "
                   "merged), resampled while ROUGE-L < threshold; G videos per anchor from the SDE sampler with "
                   "stored trajectories, VAE-decoded, CLIP features, rewards r_v2 + r_c2, group advantages, the DiT "
                   "policy update(s) accumulated timestep by timestep",
}
# the step's own timers (JointGRPO.step metrics): rollout text, rollout video, rewards + log-probs + update
GRPO_PHASES = (("text_s", "time/text_s"), ("video_s", "time/video_s"), ("update_s", "time/update_s"))


def _grpo_recipe(ctx: BenchContext):
    """The training recipe block (``configs/vans.py``-shaped: vlm, vdm, clip, generation, video,
    train.batch_size / pad_multiple / grpo) with the run's dtype for the VLM, DiT and UMT5
    (``train.grpo.group_size`` is set per stage from ``grpo.group_size``)."""
    import ml_collections

    recipe = ml_collections.ConfigDict(ctx.cfg.grpo.recipe.to_dict())
    recipe.vlm.dtype = recipe.vdm.dtype = ctx.dtype
    return recipe


def _grpo_vlm(ctx: BenchContext, recipe):
    """(Qwen2.5-VL with fresh LoRA adapters, its tokenizer): ``recipe.vlm.path`` through the trainer's
    loader, else random weights of ``vlm.model``'s architecture and a tiny tokenizer trained on the
    synthetic world's texts (the special-token ids follow the tokenizer; the vocabulary size stays,
    so the LM head and sampling cost what they cost at that size)."""
    from vans_jax.data import synthetic
    from vans_jax.models import qwen2_5_vl as qwen
    from vans_jax.models.lora import lora_init_fill
    from vans_jax.models.qwen2_5_vl import tokenizer as qtok
    from vans_jax.rl.format import TAGS
    from vans_jax.train import loop

    if recipe.vlm.path:
        return loop.load_vlm(recipe, None, lora=True)
    arch = ctx.cfg.vlm.model.to_dict()
    path = ctx.tmpdir("grpo_vlm_tokenizer")
    ids = qtok.build_tiny_tokenizer(path, synthetic.world_texts(), vocab_size=min(512, arch["vocab_size"] - 16),
                                   added_tokens=TAGS)
    if ids["vocab_size"] > arch["vocab_size"]:
        raise ValueError(f"vlm.model.vocab_size {arch['vocab_size']} is smaller than the tiny tokenizer's "
                         f"{ids['vocab_size']} ids")
    arch.update(image_token_id=ids["image_pad"], video_token_id=ids["video_pad"],
                vision_start_token_id=ids["vision_start"], vision_end_token_id=ids["vision_end"],
                eos_token_id=ids["eos"], pad_token_id=ids["pad"])
    mcfg = qwen.Qwen2_5_VLConfig.from_hf_dict(arch, dtype=ctx.dtype, attn_impl=str(recipe.vlm.attn_impl),
                                              remat=str(recipe.vlm.remat))
    lora = loop._lora_config(recipe)
    model = random_model(lambda: qwen.Qwen2_5_VLModel(mcfg, rngs=nnx.Rngs(0), lora=lora), ctx.seed + 10,
                         fill_first=lora_init_fill(ctx.seed))
    return model, qtok.load_tokenizer(path)


def _grpo_clip(ctx: BenchContext, recipe):
    """(CLIP reward model, tokenizer): ``recipe.clip.path``, else random fp32 weights of ``grpo.clip``
    (a Hugging Face CLIPConfig dict; {} = ViT-B/32) with the character-level tiny tokenizer."""
    from vans_jax.models import clip
    from vans_jax.train import loop

    if recipe.clip.path:
        return loop.load_clip(recipe, None)
    d = ctx.cfg.grpo.clip.to_dict()
    d["text_config"] = dict(d.get("text_config") or {}, **{k: v for k, v in clip.TINY_TOKENIZER_IDS.items()
                                                          if k != "vocab_size"})
    cfg = clip.CLIPConfig.from_dict(d)
    model = random_model(lambda: clip.CLIPModel(cfg, dtype="float32", rngs=nnx.Rngs(0)), ctx.seed + 20)
    return model, clip.build_tiny_tokenizer(cfg.text.max_position_embeddings)


def _grpo_vdm(ctx: BenchContext, recipe):
    """Our Wan models: ``recipe.vdm.path``, else those of the Wan sections (``wan.*``; built without
    torch when they did not run). The reference's torch models cached by the other sections are
    released first (Joint-GRPO has no reference; on an accelerator they would hold its memory)."""
    import gc

    from vans_jax.train import loop

    ctx._cache.pop("qwen", None)
    cached = ctx._cache.pop("wan", None)
    if cached is not None:
        ctx._cache["wan_ours"] = (cached[0], None, None)
    del cached
    gc.collect()
    if ctx.torch is not None and ctx.torch_device.startswith("cuda"):
        ctx.torch.cuda.empty_cache()
    if recipe.vdm.path:
        return loop.load_vdm(recipe, None)
    return ctx.cached("wan_ours", lambda: build_wan(ctx, with_reference=False))[0]


def _with_dit_config(models, *, copy_weights: bool, **changes):
    """``models`` with a DiT whose config has ``changes`` (remat, text_len); the weights are copied
    when a trainer will donate them, so the shared models stay intact."""
    graphdef, state = nnx.split(models.dit)
    dit = nnx.merge(graphdef, jax.tree.map(jnp.copy, state) if copy_weights else state)
    dit.cfg = dataclasses.replace(dit.cfg, **changes)
    return dataclasses.replace(models, dit=dit, _negative={})


def _grpo_examples(ctx: BenchContext, recipe):
    """``train.batch_size`` samples of the synthetic world's RL split at the recipe's video size and
    rate (``grpo.world``: input clip length, event segment, events), written as videos and read back
    through the training data pipeline (``data.VNEPSource``), as ``vans-jax train`` reads them."""
    from vans_jax.data import PipelineConfig, VNEPSource, synthetic

    v, w = recipe.video, ctx.cfg.grpo.world
    world = synthetic.WorldConfig(height=int(v.height), width=int(v.width), fps=float(v.fps),
                                  input_frames=int(w.input_frames), segment=int(w.segment),
                                  target_frames=int(v.num_frames), events=tuple(w.events) or synthetic.EVENTS)
    n = int(recipe.train.batch_size)
    split = synthetic.generate_world(ctx.tmpdir("grpo_world"), "rl", n, config=world)
    pc = PipelineConfig(**dict(world.pipeline_kwargs(), reference_frames=int(v.num_frames)))
    source = VNEPSource(split.csv_path, split.video_root, pc)
    return [source.load(i) for i in range(n)]


def _param_summary(module: nnx.Module) -> dict:
    leaves = jax.tree.leaves(nnx.state(module, nnx.Param))
    dtypes: dict[str, int] = {}
    for x in leaves:
        dtypes[str(x.dtype)] = dtypes.get(str(x.dtype), 0) + int(x.size)
    return dict(params=sum(dtypes.values()), param_dtypes=dtypes)


def _time_grpo_steps(ctx: BenchContext, runner, examples, steps: int):
    """One warm-up step (compilation included), then ``steps`` timed steps on the same prompts
    (fresh rollouts: the step index folds into the RNG). ``JointGRPO.step`` returns the update's
    metrics as device arrays; fetching them inside the timer makes the wall time the device time of
    the whole step."""
    base = jax.random.key(ctx.seed)

    def one(i):
        t0 = time.perf_counter()
        m = jax.device_get(runner.step(examples, i, jax.random.fold_in(base, i)))
        dt = time.perf_counter() - t0
        if m.get("skipped_rewards"):
            raise RuntimeError(f"{runner.s.mode} step {i}: non-finite rewards, the step was skipped")
        return dt, m

    warmup, _ = one(1)
    runs = [one(i) for i in range(2, 2 + max(1, int(steps)))]
    times = [t for t, _ in runs]
    med = lambda key: statistics.median(m[key] for _, m in runs)
    ours = dict(warmup_s=warmup, **spread(times), device=ctx.device,
                phases_s={name: med(key) for name, key in GRPO_PHASES},
                frames_per_s=med("throughput/frames_per_s"))
    if runner.s.mode == "grpo_stage1":
        ours["tokens_per_s"] = med("throughput/tokens_per_s")
    last = {k: float(v) for k, v in runs[-1][1].items() if not isinstance(v, str) and np.ndim(v) == 0}
    return ours, last


@section("grpo")
def bench_grpo(ctx: BenchContext) -> list[dict]:
    """Joint-GRPO Stage-1 and Stage-2 step times with the trainer's own code (``vans-jax train``'s
    ``JointGRPO`` built from the recipe block through ``train.loop.grpo_settings`` /
    ``render_settings``) on random models: the VLM of ``vlm.model``, the Wan models of ``wan.*``, the
    CLIP of ``grpo.clip`` (or checkpoints: ``grpo.recipe.{vlm,vdm,clip}.path``)."""
    from vans_jax.models.lora import merge_lora_copy
    from vans_jax.sampling import wan as wp
    from vans_jax.parallel import make_mesh
    from vans_jax.train import loop
    from vans_jax.train.grpo import JointGRPO
    from vans_jax.rl.rollouts import build_prompt_batch

    c = ctx.cfg.grpo
    unknown = [m for m in c.stages if m not in GRPO_WHAT]
    if unknown:
        raise ValueError(f"grpo.stages: unknown stage(s) {unknown}; expected some of {list(GRPO_WHAT)}")
    stages = [m for m in GRPO_WHAT if m in c.stages]      # Stage 2 starts from Stage 1's VLM
    recipe = _grpo_recipe(ctx)
    vdm = _grpo_vdm(ctx, recipe)
    vlm, tokenizer = _grpo_vlm(ctx, recipe)
    clip_model, clip_tokenizer = _grpo_clip(ctx, recipe)
    examples = _grpo_examples(ctx, recipe)
    mesh = make_mesh({"data": 1}, jax.devices()[:1])
    render = loop.render_settings(recipe)
    g = recipe.train.grpo
    text_len = int(c.text_len) if c.text_len else vdm.text_len
    n_prompts = len(examples)

    prompt_ids = np.asarray(build_prompt_batch(examples, tokenizer, vlm.config, recipe.vlm,
                                               int(recipe.train.pad_multiple))["input_ids"])
    t_lat, h_lat, w_lat = wp.check_generation_size(vdm, render.height, render.width, render.num_frames)
    lo, hi = render.sde_window or (0, render.num_steps - 1)
    models = dict(vlm=dict(_param_summary(vlm), layers=vlm.config.text.num_hidden_layers,
                           hidden=vlm.config.text.hidden_size, vocab=vlm.config.text.vocab_size,
                           vision_depth=vlm.config.vision.depth, lora_rank=int(recipe.vlm.lora.rank),
                           remat=vlm.config.remat),
                  dit=dict(_param_summary(vdm.dit), dim=vdm.dit.cfg.dim, layers=vdm.dit.cfg.num_layers,
                           heads=vdm.dit.cfg.num_heads, ffn=vdm.dit.cfg.ffn_dim),
                  text_encoder=dict(_param_summary(vdm.text_encoder), d_model=vdm.text_encoder.config.d_model,
                                    layers=vdm.text_encoder.config.num_layers),
                  vae=dict(_param_summary(vdm.vae), base_dim=vdm.vae.cfg.base_dim),
                  clip=dict(_param_summary(clip_model), vision_hidden=clip_model.config.vision.hidden_size,
                            vision_layers=clip_model.config.vision.num_hidden_layers,
                            image_size=clip_model.config.vision.image_size,
                            patch_size=clip_model.config.vision.patch_size))
    common = dict(prompts=n_prompts, prompt_tokens=int(prompt_ids.shape[1]),
                  video_tokens=int((prompt_ids[0] == vlm.config.video_token_id).sum()),
                  vlm_frames=int(np.asarray(examples[0]["vlm_frames"]).shape[0]),
                  video=[render.num_frames, render.height, render.width],
                  latent_frames=[render.n_ref, t_lat], latent_hw=[h_lat, w_lat],
                  sampler_steps=render.num_steps, cfg_scale=render.cfg_scale, text_len=text_len)

    out, stage1_vlm = [], None
    for mode in stages:
        recipe.train.grpo.group_size = int(c.group_size[mode])
        s = loop.grpo_settings(recipe, mode)
        if mode == "grpo_stage1":
            policy = vlm
            vdm_run = _with_dit_config(vdm, copy_weights=False, text_len=text_len)
            shape = dict(common, group_size=s.group_size, videos=n_prompts * s.group_size,
                         new_tokens=s.max_new_tokens, sampler=f"{render.mode} (ODE)", num_updates=s.num_updates)
        else:
            # the Stage-1 VLM, frozen with its LoRA merged, as `vans-jax train` exports it for Stage 2
            policy = merge_lora_copy(stage1_vlm if stage1_vlm is not None else vlm)
            vlm = stage1_vlm = None              # only the merged copy stays in memory
            vdm_run = _with_dit_config(vdm, copy_weights=True, text_len=text_len, remat=str(c.dit_remat))
            shape = dict(common, group_size=s.group_size, videos=n_prompts * s.group_size,
                         anchor_new_tokens=s.max_new_tokens, anchor_max_tries=s.anchor_max_tries,
                         sampler="sde", trained_timesteps=hi - lo, dit_remat=str(c.dit_remat),
                         num_updates=s.num_updates)
        runner = JointGRPO(s, render, vlm=policy, vlm_tokenizer=tokenizer, vlm_vcfg=recipe.vlm, vdm=vdm_run,
                           clip_model=clip_model, clip_tokenizer=clip_tokenizer, vlm_trainable=str(g.vlm_trainable),
                           dit_trainable=str(g.dit_trainable), optim_cfg=g, seed=ctx.seed, mesh=mesh)
        ours, metrics = _time_grpo_steps(ctx, runner, examples, int(c.steps))
        if mode == "grpo_stage1":
            stage1_vlm = runner.vlm.model()      # the trained adapters (the state `vlm` held was donated)
        del runner, policy, vdm_run
        dtypes = {name: max(m["param_dtypes"], key=m["param_dtypes"].get) for name, m in models.items()}
        out.append(figure(
            f"{mode}_step", "grpo", GRPO_WHAT[mode], shape, ctx.dtype, ours, None, GRPO_NO_REFERENCE,
            dtypes=dtypes, models=models, metrics=metrics,
            phases="text_s: VLM sampling (Stage 1: the G captions; Stage 2: the anchors, every attempt) and "
                   "decoding; video_s: rendering (text encoding, sampler, VAE decode) and CLIP frame features; "
                   "update_s: rewards, advantages, log-probs and the policy update(s) (JointGRPO.step's timers)",
            note="random weights: captions rarely parse and rows decode up to the token cap (EOS has ~1/vocab "
                 "chance a token); no anchor reaches the ROUGE-L threshold, so Stage 2 makes every allowed "
                 "attempt (metrics['anchor/resamples']). Trained checkpoints stop earlier."))
    return out
