"""Bench section ``vlm_parity``: Qwen2.5-VL logits of one video prompt, ours vs transformers, on the
same random weights and dtype (the run's): the error of the whole model (vision tower + decoder),
both given our M-RoPE positions (the conventions differ after a long video: README, Conventions)."""
from __future__ import annotations

import numpy as np
from flax import nnx

from .common import BenchContext, figure, output_parity, section
from .vlm import _build_qwen


@section("vlm_parity")
def bench_vlm_parity(ctx: BenchContext) -> list[dict]:
    from vans_jax.data.synthetic import moving_square
    from vans_jax.models import qwen2_5_vl as qwen
    from vans_jax.models.qwen2_5_vl import processor

    c = ctx.cfg.vlm
    model, hf, reason = ctx.cached("qwen", lambda: _build_qwen(ctx))
    mcfg = model.config
    frames = moving_square(int(c.num_frames), int(c.height), int(c.width), seed=ctx.seed + 1)
    pixels, grid, seconds = processor.preprocess_videos([frames], float(c.fps), min_pixels=int(c.min_pixels),
                                                        max_pixels=int(c.max_pixels))
    n_video = int(processor.num_vision_tokens(grid, mcfg.vision.spatial_merge_size).sum())
    rng = np.random.default_rng(ctx.seed + 1)
    before, after = (int(x) for x in c.prompt_text_tokens)
    text = lambda n: rng.integers(0, int(c.text_id_max), n)
    ids = np.concatenate([text(before), [mcfg.vision_start_token_id], np.full(n_video, mcfg.video_token_id),
                          [mcfg.vision_end_token_id], text(after)]).astype(np.int64)[None]
    mask = np.ones_like(ids)
    batch = qwen.prepare_inputs(mcfg, ids, mask, pixels, grid, seconds)
    forward = nnx.jit(lambda m, b: m.forward_arrays(b["input_ids"], b["attention_mask"], b["position_ids"],
                                                    b.get("video")))
    ours, logits = ctx.ours(lambda: forward(model, batch))
    shape = dict(prompt_tokens=int(ids.shape[1]), video_tokens=n_video, video_grid_thw=grid[0].tolist(),
                 vocab=mcfg.text.vocab_size, layers=mcfg.text.num_hidden_layers, attn_impl=mcfg.attn_impl)
    ref, parity = None, dict(parity_rel_err=None, parity_mean_rel_err=None, argmax_agreement=None)
    if hf is not None:
        t = ctx.torch
        dev = ctx.torch_device
        inputs = dict(input_ids=t.from_numpy(ids).to(dev), attention_mask=t.from_numpy(mask).to(dev),
                      mm_token_type_ids=t.from_numpy(np.where(ids == mcfg.video_token_id, 2, 0)).to(dev),
                      pixel_values_videos=t.from_numpy(pixels).to(dev, ctx.torch_dtype()),
                      video_grid_thw=t.from_numpy(grid).to(dev), second_per_grid_ts=t.from_numpy(seconds).to(dev),
                      # our M-RoPE positions: transformers 5.x places text after a video differently when
                      # the video's temporal span exceeds its spatial one (README, Conventions)
                      position_ids=t.from_numpy(np.asarray(batch["position_ids"], np.int64)).to(dev))

        def hf_logits():
            with t.inference_mode():
                return hf(**inputs).logits

        ref, ref_logits = ctx.reference(hf_logits)
        ref_np = ref_logits.float().cpu().numpy()
        ours_np = np.asarray(logits, np.float32)
        parity = dict(output_parity(ours_np, ref_np),
                      argmax_agreement=float((ours_np.argmax(-1) == ref_np.argmax(-1)).mean()))
    return [figure("vlm_logits", "vlm_parity", "logits of one video prompt (vision tower + decoder), ours vs "
                   "transformers on the same weights", shape, ctx.dtype, ours, ref, reason, **parity)]
