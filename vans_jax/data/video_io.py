"""Video I/O (PyAV) and the clip transforms used by the VANS data pipeline.

Conventions
-----------
* Frames are ``uint8`` arrays of shape ``(T, H, W, 3)`` in RGB order.
* ``read_video`` decodes every frame of the first video stream and returns the
  stream's nominal frame rate (``average_rate``, falling back to
  ``guessed_rate`` / ``base_rate`` and finally to the rate implied by the
  timestamps).  All failures raise :class:`VideoError` carrying the file name
  and a short machine-readable ``reason`` (``missing``, ``corrupt``,
  ``no_video_stream``, ``empty``) which the pipeline uses as skip counters.
* ``write_video`` encodes H.264 (libx264, ``yuv420p``, CRF 12 by default,
  single-threaded so the bytes are reproducible) and falls back to MPEG-4 Part
  2 if libx264 is unavailable.  ``yuv420p`` needs even sizes: odd heights /
  widths are padded by one row / column replicating the edge pixels
  (bottom / right), so a clip read back can be one pixel larger than the one
  written.  The file is written to a temporary name and renamed, so a crashed
  writer never leaves a half-written ``.mp4`` under the final name.
* ``resize_center_crop`` resizes so that the frame *covers* the target (scale
  = ``max(h/H, w/W)``, i.e. the short side relative to the target aspect is
  matched) and then crops the centre.  Resampling is PIL **bicubic** by
  default (the same filter the Qwen2.5-VL processor uses); ``bilinear`` /
  ``lanczos`` / ``nearest`` are selectable.
* Time resampling (``resample_indices``) is nearest-frame: output frame ``k``
  sits at ``t_k = k / out_fps`` seconds and takes source frame
  ``floor(t_k * fps + 0.5)``.  Indices past the end of the clip are replaced by
  the last frame ("repeat last frame" padding); the number of real frames is
  reported so callers can mask the padding.
* The video VAE compresses time by 4 (first frame separately), so clips fed to
  it must have ``4k + 1`` frames; ``target_clip`` and ``reference_clip``
  reject other counts with a clear error.
"""

from __future__ import annotations

import dataclasses
import math
import os
from fractions import Fraction
from typing import Literal

import numpy as np
from PIL import Image

from .._files import temp_path

__all__ = [
    "VideoError",
    "VideoInfo",
    "read_video",
    "probe_video",
    "write_video",
    "resize_center_crop",
    "resample_indices",
    "check_vae_frames",
    "target_clip",
    "reference_clip",
    "DEFAULT_OUT_FPS",
    "DEFAULT_TARGET_FRAMES",
    "DEFAULT_HEIGHT",
    "DEFAULT_WIDTH",
]

DEFAULT_OUT_FPS = 11.0
DEFAULT_TARGET_FRAMES = 33
DEFAULT_HEIGHT = 352
DEFAULT_WIDTH = 640

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}

_FORMAT_BY_EXT = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska", ".avi": "avi", ".webm": "webm"}


class VideoError(RuntimeError):
    """A video could not be read (or written).

    Attributes: ``path`` (the file), ``reason`` (one of ``missing``,
    ``corrupt``, ``no_video_stream``, ``empty``, ``too_short``, ``write``),
    ``detail`` (free text).
    """

    def __init__(self, path, reason: str, detail: str = ""):
        self.path = os.fspath(path)
        self.reason = reason
        self.detail = detail
        msg = f"{reason}: {self.path}"
        if detail:
            msg += f" ({detail})"
        super().__init__(msg)

    def __reduce__(self):  # picklable across grain worker processes
        return (VideoError, (self.path, self.reason, self.detail))


@dataclasses.dataclass(frozen=True)
class VideoInfo:
    path: str
    num_frames: int  # exact when decoded fully, else from the container header
    fps: float
    height: int
    width: int
    exact: bool  # True when num_frames was counted by decoding


def _av():
    import av  # local import: keeps `import vans_jax.data` cheap

    return av


def _open(path):
    av = _av()
    path = os.fspath(path)
    if not os.path.exists(path):
        raise VideoError(path, "missing", "file does not exist")
    if os.path.isdir(path):
        raise VideoError(path, "missing", "path is a directory")
    if os.path.getsize(path) == 0:
        raise VideoError(path, "corrupt", "file is empty (0 bytes)")
    try:
        container = av.open(path, "r")
    except Exception as e:  # av.error.InvalidDataError & friends
        raise VideoError(path, "corrupt", f"cannot open container: {type(e).__name__}: {e}") from None
    if not container.streams.video:
        container.close()
        raise VideoError(path, "no_video_stream", "container has no video stream")
    return container


def _stream_fps(stream) -> float | None:
    for attr in ("average_rate", "guessed_rate", "base_rate"):
        try:
            r = getattr(stream, attr)
        except Exception:
            r = None
        if r is not None and float(r) > 0 and math.isfinite(float(r)):
            return float(r)
    return None


def read_video(path, *, max_frames: int | None = None) -> tuple[np.ndarray, float]:
    """Decode a video file to ``(frames uint8 (T,H,W,3) RGB, fps)``.

    ``max_frames`` stops decoding early.  Raises :class:`VideoError` naming the
    file for a missing / unreadable / corrupt / stream-less / frame-less file.
    A file whose tail is corrupt but whose first frames decode is returned
    truncated (FFmpeg behaviour); a decode error before the first frame is
    ``corrupt``.
    """
    path = os.fspath(path)
    container = _open(path)
    frames: list[np.ndarray] = []
    pts: list[float] = []
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        fps = _stream_fps(stream)
        try:
            for frame in container.decode(stream):
                frames.append(frame.to_ndarray(format="rgb24"))
                if frame.time is not None:
                    pts.append(float(frame.time))
                if max_frames is not None and len(frames) >= max_frames:
                    break
        except Exception as e:
            if not frames:
                raise VideoError(path, "corrupt", f"decode failed: {type(e).__name__}: {e}") from None
            # keep the frames decoded before the damage
    finally:
        container.close()
    if not frames:
        raise VideoError(path, "empty", "no decodable frames")
    if fps is None:
        if len(pts) >= 2 and pts[-1] > pts[0]:
            fps = (len(pts) - 1) / (pts[-1] - pts[0])
        else:
            raise VideoError(path, "corrupt", "cannot determine frame rate")
    shapes = {f.shape for f in frames}
    if len(shapes) != 1:  # resolution change mid-stream: resize to the first frame's size
        h, w = frames[0].shape[:2]
        frames = [f if f.shape == frames[0].shape else np.asarray(Image.fromarray(f).resize((w, h))) for f in frames]
    return np.stack(frames), float(fps)


def probe_video(path, *, full_decode: bool = False) -> VideoInfo:
    """Open a video and return :class:`VideoInfo`.

    With ``full_decode`` every frame is decoded (exact count, catches damage
    anywhere).  Otherwise only the first frame is decoded (proves the stream is
    decodable) and the frame count comes from the header (``stream.frames``,
    else ``duration * fps``).
    """
    path = os.fspath(path)
    if full_decode:
        frames, fps = read_video(path)
        return VideoInfo(path, int(frames.shape[0]), fps, int(frames.shape[1]), int(frames.shape[2]), True)
    container = _open(path)
    try:
        stream = container.streams.video[0]
        fps = _stream_fps(stream)
        n = int(stream.frames or 0)
        if n <= 0 and fps:
            dur = None
            if stream.duration is not None and stream.time_base is not None:
                dur = float(stream.duration * stream.time_base)
            elif container.duration is not None:
                dur = container.duration / 1_000_000
            if dur:
                n = int(round(dur * fps))
        try:
            first = next(iter(container.decode(stream)))
        except StopIteration:
            raise VideoError(path, "empty", "no decodable frames") from None
        except Exception as e:
            raise VideoError(path, "corrupt", f"decode failed: {type(e).__name__}: {e}") from None
        h, w = first.height, first.width
    finally:
        container.close()
    if fps is None:
        raise VideoError(path, "corrupt", "cannot determine frame rate")
    return VideoInfo(path, max(n, 1), float(fps), int(h), int(w), False)


def _encoder_name(preferred: str | None) -> str:
    av = _av()
    candidates = [preferred] if preferred else ["libx264", "h264", "mpeg4"]
    for name in candidates:
        try:
            av.codec.Codec(name, "w")
            return name
        except Exception:
            continue
    raise VideoError("<encoder>", "write", f"none of the encoders {candidates} is available in this PyAV build")


def _as_frames(frames, fn: str) -> np.ndarray:
    a = np.asarray(frames)
    if a.ndim == 3 and a.shape[-1] == 3:
        a = a[None]
    if a.ndim != 4 or a.shape[-1] != 3:
        raise ValueError(f"{fn}: expected frames of shape (T, H, W, 3), got {a.shape}")
    if a.shape[0] == 0:
        raise ValueError(f"{fn}: got zero frames")
    if a.dtype != np.uint8:
        if np.issubdtype(a.dtype, np.floating):
            raise ValueError(f"{fn}: expected uint8 frames, got {a.dtype} (scale/clip to 0..255 and cast first)")
        a = np.clip(a, 0, 255).astype(np.uint8)
    return a


def write_video(path, frames, fps: float = DEFAULT_OUT_FPS, *, codec: str | None = None, crf: int = 12) -> str:
    """Encode ``frames`` (uint8 ``(T,H,W,3)`` RGB) to ``path`` at ``fps``.

    H.264 (libx264, yuv420p converted before encoding, ``crf``, preset
    ``medium``, 1 thread -> the same frames give the same bytes) or MPEG-4 Part 2 (``qscale`` 2) when libx264 is missing.
    Odd sizes are padded to even by replicating the last row/column.
    Parent directories are created.  Returns the path.
    """
    av = _av()
    path = os.fspath(path)
    frames = _as_frames(frames, "write_video")
    fps = float(fps)
    if not (fps > 0 and math.isfinite(fps)):
        raise ValueError(f"write_video: fps must be positive, got {fps}")
    t, h, w, _ = frames.shape
    ph, pw = h % 2, w % 2
    if ph or pw:
        frames = np.pad(frames, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="edge")
    h2, w2 = frames.shape[1:3]
    name = _encoder_name(codec)
    ext = os.path.splitext(path)[1].lower()
    fmt = _FORMAT_BY_EXT.get(ext)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = temp_path(path)           # the umask's permissions; a killed run's leftover is cleaned later
    try:
        container = av.open(tmp, "w", format=fmt or "mp4")
        try:
            rate = Fraction(fps).limit_denominator(1001)
            stream = container.add_stream(name, rate=rate)
            stream.width, stream.height = w2, h2
            stream.pix_fmt = "yuv420p"
            if name in ("libx264", "h264"):
                stream.options = {"crf": str(int(crf)), "preset": "medium"}
            else:
                stream.options = {"qscale": "2"}
                stream.codec_context.qmin = 1
                stream.codec_context.qmax = 4
            stream.codec_context.thread_count = 1
            for i in range(t):
                vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frames[i]), format="rgb24")
                # convert to yuv420p here, not inside ``stream.encode``: PyAV's implicit conversion
                # there gave 2-4 different bitstreams (and decoded frames) for the same frames over
                # 25 runs; the explicit one gave one in every run we tried
                vf = vf.reformat(format="yuv420p")
                for pkt in stream.encode(vf):
                    container.mux(pkt)
            for pkt in stream.encode():
                container.mux(pkt)
        finally:
            container.close()
        os.replace(tmp, path)
    except VideoError:
        raise
    except Exception as e:
        raise VideoError(path, "write", f"{type(e).__name__}: {e}") from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def resize_center_crop(frames, height: int, width: int, *, resample: str = "bicubic") -> np.ndarray:
    """Resize so the frames cover ``height x width`` (aspect kept), then
    centre-crop to exactly that size.  Accepts ``(T,H,W,3)`` or ``(H,W,3)``.

    The scale is ``max(height/H, width/W)``; the resized size is
    ``max(target, round(H*scale))`` per axis; the crop offset is
    ``(resized - target) // 2``.  Frames already at the target size are
    returned unchanged (copied).
    """
    single = np.asarray(frames).ndim == 3
    a = _as_frames(frames, "resize_center_crop")
    height, width = int(height), int(width)
    if height <= 0 or width <= 0:
        raise ValueError(f"resize_center_crop: target size must be positive, got {height}x{width}")
    if resample not in _RESAMPLE:
        raise ValueError(f"resize_center_crop: resample must be one of {sorted(_RESAMPLE)}, got {resample!r}")
    t, h, w, _ = a.shape
    if (h, w) == (height, width):
        out = a.copy()
    else:
        scale = max(height / h, width / w)
        nh, nw = max(height, int(round(h * scale))), max(width, int(round(w * scale)))
        top, left = (nh - height) // 2, (nw - width) // 2
        out = np.empty((t, height, width, 3), np.uint8)
        for i in range(t):
            img = Image.fromarray(a[i])
            if (nh, nw) != (h, w):
                img = img.resize((nw, nh), _RESAMPLE[resample])
            out[i] = np.asarray(img)[top : top + height, left : left + width]
    return out[0] if single else out


def resample_indices(num_src: int, fps: float, out_fps: float, num_frames: int) -> tuple[np.ndarray, int]:
    """Nearest-frame indices for ``num_frames`` frames at ``out_fps`` from a
    clip of ``num_src`` frames at ``fps``, starting at t=0.

    Returns ``(indices, num_valid)``: indices past the end are clamped to the
    last frame (repeat-last padding); ``num_valid`` counts the real ones.
    """
    if num_src <= 0:
        raise ValueError("resample_indices: empty clip")
    if not (fps > 0 and out_fps > 0):
        raise ValueError(f"resample_indices: fps and out_fps must be > 0, got {fps}, {out_fps}")
    if num_frames <= 0:
        raise ValueError(f"resample_indices: num_frames must be >= 1, got {num_frames}")
    idx = np.floor(np.arange(num_frames) * (float(fps) / float(out_fps)) + 0.5).astype(np.int64)
    valid = int(np.sum(idx < num_src))
    return np.minimum(idx, num_src - 1), valid


def check_vae_frames(num_frames: int, what: str = "clip", temporal: int = 4) -> None:
    """The Wan VAE's frame rule, the one check everything uses: ``temporal``k+1 frames (1, 5, 9, ...,
    33, ...), so the causal encoder's first frame plus whole chunks of ``temporal``."""
    if num_frames < 1 or (num_frames - 1) % temporal != 0:
        lo = max(1, (num_frames - 1) // temporal * temporal + 1)
        raise ValueError(
            f"{what}: the video VAE needs {temporal}k+1 frames (1, {1 + temporal}, {1 + 2 * temporal}, ..., 33, ...), "
            f"got num_frames={num_frames}; use e.g. {lo} or {lo + temporal}"
        )


def target_clip(
    frames,
    fps: float,
    num_frames: int = DEFAULT_TARGET_FRAMES,
    height: int = DEFAULT_HEIGHT,
    width: int = DEFAULT_WIDTH,
    out_fps: float = DEFAULT_OUT_FPS,
    *,
    resample: str = "bicubic",
    return_valid: bool = False,
):
    """The diffusion target: the first ``num_frames`` frames of the clip
    re-timed to ``out_fps`` (nearest frame) and resized + centre-cropped to
    ``height x width``.  A clip shorter than ``num_frames / out_fps`` seconds is
    padded by repeating its last frame.  ``num_frames`` must be 4k+1.

    Returns the ``uint8 (num_frames, height, width, 3)`` clip, plus the number
    of real (non-padded) frames when ``return_valid``.
    """
    check_vae_frames(num_frames, "target_clip")
    a = _as_frames(frames, "target_clip")
    idx, valid = resample_indices(a.shape[0], fps, out_fps, num_frames)
    out = resize_center_crop(a[idx], height, width, resample=resample)
    return (out, valid) if return_valid else out


def reference_clip(
    frames,
    fps: float,
    num_frames: int = DEFAULT_TARGET_FRAMES,
    height: int = DEFAULT_HEIGHT,
    width: int = DEFAULT_WIDTH,
    out_fps: float = DEFAULT_OUT_FPS,
    *,
    mode: Literal["last", "first", "uniform"] = "last",
    resample: str = "bicubic",
    return_valid: bool = False,
):
    """The VAE conditioning clip built from the *input* video.

    ``mode="last"`` (default): the clip is re-timed to ``out_fps`` and its
    *last* ``num_frames`` frames are kept (the context right before the cut,
    which the generated continuation must match); a shorter clip is padded at
    the front by repeating its first frame.  ``"first"`` keeps the first
    ``num_frames`` (padding at the end with the last frame, like
    :func:`target_clip`).  ``"uniform"`` spreads ``num_frames`` indices evenly
    over the whole clip (``round(linspace(0, T-1, n))``, no re-timing).
    ``num_frames`` must be 4k+1.  Output ``uint8 (num_frames, height, width, 3)``.
    """
    check_vae_frames(num_frames, "reference_clip")
    a = _as_frames(frames, "reference_clip")
    n_src = a.shape[0]
    if mode == "first":
        idx, valid = resample_indices(n_src, fps, out_fps, num_frames)
    elif mode == "last":
        duration = n_src / float(fps)
        n_all = max(1, int(math.floor(duration * out_fps + 1e-6)))
        all_idx, _ = resample_indices(n_src, fps, out_fps, n_all)
        all_idx = np.minimum(all_idx, n_src - 1)
        if n_all >= num_frames:
            idx, valid = all_idx[-num_frames:], num_frames
        else:
            idx = np.concatenate([np.full(num_frames - n_all, all_idx[0]), all_idx])
            valid = n_all
    elif mode == "uniform":
        idx = np.floor(np.linspace(0.0, n_src - 1, num_frames) + 0.5).astype(np.int64)
        valid = min(num_frames, n_src)
    else:
        raise ValueError(f"reference_clip: mode must be 'last', 'first' or 'uniform', got {mode!r}")
    out = resize_center_crop(a[idx], height, width, resample=resample)
    return (out, valid) if return_valid else out
