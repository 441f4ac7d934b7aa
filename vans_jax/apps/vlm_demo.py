"""The VLM half of VANS on a synthetic clip: video + question -> G sampled answers.

With ``vlm.path`` empty, a tiny random Qwen2.5-VL and a tiny tokenizer are built on the fly
(no weights, no network), so the whole path - frame sampling, the Qwen processor, the chat
template with the VANS system prompt, M-RoPE, the jitted prefill + decode loop - runs anywhere.
With ``vlm.path`` set, the checkpoint and its tokenizer are loaded from that local directory.
"""
from __future__ import annotations

import json
import os
import tempfile
import time

import jax
import numpy as np
from flax import nnx

from vans_jax import parallel
from vans_jax.models import qwen2_5_vl as qwen
from vans_jax.models.qwen2_5_vl import processor, tokenizer as tok_lib
from vans_jax.rl.format import TAGS, format_response, parse_response


def synthetic_clip(num_frames: int = 12, height: int = 84, width: int = 112, seed: int = 0):
    """A red square moving right over a textured background (uint8 frames)."""
    rng = np.random.default_rng(seed)
    bg = (rng.integers(0, 40, size=(height, width, 3)) + np.array([20, 60, 20])).astype(np.uint8)
    frames = np.repeat(bg[None], num_frames, axis=0)
    size = height // 4
    for t in range(num_frames):
        x = int(t * (width - size) / max(num_frames - 1, 1))
        y = height // 2 - size // 2
        frames[t, y:y + size, x:x + size] = (220, 30, 30)
    return frames


def _tiny_model(cfg, ids, seed):
    model_dict = dict(cfg.vlm.model.to_dict() if hasattr(cfg.vlm.model, "to_dict") else cfg.vlm.model)
    model_dict.update(vocab_size=ids["vocab_size"], image_token_id=ids["image_pad"], video_token_id=ids["video_pad"],
                      vision_start_token_id=ids["vision_start"], vision_end_token_id=ids["vision_end"],
                      eos_token_id=ids["eos"], pad_token_id=ids["pad"])
    mcfg = qwen.Qwen2_5_VLConfig.from_hf_dict(model_dict, dtype=cfg.vlm.dtype, attn_impl=cfg.vlm.attn_impl,
                                              remat=cfg.vlm.remat)
    return qwen.Qwen2_5_VLModel(mcfg, rngs=nnx.Rngs(seed))


def run(cfg, question: str, output: str | None = None, video: str | None = None) -> dict:
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
        from vans_jax.data.video_io import read_video
        frames, fps = read_video(video)
    else:
        frames, fps = synthetic_clip(seed=seed), 4.0
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
