"""`vans-jax bench` at reduced size for CPUs (fp32, tiny random models keeping every structural
feature; about 2.5 minutes on 2 cores with the PyTorch reference, 1.5 of them Joint-GRPO's compilation):

    vans-jax bench --config configs/bench_cpu.py --output out/bench_cpu.json

Same structure as configs/bench_gpu.py; shrink further with overrides, e.g.
--config.repeats=1 --config.vlm.max_new_tokens=8 --config.sections="('dit',)"."""
import importlib.util
import os

_spec = importlib.util.spec_from_file_location("_vans_bench_gpu", os.path.join(os.path.dirname(__file__),
                                                                               "bench_gpu.py"))
_gpu = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_gpu)


def get_config():
    c = _gpu.get_config()
    c.dtype = "float32"
    c.repeats = 3
    c.reference_repeats = 3
    c.matmul.size = 1024
    c.vlm.model.update(dict(
        vocab_size=400, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rope_scaling=dict(type="mrope", mrope_section=[4, 6, 6]),
        image_token_id=392, video_token_id=393, vision_start_token_id=390, vision_end_token_id=391,
        eos_token_id=394, pad_token_id=395,
        vision_config=dict(depth=4, hidden_size=64, num_heads=2, intermediate_size=128, out_hidden_size=128,
                           patch_size=14, temporal_patch_size=2, spatial_merge_size=2, window_size=56,
                           fullatt_block_indexes=[1, 3], in_channels=3, tokens_per_second=2, hidden_act="silu")))
    c.vlm.update(dict(attn_impl="xla", height=112, width=112, min_pixels=56 * 56, max_pixels=112 * 112,
                      prompt_text_tokens=(40, 12), text_id_max=380, num_return_sequences=4, max_new_tokens=32))
    c.wan.dit.update(dict(num_attention_heads=4, attention_head_dim=64, text_dim=128, freq_dim=64, ffn_dim=1024,
                          num_layers=2))
    c.wan.vae.update(dict(base_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1))
    c.wan.text_encoder.update(dict(d_model=128, d_kv=32, num_heads=4, d_ff=256, num_layers=2))
    c.wan.attn_impl = "xla"
    c.dit.update(dict(n_ref=2, target_frames=3, height=128, width=128, text_len=32))
    c.pipeline.update(dict(height=64, width=64, num_frames=9, num_steps=4, n_ref=2, text_len=32))
    c.vae.update(dict(height=64, width=64, num_frames=9))
    # Joint-GRPO: the models above, a tiny CLIP, 64x64x9 videos after 2 reference latent frames, 4 sampler
    # steps, 24 new tokens, G = 2 in both stages (one VAE-decode compilation for both), at most 2 anchor
    # attempts. Compilation is most of it (~80 s of CPU time; the Stage-2 DiT update alone ~22 s).
    c.grpo.update(dict(steps=3, group_size=dict(grpo_stage1=2, grpo_stage2=2), dit_remat="none", text_len=32,
                       world=dict(input_frames=11, segment=2,   # events that fit canvases down to 32x32
                                  events=("bounce", "grow", "shrink", "move_pattern", "color_cycle"))))
    c.grpo.clip = dict(
        text_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                         max_position_embeddings=77),
        vision_config=dict(hidden_size=32, intermediate_size=40, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    r = c.grpo.recipe
    r.vlm.update(dict(attn_impl="xla", remat="none", video_min_pixels=56 * 56, video_max_pixels=112 * 112))
    r.generation.max_new_tokens = 24
    r.video.update(dict(height=64, width=64, num_frames=9, n_ref=2, fps=4))
    r.train.grpo.update(dict(train_sampling_steps=4, anchor_max_tries=2))
    return c
