"""Tiny random VANS models for tests, CPU demos and CI: the full config with small numbers.
Every structural feature is kept (GQA, windowed + full vision blocks, M-RoPE sections)."""
import importlib.util
import os

_spec = importlib.util.spec_from_file_location("_vans_full", os.path.join(os.path.dirname(__file__), "vans.py"))
_full = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_full)


def get_config():
    c = _full.get_config()
    c.vlm.dtype = "float32"
    c.vlm.attn_impl = "xla"
    c.vlm.model.update(dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        rope_scaling=dict(type="mrope", mrope_section=[2, 3, 3]), tie_word_embeddings=True,
        vision_config=dict(depth=4, hidden_size=32, num_heads=2, intermediate_size=48, out_hidden_size=64,
                           patch_size=14, temporal_patch_size=2, spatial_merge_size=2, window_size=56,
                           fullatt_block_indexes=[1, 3], in_channels=3, tokens_per_second=2, hidden_act="silu"),
    ))
    c.vlm.video_min_pixels = 56 * 56
    c.vlm.video_max_pixels = 112 * 112
    c.vdm.dtype = "float32"
    c.vdm.model.update(dict(dim=64, num_layers=2, num_heads=2, head_dim=32, ffn_dim=128, text_dim=32, freq_dim=32,
                            text_len=16))
    c.generation.max_new_tokens = 24
    c.generation.num_return_sequences = 4
    c.video.update(dict(height=64, width=64, num_frames=9, num_steps=4, n_ref=3, fps=4))
    c.data.pipeline.reference_frames = 9
    c.train.update(dict(batch_size=2, log_every=1, checkpoint_every=2, steps=2))
    c.train.sft_vlm.update(dict(lr=1e-3, max_len=384))
    c.train.sft_vdm.update(dict(lr=1e-3))
    c.train.grpo.update(dict(group_size=4, train_sampling_steps=4, train_cfg=2.0, lr=1e-4, anchor_max_tries=2))
    return c
