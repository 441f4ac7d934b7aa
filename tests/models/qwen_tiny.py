"""Tiny random Qwen2.5-VL references (transformers) and matching inputs for the parity tests.

The config keeps every structural feature of the 3B: GQA (4 heads / 2 KV heads), q/k/v bias,
M-RoPE sections, windowed + full-attention vision blocks, merger, tied or untied embeddings.
"""
from __future__ import annotations

import numpy as np
import torch

VOCAB = 400
IDS = dict(vision_start=390, vision_end=391, image=392, video=393, eos=394, pad=395)


def hf_config(tie=True, vocab=VOCAB):
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(
        text_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=96, vocab_size=vocab, rms_norm_eps=1e-6, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e6},
                         eos_token_id=IDS["eos"], pad_token_id=IDS["pad"], tie_word_embeddings=tie),
        vision_config=dict(depth=4, hidden_size=32, num_heads=2, intermediate_size=48, out_hidden_size=64,
                           fullatt_block_indexes=[1, 3], window_size=56, tokens_per_second=2),
        image_token_id=IDS["image"], video_token_id=IDS["video"], vision_start_token_id=IDS["vision_start"],
        vision_end_token_id=IDS["vision_end"], tie_word_embeddings=tie)


def hf_model(tie=True, seed=0):
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    cfg = hf_config(tie)
    cfg._attn_implementation = "eager"
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    # random (non-unit) norm weights and biases so every parameter matters
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name or "ln_q" in name or name.endswith("norm1.weight") \
                    or name.endswith("norm2.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.05 * torch.randn_like(p))
    return model


def text_ids(rng, n):
    return list(rng.integers(0, 380, size=n))


def build_batch(padding="right", seconds=(1.0, 0.5), grids=((3, 4, 6), (2, 6, 4)), image_grid=(1, 4, 4),
                seed=0):
    """Three rows: text+video1+text; text+image+text+video2+text; text only. Returns a dict with
    input_ids / attention_mask / pixel values / grids / mm_token_type_ids (numpy)."""
    rng = np.random.default_rng(seed)
    vs, ve = IDS["vision_start"], IDS["vision_end"]
    v1 = [IDS["video"]] * (int(np.prod(grids[0])) // 4)
    v2 = [IDS["video"]] * (int(np.prod(grids[1])) // 4)
    im = [IDS["image"]] * (int(np.prod(image_grid)) // 4)
    rows = [
        text_ids(rng, 5) + [vs] + v1 + [ve] + text_ids(rng, 4),
        text_ids(rng, 3) + [vs] + im + [ve] + text_ids(rng, 2) + [vs] + v2 + [ve] + text_ids(rng, 3),
        text_ids(rng, 9),
    ]
    length = max(len(r) for r in rows)
    ids = np.full((3, length), IDS["pad"], np.int64)
    mask = np.zeros((3, length), np.int64)
    for i, r in enumerate(rows):
        if padding == "right":
            ids[i, :len(r)], mask[i, :len(r)] = r, 1
        else:
            ids[i, length - len(r):], mask[i, length - len(r):] = r, 1
    types = np.zeros_like(ids)
    types[ids == IDS["image"]] = 1
    types[ids == IDS["video"]] = 2
    n_vid = sum(int(np.prod(g)) for g in grids)
    return dict(input_ids=ids, attention_mask=mask, mm_token_type_ids=types,
                pixel_values_videos=rng.standard_normal((n_vid, 1176)).astype(np.float32),
                video_grid_thw=np.array(grids, np.int64), second_per_grid_ts=np.array(seconds, np.float32),
                pixel_values=rng.standard_normal((int(np.prod(image_grid)), 1176)).astype(np.float32),
                image_grid_thw=np.array([image_grid], np.int64))


def to_torch(batch, keys):
    return {k: torch.from_numpy(np.asarray(batch[k])) for k in keys}


