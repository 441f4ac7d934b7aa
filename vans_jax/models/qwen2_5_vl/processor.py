"""NumPy re-implementation of the Qwen2.5-VL image / video pre-processing.

Pipeline for every frame (identical for images and videos)::

    uint8 HxWx3 --PIL bicubic resize to smart_resize(H, W)--> uint8
      --> float32(x.astype(float64) * (1/255))          # "rescale"
      --> (x - CLIP_MEAN) / CLIP_STD                    # float32 "normalize"
      --> patchify into rows of C*T*14*14 = 1176 values

Patch layout: a clip of ``gt*2`` frames of size ``(C, gh*14, gw*14)`` is viewed
as ``(gt, 2, C, gh/2, 2, 14, gw/2, 2, 14)`` and permuted with
``(0, 3, 6, 4, 7, 2, 1, 5, 8)`` to ``(gt, gh/2, gw/2, 2, 2, C, 2, 14, 14)``,
then flattened to ``(gt*gh*gw, 1176)``.  Rows are therefore ordered
time-major, then by 2x2 merge window (row-major over windows), then row-major
inside the window -- exactly what the Qwen2.5-VL vision tower expects.  An
image is a one-frame clip whose frame is repeated to fill the temporal patch.

Reference implementation (transformers 5.x)
-------------------------------------------
* Images: ``Qwen2VLImageProcessorPil`` (the PIL/NumPy backend).  Our output is
  bit-identical to it (PIL bicubic on uint8, same float64->float32 rescale, same
  float32 normalisation).  The default ``AutoImageProcessor`` of v5 picks the
  torchvision backend (``Qwen2VLImageProcessor``) when torchvision is
  installed; that path resizes with ``torchvision.transforms.v2.functional.resize``
  (bicubic, antialias) and fuses rescale+normalise, which differs from PIL by
  up to about one uint8 level per pixel (<~0.03 after normalisation).
* Videos: ``Qwen2VLVideoProcessor`` (used for Qwen2.5-VL) exists only as a
  torchvision backend and torchvision is not installed here.  Our video path
  is therefore defined as "the PIL image pipeline applied per frame" followed
  by the video patch layout of ``Qwen2VLVideoProcessor.patchify`` (pad to a
  multiple of ``temporal_patch_size`` by repeating the last frame, then the
  permutation above).  The tests check it against ``Qwen2VLImageProcessorPil``
  run frame by frame and re-assembled with the HF video permutation.
  Grids, token counts and ``second_per_grid_ts`` follow the HF video
  processor / ``Qwen2_5_VLProcessor`` exactly.  ``cap_pixels_per_frame`` of
  the HF video processor (off by default in v5) is not implemented: for VANS'
  6-frame inputs it would never bind anyway.

Defaults for ``min_pixels`` / ``max_pixels`` are those of the transformers
classes (images: 56*56 .. 28*28*1280; videos: 128*28*28 .. 768*28*28).  Note
that checkpoints ship their own ``preprocessor_config.json`` (the public
Qwen2.5-VL configs use 3136 .. 12845056 for images), so callers loading a real
checkpoint should pass the values from that file.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from PIL import Image

__all__ = [
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "PATCH_SIZE",
    "TEMPORAL_PATCH_SIZE",
    "MERGE_SIZE",
    "IMAGE_MIN_PIXELS",
    "IMAGE_MAX_PIXELS",
    "VIDEO_MIN_PIXELS",
    "VIDEO_MAX_PIXELS",
    "smart_resize",
    "resize_frame",
    "normalize_frames",
    "patchify",
    "preprocess_images",
    "preprocess_videos",
    "sample_frames_for_vlm",
    "num_vision_tokens",
]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

PATCH_SIZE = 14
TEMPORAL_PATCH_SIZE = 2
MERGE_SIZE = 2

IMAGE_MIN_PIXELS = 56 * 56
IMAGE_MAX_PIXELS = 28 * 28 * 1280
VIDEO_MIN_PIXELS = 128 * 28 * 28
VIDEO_MAX_PIXELS = 768 * 28 * 28


def smart_resize(
    height: int,
    width: int,
    factor: int = 28,
    min_pixels: int = IMAGE_MIN_PIXELS,
    max_pixels: int = IMAGE_MAX_PIXELS,
) -> tuple[int, int]:
    """Target ``(height, width)``: multiples of ``factor``, area in
    ``[min_pixels, max_pixels]``, aspect ratio kept as well as possible.

    Same arithmetic as ``transformers`` (v5) ``smart_resize`` (including
    Python's round-half-to-even in the first step).  Raises ``ValueError`` when
    the aspect ratio exceeds 200 (as HF does) and, unlike HF (which would fail
    with ``ZeroDivisionError``), for non-positive sizes.  transformers v5 has no
    "smaller than factor" error any more: tiny inputs are upscaled to at least
    ``min_pixels``; we follow v5.
    """
    height, width = int(height), int(width)
    if height <= 0 or width <= 0:
        raise ValueError(f"smart_resize: height and width must be positive, got height={height}, width={width}")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(
            f"absolute aspect ratio must be smaller than 200, got {max(height, width) / min(height, width)} "
            f"(height={height}, width={width})"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


# --------------------------------------------------------------------------- #
# input validation
# --------------------------------------------------------------------------- #
def _as_frame(img, what: str, min_size: int = PATCH_SIZE) -> np.ndarray:
    """HxWx3 uint8 array from an array or PIL image, with clear errors."""
    if isinstance(img, Image.Image):
        img = np.asarray(img.convert("RGB"))
    if not isinstance(img, np.ndarray):
        raise ValueError(f"{what}: expected a numpy array (H, W, 3) uint8 or a PIL image, got {type(img).__name__}")
    if img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(f"{what}: expected shape (H, W, 3), got {img.shape}")
    if img.dtype != np.uint8:
        raise ValueError(f"{what}: expected dtype uint8, got {img.dtype} (shape {img.shape})")
    if img.shape[0] < min_size or img.shape[1] < min_size:
        # HF v5 silently upsamples such inputs; a frame smaller than one patch is almost surely a bug.
        raise ValueError(f"{what}: frame of shape {img.shape} is smaller than one {min_size}x{min_size} patch")
    return img


def _as_video(video, what: str, min_size: int = PATCH_SIZE) -> np.ndarray:
    if isinstance(video, (list, tuple)):
        if len(video) == 0:
            raise ValueError(f"{what}: video has zero frames")
        video = np.stack([_as_frame(f, f"{what} frame {i}", min_size) for i, f in enumerate(video)])
    if not isinstance(video, np.ndarray):
        raise ValueError(f"{what}: expected a numpy array (T, H, W, 3) uint8, got {type(video).__name__}")
    if video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"{what}: expected shape (T, H, W, 3), got {video.shape}")
    if video.dtype != np.uint8:
        raise ValueError(f"{what}: expected dtype uint8, got {video.dtype} (shape {video.shape})")
    if video.shape[0] == 0:
        raise ValueError(f"{what}: video has zero frames (shape {video.shape})")
    if video.shape[1] < min_size or video.shape[2] < min_size:
        raise ValueError(f"{what}: frames of shape {video.shape[1:]} are smaller than one {min_size}x{min_size} patch")
    return video


# --------------------------------------------------------------------------- #
# building blocks
# --------------------------------------------------------------------------- #
def resize_frame(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    """PIL bicubic resize of a uint8 HxWx3 frame (what HF's PIL backend does;
    it also calls PIL when the size is unchanged, which is an exact copy)."""
    pil = Image.fromarray(frame)
    out = pil.resize((int(width), int(height)), resample=Image.Resampling.BICUBIC)
    return np.asarray(out)


def normalize_frames(frames_u8: np.ndarray, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD) -> np.ndarray:
    """``(..., H, W, 3)`` uint8 -> channels-first ``(..., 3, H, W)`` float32,
    rescaled by 1/255 (in float64 then cast, as HF) and CLIP-normalised in float32."""
    x = (frames_u8.astype(np.float64) * (1.0 / 255.0)).astype(np.float32)
    mean = np.asarray(mean, dtype=np.float32)
    std = np.asarray(std, dtype=np.float32)
    x = (x - mean) / std
    return np.moveaxis(x, -1, -3)


def patchify(
    frames: np.ndarray,
    patch_size: int = PATCH_SIZE,
    temporal_patch_size: int = TEMPORAL_PATCH_SIZE,
    merge_size: int = MERGE_SIZE,
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """``(T, C, H, W)`` float32 -> ``((gt*gh*gw, C*tp*p*p), (gt, gh, gw))``.

    ``T`` is padded up to a multiple of ``temporal_patch_size`` by repeating
    the last frame.  ``H`` and ``W`` must be multiples of ``patch_size*merge_size``.
    """
    t, c, h, w = frames.shape
    if h % (patch_size * merge_size) or w % (patch_size * merge_size):
        raise ValueError(f"patchify: frame size {(h, w)} is not a multiple of {patch_size * merge_size}")
    pad = -t % temporal_patch_size
    if pad:
        frames = np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)], axis=0)
        t += pad
    gt, gh, gw = t // temporal_patch_size, h // patch_size, w // patch_size
    x = frames.reshape(
        gt, temporal_patch_size, c,
        gh // merge_size, merge_size, patch_size,
        gw // merge_size, merge_size, patch_size,
    )
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    x = x.reshape(gt * gh * gw, c * temporal_patch_size * patch_size * patch_size)
    return np.ascontiguousarray(x, dtype=np.float32), (gt, gh, gw)


def _process_clip(
    clip: np.ndarray,
    min_pixels: int,
    max_pixels: int,
    patch_size: int,
    temporal_patch_size: int,
    merge_size: int,
    what: str,
) -> tuple[np.ndarray, tuple[int, int, int]]:
    _, h, w, _ = clip.shape
    try:
        rh, rw = smart_resize(h, w, factor=patch_size * merge_size, min_pixels=min_pixels, max_pixels=max_pixels)
    except ValueError as e:
        raise ValueError(f"{what}: cannot resize frames of shape {clip.shape[1:]}: {e}") from None
    resized = np.stack([resize_frame(f, rh, rw) for f in clip])
    return patchify(normalize_frames(resized), patch_size, temporal_patch_size, merge_size)


# --------------------------------------------------------------------------- #
# public entry points
# --------------------------------------------------------------------------- #
def preprocess_images(
    images: Sequence[np.ndarray],
    *,
    min_pixels: int = IMAGE_MIN_PIXELS,
    max_pixels: int = IMAGE_MAX_PIXELS,
    patch_size: int = PATCH_SIZE,
    temporal_patch_size: int = TEMPORAL_PATCH_SIZE,
    merge_size: int = MERGE_SIZE,
) -> tuple[np.ndarray, np.ndarray]:
    """Images (each HxWx3 uint8 or PIL) -> ``(pixel_values (N, 1176) float32,
    image_grid_thw (n_images, 3) int64)``; rows of all images concatenated."""
    if isinstance(images, (np.ndarray, Image.Image)) and not (isinstance(images, np.ndarray) and images.ndim == 4):
        images = [images]
    if len(images) == 0:
        raise ValueError("preprocess_images: got an empty list of images")
    rows, grids = [], []
    for i, img in enumerate(images):
        img = _as_frame(img, f"image {i}")
        r, g = _process_clip(img[None], min_pixels, max_pixels, patch_size, temporal_patch_size, merge_size,
                             f"image {i}")
        rows.append(r)
        grids.append(g)
    return np.concatenate(rows, axis=0), np.asarray(grids, dtype=np.int64)


def preprocess_videos(
    videos: Sequence[np.ndarray],
    fps: float | Sequence[float],
    *,
    min_pixels: int = VIDEO_MIN_PIXELS,
    max_pixels: int = VIDEO_MAX_PIXELS,
    patch_size: int = PATCH_SIZE,
    temporal_patch_size: int = TEMPORAL_PATCH_SIZE,
    merge_size: int = MERGE_SIZE,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Videos (each TxHxWx3 uint8, or a list of frames) ->
    ``(pixel_values_videos (N, 1176) float32, video_grid_thw (n, 3) int64,
    second_per_grid_ts (n,) float32)``.

    ``fps`` is the frame rate of the frames *as given* (i.e. the sampled fps),
    one per video or a single number for all; ``second_per_grid_ts =
    temporal_patch_size / fps`` (float32, like the tensor HF builds).  Odd
    frame counts are padded by repeating the last frame.
    """
    if isinstance(videos, np.ndarray) and videos.ndim == 4:
        videos = [videos]
    if len(videos) == 0:
        raise ValueError("preprocess_videos: got an empty list of videos")
    if np.ndim(fps) == 0:
        fps_list = [float(fps)] * len(videos)
    else:
        fps_list = [float(f) for f in fps]
        if len(fps_list) != len(videos):
            raise ValueError(f"preprocess_videos: got {len(fps_list)} fps values for {len(videos)} videos")
    for i, f in enumerate(fps_list):
        if not (math.isfinite(f) and f > 0):
            raise ValueError(f"preprocess_videos: fps of video {i} must be a positive number, got {f}")
    rows, grids = [], []
    for i, video in enumerate(videos):
        video = _as_video(video, f"video {i}")
        r, g = _process_clip(video, min_pixels, max_pixels, patch_size, temporal_patch_size, merge_size,
                             f"video {i}")
        rows.append(r)
        grids.append(g)
    second_per_grid_ts = np.asarray([temporal_patch_size / f for f in fps_list], dtype=np.float32)
    return np.concatenate(rows, axis=0), np.asarray(grids, dtype=np.int64), second_per_grid_ts


def num_vision_tokens(grid_thw, merge_size: int = MERGE_SIZE) -> np.ndarray:
    """LLM placeholder tokens per image/video: ``t*h*w // merge_size**2``."""
    g = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
    return g.prod(axis=1) // (merge_size**2)


def sample_frames_for_vlm(
    frames: np.ndarray,
    fps: float,
    num_frames: int = 6,
    sample_fps: float = 1.0,
) -> tuple[np.ndarray, float]:
    """VANS frame sampling for the VLM: ``num_frames`` frames at ``sample_fps``.

    Frame ``k`` is the source frame nearest to ``t_k = k / sample_fps`` seconds,
    i.e. index ``round(k * fps / sample_fps)`` (round half up), k = 0..num_frames-1,
    and the returned fps is ``sample_fps``.

    If the clip is too short (the last index would be ``>= T``), the
    ``num_frames`` indices are instead spread evenly over the whole clip,
    ``round(linspace(0, T-1, num_frames))`` -- which repeats frames when
    ``T < num_frames`` -- and the returned fps is the effective rate of that
    spacing, ``(num_frames - 1) / ((T - 1) / fps)``; for a single-frame clip
    (no time span) ``sample_fps`` is returned.

    Returns ``(frames[indices], effective_fps)``; pass ``effective_fps`` to
    :func:`preprocess_videos` so ``second_per_grid_ts`` matches the spacing.
    """
    frames = _as_video(frames, "sample_frames_for_vlm", min_size=1)
    fps = float(fps)
    if not (math.isfinite(fps) and fps > 0):
        raise ValueError(f"sample_frames_for_vlm: fps must be a positive number, got {fps}")
    if num_frames < 1:
        raise ValueError(f"sample_frames_for_vlm: num_frames must be >= 1, got {num_frames}")
    if not (sample_fps > 0):
        raise ValueError(f"sample_frames_for_vlm: sample_fps must be > 0, got {sample_fps}")
    total = frames.shape[0]
    idx = np.floor(np.arange(num_frames) * (fps / sample_fps) + 0.5).astype(np.int64)
    if idx[-1] < total:
        return frames[idx], float(sample_fps)
    idx = np.floor(np.linspace(0.0, total - 1, num_frames) + 0.5).astype(np.int64)
    if total == 1 or num_frames == 1:
        return frames[idx], float(sample_fps)
    eff = (num_frames - 1) * fps / (total - 1)
    return frames[idx], float(eff)
