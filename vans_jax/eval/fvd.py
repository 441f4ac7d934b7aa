"""Frechet Video Distance with the Kinetics-400 I3D (``vans_jax.models.i3d``).

FVD = ||mu_g - mu_r||^2 + Tr(S_g + S_r - 2 sqrtm(S_g S_r)) between Gaussians fitted to the I3D
features of generated and ground-truth videos. Conventions:

* **features**: the 400-d I3D logits (pre-softmax), averaged over time (``I3D.features``);
* **frames** (``preprocess_for_i3d``): ``num_frames`` = 16 per video. ``sampling="uniform"``
  (default): a longer video gives the frames at ``floor(linspace(0, T - 1, 16) + 0.5)`` (first and
  last frame included, spread evenly); ``sampling="first"``: the first 16 consecutive frames (the
  StyleGAN-V "FVD16" clip). A shorter video is padded by repeating its last frame, either way;
* **resize**: every frame straight to 224x224 (aspect ratio **not** kept, no crop), bilinear with
  half-pixel centres and no antialiasing, i.e. torch ``F.interpolate(mode="bilinear",
  align_corners=False)`` as the common FVD implementations do;
* **range**: uint8 frames are [0, 255]; float frames are taken as [0, 1] (the ``"float"`` output
  of the Wan pipeline) unless ``value_range`` says otherwise; both map linearly to [-1, 1] (values
  outside the range are clipped);
* **statistics**: mean and unbiased covariance (``np.cov`` convention, divisor n - 1) in float64,
  accumulated batch by batch (``FeatureStats``), so eval sets of any size stream;
* **distance**: ``frechet_distance`` in float64 NumPy/SciPy as pytorch-fid computes it (sqrtm of the
  product; if that is not finite, both covariances get ``eps * I`` added; a complex result keeps
  its real part). pytorch-fid raises when the imaginary part of the diagonal exceeds 1e-3; here
  that is a ``RuntimeWarning`` (small eval sets give singular covariances), and the result is
  still the real part.

Typical use::

    i3d = load_i3d("i3d_rgb_imagenet.safetensors")
    score = fvd(i3d, generated_uint8, ground_truth_uint8, batch_size=8)   # (N, T, H, W, 3) each

or, streaming::

    gen, ref = FeatureStats(), FeatureStats()
    for g, r in batches:
        gen.update(i3d_features(i3d, g)); ref.update(i3d_features(i3d, r))
    score = fvd_from_stats(gen, ref)
"""
from __future__ import annotations

import functools
import warnings
import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
from flax import nnx

NUM_FRAMES = 16
SIZE = 224
SAMPLINGS = ("uniform", "first")


# ----------------------------------------------------------------------------- preprocessing

def frame_indices(num_in: int, num_frames: int = NUM_FRAMES, sampling: str = "uniform") -> np.ndarray:
    """Which input frames make the ``num_frames`` clip (see the module docstring)."""
    if num_in < 1 or num_frames < 1:
        raise ValueError(f"need at least one input and one output frame, got {num_in} -> {num_frames}")
    if sampling not in SAMPLINGS:
        raise ValueError(f"unknown sampling {sampling!r}; expected one of {SAMPLINGS}")
    if num_in <= num_frames:
        return np.minimum(np.arange(num_frames), num_in - 1)   # all frames, then repeat the last
    if sampling == "first":
        return np.arange(num_frames)
    return np.floor(np.linspace(0.0, num_in - 1, num_frames) + 0.5).astype(np.int64)


def preprocess_for_i3d(frames, num_frames: int = NUM_FRAMES, size: int = SIZE, *, sampling: str = "uniform",
                       value_range: tuple[float, float] | None = None):
    """Videos (B, T, H, W, 3), uint8 or float -> (B, num_frames, size, size, 3) float32 in [-1, 1].

    value_range: the input's (black, white) values; default (0, 255) for integer input, (0, 1) for
    float input. Works on NumPy or JAX arrays and under ``jax.jit`` (shapes are static).
    """
    if frames.ndim != 5 or frames.shape[-1] != 3:
        raise ValueError(f"expected videos (B, T, H, W, 3), got shape {tuple(frames.shape)}")
    is_int = jnp.issubdtype(frames.dtype, jnp.integer)
    if value_range is None:
        value_range = (0.0, 255.0) if is_int else (0.0, 1.0)
    lo, hi = float(value_range[0]), float(value_range[1])
    if not hi > lo:
        raise ValueError(f"value_range {value_range} must be (low, high) with high > low")
    idx = frame_indices(frames.shape[1], num_frames, sampling)
    x = jnp.asarray(frames)[:, idx].astype(jnp.float32)
    x = jnp.clip((x - lo) * (2.0 / (hi - lo)) - 1.0, -1.0, 1.0)
    b, t, h, w, c = x.shape
    if (h, w) != (size, size):
        x = jax.image.resize(x, (b, t, size, size, c), method="bilinear", antialias=False)
    return x


# ----------------------------------------------------------------------------- features

@functools.partial(jax.jit, static_argnames=("graphdef", "num_frames", "size", "sampling", "value_range"))
def _features_jit(graphdef, state, videos, num_frames, size, sampling, value_range):
    model = nnx.merge(graphdef, state)
    x = preprocess_for_i3d(videos, num_frames, size, sampling=sampling, value_range=value_range)
    return model.features(x)


def i3d_features(model, videos, batch_size: int = 8, *, num_frames: int = NUM_FRAMES, size: int = SIZE,
                 sampling: str = "uniform", value_range: tuple[float, float] | None = None) -> np.ndarray:
    """(N, T, H, W, 3) raw videos -> (N, num_classes) float32 I3D features (NumPy).

    Preprocessing (``preprocess_for_i3d``) and the network run in one jitted step per batch of
    ``batch_size`` videos; a short batch (the last one, or all of fewer than ``batch_size`` videos) is
    padded to ``batch_size`` (repeating its last video) so every call with the same video shape
    reuses one compilation -- what streaming evaluation wants.
    """
    videos = np.asarray(videos) if not isinstance(videos, jax.Array) else videos
    if videos.ndim != 5:
        raise ValueError(f"expected videos (N, T, H, W, 3), got shape {tuple(videos.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = videos.shape[0]
    if n == 0:
        return np.zeros((0, model.num_classes), np.float32)
    vr = None if value_range is None else (float(value_range[0]), float(value_range[1]))
    graphdef, state = nnx.split(model)
    bs = batch_size
    out = []
    for start in range(0, n, bs):
        chunk = videos[start:start + bs]
        m = chunk.shape[0]
        if m < bs:
            pad = np.repeat(np.asarray(chunk[-1:]), bs - m, axis=0)
            chunk = np.concatenate([np.asarray(chunk), pad], axis=0)
        feats = _features_jit(graphdef, state, chunk, num_frames=num_frames, size=size, sampling=sampling,
                              value_range=vr)
        out.append(np.asarray(jax.device_get(feats))[:m])
    return np.concatenate(out, axis=0).astype(np.float32)


# ----------------------------------------------------------------------------- statistics

class FeatureStats:
    """Streaming mean / covariance of feature vectors in float64.

    Keeps the count n, the running mean and the centred scatter matrix M2 = sum (x - mean)(x - mean)^T;
    each ``update`` folds a batch in with the pairwise (Chan et al.) combination, which equals the
    one-shot statistics of all rows seen and avoids the cancellation of raw sums of squares.
    ``cov`` is M2 / (n - 1) (``np.cov`` with ``rowvar=False``)."""

    def __init__(self, dim: int | None = None):
        self.dim = dim
        self.n = 0
        self._mean = None if dim is None else np.zeros(dim, np.float64)
        self._m2 = None if dim is None else np.zeros((dim, dim), np.float64)

    def update(self, features) -> "FeatureStats":
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2:
            raise ValueError(f"expected features (N, D), got shape {x.shape}")
        if self.dim is None:
            self.dim = x.shape[1]
            self._mean = np.zeros(self.dim, np.float64)
            self._m2 = np.zeros((self.dim, self.dim), np.float64)
        if x.shape[1] != self.dim:
            raise ValueError(f"feature dimension {x.shape[1]} != {self.dim}")
        if x.shape[0] == 0:
            return self
        mean_b = x.mean(axis=0)
        xc = x - mean_b
        self._combine(x.shape[0], mean_b, xc.T @ xc)
        return self

    def merge(self, other: "FeatureStats") -> "FeatureStats":
        """Folds in another accumulator (e.g. from another host)."""
        if other.n == 0:
            return self
        if self.dim is None:
            self.dim = other.dim
            self._mean = np.zeros(self.dim, np.float64)
            self._m2 = np.zeros((self.dim, self.dim), np.float64)
        if other.dim != self.dim:
            raise ValueError(f"feature dimension {other.dim} != {self.dim}")
        self._combine(other.n, other._mean, other._m2)
        return self

    def _combine(self, nb, mean_b, m2_b):
        na = self.n
        n = na + nb
        delta = mean_b - self._mean
        self._mean = self._mean + delta * (nb / n)
        self._m2 = self._m2 + m2_b + np.outer(delta, delta) * (na * nb / n)
        self.n = n

    @property
    def mean(self) -> np.ndarray:
        if self.n < 1:
            raise ValueError("no features accumulated")
        return self._mean.copy()

    @property
    def cov(self) -> np.ndarray:
        if self.n < 2:
            raise ValueError(f"a covariance needs at least 2 feature vectors, have {self.n}")
        return self._m2 / (self.n - 1)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2)) in float64 (see the module docstring)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != mu1.shape * 2:
        raise ValueError(f"shape mismatch: mu {mu1.shape} / {mu2.shape}, sigma {s1.shape} / {s2.shape}")
    diff = mu1 - mu2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(s1 @ s2)
        if not np.isfinite(covmean).all():
            offset = np.eye(s1.shape[0]) * eps
            covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        imag = np.max(np.abs(np.diagonal(covmean).imag))
        if imag > 1e-3:
            warnings.warn(f"frechet_distance: sqrtm has an imaginary diagonal component up to {imag:.3g}; "
                          "using its real part (singular or ill-conditioned covariances)", RuntimeWarning,
                          stacklevel=2)
        covmean = covmean.real
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


def fvd_from_stats(gen: FeatureStats, ref: FeatureStats) -> float:
    return frechet_distance(gen.mean, gen.cov, ref.mean, ref.cov)


def accumulate(model, videos, stats: FeatureStats | None = None, batch_size: int = 8, **preprocess) -> FeatureStats:
    """I3D feature statistics of ``videos``: one (N, T, H, W, 3) array, or an iterable of such batches."""
    stats = stats if stats is not None else FeatureStats()
    if hasattr(videos, "ndim") and videos.ndim == 5:
        videos = (videos,)
    for batch in videos:
        stats.update(i3d_features(model, batch, batch_size, **preprocess))
    return stats


def fvd(model, gen_videos, gt_videos, batch_size: int = 8, **preprocess) -> float:
    """FVD between generated and ground-truth videos (each an (N, T, H, W, 3) array, uint8 or float, or
    an iterable of such batches); ``preprocess``: ``num_frames``, ``size``, ``sampling``, ``value_range``.
    Needs at least 2 videos per side (in practice hundreds or more: the statistic is biased for small N)."""
    gen = accumulate(model, gen_videos, batch_size=batch_size, **preprocess)
    ref = accumulate(model, gt_videos, batch_size=batch_size, **preprocess)
    return fvd_from_stats(gen, ref)
