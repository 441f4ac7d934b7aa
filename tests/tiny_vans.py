"""Tiny random VANS model directories for the pipeline / predict tests, in the real layouts:
a Hugging Face Qwen2.5-VL directory with a tiny byte-level BPE tokenizer, and a diffusers Wan2.1
pipeline directory (the components of tests/models/test_wan_pipeline.py). Plus a small input clip."""
from __future__ import annotations

import os

import numpy as np
import torch

from vans_jax.models.qwen2_5_vl.tokenizer import build_tiny_tokenizer
from vans_jax.rl.format import TAGS

H, W, F, FPS = 32, 48, 5, 8.0
Z = 16
DIT = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=Z, out_channels=Z,
           text_dim=32, freq_dim=32, ffn_dim=96, num_layers=2, cross_attn_norm=True,
           qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=64)
VAE = dict(base_dim=16, z_dim=Z, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
           temperal_downsample=[False, True, True], dropout=0.0,
           latents_mean=list(np.linspace(-0.8, 0.9, Z).round(3)), latents_std=list(np.linspace(0.6, 2.5, Z).round(3)))
UMT5 = dict(vocab_size=300, d_model=32, d_kv=16, num_heads=2, d_ff=64, num_layers=2,
            relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.0)

# settings that keep every stage tiny: 32x48x5 video, 2 sampler steps, 8 new tokens
SETTINGS = dict(height=H, width=W, num_frames=F, fps=FPS, num_steps=2, cfg_scale=4.0, shift=3.0, n_ref=3,
                reference_frames=5, vlm_num_frames=4, vlm_sample_fps=2.0, video_min_pixels=56 * 56,
                video_max_pixels=112 * 112, max_new_tokens=8, temperature=0.0, top_p=1.0, negative_prompt="",
                prompt_bucket=32)


def _perturb(m, scale, pred=lambda n: True):
    with torch.no_grad():
        for n, p in m.named_parameters():
            if pred(n):
                p.add_(torch.randn_like(p) * scale)
    return m.eval()


def vlm_config(ids: dict, tie: bool = False):
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(
        text_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=96, vocab_size=ids["vocab_size"], rms_norm_eps=1e-6,
                         max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e6},
                         eos_token_id=ids["eos"], pad_token_id=ids["pad"], bos_token_id=None,
                         tie_word_embeddings=tie),
        vision_config=dict(depth=4, hidden_size=32, num_heads=2, intermediate_size=48, out_hidden_size=64,
                           fullatt_block_indexes=[1, 3], window_size=56, tokens_per_second=2),
        image_token_id=ids["image_pad"], video_token_id=ids["video_pad"], vision_start_token_id=ids["vision_start"],
        vision_end_token_id=ids["vision_end"], tie_word_embeddings=tie)


def build_vlm_dir(d: str, seed: int = 0, tie: bool = False):
    """A tiny random Qwen2.5-VL + tokenizer directory; returns (dir, torch model, token ids). Untied
    embeddings by default: a tied random model tends to repeat its last input token."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    os.makedirs(d, exist_ok=True)
    ids = build_tiny_tokenizer(d, added_tokens=TAGS)
    torch.manual_seed(seed)
    cfg = vlm_config(ids, tie)
    cfg._attn_implementation = "eager"
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    _perturb(model, 0.1, lambda n: "norm" in n or "ln_q" in n)
    model.save_pretrained(d)
    return d, model, ids


def build_vdm_dir(d: str, seed: int = 0) -> str:
    """A tiny random diffusers Wan2.1 pipeline directory."""
    import diffusers
    import transformers

    torch.manual_seed(seed)
    dit = _perturb(diffusers.WanTransformer3DModel(**DIT), 0.1)
    # every VAE weight perturbed: a random encoder is then sensitive enough to its input that different
    # clips give clearly different reference latents
    vae = _perturb(diffusers.AutoencoderKLWan(**VAE), 0.05)
    te = _perturb(transformers.UMT5EncoderModel(transformers.UMT5Config(**UMT5)), 0.2, lambda n: "layer_norm" in n)
    pieces = ["▁a", "▁cat", "▁dog", "▁the", "▁runs", "▁on", "▁red", "▁grass", "▁video", "▁of", "▁big"]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(p, -3.0) for p in pieces] + [(c, -6.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    tok = transformers.T5Tokenizer(vocab=vocab, extra_ids=0)
    sch = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    pipe = diffusers.WanPipeline(tokenizer=tok, text_encoder=te, transformer=dit, vae=vae, scheduler=sch)
    pipe.save_pretrained(d, safe_serialization=True)
    return d


def moving_square(num_frames: int = 12, height: int = 40, width: int = 56, color=(220, 40, 40), seed: int = 0):
    """A coloured square moving right over a textured background: uint8 (T, H, W, 3)."""
    rng = np.random.default_rng(seed)
    bg = (rng.integers(0, 60, size=(height, width, 3)) + np.array([20, 70, 30])).astype(np.uint8)
    frames = np.repeat(bg[None], num_frames, axis=0)
    size = height // 3
    for t in range(num_frames):
        x = int(t * (width - size) / max(num_frames - 1, 1))
        y = height // 2 - size // 2
        frames[t, y:y + size, x:x + size] = color
    return frames
