"""Render accuracy on the synthetic world: an exact, model-free measure of a generated video against
the ground-truth next event.

The world (``data.synthetic``) draws flat-coloured objects (five colours, ``COLORS``) on a black
canvas framed by a grey wall, so what should be on screen is known pixel for pixel. Two numbers,
frame by frame (generated frame ``i`` against ground-truth frame ``i``, both ``uint8 (T, H, W, 3)``
of one size):

* **Foreground IoU** (``render_iou``): the foreground mask of a frame holds the pixels that are
  neither background nor wall: max-channel distance to black above ``bg_margin`` *and* to the wall
  grey above ``wall_margin``. IoU of the two masks; a frame where both are empty counts 1. The
  clip's value is the mean over frames.
* **Object colour** (``render_color``): the ground truth's foreground pixels are grouped by their
  nearest world colour (one group a colour present in the frame: two objects of one colour form one
  group). For each group, the generated foreground pixels inside the group's mask are averaged and
  the mean RGB is classified to the nearest world colour; the group counts as right when that is
  its colour, wrong when it is another one or when the generated frame has no foreground there.
  The clip's value is the fraction of right (frame, group) pairs; ``nan`` when the truth shows no
  object at all (``render_color_groups`` says how many pairs were counted). A group smaller than
  ``min_group_pixels`` (default: 1/800 of the frame, 5 pixels at 64x64) is not counted: in a decoded
  and resized ground truth such groups are the blended edges of an object of another colour (H.264's
  half-resolution chroma, the resize), not an object; counted, they made 18% of the groups on the
  world's eval clips and capped the score of a perfect reconstruction well below 1. A truth pixel
  farther than ``color_tolerance`` from every world colour belongs to no group (default
  ``COLOR_TOLERANCE``, half the distance between the two closest world colours, blue and purple: 58):
  such pixels are the codec's blends at an object's edge, e.g. the one-pixel (0, 0, 70) rim that
  H.264 leaves around a blue ball, whose nearest world colour is *green*; grouped by nearest colour,
  those rims formed "green" groups of 6-48 pixels (a third of the green groups of the world's eval
  clips) that a correct blue render could only get wrong.
* **Where the colours go** (``render_color_confusion``): the same (frame, group) pairs as a
  ``5 x 6`` count matrix, rows the true colour (``COLOR_NAMES``), columns the colour the generated
  pixels were read as, the last column ``"none"`` (no generated foreground in the group);
  ``CONFUSION_LABELS`` names the columns. Its diagonal over its sum is ``render_color``.

This is a diagnostic for the embedded world (reported next to CLIP-V by the world build and
``vans-jax demo``) and the ``world`` reward (``rl.rewards``; a choice, not the paper's); on real videos it
means nothing.
"""
from __future__ import annotations

import numpy as np

from vans_jax.data.synthetic import BG_RGB, COLORS, WALL_RGB
from vans_jax.data.video_io import as_frames

COLOR_NAMES = tuple(COLORS)
CONFUSION_LABELS = COLOR_NAMES + ("none",)
_PALETTE = np.asarray([COLORS[c] for c in COLOR_NAMES], np.float32)   # (5, 3)
# a truth pixel within this (Euclidean RGB) distance of a world colour is that colour beyond doubt: half
# the distance between the two closest world colours (blue and purple)
COLOR_TOLERANCE = float(min(np.linalg.norm(a - b) for i, a in enumerate(_PALETTE) for b in _PALETTE[i + 1:]) / 2)


def foreground_mask(frames, *, bg_margin: int = 60, wall_margin: int = 40) -> np.ndarray:
    """``bool (T, H, W)``: pixels farther than ``bg_margin`` from black and farther than
    ``wall_margin`` from the wall grey (max over channels). The world's colours are at least 170 from
    black and 82 from the grey in their largest channel."""
    f = as_frames(frames, "render_accuracy (frames)").astype(np.int16)
    d_bg = np.abs(f - np.asarray(BG_RGB, np.int16)).max(-1)
    d_wall = np.abs(f - np.asarray(WALL_RGB, np.int16)).max(-1)
    return (d_bg > bg_margin) & (d_wall > wall_margin)


def _palette_d2(rgb) -> np.ndarray:
    """Squared Euclidean distance of each RGB triple to each world colour (``..., 5``)."""
    return ((np.asarray(rgb, np.float32)[..., None, :] - _PALETTE) ** 2).sum(-1)


def nearest_color(rgb) -> np.ndarray:
    """Index into ``COLOR_NAMES`` of the world colour nearest (Euclidean) to each RGB triple."""
    return _palette_d2(rgb).argmin(-1)


def _truth_colors(rgb, tolerance: float) -> np.ndarray:
    """Index into ``COLOR_NAMES`` of each truth pixel's world colour, -1 where it is farther than
    ``tolerance`` from every one (an edge blend, not an object's colour)."""
    d = _palette_d2(rgb)
    return np.where(d.min(-1) <= tolerance ** 2, d.argmin(-1), -1)


def default_min_group_pixels(height: int, width: int) -> int:
    """The smallest colour group ``render_accuracy`` counts: 1/800 of the frame, at least 1."""
    return max(1, round(height * width / 800))


def render_accuracy(generated, truth, *, bg_margin: int = 60, wall_margin: int = 40,
                    min_group_pixels: int | None = None, color_tolerance: float | None = None) -> dict:
    """``{"render_iou", "render_color", "render_color_groups", "render_iou_per_frame"}`` of one
    generated clip against its ground truth (see the module docstring)."""
    g, t = as_frames(generated, "render_accuracy (generated)"), as_frames(truth, "render_accuracy (truth)")
    if g.shape != t.shape:
        raise ValueError(f"render_accuracy: generated frames {g.shape} and ground-truth frames {t.shape} "
                         "differ in shape (bring both to the evaluation geometry first)")
    if min_group_pixels is None:
        min_group_pixels = default_min_group_pixels(t.shape[1], t.shape[2])
    tol = COLOR_TOLERANCE if color_tolerance is None else float(color_tolerance)
    mg = foreground_mask(g, bg_margin=bg_margin, wall_margin=wall_margin)
    mt = foreground_mask(t, bg_margin=bg_margin, wall_margin=wall_margin)
    inter = (mg & mt).sum((1, 2)).astype(np.float64)
    union = (mg | mt).sum((1, 2)).astype(np.float64)
    iou = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
    right = groups = 0
    confusion = np.zeros((len(COLOR_NAMES), len(CONFUSION_LABELS)), np.int64)
    for i in range(t.shape[0]):
        if not mt[i].any():
            continue
        cls = _truth_colors(t[i][mt[i]], tol)
        ys, xs = np.nonzero(mt[i])
        for c in np.unique(cls[cls >= 0]):
            sel = cls == c
            if sel.sum() < min_group_pixels:
                continue
            yy, xx = ys[sel], xs[sel]
            groups += 1
            inside = mg[i][yy, xx]
            if not inside.any():
                confusion[c, -1] += 1
                continue
            mean = g[i][yy[inside], xx[inside]].astype(np.float32).mean(0)
            read = int(nearest_color(mean))
            confusion[c, read] += 1
            right += int(read == c)
    return {"render_iou": float(iou.mean()),
            "render_color": float(right / groups) if groups else float("nan"),
            "render_color_groups": int(groups), "render_color_right": int(right),
            "render_color_confusion": confusion.tolist(),
            "render_iou_per_frame": [float(v) for v in iou]}


def pool_render_accuracy(results) -> dict:
    """``render_accuracy`` results of several clips -> the IoU averaged over clips, the colour
    accuracy pooled over every (frame, group) of every clip, and the colour confusion counts summed
    when every result has them (records that kept only the scalars, as the demo's do, pool without)."""
    results = list(results)
    ious = [r["render_iou"] for r in results]
    groups = sum(r["render_color_groups"] for r in results)
    out = {"render_iou": float(np.mean(ious)) if ious else float("nan"),
           "render_color": sum(r["render_color_right"] for r in results) / groups if groups else float("nan"),
           "render_iou_per_clip": ious, "num_clips": len(ious)}
    if results and all("render_color_confusion" in r for r in results):
        confusion = np.zeros((len(COLOR_NAMES), len(CONFUSION_LABELS)), np.int64)
        for r in results:
            confusion += np.asarray(r["render_color_confusion"], np.int64)
        out["render_color_confusion"] = confusion.tolist()
    return out


def mean_render_accuracy(pairs) -> dict:
    """``pool_render_accuracy`` of ``render_accuracy`` over ``(generated, truth)`` pairs."""
    return pool_render_accuracy(render_accuracy(g, t) for g, t in pairs)


__all__ = ["foreground_mask", "nearest_color", "default_min_group_pixels", "render_accuracy", "pool_render_accuracy", "mean_render_accuracy",
           "COLOR_NAMES", "CONFUSION_LABELS", "COLOR_TOLERANCE"]
