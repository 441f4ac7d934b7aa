"""Host-side (NumPy) index computations for Qwen2.5-VL: M-RoPE positions, vision rotary
positions and the window-attention layout. These are data-dependent (they depend on the
grids), so they run before the jitted forward and are passed in as arrays.
"""
from __future__ import annotations

import numpy as np

from .config import Qwen2_5_VLConfig, VisionConfig


def _runs(types: np.ndarray):
    """(type, start, end) for each maximal run of equal values."""
    if len(types) == 0:
        return []
    edges = np.flatnonzero(np.diff(types)) + 1
    starts = np.concatenate([[0], edges])
    ends = np.concatenate([edges, [len(types)]])
    return [(int(types[s]), int(s), int(e)) for s, e in zip(starts, ends)]


def get_rope_index(cfg: Qwen2_5_VLConfig, input_ids, attention_mask=None, image_grid_thw=None,
                   video_grid_thw=None, second_per_grid_ts=None):
    """3D M-RoPE positions (3, B, L) and rope deltas (B,), as the original Qwen2.5-VL.

    Text spans advance all three rows together. A vision span of grid (t, h, w) gets
    t index = floor(arange(t) * second_per_grid_t * tokens_per_second) (images: arange(t)),
    h and w indices over the merged grid, all offset by the running start; the text after it
    starts at max(span) + 1. Padded positions (attention_mask 0) get 1. ``rope_deltas`` =
    max position + 1 - number of valid tokens, so decoding continues at max + 1.

    Note: transformers 5.x advances the text after a video by max(h, w)/merge instead of
    max + 1; the two agree whenever the video's temporal span is not longer than its spatial
    one. We follow the original (and the SPEC).
    """
    input_ids = np.asarray(input_ids)
    b, length = input_ids.shape
    mask = np.ones_like(input_ids, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    merge = cfg.vision.spatial_merge_size
    tps = cfg.vision.tokens_per_second
    image_grids = iter([] if image_grid_thw is None else np.asarray(image_grid_thw).tolist())
    video_grids = iter([] if video_grid_thw is None else np.asarray(video_grid_thw).tolist())
    n_videos = 0 if video_grid_thw is None else len(video_grid_thw)
    seconds = iter(np.ones(n_videos) if second_per_grid_ts is None else np.asarray(second_per_grid_ts, float).tolist())
    positions = np.ones((3, b, length), np.int64)
    deltas = np.zeros((b,), np.int64)
    for i in range(b):
        ids = input_ids[i][mask[i]]
        types = np.zeros(len(ids), np.int64)
        types[ids == cfg.image_token_id] = 1
        types[ids == cfg.video_token_id] = 2
        parts = []
        start = 0
        for kind, s, e in _runs(types):
            if kind == 0:
                parts.append(np.broadcast_to(np.arange(e - s) + start, (3, e - s)))
                start += e - s
                continue
            try:
                t, h, w = next(image_grids if kind == 1 else video_grids)
            except StopIteration:
                what = "image" if kind == 1 else "video"
                raise ValueError(f"row {i} has more {what} token spans than {what}_grid_thw entries") from None
            gh, gw = h // merge, w // merge
            if t * gh * gw != e - s:
                what = "image" if kind == 1 else "video"
                raise ValueError(f"row {i}: a {what} span has {e - s} tokens but its grid {(t, h, w)} needs "
                                 f"{t * gh * gw}")
            interval = tps * next(seconds) if kind == 2 else 1.0
            tt = np.floor(np.arange(t) * interval).astype(np.int64)
            grid = np.stack(np.meshgrid(tt, np.arange(gh), np.arange(gw), indexing="ij")).reshape(3, -1)
            part = grid + start
            parts.append(part)
            start = int(part.max()) + 1
        pos = np.concatenate(parts, axis=1) if parts else np.zeros((3, 0), np.int64)
        positions[:, i, mask[i]] = pos
        deltas[i] = (int(pos.max()) + 1 if pos.size else 0) - len(ids)
    return positions, deltas


def vision_layout(vcfg: VisionConfig, grid_thw) -> dict[str, np.ndarray]:
    """Everything the vision tower needs that depends only on the grids.

    Returns (all NumPy):
      perm:        (N,) patch order for window attention (original index per permuted slot)
      unperm:      (N/merge^2,) inverse of the merged-unit permutation (applied after the merger)
      rope_hw:     (N, 2) (h, w) rotary positions, in permuted order
      full_*, window_*: the attention segments (one per temporal slice of each video/image for
                   full attention; one per window otherwise) as padded blocks, see ``segment_blocks``
    """
    grid_thw = np.asarray(grid_thw, np.int64).reshape(-1, 3)
    merge = vcfg.spatial_merge_size
    unit = merge * merge
    win = vcfg.window_size // merge // vcfg.patch_size
    window_index, rope_hw, seg_full, seg_window = [], [], [], []
    offset = 0
    n_frames = 0
    n_windows = 0
    for t, h, w in grid_thw.tolist():
        if h % merge or w % merge:
            raise ValueError(f"grid {(t, h, w)} is not divisible by spatial_merge_size {merge}")
        gh, gw = h // merge, w // merge
        # rotary positions in merge-block order
        hpos = np.arange(h)[:, None].repeat(w, 1).reshape(gh, merge, gw, merge).transpose(0, 2, 1, 3).ravel()
        wpos = np.arange(w)[None, :].repeat(h, 0).reshape(gh, merge, gw, merge).transpose(0, 2, 1, 3).ravel()
        hw = np.tile(np.stack([hpos, wpos], -1), (t, 1))
        # windows of win x win merged units per temporal slice; padding cells dropped
        ph, pw = -gh % win or 0, -gw % win or 0
        idx = np.arange(t * gh * gw).reshape(t, gh, gw)
        padded = np.full((t, gh + ph, gw + pw), -1, np.int64)
        padded[:, :gh, :gw] = idx
        nh, nw = (gh + ph) // win, (gw + pw) // win
        padded = padded.reshape(t, nh, win, nw, win).transpose(0, 1, 3, 2, 4).reshape(t, nh * nw, win * win)
        wid = np.broadcast_to(np.arange(t * nh * nw).reshape(t, nh * nw, 1), padded.shape)
        keep = padded >= 0
        order = padded[keep]
        window_index.append(order + offset)
        seg_window.append(np.repeat(wid[keep] + n_windows, unit))
        seg_full.append(np.repeat(order // (gh * gw) + n_frames, unit))
        rope_hw.append(hw)
        offset += t * gh * gw
        n_frames += t
        n_windows += t * nh * nw
    window_index = np.concatenate(window_index)
    perm = (window_index[:, None] * unit + np.arange(unit)).ravel()
    rope_hw = np.concatenate(rope_hw)[perm]
    out = dict(perm=perm.astype(np.int32), unperm=np.argsort(window_index).astype(np.int32),
               rope_hw=rope_hw.astype(np.int32))
    for name, seg in (("full", np.concatenate(seg_full)), ("window", np.concatenate(seg_window))):
        gather, valid, scatter = segment_blocks(seg)
        out.update({f"{name}_gather": gather, f"{name}_valid": valid, f"{name}_scatter": scatter})
    return out


def segment_blocks(seg: np.ndarray):
    """Contiguous segments -> padded blocks, so block-diagonal attention costs sum(len^2)
    instead of N^2. Returns gather (S, Lmax) token indices (padding -> 0), valid (S, Lmax) and
    scatter (N,) = each token's position in the flattened (S * Lmax) blocks."""
    starts = np.flatnonzero(np.concatenate([[True], seg[1:] != seg[:-1]]))
    lengths = np.diff(np.concatenate([starts, [len(seg)]]))
    if len(np.unique(seg)) != len(starts):
        raise ValueError("attention segments must be contiguous in the permuted order")
    lmax = int(lengths.max())
    offs = np.arange(lmax)
    valid = offs[None, :] < lengths[:, None]
    gather = np.where(valid, starts[:, None] + offs[None, :], 0)
    scatter = (np.arange(len(starts))[:, None] * lmax + offs[None, :])[valid]
    return gather.astype(np.int32), valid, scatter.astype(np.int32)
