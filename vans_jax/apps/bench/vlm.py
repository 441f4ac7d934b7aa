"""Bench section ``vlm``: Qwen2.5-VL prefill of one video prompt and decode of G x N new tokens
(``models.qwen2_5_vl.generate``) vs ``transformers ... .generate``."""
from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from .common import BenchContext, figure, random_model, section, spread

PAIR_TRIES = 3     # measurements of the generate(1) / generate(N) pair before decode is called unmeasurable


def measure_pair(measure, n: int, tries: int = PAIR_TRIES):
    """(generate(1) stats, (generate(n) stats, output)) from ``measure(k) -> (stats, output)``: the pair
    is measured again (up to ``tries`` times) while generate(n) is not slower than generate(1) in every
    repeat, so a burst of load on a busy host does not turn into a negative decode time. Both stats
    record ``pair_attempts``."""
    for attempt in range(1, int(tries) + 1):
        pre, _ = measure(1)
        full, out = measure(n)
        if all(f > p for f, p in zip(full["times_s"], pre["times_s"])):
            break
    pre["pair_attempts"] = full["pair_attempts"] = attempt
    return pre, (full, out)


def _build_qwen(ctx: BenchContext):
    """(our model, HF model or None, reason): random weights; with the reference, a random
    transformers model saved and loaded by our loader."""
    from vans_jax.models import qwen2_5_vl as qwen

    c = ctx.cfg.vlm
    model_dict = c.model.to_dict()
    transformers, reason = ctx.require("transformers")
    if transformers is None:
        mcfg = qwen.Qwen2_5_VLConfig.from_hf_dict(model_dict, dtype=ctx.dtype, attn_impl=c.attn_impl)
        return random_model(lambda: qwen.Qwen2_5_VLModel(mcfg, rngs=nnx.Rngs(0)), ctx.seed), None, reason
    hf_cfg = transformers.Qwen2_5_VLConfig(**model_dict)
    hf_cfg._attn_implementation = str(c.reference_attn)
    hf = ctx.to_torch_dtype(transformers.Qwen2_5_VLForConditionalGeneration(hf_cfg).eval())
    path = ctx.tmpdir("qwen")
    hf.save_pretrained(path)
    ours = qwen.from_pretrained(path, dtype=ctx.dtype, attn_impl=c.attn_impl)
    return ours, hf.to(ctx.torch_device), None


@section("vlm")
def bench_vlm(ctx: BenchContext) -> list[dict]:
    from vans_jax.models import qwen2_5_vl as qwen
    from vans_jax.models.qwen2_5_vl import processor
    from vans_jax.data.synthetic import moving_square

    c = ctx.cfg.vlm
    model, hf, reason = ctx.cached("qwen", lambda: _build_qwen(ctx))
    mcfg = model.config
    frames = moving_square(int(c.num_frames), int(c.height), int(c.width), seed=ctx.seed)
    pixels, grid, seconds = processor.preprocess_videos([frames], float(c.fps), min_pixels=int(c.min_pixels),
                                                        max_pixels=int(c.max_pixels))
    n_video = int(processor.num_vision_tokens(grid, mcfg.vision.spatial_merge_size).sum())
    rng = np.random.default_rng(ctx.seed)
    text = lambda n: rng.integers(0, int(c.text_id_max), n)       # ordinary (non-special) token ids
    before, after = (int(x) for x in c.prompt_text_tokens)
    ids = np.concatenate([text(before), [mcfg.vision_start_token_id], np.full(n_video, mcfg.video_token_id),
                          [mcfg.vision_end_token_id], text(after)]).astype(np.int64)[None]
    mask = np.ones_like(ids)
    batch = qwen.prepare_inputs(mcfg, ids, mask, pixels, grid, seconds)
    G, N = int(c.num_return_sequences), int(c.max_new_tokens)
    if N < 2:
        raise ValueError(f"vlm.max_new_tokens must be >= 2 to time decoding, got {N}")

    def ours_generate(n):
        # eos_token_id=-1: never stops early, so every row decodes exactly n tokens (as min_new_tokens)
        return qwen.generate(model, batch, max_new_tokens=n, temperature=1.0, top_p=1.0, top_k=0,
                             num_return_sequences=G, rng=jax.random.key(ctx.seed), eos_token_id=-1).tokens

    prefill, (full, tokens) = measure_pair(lambda n: ctx.ours(lambda: ours_generate(n)), N)
    if tokens.shape != (G, N):
        raise RuntimeError(f"generate returned tokens of shape {tokens.shape}, expected {(G, N)}")
    ref_prefill = ref_full = None
    if hf is not None:
        t = ctx.torch
        dev = ctx.torch_device
        types = np.where(ids == mcfg.video_token_id, 2, 0)
        inputs = dict(input_ids=t.from_numpy(ids).to(dev), attention_mask=t.from_numpy(mask).to(dev),
                      mm_token_type_ids=t.from_numpy(types).to(dev),
                      pixel_values_videos=t.from_numpy(pixels).to(dev, ctx.torch_dtype()),
                      video_grid_thw=t.from_numpy(grid).to(dev), second_per_grid_ts=t.from_numpy(seconds).to(dev))

        def hf_generate(n):
            with t.inference_mode():
                out = hf.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=True, temperature=1.0,
                                  top_p=1.0, top_k=0, num_return_sequences=G, eos_token_id=mcfg.eos_token_id,
                                  pad_token_id=mcfg.pad_token_id)
            if out.shape != (G, ids.shape[1] + n):
                raise RuntimeError(f"transformers generate returned {tuple(out.shape)}, expected "
                                   f"{(G, ids.shape[1] + n)}")
            return out

        ref_prefill, (ref_full, _) = measure_pair(lambda n: ctx.reference(lambda: hf_generate(n)), N)

    shape = dict(prompt_tokens=int(ids.shape[1]), video_tokens=n_video, video_frames=int(c.num_frames),
                 frame_size=[int(c.height), int(c.width)], video_grid_thw=grid[0].tolist(),
                 num_return_sequences=G, new_tokens=N, vocab=mcfg.text.vocab_size, layers=mcfg.text.num_hidden_layers,
                 hidden=mcfg.text.hidden_size, vision_depth=mcfg.vision.depth)

    def decode(full_stats, prefill_stats):
        """generate(N) minus generate(1), paired repeat by repeat (the i-th run of each)."""
        if full_stats is None:
            return None
        d = dict(full_stats, **spread([f - p for f, p in zip(full_stats["times_s"], prefill_stats["times_s"])]))
        d["warmup_s"] = full_stats["warmup_s"]
        if d["min_s"] <= 0:
            raise RuntimeError(f"generate({N}) was not slower than generate(1) in every repeat "
                               f"in {PAIR_TRIES} tries ({full_stats['times_s']} s vs {prefill_stats['times_s']} s): decoding is below the "
                               f"timing noise; raise vlm.max_new_tokens")
        d["tokens_per_s"] = G * (N - 1) / d["steady_s"]
        return d

    for stats in (full, ref_full):
        if stats is not None:
            stats["tokens_per_s"] = G * N / stats["steady_s"]
    note_ref = ("transformers expands the prompt to G rows before prefill (G x the prefill work); "
                "ours prefills once and repeats the KV cache")
    return [
        figure("vlm_prefill", "vlm", "prefill of one video prompt (vision tower + LM) and the first sampled "
               "token", shape, ctx.dtype, prefill, ref_prefill, reason, note=note_ref),
        figure("vlm_decode", "vlm", f"decode of G x (N - 1) = {G} x {N - 1} tokens: generate(N) minus "
               f"generate(1), sampling at temperature 1, EOS suppressed", shape, ctx.dtype, decode(full, prefill),
               decode(ref_full, ref_prefill), reason),
        figure("vlm_generate", "vlm", f"prefill + {G} x {N} new tokens", shape, ctx.dtype, full, ref_full, reason,
               note=note_ref),
    ]
