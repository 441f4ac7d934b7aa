"""The full-size VANS system: Qwen2.5-VL-3B-Instruct + Wan2.1-T2V-1.3B (numbers from SPEC)."""
import ml_collections


def qwen2_5_vl_3b():
    """The model part of Qwen2.5-VL-3B-Instruct's config.json."""
    return dict(
        model_type="qwen2_5_vl", vocab_size=151936, hidden_size=2048, intermediate_size=11008,
        num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2, rms_norm_eps=1e-6,
        rope_scaling=dict(type="mrope", mrope_section=[16, 24, 24]), rope_theta=1000000.0,
        max_position_embeddings=128000, hidden_act="silu", tie_word_embeddings=True,
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
        eos_token_id=151645, pad_token_id=151643,
        vision_config=dict(depth=32, hidden_size=1280, num_heads=16, intermediate_size=3420, out_hidden_size=2048,
                           patch_size=14, temporal_patch_size=2, spatial_merge_size=2, window_size=112,
                           fullatt_block_indexes=[7, 15, 23, 31], in_channels=3, tokens_per_second=2,
                           hidden_act="silu"),
    )


def wan2_1_t2v_1_3b():
    return dict(dim=1536, num_layers=30, num_heads=12, head_dim=128, ffn_dim=8960, patch_size=(1, 2, 2),
                in_channels=16, out_channels=16, text_dim=4096, freq_dim=256, eps=1e-6, text_len=512)


def get_config():
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, sequence=1, tensor=1))
    c.vlm = ml_collections.ConfigDict(dict(
        path="",                  # local HF directory; empty = random init from `model`
        dtype="bfloat16", attn_impl="auto", remat="none",
        model=qwen2_5_vl_3b(),
        lora=dict(rank=8, alpha=32.0, dropout=0.05,
                  targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                  include_vision=False),
        # VANS feeds the VLM 6 frames sampled at 1 fps
        num_frames=6, sample_fps=1.0, video_min_pixels=128 * 28 * 28, video_max_pixels=768 * 28 * 28,
    ))
    c.vdm = ml_collections.ConfigDict(dict(path="", dit_path="", dtype="bfloat16", model=wan2_1_t2v_1_3b(),
                                           # DiT / VAE / UMT5 attention (layers.attention: auto = splash on
                                           # TPU, cudnn on GPU) and the DiT's self-attention over a
                                           # `sequence` mesh axis: none | ring | ulysses
                                           attn_impl="auto", seq_parallel="none"))
    c.generation = ml_collections.ConfigDict(dict(max_new_tokens=256, temperature=1.0, top_p=1.0, top_k=0,
                                                  num_return_sequences=1))
    c.video = ml_collections.ConfigDict(dict(height=352, width=640, num_frames=33, fps=11.0, n_ref=6,
                                             num_steps=50, cfg_scale=5.0, shift=5.0))
    c.clip = ml_collections.ConfigDict(dict(path=""))   # local Hugging Face CLIP directory (rewards, eval)
    c.data = ml_collections.ConfigDict(dict(
        train_csv="", rl_csv="", eval_csv="", video_root="", num_workers=0,
        num_shards=0,             # data shards (0: one per process); the batches depend on this, not on the hosts
        # what one sample looks like (vans_jax.data.loader.PipelineConfig.from_experiment): frame counts,
        # sizes and rates come from vlm.* and video.*; here only what is set nowhere else. VANS: the
        # reference latents come from the input clip's last 33 frames
        pipeline=dict(reference_frames=33),
    ))
    c.train = ml_collections.ConfigDict(dict(
        mode="grpo_stage1",       # sft_vlm | sft_vdm | grpo_stage1 | grpo_stage2 | grpo_vlm | grpo_vdm | grpo_all_in_one
        workdir="", steps=0,      # 0: the mode's own step count below
        batch_size=1,             # prompts per step (SFT: examples per step)
        pad_multiple=64,          # token sequences padded to a multiple of this (fewer recompilations)
        log_every=10, checkpoint_every=100, keep_checkpoints=3, async_checkpoint=True,
        # TensorBoard media (train/media.py): GRPO rollout strips, captions, reward terms, histograms; SFT-VDM
        # renders of media_samples fixed captions. 0: off
        log_media_every=50, media_samples=2,
        export=True, export_link=True,
        sft_vlm=dict(steps=10_000, lr=5e-5, trainable="lora", grad_clip=1.0, warmup_steps=0, schedule="constant",
                     weight_decay=0.0, dropout=True, max_len=0),   # max_len > 0: fixed sequence length
        sft_vdm=dict(steps=20_000, lr=5e-5, trainable="full", grad_clip=1.0, warmup_steps=0, schedule="constant",
                     weight_decay=0.0, text_dropout=0.1,
                     log_media_every=500,    # renders media_samples videos each time (train/media.py)
                     latent_cache="auto",     # VAE latents + UMT5 embeddings cached: auto (<workdir>/latent_cache) | DIR | off
                     ema_decay=0.0,           # > 0: a parameter EMA, what export/ holds (e.g. 0.999)
                     # > 0: foreground latent cells weigh 1 + fg_weight in the loss (train.sft.sft_vdm_loss)
                     fg_weight=0.0, fg_threshold=0.5),
        grpo=dict(group_size=8, beta=0.004, clip_eps=1e-3, lr=5e-5, stage1_steps=800, stage2_steps=1000,
                  num_updates=1, aggregation="sequence_mean", anchor_rouge_threshold=0.6, anchor_max_tries=4,
                  anchor_temperature=1.0, caption_fallback="full", sde_noise_level=0.7, sde_std_form="flow_grpo",
                  sde_window=(), train_sampling_steps=20, train_cfg=4.5, render_sampler="euler",
                  advantage_clip=5.0, grad_clip=1.0, weight_decay=0.0, warmup_steps=0, schedule="constant",
                  # "lora" | "full" | module groups, e.g. "time_linear_1,time_linear_2" (train.core.trainable_filter;
                  # the stage-2 gate logs each group's gradient agreement: diag/grad_cos_halves/<group>)
                  vlm_trainable="lora", dit_trainable="full", disabled_rewards="",
                  rewards="",   # "": the mode's paper rewards; else e.g. "v2,c2=0.5,world,my.module:fn,path/r.py:fn"
                  # grpo_stage2's own list when set (the demo's Joint-GRPO runs stage 1 and stage 2 from
                  # one config: `rewards` would set both), e.g. "v2,c2,world"; "": `rewards`
                  stage2_rewards="",
                  stage2_batch_size=0,   # grpo_stage2's prompts a step when > 0; 0: train.batch_size
                  shuffle_advantages=False,   # the control: advantages permuted within each group
                  # stage 2 every N steps (0: off): half-batch gradient cosine vs its shuffled control,
                  # reward variance split (K initial noises x M SDE draws of one anchor)
                  diagnostics_every=0, diagnostics_noises=4, diagnostics_sde_draws=4,
                  # stage 2 (grpo_stage2 / grpo_vdm): rollout batches of the step's prompts per optimizer
                  # update; one initial noise per group (DanceGRPO); "std_dt": each timestep's policy
                  # term x std_t / sqrt(-dt), normalized to mean 1 (flow_grpo's Wan trainer)
                  grad_accum=1, same_noise=False, timestep_weight="none",
                  # > 0: every DiT update adds this x the SFT-VDM flow-matching loss on the step's ground
                  # truth (target video, caption, reference latents; flow_grpo's auxiliary ``sft`` term)
                  sft_weight=0.0,
                  # the DiT's RL objective: "flow_grpo" (the paper's: SDE rollouts, per-timestep log-prob ratio)
                  # | "nft" (DiffusionNFT: the policy's own ODE renders, a reward-weighted flow-matching step on
                  # their final latents with nft_timesteps forward-noise draws; rl.stages.nft_grads)
                  dit_objective="flow_grpo", nft_beta=1.0, nft_timesteps=4,
                  vlm_lr=None, dit_lr=None,    # per-part learning rates (None: lr)
                  ema_decay=0.0,               # > 0: a parameter EMA of the trained parts: what is evaluated and exported
                  vlm_ema_decay=None, dit_ema_decay=None),   # per-part EMA decays (None: ema_decay; 0: none)
    ))
    return c
