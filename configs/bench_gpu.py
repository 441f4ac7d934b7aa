"""`vans-jax bench` at full size (one accelerator, bf16, random weights):
Qwen2.5-VL-3B (G = 8 x 256 new tokens from one 6-frame video prompt), Wan2.1-T2V-1.3B DiT at
352x640 with 6 + 9 latent frames (13,200 tokens), a 50-step CFG generation at 352x640x33, the
Wan2.1 VAE at 352x640x33; Joint-GRPO Stage-1 (G = 8 captions of 256 tokens, each rendered at
352x640x33 with 20 steps) and Stage-2 (G = 4 SDE videos at 352x640x33, 20 steps, 19 trained)
steps with those models and a ViT-B/32 CLIP. The UMT5-XXL text encoder has its full depth and
width but a tiny vocabulary (the benchmark tokenizer's), which changes nothing but the embedding
table's size.

    vans-jax bench --config configs/bench_gpu.py --output out/bench_gpu.json

The PyTorch reference needs a CUDA build of torch in the same environment; run with
XLA_PYTHON_CLIENT_PREALLOCATE=false so JAX and torch share the GPU."""
import importlib.util
import os

import ml_collections

_spec = importlib.util.spec_from_file_location("_vans_full", os.path.join(os.path.dirname(__file__), "vans.py"))
_full = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_full)

WAN21_LATENTS_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                      0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]
WAN21_LATENTS_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                     3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160]


def wan_dit_1_3b():
    """diffusers WanTransformer3DModel config of Wan2.1-T2V-1.3B."""
    return dict(patch_size=[1, 2, 2], num_attention_heads=12, attention_head_dim=128, in_channels=16,
                out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)


def wan_vae():
    """diffusers AutoencoderKLWan config of Wan2.1."""
    return dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                temperal_downsample=[False, True, True], dropout=0.0, latents_mean=WAN21_LATENTS_MEAN,
                latents_std=WAN21_LATENTS_STD)


def umt5_xxl(vocab_size=64):
    return dict(vocab_size=vocab_size, d_model=4096, d_kv=64, num_heads=64, d_ff=10240, num_layers=24,
                relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.0,
                feed_forward_proj="gated-gelu")


def grpo_recipe():
    """The Joint-GRPO recipe of configs/vans.py (the training config's vlm / vdm / clip / generation /
    video / train.grpo blocks): what `vans-jax train` would run, through the same grpo_settings /
    render_settings."""
    full = _full.get_config()
    # set by the bench: the architectures (above), the dtype (the run's) and G (grpo.group_size, per stage)
    del full.vlm.model, full.vdm.model, full.vlm.dtype, full.vdm.dtype, full.train.grpo.group_size
    return ml_collections.ConfigDict(dict(
        vlm=full.vlm, vdm=full.vdm, clip=full.clip, generation=full.generation, video=full.video,
        train=dict(batch_size=full.train.batch_size, pad_multiple=full.train.pad_multiple, grpo=full.train.grpo)))


def get_config():
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.dtype = "bfloat16"
    c.repeats = 5
    c.reference = True                 # False: our side only (e.g. on TPU, where torch cannot run)
    c.reference_device = "auto"        # "auto": cuda if torch has it (else no reference on an accelerator)
    c.reference_repeats = 3
    c.threads = 0                      # CPU threads of both sides: XLA's pool (PJRT_NPROC) and torch's intra-op
                                       # and inter-op threads (0: the cores available to the process)
    c.omp_wait_policy = "PASSIVE"      # torch's OpenMP idle threads sleep instead of spinning ("": environment's)
    c.sections = ("matmul", "vlm", "dit", "pipeline", "vae", "train", "predict", "grpo")
    c.matmul = ml_collections.ConfigDict(dict(size=8192, repeats=20))
    c.vlm = ml_collections.ConfigDict(dict(
        model=_full.qwen2_5_vl_3b(), attn_impl="auto", reference_attn="sdpa",
        # VANS: 6 frames at 1 fps of a 352x640 clip; the processor's VANS pixel bounds
        num_frames=6, fps=1.0, height=352, width=640, min_pixels=128 * 28 * 28, max_pixels=768 * 28 * 28,
        prompt_text_tokens=(80, 20),   # system prompt + chat template before the video; question after
        text_id_max=150000, num_return_sequences=8, max_new_tokens=256))
    c.wan = ml_collections.ConfigDict(dict(dit=wan_dit_1_3b(), vae=wan_vae(), text_encoder=umt5_xxl(),
                                           attn_impl="auto", vae_dtype="float32"))
    c.dit = ml_collections.ConfigDict(dict(batch=1, n_ref=6, target_frames=9, height=352, width=640, text_len=512,
                                           remat="none"))
    c.pipeline = ml_collections.ConfigDict(dict(height=352, width=640, num_frames=33, num_steps=50, guidance_scale=5.0,
                                                shift=5.0, n_ref=6, text_len=512,
                                                caption="the person cuts the onion on the board"))
    c.vae = ml_collections.ConfigDict(dict(height=352, width=640, num_frames=33))
    # our own heaviest CPU work, so regressions show: SFT steps of the world config (the shipped tiny
    # models; batch_size 0: the config's train.batch_size) and `vans-jax predict` end to end on them
    c.train = ml_collections.ConfigDict(dict(config="tiny_world", modes=("sft_vlm", "sft_vdm"), steps=3,
                                             batch_size=0))
    c.predict = ml_collections.ConfigDict(dict())
    # Joint-GRPO steps, the SPEC / configs/vans.py recipe: 1 prompt per step (train.batch_size), 352x640x33
    # videos after 6 reference latent frames, 20 sampler steps (Stage 2 trains the first 19), CFG 4.5, 256
    # new tokens; G = 8 in Stage 1 (the paper's group). Stage 2 takes G = 4: its update runs the G videos,
    # x2 for CFG, through the DiT at once, and the memory plan puts one 13,200-token row with full remat
    # at up to ~12 GB (an XLA:CPU upper bound), so 16 rows (G = 8) cannot fit one chip beside the models
    # and 8 rows are about the limit of an H200 (on an H100: --config.grpo.group_size.grpo_stage2=2).
    recipe = grpo_recipe()
    recipe.vlm.remat = "full"          # memory-plan: one chip holds the Stage-1 VLM step only with full remat
    c.grpo = ml_collections.ConfigDict(dict(
        stages=("grpo_stage1", "grpo_stage2"),
        steps=3,                       # timed steps per stage, after one warm-up step (compilation)
        group_size=dict(grpo_stage1=8, grpo_stage2=4),
        dit_remat="full",              # the trained DiT's remat policy in Stage 2
        text_len=0,                    # caption tokens into the DiT (0: the DiT config's, 512 for Wan)
        clip={},                       # a random CLIP's Hugging Face config ({}: ViT-B/32, the reward model)
        world=dict(input_frames=41, segment=8, events=()),   # synthetic input clips (41 frames: 6 VLM frames);
                                                             # events: () = all
        recipe=recipe))
    return c
