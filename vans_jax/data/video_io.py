"""Video I/O (PyAV) and the clip transforms used by the VANS data pipeline.

Conventions
-----------
* Frames are ``uint8`` arrays of shape ``(T, H, W, 3)`` in RGB order.
* ``sample_video`` is the reader for real clips (the pipeline's and the loader's): one demux
  pass gives every frame's presentation timestamp (``scan_video``, no decoding); the sampling
  rules pick frames by time (``vlm_indices``, ``clip_indices``: the rules below, on ``pts *
  time_base`` instead of ``i / fps``, the same frames for a constant-rate clip); only those are
  decoded, seeking to the keyframe before each stretch, converted to RGB (scaled down to
  ``max_pixels`` by swscale) and turned upright as they come out. Memory is the requested frames,
  not the clip. It compares what decodes with what the container announces (``ReadReport``):
  below ``MIN_DECODED_FRACTION`` (75 %) of the frames or the duration is ``VideoError``
  ``damaged`` naming the file and both numbers; any shortfall (more than one frame), decode error
  or frame replaced by its decodable neighbour is a ``VideoDamageWarning`` and ``report.warning``.
  Frames outside the decoded stretches are counted from the container, not decoded.
* Rotation: a display matrix (phone clips; PyAV ``frame.rotation``, counter-clockwise degrees)
  is undone on every frame by every reader here, so frames are upright (a portrait phone clip
  reads as portrait). ``probe_video`` reports the upright size.
* ``read_video`` decodes every frame of the first video stream (all of it in memory: for
  short clips and tests; use ``sample_video`` for inputs of any length) and returns the
  stream's nominal frame rate (``average_rate``, falling back to
  ``guessed_rate`` / ``base_rate`` and finally to the rate implied by the
  timestamps).  All failures raise :class:`VideoError` carrying the file name
  and a short machine-readable ``reason`` (``missing``, ``corrupt``,
  ``no_video_stream``, ``empty``, ``damaged``) which the pipeline uses as skip counters.
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

import collections
import dataclasses
import math
import os
import threading
import warnings
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
    "MIN_DECODED_FRACTION",
    "VideoDamageWarning",
    "VideoTimeline",
    "scan_video",
    "vlm_indices",
    "clip_indices",
    "ReadReport",
    "SampledVideo",
    "sample_video",
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
    ``corrupt``, ``no_video_stream``, ``empty``, ``damaged``, ``too_short``, ``write``),
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
        stream.thread_type = "SLICE"   # frame threads: 4x slower on small clips, and they drop damaged frames silently
        fps = _stream_fps(stream)
        try:
            for frame in container.decode(stream):
                frames.append(_frame_rgb(frame, None))
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

    With ``full_decode`` every frame is decoded, streamed (exact count of the frames that decode,
    catches damage anywhere; fewer than ``MIN_DECODED_FRACTION`` of the frames the header
    announces is ``VideoError`` ``damaged``).  Otherwise only the first frame is decoded (proves the stream is
    decodable) and the frame count comes from the header (``stream.frames``,
    else ``duration * fps``).
    """
    path = os.fspath(path)
    if full_decode:   # streamed: decodes every packet (on past damaged ones), counts, holds one frame
        container = _open(path)
        n, errors, first, times, last_time, err = 0, 0, None, [], None, ""
        try:
            stream = container.streams.video[0]
            stream.thread_type = "SLICE"   # frame threads drop damaged frames without an error
            fps = _stream_fps(stream)
            expected = int(stream.frames or 0)

            def count(frames):
                nonlocal n, first, last_time
                for frame in frames:
                    if getattr(frame, "is_corrupt", False):
                        continue
                    if first is None:
                        first = frame.width, frame.height, getattr(frame, "rotation", 0)
                    if frame.time is not None and len(times) < 2:
                        times.append(float(frame.time))
                    last_time = frame.time
                    n += 1

            try:
                for pkt in container.demux(stream):
                    try:
                        count(stream.decode(pkt) if pkt.size else stream.codec_context.decode(None))
                    except Exception as e:
                        errors, err = errors + 1, f"{type(e).__name__}: {e}"
            except Exception as e:  # unreadable tail
                errors, err = errors + 1, f"{type(e).__name__}: {e}"
        finally:
            container.close()
        if not n and errors:
            raise VideoError(path, "corrupt", f"decode failed: {err}")
        if expected and n < MIN_DECODED_FRACTION * expected:
            raise VideoError(path, "damaged", f"{n} of {expected} frames decoded ({errors} decode errors): "
                                              f"below the {MIN_DECODED_FRACTION:.0%} threshold")
        if not n:
            raise VideoError(path, "empty", "no decodable frames")
        if fps is None:
            if n >= 2 and last_time is not None and times and float(last_time) > times[0]:
                fps = (n - 1) / (float(last_time) - times[0])
            else:
                raise VideoError(path, "corrupt", "cannot determine frame rate")
        w, h, rot = first
        if int(round(float(rot or 0) / 90.0)) % 2:   # displayed size (turned upright)
            h, w = w, h
        return VideoInfo(path, n, float(fps), int(h), int(w), True)
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
        if int(round(float(getattr(first, "rotation", 0) or 0) / 90.0)) % 2:   # displayed size
            h, w = w, h
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


def as_frames(frames, fn: str) -> np.ndarray:
    """``frames`` as uint8 ``(T, H, W, 3)`` (one ``(H, W, 3)`` frame becomes ``T = 1``; integer arrays
    are clipped to 0..255); other shapes, zero frames or float arrays raise ValueError naming ``fn``."""
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
    frames = as_frames(frames, "write_video")
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
    a = as_frames(frames, "resize_center_crop")
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
    a = as_frames(frames, "target_clip")
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
    a = as_frames(frames, "reference_clip")
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


# --------------------------------------------------------------------------- #
# streaming, timestamp-based sampling (what the pipeline and the loader use)
# --------------------------------------------------------------------------- #
MIN_DECODED_FRACTION = 0.75


class VideoDamageWarning(UserWarning):
    """A video decoded only partly (above ``min_decoded``): it was used, the numbers are in the report."""


def _rotate_upright(a: np.ndarray, rotation) -> np.ndarray:
    """Undo a display-matrix rotation: ``rotation`` is the counter-clockwise angle (degrees) the
    player turns the stored picture by (PyAV ``frame.rotation``; a phone's ``rotate=90`` tag is -90)."""
    k = int(round(float(rotation or 0) / 90.0)) % 4
    return np.ascontiguousarray(np.rot90(a, k)) if k else a


def _frame_rgb(frame, max_pixels: int | None) -> np.ndarray:
    """One decoded frame -> upright uint8 RGB, scaled down (swscale, area) to at most ``max_pixels``."""
    w, h = frame.width, frame.height
    if max_pixels is not None and w * h > max_pixels:
        s = math.sqrt(max_pixels / float(w * h))
        a = frame.to_ndarray(format="rgb24", width=max(1, int(w * s)), height=max(1, int(h * s)),
                             interpolation="AREA")
    else:
        a = frame.to_ndarray(format="rgb24")
    return _rotate_upright(a, getattr(frame, "rotation", 0))


def _frac(x) -> Fraction:
    return x if isinstance(x, Fraction) else Fraction(float(x)).limit_denominator(1_000_000)


@dataclasses.dataclass(frozen=True)
class VideoTimeline:
    """The frames a video's container holds, from one demux pass (no decoding).

    ``pts``: presentation timestamps (int, ``time_base`` units), sorted; frame ``i`` is shown at
    ``(pts[i] - pts[0]) * time_base`` seconds and lasts ``last_duration`` (the last one) -- so a
    variable-frame-rate clip is timed by its timestamps, not by ``i / fps``. ``by_index``: the
    container gives no timestamps (frames are timed ``i / fps``). ``expected_frames`` /
    ``expected_duration``: what the header announces (``None`` when it does not say).
    """
    path: str
    pts: np.ndarray
    time_base: Fraction
    keyframes: np.ndarray          # pts of keyframe packets, sorted
    last_duration: int             # time_base units
    fps: float                     # nominal rate (header; else from the timestamps)
    expected_frames: int | None
    expected_duration: float | None
    by_index: bool = False
    demux_error: str = ""

    @property
    def num_frames(self) -> int:
        return int(self.pts.shape[0])

    @property
    def times(self) -> np.ndarray:
        """Seconds from the first frame, float64 (for reports; the sampling uses exact integers)."""
        return (self.pts - self.pts[0]).astype(np.float64) * float(self.time_base)

    @property
    def duration(self) -> float:
        """First frame to the end of the last one, in seconds."""
        return float((int(self.pts[-1]) - int(self.pts[0]) + self.last_duration) * self.time_base)

    def _ticks(self, t) -> Fraction:
        """Seconds from the first frame -> exact timestamp."""
        return int(self.pts[0]) + _frac(t) / self.time_base

    def nearest(self, times) -> np.ndarray:
        """Index of the frame shown nearest each time (seconds from the first frame); a tie goes to
        the later frame (the ``floor(t * fps + 0.5)`` rule of a constant-rate clip)."""
        p = self.pts
        out = np.empty(len(times), np.int64)
        for k, t in enumerate(times):
            x = self._ticks(t)
            j = int(np.searchsorted(p, math.ceil(x), side="left"))
            if j >= len(p):
                out[k] = len(p) - 1
            elif j == 0:
                out[k] = 0
            else:
                out[k] = j if (int(p[j]) - x) <= (x - int(p[j - 1])) else j - 1
        return out

    def past_end(self, t) -> bool:
        """True when time ``t`` is nearer to the frame after the last one than to the last one."""
        return 2 * self._ticks(t) >= 2 * int(self.pts[-1]) + self.last_duration


def scan_video(path) -> VideoTimeline:
    """One demux pass over the first video stream (packets are read, not decoded: cheap) ->
    :class:`VideoTimeline`. A read error part-way (a truncated file) ends the timeline there
    (``demux_error``); no packet at all is ``VideoError`` ``empty`` / ``corrupt``."""
    path = os.fspath(path)
    container = _open(path)
    pts: list[int] = []
    keys: list[int] = []
    durations: list[int] = []
    no_ts = 0
    err = ""
    try:
        stream = container.streams.video[0]
        tb = stream.time_base
        fps = _stream_fps(stream)
        expected = int(stream.frames or 0) or None
        exp_dur = None
        if stream.duration is not None and tb is not None and stream.duration > 0:
            exp_dur = float(stream.duration * tb)
        elif container.duration is not None and container.duration > 0 and len(container.streams) == 1:
            exp_dur = container.duration / 1_000_000   # the container's: only when the video is all it holds
        try:
            for pkt in container.demux(stream):
                if pkt.size == 0 or getattr(pkt, "is_discard", False):
                    continue
                t = pkt.pts if pkt.pts is not None else pkt.dts
                if t is None:
                    no_ts += 1
                    t = len(pts)
                pts.append(int(t))
                durations.append(int(pkt.duration or 0))
                if pkt.is_keyframe:
                    keys.append(int(t))
        except Exception as e:  # truncated / unreadable tail
            err = f"{type(e).__name__}: {e}"
    finally:
        container.close()
    if not pts:
        raise VideoError(path, "corrupt" if err else "empty", err or "no video packets")
    by_index = no_ts > 0 or tb is None
    if by_index:
        if fps is None:
            raise VideoError(path, "corrupt", "no timestamps and no frame rate")
        tb = Fraction(1) / _frac(fps)
        p = np.arange(len(pts), dtype=np.int64)
        keyframes, last = np.zeros(1, np.int64), 1
    else:
        tb = Fraction(tb.numerator, tb.denominator)
        order = np.argsort(np.asarray(pts, np.int64), kind="stable")
        p = np.asarray(pts, np.int64)[order]
        if len(np.unique(p)) != len(p):  # duplicate timestamps: keep the first of each
            p = np.unique(p)
        keyframes = np.unique(np.asarray(keys or [int(p[0])], np.int64))
        last = int(np.asarray(durations, np.int64)[order][-1]) if durations else 0
        if last <= 0:
            d = np.diff(p)
            last = int(np.median(d)) if d.size else (int(round(1 / (fps * tb))) if fps else 1)
        last = max(last, 1)
        if fps is None:
            if len(p) < 2:
                raise VideoError(path, "corrupt", "cannot determine frame rate")
            fps = (len(p) - 1) / float((int(p[-1]) - int(p[0])) * tb)
    return VideoTimeline(path, p, tb, keyframes, int(last), float(fps), expected, exp_dur, by_index, err)


SCAN_CACHE_SIZE = 4096     # timelines kept per process (``scan_video_cached``)
_scan_cache: "collections.OrderedDict[tuple, VideoTimeline]" = collections.OrderedDict()
_scan_lock = threading.Lock()


def scan_video_cached(path) -> VideoTimeline:
    """``scan_video`` through a per-process cache of the last ``SCAN_CACHE_SIZE`` files, keyed by the
    path and the file's size, modification time and inode (a rewritten file is scanned again): a
    clip read again (each epoch of a training run) is not demuxed again. Errors are not cached."""
    path = os.fspath(path)
    try:
        st = os.stat(path)
    except OSError:
        return scan_video(path)            # its error names the file
    key = (path, st.st_size, st.st_mtime_ns, st.st_ino)
    with _scan_lock:
        tl = _scan_cache.get(key)
        if tl is not None:
            _scan_cache.move_to_end(key)
            return tl
    tl = scan_video(path)
    with _scan_lock:
        _scan_cache[key] = tl
        while len(_scan_cache) > SCAN_CACHE_SIZE:
            _scan_cache.popitem(last=False)
    return tl


# -- which frames: the sampling rules on timestamps (constant-rate clips: the index rules above) --

def vlm_indices(tl: VideoTimeline, num_frames: int = 6, sample_fps: float = 1.0) -> tuple[np.ndarray, float]:
    """``processor.sample_frames_for_vlm`` on timestamps: frame ``k`` is the one shown nearest
    ``k / sample_fps`` s; when the last of those times is past the end of the clip the frames are
    spread over the clip's time span instead (nearest each of ``linspace(0, t_last, num_frames)``)
    and the returned rate is the effective one, ``(num_frames - 1) / t_last``."""
    if num_frames < 1 or not sample_fps > 0:
        raise ValueError(f"vlm_indices: need num_frames >= 1 and sample_fps > 0, got {num_frames}, {sample_fps}")
    r = _frac(sample_fps)
    times = [Fraction(k) / r for k in range(num_frames)]
    if not tl.past_end(times[-1]):
        return tl.nearest(times), float(sample_fps)
    span = (int(tl.pts[-1]) - int(tl.pts[0])) * tl.time_base
    idx = tl.nearest([span * j / max(num_frames - 1, 1) for j in range(num_frames)])
    if tl.num_frames == 1 or num_frames == 1 or span <= 0:
        return idx, float(sample_fps)
    return idx, float((num_frames - 1) / span)


def clip_indices(tl: VideoTimeline, num_frames: int, out_fps: float,
                 mode: Literal["first", "last", "uniform"] = "first") -> tuple[np.ndarray, int]:
    """``target_clip`` (``mode="first"``) and ``reference_clip`` (``"last"`` / ``"uniform"``) on
    timestamps: output frame ``k`` at ``k / out_fps`` s takes the frame shown nearest that time.
    ``first``: times past the end repeat the last frame; ``last``: the last ``num_frames`` of the
    clip's ``floor(duration * out_fps)`` re-timed frames, padded in front by the first;
    ``uniform``: nearest each of ``linspace(0, t_last, num_frames)``. Returns ``(indices, valid)``."""
    if num_frames < 1 or not out_fps > 0:
        raise ValueError(f"clip_indices: need num_frames >= 1 and out_fps > 0, got {num_frames}, {out_fps}")
    r = _frac(out_fps)
    if mode == "first":
        times = [Fraction(k) / r for k in range(num_frames)]
        return tl.nearest(times), sum(not tl.past_end(t) for t in times)
    if mode == "last":
        dur = (int(tl.pts[-1]) - int(tl.pts[0]) + tl.last_duration) * tl.time_base
        n_all = max(1, math.floor(dur * r))
        ks = range(max(0, n_all - num_frames), n_all)
        idx = tl.nearest([Fraction(k) / r for k in ks])
        if n_all >= num_frames:
            return idx, num_frames
        return np.concatenate([np.full(num_frames - n_all, idx[0]), idx]), n_all
    if mode == "uniform":
        span = (int(tl.pts[-1]) - int(tl.pts[0])) * tl.time_base
        return tl.nearest([span * j / max(num_frames - 1, 1) for j in range(num_frames)]), min(num_frames, tl.num_frames)
    raise ValueError(f"clip_indices: mode must be 'first', 'last' or 'uniform', got {mode!r}")


# -- decoding only those frames ------------------------------------------------------------------

@dataclasses.dataclass
class ReadReport:
    """How a video was read: what the container announces against what decoded.

    ``decoded_frames``: frames the file holds (its packets) minus the ones that failed to decode
    where this read decoded (frames outside the decoded stretches are counted, not decoded);
    ``decoded_duration``: first frame to the end of the last good one. ``substituted``: requested
    frames that did not decode and were replaced by the nearest one that did. ``warning``: set when
    less decoded than announced (then :class:`VideoDamageWarning`)."""
    path: str
    expected_frames: int | None
    decoded_frames: int
    expected_duration: float | None
    decoded_duration: float
    fps: float
    rotation: int = 0
    decode_errors: int = 0
    substituted: int = 0
    frames_decoded_here: int = 0   # frames this read actually decoded (cost)
    warning: str | None = None

    @property
    def decoded_fraction(self) -> float:
        fr = [1.0]
        if self.expected_frames:
            fr.append(self.decoded_frames / self.expected_frames)
        if self.expected_duration:
            fr.append(self.decoded_duration / self.expected_duration)
        return float(min(fr))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["expected_duration"] = None if self.expected_duration is None else round(self.expected_duration, 4)
        d["decoded_duration"] = round(self.decoded_duration, 4)
        d["decoded_fraction"] = round(self.decoded_fraction, 4)
        return d


def _decode_at(path: str, tl: VideoTimeline, wanted: np.ndarray, max_pixels: int | None) -> dict:
    """Decode the frames at timeline indices ``wanted``: for each stretch, seek to the keyframe
    before it (when that is ahead of the decoder), decode forward, convert only the wanted frames.
    A wanted frame that does not decode is replaced by the nearest one that did (``substituted``).
    Returns a dict: ``frames`` {index: rgb}, ``bad`` (timestamps sent to the decoder that gave no
    good frame), ``errors``, ``substituted``, ``decoded``, ``rotation``."""
    container = _open(path)
    pending = [int(tl.pts[i]) for i in wanted]
    index_of = {int(tl.pts[i]): int(i) for i in wanted}
    r = {"frames": {}, "bad": set(), "errors": 0, "substituted": 0, "decoded": 0, "rotation": 0}
    st = {"i": 0, "prev": None, "last_out": None, "counter": 0, "fresh_target": None, "overshoot": False}
    sent: list[int] = []
    got: set[int] = set()

    def store(frame, want):
        r["rotation"] = int(getattr(frame, "rotation", 0) or 0)
        r["frames"][index_of[want]] = _frame_rgb(frame, max_pixels)

    def handle(frame, q):
        while st["i"] < len(pending) and pending[st["i"]] < q:   # passed without decoding
            p, prev = pending[st["i"]], st["prev"]
            store(frame if prev is None or (q - p) <= (p - prev[1]) else prev[0], p)
            r["substituted"] += 1
            st["i"] += 1
        if st["i"] < len(pending) and pending[st["i"]] == q:
            store(frame, q)
            st["i"] += 1
        st["prev"] = (frame, q)

    def take(frames):
        for f in frames:
            q = st["counter"] if tl.by_index else f.pts
            st["counter"] += 1
            if q is None:
                continue
            q = int(q)
            r["decoded"] += 1
            if st["fresh_target"] is not None:   # first frame after a seek: did it land too late?
                if q > st["fresh_target"]:
                    st["overshoot"] = True
                    return
                st["fresh_target"] = None
            st["last_out"] = q
            if getattr(f, "is_corrupt", False):
                r["bad"].add(q)
                continue
            got.add(q)
            handle(f, q)

    def close_run(flushed: bool):
        lo = st["last_out"]
        r["bad"].update(p for p in sent if p not in got and (flushed or (lo is not None and p <= lo)))
        sent.clear()
        got.clear()

    try:
        stream = container.streams.video[0]
        # slice threads only: frame threading drops damaged frames silently (no error, fewer frames)
        stream.thread_type = "SLICE"
        packets = container.demux(stream)
        pos = int(tl.pts[0])          # where the decoder is: nothing decoded yet, at the start
        restarted = False
        while st["i"] < len(pending):
            target = pending[st["i"]]
            if st["overshoot"] or not tl.by_index:
                ks = tl.keyframes[tl.keyframes <= target]
                k = int(ks[-1]) if ks.size else int(tl.keyframes[0])
                seek_to = None
                if st["overshoot"]:   # the seek landed after the target: decode from the start once
                    st["overshoot"], st["fresh_target"] = False, None
                    restarted, seek_to = True, int(tl.pts[0]) - 1
                    sent.clear()
                    got.clear()
                elif k > pos and k > int(tl.keyframes[0]):
                    close_run(False)
                    seek_to = k
                if seek_to is not None:
                    container.seek(seek_to, stream=stream, backward=True, any_frame=False)
                    stream.codec_context.flush_buffers()
                    packets = container.demux(stream)
                    # after a restart from the start a late first frame is damage, not a bad seek
                    st["prev"], pos, st["fresh_target"] = None, max(seek_to, pos), None if restarted else target
            here = st["i"]
            while st["i"] == here and not st["overshoot"]:
                try:
                    pkt = next(packets)
                except Exception:       # StopIteration, or an unreadable tail
                    pkt = None
                if pkt is None or (pkt.size == 0 and pkt.pts is None):
                    try:
                        take(stream.codec_context.decode(None))
                    except Exception:
                        r["errors"] += 1
                    close_run(True)
                    # requests after the last decodable frame: the last good one
                    while st["i"] < len(pending) and st["prev"] is not None:
                        store(st["prev"][0], pending[st["i"]])
                        r["substituted"] += 1
                        st["i"] += 1
                    if tl.by_index:
                        r["bad"].update(range(st["counter"], tl.num_frames))
                    return r
                if pkt.size == 0:
                    continue
                if not tl.by_index and not getattr(pkt, "is_discard", False):
                    t = pkt.pts if pkt.pts is not None else pkt.dts
                    if t is not None:
                        sent.append(int(t))
                try:
                    take(stream.decode(pkt))
                except Exception:
                    r["errors"] += 1
                if st["last_out"] is not None:
                    pos = max(pos, st["last_out"])
        close_run(False)
    finally:
        container.close()
    return r


@dataclasses.dataclass
class SampledVideo:
    """What :func:`sample_video` decoded: each request's frames (uint8 RGB, upright, at most
    ``max_pixels``), their rates / valid counts, the timeline and the :class:`ReadReport`."""
    path: str
    frames: dict[str, np.ndarray]
    rates: dict[str, float]
    valid: dict[str, int]
    timeline: VideoTimeline
    report: ReadReport


def sample_video(path, requests: dict, *, max_pixels: int | None = None,
                 min_decoded: float = MIN_DECODED_FRACTION, warn: bool = True) -> SampledVideo:
    """Decode only the frames ``requests`` ask for, in one seek-and-stream pass.

    ``requests``: name -> ``("vlm", num_frames, sample_fps)``, ``("clip", num_frames, out_fps, mode)``
    (``mode``: ``first`` / ``last`` / ``uniform``, see :func:`clip_indices`) or ``("spread", n)`` (``n``
    frames evenly over the clip's time span, e.g. a preview). Frames are picked by presentation
    timestamp, decoded from the keyframe before them, scaled down to ``max_pixels`` and turned
    upright as they are decoded; memory is the requested frames, whatever the clip's length.

    Damage: the container's announced frames / duration are compared with what decodes. Less than
    ``min_decoded`` of it is ``VideoError`` ``damaged`` naming the file and both numbers; less than
    all of it (more than one frame short) sets ``report.warning`` (and warns when ``warn``).
    """
    path = os.fspath(path)
    tl = scan_video_cached(path)
    plans: dict[str, tuple[np.ndarray, float, int]] = {}
    for name, req in requests.items():
        kind = req[0]
        if kind == "vlm":
            idx, rate = vlm_indices(tl, int(req[1]), float(req[2]))
            plans[name] = (idx, rate, int(req[1]))
        elif kind == "clip":
            idx, valid = clip_indices(tl, int(req[1]), float(req[2]), req[3] if len(req) > 3 else "first")
            plans[name] = (idx, float(req[2]), int(valid))
        elif kind == "spread":
            idx, valid = clip_indices(tl, int(req[1]), 1.0, "uniform")
            plans[name] = (idx, tl.fps, int(valid))
        else:
            raise ValueError(f"sample_video: unknown request {name}={req!r}")
    wanted = np.unique(np.concatenate([p[0] for p in plans.values()])) if plans else np.zeros(0, np.int64)
    d = _decode_at(path, tl, wanted, max_pixels)
    got = d["frames"]
    if len(got) < len(wanted):
        raise VideoError(path, "corrupt" if d["errors"] else "empty",
                         f"{len(wanted) - len(got)} of {len(wanted)} requested frames did not decode ({d['errors']} decode errors)")
    bad = d["bad"] & set(tl.pts.tolist())
    good = tl.pts[~np.isin(tl.pts, np.fromiter(bad, np.int64, len(bad)))] if bad else tl.pts
    if good.size == 0:
        raise VideoError(path, "corrupt", f"no frame decoded ({d['errors']} decode errors)")
    dec_dur = float((int(good[-1]) - int(tl.pts[0]) + tl.last_duration) * tl.time_base)
    errors, substituted = d["errors"], d["substituted"]
    rep = ReadReport(path, tl.expected_frames, int(good.size), tl.expected_duration, dec_dur, tl.fps,
                     d["rotation"], errors, substituted, d["decoded"])
    frac = rep.decoded_fraction
    exp = f"{tl.expected_frames} frames" if tl.expected_frames else "?"
    numbers = (f"{rep.decoded_frames} of {exp} ({dec_dur:.2f} s of "
               f"{'?' if tl.expected_duration is None else f'{tl.expected_duration:.2f}'} s) decoded")
    if frac < min_decoded:
        raise VideoError(path, "damaged", f"{numbers}: below the {min_decoded:.0%} threshold"
                         + (f"; {tl.demux_error}" if tl.demux_error else ""))
    short_frames = tl.expected_frames is not None and tl.expected_frames - rep.decoded_frames > 1
    frame_s = 1.0 / tl.fps if tl.fps else 0.0
    short_time = tl.expected_duration is not None and dec_dur < tl.expected_duration - 2 * frame_s - 1e-6
    if short_frames or short_time or substituted or errors or bad:
        rep.warning = f"{path}: damaged video, {numbers}" + (f", {errors} decode error(s)" if errors else "") + (
            f", {substituted} requested frame(s) replaced by the nearest decodable one" if substituted else "")
        if warn:
            warnings.warn(VideoDamageWarning(rep.warning), stacklevel=2)
    frames, rates, valid = {}, {}, {}
    ref_shape = got[int(wanted[0])].shape if len(wanted) else None
    for name, (idx, rate, v) in plans.items():
        fs = [got[int(i)] for i in idx]
        fs = [f if f.shape == ref_shape else np.asarray(Image.fromarray(f).resize((ref_shape[1], ref_shape[0])))
              for f in fs]
        frames[name] = np.stack(fs)
        rates[name], valid[name] = rate, v
    return SampledVideo(path, frames, rates, valid, tl, rep)
