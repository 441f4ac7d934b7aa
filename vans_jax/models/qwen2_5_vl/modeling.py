"""Qwen2.5-VL (vision tower + Qwen2 decoder with M-RoPE) in Flax NNX.

The hot paths are pure functions of arrays: ``vision_forward`` and ``text_forward`` take the
host-prepared layout arrays (see ``rope.py``) so they can be jitted with fixed shapes.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ...parallel import constrain
from ..layers import (Embed, Linear, RMSNorm, apply_rotary, attention, resolve_attention_impl, resolve_dtype,
                      scan_layers, stack_layers)
from .config import Qwen2_5_VLConfig, TextConfig, VisionConfig


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """LoRA on the language model's projections (PEFT semantics: scale alpha / rank)."""
    rank: int = 8
    alpha: float = 32.0
    dropout: float = 0.05
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    include_vision: bool = False  # also adapt the vision tower's qkv/proj/mlp


def _maybe_lora(layer: Linear, name: str, lora: LoRAConfig | None, rngs, dtype):
    if lora is not None and name in lora.targets:
        layer.add_lora(lora.rank, lora.alpha, lora.dropout, rngs, dtype)
    return layer


# ----------------------------------------------------------------------------- vision


class VisionBlock(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, rngs, lora: LoRAConfig | None = None):
        d, m = cfg.hidden_size, cfg.intermediate_size
        lora = lora if (lora is not None and lora.include_vision) else None
        self.num_heads = cfg.num_heads
        self.norm1 = RMSNorm(d, eps=1e-6, dtype=dtype)
        self.norm2 = RMSNorm(d, eps=1e-6, dtype=dtype)
        self.qkv = _maybe_lora(Linear(d, 3 * d, axes=("vision_embed", "qkv"), dtype=dtype, rngs=rngs),
                               "qkv", lora, rngs, dtype)
        self.proj = _maybe_lora(Linear(d, d, axes=("vision_heads", "vision_embed"), dtype=dtype, rngs=rngs),
                                "proj", lora, rngs, dtype)
        self.gate_proj = _maybe_lora(Linear(d, m, axes=("vision_embed", "vision_mlp"), dtype=dtype, rngs=rngs),
                                     "gate_proj", lora, rngs, dtype)
        self.up_proj = _maybe_lora(Linear(d, m, axes=("vision_embed", "vision_mlp"), dtype=dtype, rngs=rngs),
                                   "up_proj", lora, rngs, dtype)
        self.down_proj = _maybe_lora(Linear(m, d, axes=("vision_mlp", "vision_embed"), dtype=dtype, rngs=rngs),
                                     "down_proj", lora, rngs, dtype)

    def __call__(self, x, cos, sin, is_full, layout, impl, rng=None, block_sizes=None):
        keys = [None] * 5 if rng is None else list(jax.random.split(rng, 5))
        n, d = x.shape
        h = self.norm1(x)
        qkv = self.qkv(h, keys[0]).reshape(n, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
        q = apply_rotary(q, cos[:, None], sin[:, None])
        k = apply_rotary(k, cos[:, None], sin[:, None])
        o = jax.lax.cond(is_full, lambda: segment_attention(q, k, v, layout, "full", impl, block_sizes),
                         lambda: segment_attention(q, k, v, layout, "window", impl, block_sizes))
        x = x + self.proj(o.reshape(n, d), keys[1])
        h = self.norm2(x)
        h = jax.nn.silu(self.gate_proj(h, keys[2])) * self.up_proj(h, keys[3])
        return x + self.down_proj(h, keys[4])


def segment_attention(q, k, v, layout, kind, impl, block_sizes=None):
    """Block-diagonal attention over contiguous segments (windows, or temporal slices): q, k, v
    (N, H, D) -> (N, H, D). On padded per-segment blocks; with the splash kernel over the whole
    sequence with one segment id per segment instead."""
    gather, valid, scatter = layout[f"{kind}_gather"], layout[f"{kind}_valid"], layout[f"{kind}_scatter"]
    n, h, d = q.shape
    if resolve_attention_impl(impl, q.dtype) == "splash":
        seg = segment_ids_from_layout(gather, valid, n)[None]
        return attention(q[None], k[None], v[None], segment_ids=(seg, seg), impl="splash",
                         block_sizes=block_sizes)[0]
    o = attention(q[gather], k[gather], v[gather], mask=valid[:, None, None, :], impl=impl)
    return o.reshape(-1, h, d)[scatter]


def segment_ids_from_layout(gather, valid, n: int):
    """(N,) int32: the segment (row of ``gather``) each of the N tokens belongs to."""
    rows = jnp.broadcast_to(jnp.arange(gather.shape[0], dtype=jnp.int32)[:, None], gather.shape)
    idx = jnp.where(valid, gather, n)           # padding slots write out of bounds: dropped
    return jnp.zeros((n,), jnp.int32).at[idx.reshape(-1)].set(rows.reshape(-1), mode="drop")


class VisionTransformer(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, rngs, lora: LoRAConfig | None = None):
        self.cfg = cfg
        d = cfg.hidden_size
        patch_dim = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2
        # Conv3d with stride == kernel on flat patches is a matmul (no bias).
        self.patch_embed = Linear(patch_dim, d, use_bias=False, axes=("patch", "vision_embed"), dtype=dtype,
                                  rngs=rngs)
        self.blocks = stack_layers(lambda r: VisionBlock(cfg, dtype=dtype, rngs=r, lora=lora), cfg.depth, rngs)
        unit = cfg.spatial_merge_size ** 2
        self.merger_norm = RMSNorm(d, eps=1e-6, dtype=dtype)
        self.merger_fc1 = Linear(d * unit, d * unit, axes=("vision_embed", "vision_mlp"), dtype=dtype, rngs=rngs)
        self.merger_fc2 = Linear(d * unit, cfg.out_hidden_size, axes=("vision_mlp", "embed"), dtype=dtype,
                                 rngs=rngs)

    def __call__(self, patches, layout, *, impl="xla", remat="none", rng=None, block_sizes=None):
        """patches: (N, 1176) in the processor's order; layout: arrays from ``vision_layout``.
        Returns merged features (N / merge^2, out_hidden_size) in the original order."""
        cfg = self.cfg
        x = self.patch_embed(patches.astype(self.patch_embed.kernel[...].dtype))
        x = x[layout["perm"]]
        half = cfg.head_dim // 2
        inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, half, 2, dtype=np.float32) / half))
        freqs = layout["rope_hw"].astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # (N, 2, hd/4)
        freqs = freqs.reshape(freqs.shape[0], -1)
        emb = jnp.concatenate([freqs, freqs], axis=-1)
        cos, sin = jnp.cos(emb), jnp.sin(emb)
        is_full = np.zeros((cfg.depth,), bool)
        is_full[[i for i in cfg.fullatt_block_indexes if i < cfg.depth]] = True
        keys = jnp.arange(cfg.depth) if rng is None else jax.random.split(rng, cfg.depth)

        def body(block, h, xs):
            flag, key = xs
            return block(h, cos, sin, flag, layout, impl, None if rng is None else key, block_sizes), None

        x, _ = scan_layers(self.blocks, body, x, (jnp.asarray(is_full), keys), remat=remat)
        unit = cfg.spatial_merge_size ** 2
        x = self.merger_norm(x).reshape(-1, cfg.hidden_size * unit)
        x = self.merger_fc2(jax.nn.gelu(self.merger_fc1(x), approximate=False))
        return x[layout["unperm"]]


# ----------------------------------------------------------------------------- text


def mrope_cos_sin(cfg: TextConfig, position_ids):
    """cos/sin (B, L, head_dim) from (3, B, L) positions: frequency chunk i uses row i % 3."""
    hd = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, hd, 2, dtype=np.float32) / hd))
    freqs = position_ids.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # (3, B, L, hd/2)
    bounds = np.cumsum((0,) + tuple(cfg.mrope_section))
    row = np.concatenate([np.full(bounds[i + 1] - bounds[i], i % 3) for i in range(len(cfg.mrope_section))])
    freqs = _select_rows(freqs, row)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def _select_rows(freqs, row):
    # freqs: (3, B, L, F); out[..., f] = freqs[row[f], ..., f]
    onehot = jnp.asarray(np.eye(3, dtype=np.float32)[row].T)  # (3, F)
    return jnp.einsum("rblf,rf->blf", freqs, onehot)


# The decoder's residual stream (B, S, D): rows over the batch mesh axes at every layer boundary (a
# sharding constraint under ``jax.set_mesh``; a no-op without a mesh).
HIDDEN = ("activation_batch", None, "activation_embed")


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype, rngs, lora: LoRAConfig | None = None):
        d, hd = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, hd
        self.input_layernorm = RMSNorm(d, eps=cfg.rms_norm_eps, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(d, eps=cfg.rms_norm_eps, dtype=dtype)
        mk = lambda name, i, o, axes, bias: _maybe_lora(
            Linear(i, o, use_bias=bias, axes=axes, dtype=dtype, rngs=rngs), name, lora, rngs, dtype)
        self.q_proj = mk("q_proj", d, cfg.num_attention_heads * hd, ("embed", "heads"), True)
        self.k_proj = mk("k_proj", d, cfg.num_key_value_heads * hd, ("embed", "kv_heads"), True)
        self.v_proj = mk("v_proj", d, cfg.num_key_value_heads * hd, ("embed", "kv_heads"), True)
        self.o_proj = mk("o_proj", cfg.num_attention_heads * hd, d, ("heads", "embed"), False)
        self.gate_proj = mk("gate_proj", d, cfg.intermediate_size, ("embed", "mlp"), False)
        self.up_proj = mk("up_proj", d, cfg.intermediate_size, ("embed", "mlp"), False)
        self.down_proj = mk("down_proj", cfg.intermediate_size, d, ("mlp", "embed"), False)

    def __call__(self, x, cos, sin, k_cache, v_cache, cache_index, mask, impl, rng=None, block_sizes=None):
        """x: (B, S, D). k_cache/v_cache: (B, T, Hkv, hd) holding this layer's keys; the S new
        keys are written at ``cache_index``. mask: (B, S, T) bool, or (B, S) token validity when
        T == S (causal over the valid tokens: segment ids, the splash kernel's form). Returns
        (x, k_cache, v_cache)."""
        keys = [None] * 7 if rng is None else list(jax.random.split(rng, 7))
        b, s, _ = x.shape
        h = self.input_layernorm(x)
        q = self.q_proj(h, keys[0]).reshape(b, s, self.num_heads, self.head_dim)
        k = self.k_proj(h, keys[1]).reshape(b, s, self.num_kv_heads, self.head_dim)
        v = self.v_proj(h, keys[2]).reshape(b, s, self.num_kv_heads, self.head_dim)
        q = apply_rotary(q, cos[:, :, None], sin[:, :, None])
        k = apply_rotary(k, cos[:, :, None], sin[:, :, None])
        k_cache = jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), cache_index, axis=1)
        v_cache = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), cache_index, axis=1)
        if mask.ndim == 2:   # (B, S) token validity, no cache: causal + padding as segment ids
            seg = mask.astype(jnp.int32)
            o = attention(q, k_cache, v_cache, segment_ids=(seg, seg), causal=True, impl=impl,
                          block_sizes=block_sizes)
        else:
            o = attention(q, k_cache, v_cache, mask=mask[:, None], impl=impl)
        x = x + self.o_proj(o.reshape(b, s, -1), keys[3])
        h = self.post_attention_layernorm(x)
        h = jax.nn.silu(self.gate_proj(h, keys[4])) * self.up_proj(h, keys[5])
        return constrain(x + self.down_proj(h, keys[6]), HIDDEN), k_cache, v_cache


class Qwen2_5_VLModel(nnx.Module):
    """Qwen2.5-VL for conditional generation. ``__call__`` takes the HF processor's outputs."""

    def __init__(self, cfg: Qwen2_5_VLConfig, *, rngs: nnx.Rngs, lora: LoRAConfig | None = None):
        self.config = cfg
        self.lora_config = lora
        dtype = resolve_dtype(cfg.dtype)
        t = cfg.text
        self.visual = VisionTransformer(cfg.vision, dtype=dtype, rngs=rngs, lora=lora)
        self.embed_tokens = Embed(t.vocab_size, t.hidden_size, dtype=dtype, rngs=rngs)
        self.layers = stack_layers(lambda r: DecoderLayer(t, dtype=dtype, rngs=r, lora=lora), t.num_hidden_layers,
                                   rngs)
        self.norm = RMSNorm(t.hidden_size, eps=t.rms_norm_eps, dtype=dtype)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(
            t.hidden_size, t.vocab_size, use_bias=False, axes=("embed", "vocab"), dtype=dtype, rngs=rngs)

    # -- pieces of the forward, all traceable

    def embed(self, input_ids, video_feats=None, image_feats=None):
        """Token embeddings with vision features scattered into the video/image token slots
        (row-major order over the batch, as the HF model's masked_scatter)."""
        x = self.embed_tokens(input_ids)
        for feats, tok in ((image_feats, self.config.image_token_id), (video_feats, self.config.video_token_id)):
            if feats is None:
                continue
            is_tok = input_ids == tok
            idx = jnp.cumsum(is_tok.reshape(-1)) - 1
            gathered = feats.astype(x.dtype)[jnp.clip(idx, 0, feats.shape[0] - 1)].reshape(x.shape)
            x = jnp.where(is_tok[..., None], gathered, x)
        return x

    def logits(self, h):
        if self.lm_head is None:
            return self.embed_tokens.attend(h)
        return jnp.einsum("...d,dv->...v", h, self.lm_head.kernel[...], preferred_element_type=jnp.float32)

    def decoder(self, x, position_ids, mask, cache=None, cache_index=0, rng=None):
        """Runs the decoder stack. x: (B, S, D); position_ids (3, B, S); mask (B, S, T) where
        T is the cache length (or S without a cache), or without a cache the (B, S) validity of
        the tokens (causal attention among the valid ones; what the splash kernel takes; the
        outputs at invalid positions differ from the (B, S, S) form's and are meaningless in
        both). Returns (hidden, cache)."""
        if mask.ndim == 2 and (cache is not None or mask.shape != x.shape[:2]):
            raise ValueError(f"a (batch, length) token-validity mask {mask.shape} needs no cache and the "
                             f"input's {x.shape[:2]}; pass a (B, S, T) mask with a cache")
        cfg = self.config
        t = cfg.text
        b, s, _ = x.shape
        cos, sin = mrope_cos_sin(t, position_ids)
        if cache is None:
            shape = (t.num_hidden_layers, b, s, t.num_key_value_heads, t.head_dim)
            cache = (jnp.zeros(shape, x.dtype), jnp.zeros(shape, x.dtype))
        n = t.num_hidden_layers
        keys = jnp.arange(n) if rng is None else jax.random.split(rng, n)

        def body(layer, carry, xs):
            h, kc, vc = carry
            i, key = xs
            h, k_i, v_i = layer(h, cos, sin, kc[i], vc[i], cache_index, mask, cfg.attn_impl,
                                None if rng is None else key, cfg.attn_block_size)
            kc = jax.lax.dynamic_update_index_in_dim(kc, k_i, i, 0)
            vc = jax.lax.dynamic_update_index_in_dim(vc, v_i, i, 0)
            return (h, kc, vc), None

        carry = (constrain(x, HIDDEN), cache[0], cache[1])
        (x, kc, vc), _ = scan_layers(self.layers, body, carry, (jnp.arange(n), keys), remat=cfg.remat)
        return self.norm(x), (kc, vc)

    def forward_arrays(self, input_ids, attention_mask, position_ids, video=None, image=None, rng=None):
        """Full forward on prepared arrays (jit-friendly). video/image: None or
        (patches, layout dict). Returns fp32 logits (B, L, V)."""
        h, _ = self.hidden_states(input_ids, attention_mask, position_ids, video, image, rng)
        return self.logits(h)

    def vision_features(self, vis, rng=None):
        if vis is None:
            return None
        patches, layout = vis
        return self.visual(patches, layout, impl=self.config.attn_impl, remat=self.config.remat, rng=rng,
                           block_sizes=self.config.attn_block_size)

    def hidden_states(self, input_ids, attention_mask, position_ids, video=None, image=None, rng=None,
                      cache_len=None):
        b, s = input_ids.shape
        r_vis, r_txt = (None, None) if rng is None else jax.random.split(rng)
        x = self.embed(input_ids, self.vision_features(video, r_vis), self.vision_features(image, r_vis))
        mask = jnp.asarray(attention_mask).astype(bool) if cache_len is None else causal_mask(attention_mask,
                                                                                               cache_len)
        cache = None
        if cache_len is not None:
            t = self.config.text
            shape = (t.num_hidden_layers, b, cache_len, t.num_key_value_heads, t.head_dim)
            cache = (jnp.zeros(shape, x.dtype), jnp.zeros(shape, x.dtype))
        return self.decoder(x, position_ids, mask, cache, 0, r_txt)

    def __call__(self, input_ids, attention_mask=None, pixel_values_videos=None, video_grid_thw=None,
                 second_per_grid_ts=None, pixel_values=None, image_grid_thw=None, position_ids=None):
        """Eager convenience call with the HF processor's outputs; returns logits (B, L, V).
        For training/serving use ``prepare_inputs`` + a jitted ``forward_arrays``."""
        batch = prepare_inputs(self.config, input_ids, attention_mask, pixel_values_videos, video_grid_thw,
                               second_per_grid_ts, pixel_values, image_grid_thw, position_ids)
        return _jit_forward(self, batch)


def causal_mask(attention_mask, total_len, offset=0):
    """(B, S, T) mask: query i (at slot offset+i) may see key slot j <= offset+i that is valid."""
    attention_mask = jnp.asarray(attention_mask).astype(bool)
    b, s = attention_mask.shape
    valid = attention_mask
    if total_len > s:
        valid = jnp.concatenate([valid, jnp.zeros((b, total_len - s), bool)], axis=1)
    q = jnp.arange(s)[:, None] + offset
    k = jnp.arange(total_len)[None, :]
    return (k <= q)[None] & valid[:, None, :]


@nnx.jit
def _jit_forward(model, batch):
    return model.forward_arrays(batch["input_ids"], batch["attention_mask"], batch["position_ids"],
                                batch.get("video"), batch.get("image"))


def _vision_input(cfg, pixel_values, grid_thw, what, mesh=None):
    from .rope import vision_layout
    if pixel_values is None:
        return None
    if grid_thw is None:
        raise ValueError(f"pixel values for {what} were given without their {what}_grid_thw")
    grid_thw = np.asarray(grid_thw, np.int64).reshape(-1, 3)
    pv = np.asarray(pixel_values)
    v = cfg.vision
    patch_dim = v.in_channels * v.temporal_patch_size * v.patch_size ** 2
    if pv.ndim != 2 or pv.shape[1] != patch_dim:
        raise ValueError(f"{what} pixel values have shape {pv.shape}; expected (num_patches, {patch_dim})")
    if int(grid_thw.prod(-1).sum()) != pv.shape[0]:
        raise ValueError(f"{what}_grid_thw {grid_thw.tolist()} implies {int(grid_thw.prod(-1).sum())} patches, "
                         f"pixel values have {pv.shape[0]}")
    if mesh is None:
        layout = {k: jnp.asarray(a) for k, a in vision_layout(v, grid_thw).items()}
        return jnp.asarray(pv, jnp.float32), layout
    from ... import parallel
    from jax.sharding import NamedSharding, PartitionSpec
    # the layout indexes the patches of the whole global batch: built from every process's grids
    every = np.concatenate(parallel.process_allgather_objects(grid_thw))
    layout = parallel.device_put_global(vision_layout(v, every), NamedSharding(mesh, PartitionSpec()))
    return parallel.host_local_batch_to_global(pv.astype(np.float32), mesh), layout


def prepare_inputs(cfg: Qwen2_5_VLConfig, input_ids, attention_mask=None, pixel_values_videos=None,
                   video_grid_thw=None, second_per_grid_ts=None, pixel_values=None, image_grid_thw=None,
                   position_ids=None, *, mesh=None):
    """Host-side preparation of one batch: M-RoPE positions, rope deltas and the vision layouts.
    ``mesh``: the batch comes out as global arrays on ``mesh``, rows (and vision patches) over its
    batch axes; with several processes each passes its own rows and their videos/images (the same
    shapes on every process) and the vision layouts cover the whole global batch."""
    from .rope import get_rope_index
    input_ids = np.asarray(input_ids)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be (batch, length), got shape {input_ids.shape}")
    attention_mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {attention_mask.shape} != input_ids shape {input_ids.shape}")
    n_vid_tok = int((input_ids == cfg.video_token_id).sum())
    n_img_tok = int((input_ids == cfg.image_token_id).sum())
    merge2 = cfg.vision.spatial_merge_size ** 2
    for n_tok, grid, what in ((n_vid_tok, video_grid_thw, "video"), (n_img_tok, image_grid_thw, "image")):
        n_feat = 0 if grid is None else int(np.asarray(grid).reshape(-1, 3).prod(-1).sum()) // merge2
        if n_tok != n_feat:
            raise ValueError(f"input_ids hold {n_tok} {what} tokens but the {what} inputs give {n_feat} features")
    if position_ids is None:
        position_ids, deltas = get_rope_index(cfg, input_ids, attention_mask, image_grid_thw, video_grid_thw,
                                              second_per_grid_ts)
    else:
        position_ids = np.asarray(position_ids)
        if position_ids.ndim == 2:
            position_ids = np.broadcast_to(position_ids, (3,) + position_ids.shape)
        deltas = position_ids.max(axis=(0, 2)) + 1 - attention_mask.sum(-1)
    rows = dict(input_ids=np.asarray(input_ids, np.int32), attention_mask=np.asarray(attention_mask, np.int32),
                rope_deltas=np.asarray(deltas, np.int32))
    position_ids = np.asarray(position_ids, np.int32)
    if mesh is None:
        batch = {k: jnp.asarray(a) for k, a in rows.items()}
        batch["position_ids"] = jnp.asarray(position_ids)
    else:
        from ... import parallel
        batch = parallel.host_local_batch_to_global(rows, mesh)
        batch["position_ids"] = parallel.host_local_batch_to_global(
            position_ids, mesh, parallel.batch_spec(mesh, 1, position_ids.shape[1]))
    video = _vision_input(cfg, pixel_values_videos, video_grid_thw, "video", mesh)
    image = _vision_input(cfg, pixel_values, image_grid_thw, "image", mesh)
    if video is not None:
        batch["video"] = video
    if image is not None:
        batch["image"] = image
    return batch
