"""The evaluation runner: a predictions directory + the eval CSV -> the paper's Table 1 metrics.

    vans-jax eval --predictions DIR --csv eval.csv --video_root VIDEOS --output results.json \\
        [--clip CLIP_DIR] [--i3d i3d.safetensors] [--random_models] [--exclude_missing]

writes ``results.json`` and, next to it, ``results.md`` (the table laid out like the paper's
Table 1: one line per benchmark, procedural / predictive, plus all rows together).

Prediction directory format (what ``vans-jax predict`` writes, one folder per CSV row)::

    <DIR>/<index>/answer.json   {"text": the full VLM output "[Think]...[/Think][Ans]...[/Ans]",
                                 "caption": the parsed [Ans] text, "think": the parsed [Think] text,
                                 ... any other fields (ignored)}
    <DIR>/<index>/answer.mp4    the generated next-event video (any size / length; H.264 or
                                 anything PyAV decodes)

``<index>`` is the CSV row's ``index`` (``VNEPRow.index``: the 0-based position of the row among
the data rows of the file, skipped rows keeping their number), written in decimal without padding
(``0``, ``1``, ... ``799``). ``caption`` may be omitted: it is then ``extract_answer(text)``.

Every prediction is cross-checked against its CSV row first: an ``answer.json`` that records an
``input_video_path`` (``vans-jax predict --csv`` does) or an ``index`` other than its row's is an
error naming the rows (``PredictionMismatchError``: predictions made from another CSV or split).

Missing pieces never stop the run; they are counted (``counts`` in the JSON), listed, and scored
as failures in the headline numbers (``FAILURES``):

* a row without ``answer.json`` (or with an unreadable one) is a *missing* / *invalid*
  prediction: an empty caption for the text metrics, 0 on CLIP-V / CLIP-T;
* a row with ``answer.json`` but no readable ``answer.mp4``, or whose ground-truth target video
  cannot be read (``gt_video_error``), is scored on text and gets 0 on CLIP-V / CLIP-T;
* FVD is null when any row of the benchmark lacks a video pair (a set distance cannot score a
  failure).

``coverage`` (text / video: the fraction of rows scored) and ``splits.<benchmark>.scored`` (the
metrics over the scored rows only) are always reported; ``--exclude_missing`` makes the scored
subset the headline. ``complete`` is false, and ``vans-jax eval`` exits with 1, when any row failed
(video failures only when video metrics are computed).

A predictions directory that does not exist, or that holds no prediction for any CSV row, is an
error (the likely cause is a wrong path).

The scoring itself is ``score_predictions``: predictions held in memory (response texts, captions,
uint8 videos per row) against the rows' ground truth. ``evaluate`` reads each row's files and
calls it one row at a time; ``vans-jax demo`` calls it on the videos its pipeline just decoded
(no mp4 round trip), a batch of rows at a time, with ROUGE-L rounded to float32 as the Joint-GRPO
rewards are.

Conventions (also written to the output JSON's ``conventions`` field):

* **text** (``bleu1``..``bleu4``, ``rouge_l``): the predicted [Ans] caption vs the row's
  ``ENG_GT_Caption``; BLEU is corpus-level over the benchmark (COCO convention), ROUGE-L the mean
  of the per-sample F-measures (``vans_jax.eval.text_metrics``);
* **ground-truth video**: ``output_video_path`` under ``video_root`` through ``target_clip`` at
  the eval geometry (default 33 frames, 352x640, 11 fps: re-timed by nearest frame, resized to
  cover and center-cropped, a short clip padded by repeating its last frame);
* **generated video**: every decoded frame, not re-timed; frames whose size differs from the eval
  geometry are resized to cover it and center-cropped (``resize_center_crop``);
* **CLIP-V**: cosine of the CLIP image embeddings of generated frame i and ground-truth frame i,
  averaged over i < min(F_gen, F_gt), then over samples; both sides go through CLIP's own
  preprocessing (bicubic resize of the short side, center crop, CLIP mean/std);
* **CLIP-T**: cosine of each generated frame's CLIP image embedding and the CLIP text embedding of
  the *ground-truth* caption (``ENG_GT_Caption``, truncated to CLIP's 77 tokens), averaged over the
  generated frames, then over samples; the raw cosine (no 100x, no clamp at 0), as the paper's
  0.2-0.38 values;
* **FVD**: Frechet distance between the I3D features of all generated and all ground-truth target
  videos of the benchmark (the rows with both videos), ``vans_jax.eval.fvd`` conventions
  (16 frames sampled uniformly, 224x224 bilinear, [-1, 1], 400-d logits); null with fewer than 2
  videos. FVD is biased upward for small sets: compare numbers over the same number of videos;
* **benchmarks**: ``procedural`` / ``predictive`` by ``VNEPRow.kind`` (the CSV's ``kind`` column
  or the question heuristic of ``csv_format``); ``all`` is every row, unknown kinds included. The
  top-level metric fields are those of ``all``.

Models: ``--clip DIR`` (a Hugging Face CLIP directory, ``convert.clip.from_pretrained``) and
``--i3d FILE`` (pytorch-i3d weights as safetensors, ``convert.i3d.load_i3d``). Without them the
video metrics are ``null`` and a note says why. ``--random_models`` (tests and demos only) uses a
tiny randomly initialised CLIP (byte-level tokenizer) and a tiny random 3D feature network in place
of I3D (8 frames of 32x32); the output says so in ``models`` and ``notes``, and such numbers
measure nothing.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from collections import Counter
from typing import Callable, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from vans_jax.data.csv_format import KINDS, VNEPRow, read_vnep_csv
from vans_jax.data.video_io import VideoError, check_vae_frames, read_video, resize_center_crop, target_clip
from vans_jax.eval.fvd import FeatureStats, fvd_from_stats, i3d_features
from vans_jax.eval.text_metrics import caption_metrics
from vans_jax.rl.format import extract_answer, parse_response
from vans_jax.rl.rewards import _rouge_scorer, clip_score, clip_video_similarity, format_reward

__all__ = [
    "EvalConfig",
    "Models",
    "Prediction",
    "METRICS",
    "BENCHMARKS",
    "CONVENTIONS",
    "FAILURES",
    "load_models",
    "random_models",
    "read_prediction",
    "check_predictions_match",
    "PredictionMismatchError",
    "read_ground_truth",
    "to_eval_geometry",
    "score_predictions",
    "evaluate",
    "markdown_table",
    "ByteTokenizer",
    "TinyVideoFeatures",
]

METRICS = ("bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "clip_v", "clip_t", "fvd")
BENCHMARKS = KINDS + ("all",)
ANSWER_JSON, ANSWER_MP4 = "answer.json", "answer.mp4"

FAILURES = (
    "headline metrics cover every CSV row of the benchmark and a row that cannot be scored counts as a failure: "
    "without a readable answer.json it is an empty caption (no n-gram matches, its reference length in BLEU's "
    "brevity penalty, ROUGE-L 0) and scores 0 on CLIP-V / CLIP-T; with one but without a readable answer.mp4 "
    "(or with an unreadable ground-truth video) it scores 0 on CLIP-V / CLIP-T; FVD, a distance between two "
    "sets, cannot score a failure: it is null unless every row has a video pair. splits.<benchmark>.scored "
    "holds the metrics over the rows that were scored and coverage the fraction scored; --exclude_missing "
    "(exclude_missing=True) makes those the headline. Video failures count only when video metrics are "
    "computed (--clip / --i3d). complete is false (exit code 1) when any row failed")

CONVENTIONS = {
    "text": "BLEU@1..4 (corpus-level over the benchmark, COCO convention) and ROUGE-L (rouge-score "
            "F-measure, mean over samples) of the predicted [Ans] caption (answer.json 'caption', else "
            "extract_answer(answer.json 'text')) vs ENG_GT_Caption",
    "gt_video": "output_video_path under video_root through target_clip at the eval geometry "
                "(see config: frames, height x width, fps; nearest-frame re-timing, resize to cover + "
                "center crop, short clips padded by repeating the last frame)",
    "generated_video": "answer.mp4, every decoded frame, not re-timed; resized to cover the eval "
                       "height x width and center-cropped when its size differs",
    "clip_v": "cosine(CLIP image embedding of generated frame i, of ground-truth frame i) averaged over "
              "i < min(F_gen, F_gt), then over samples; CLIP preprocessing (bicubic short-side resize, "
              "center crop, CLIP mean/std) on both",
    "clip_t": "cosine(CLIP image embedding of each generated frame, CLIP text embedding of the "
              "GROUND-TRUTH caption ENG_GT_Caption, truncated to 77 tokens) averaged over the generated "
              "frames, then over samples; raw cosine (no 100x scale, no clamp at 0)",
    "fvd": "Frechet distance between I3D features (400-d time-averaged logits; 16 frames sampled uniformly, "
           "224x224 bilinear, [-1, 1]) of all generated vs all ground-truth target videos of the benchmark "
           "(rows having both videos); null with fewer than 2 videos; biased upward for small sets",
    "benchmarks": "procedural / predictive by the row's kind (CSV 'kind' column or the question heuristic); "
                  "'all' is every row; the top-level metrics are those of 'all'",
    "missing": FAILURES,
}


# --------------------------------------------------------------------------------------------
# configuration and models


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Eval geometry of the ground-truth target clip and FVD / batching settings."""

    num_frames: int = 33
    height: int = 352
    width: int = 640
    fps: float = 11.0
    resample: str = "bicubic"
    fvd_num_frames: int = 16
    fvd_size: int = 224
    fvd_sampling: str = "uniform"
    fvd_batch_size: int = 8
    clip_batch_size: int = 64

    def __post_init__(self):
        check_vae_frames(self.num_frames, "EvalConfig.num_frames")  # target_clip's rule
        if self.height < 1 or self.width < 1 or not self.fps > 0:
            raise ValueError(f"EvalConfig: bad geometry {self.height}x{self.width} at {self.fps} fps")


@dataclasses.dataclass
class Models:
    """What computes the video metrics; ``None`` turns the corresponding metrics off (null)."""

    clip: object | None = None            # a models.clip.CLIPModel
    tokenizer: object | None = None       # its tokenizer (``tokenizer(texts, padding=..., ...)`` callable)
    video_features: object | None = None  # I3D, or anything with ``features(x)`` and ``num_classes``
    clip_source: str | None = None
    i3d_source: str | None = None
    random: bool = False
    fvd_overrides: dict = dataclasses.field(default_factory=dict)  # preprocessing for the feature net

    def describe(self) -> dict:
        return {"clip": self.clip_source, "i3d": self.i3d_source, "random_models": self.random}


class ByteTokenizer:
    """A byte-level stand-in for the CLIP tokenizer (``random_models`` only): ids 1..256 are the
    UTF-8 bytes + 1, ``BOS`` / ``EOS`` follow, 0 pads. Same call interface as a Hugging Face
    tokenizer with ``padding="max_length", truncation=True, return_tensors="np"``."""

    PAD, BOS, EOS = 0, 257, 258
    vocab_size = 259

    def __call__(self, texts, padding="max_length", truncation=True, max_length=77, return_tensors="np"):
        ids = np.full((len(texts), max_length), self.PAD, np.int64)
        mask = np.zeros((len(texts), max_length), np.int64)
        for i, t in enumerate(texts):
            body = [b + 1 for b in t.encode("utf-8")][: max_length - 2]
            seq = [self.BOS] + body + [self.EOS]
            ids[i, : len(seq)] = seq
            mask[i, : len(seq)] = 1
        return {"input_ids": ids, "attention_mask": mask}


class TinyVideoFeatures(nnx.Module):
    """A tiny random video feature network with I3D's FVD interface (``random_models`` only):
    (B, T, S, S, 3) in [-1, 1] -> 8x8 patches -> random projection + tanh -> mean and std over
    time and space -> random projection to ``num_classes``."""

    def __init__(self, num_classes: int = 16, patch: int = 8, hidden: int = 32, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.num_classes, self.patch = num_classes, patch
        self.embed = nnx.Param(jnp.asarray(rng.normal(size=(patch * patch * 3, hidden)) / patch, jnp.float32))
        self.head = nnx.Param(jnp.asarray(rng.normal(size=(2 * hidden, num_classes)) / math.sqrt(hidden), jnp.float32))

    def features(self, x):
        b, t, h, w, c = x.shape
        p = self.patch
        x = x.reshape(b, t, h // p, p, w // p, p, c).transpose(0, 1, 2, 4, 3, 5, 6).reshape(b, -1, p * p * c)
        z = jnp.tanh(x @ self.embed[...])
        return jnp.concatenate([z.mean(axis=1), z.std(axis=1)], axis=-1) @ self.head[...]


def random_models(seed: int = 0) -> Models:
    """Tiny random CLIP (32x32 images, byte tokenizer) and video feature net: for tests and demos."""
    from vans_jax.models import clip as C

    tok = ByteTokenizer()
    cfg = C.CLIPConfig(
        text=C.CLIPTextConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, max_position_embeddings=77, pad_token_id=tok.PAD,
                              bos_token_id=tok.BOS, eos_token_id=tok.EOS),
        vision=C.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  image_size=32, patch_size=8),
        projection_dim=32)
    model = C.CLIPModel(cfg, rngs=nnx.Rngs(seed))
    return Models(clip=model, tokenizer=tok, video_features=TinyVideoFeatures(seed=seed),
                  clip_source="random (tiny, 32x32, byte tokenizer)", i3d_source="random (tiny 3D features, not I3D)",
                  random=True, fvd_overrides={"fvd_num_frames": 8, "fvd_size": 32})


def load_models(clip_dir: str | None = None, i3d_path: str | None = None, *, use_random: bool = False) -> Models:
    """The CLIP model + tokenizer from a Hugging Face directory and I3D from its weights; either may
    be None (its metrics become null). ``use_random``: ``random_models()`` instead (not with paths)."""
    if use_random:
        if clip_dir or i3d_path:
            raise ValueError("--random_models cannot be combined with --clip / --i3d")
        return random_models()
    models = Models()
    if clip_dir:
        from vans_jax.models import clip as C

        if not os.path.isdir(clip_dir):
            raise FileNotFoundError(f"CLIP directory not found: {clip_dir}")
        from vans_jax.convert import clip as clip_ckpt
        models.clip, models.tokenizer = clip_ckpt.from_pretrained(clip_dir), C.load_tokenizer(clip_dir)
        models.clip_source = os.path.abspath(clip_dir)
    if i3d_path:
        from vans_jax.convert.i3d import load_i3d

        if not os.path.exists(i3d_path):
            raise FileNotFoundError(f"I3D weights not found: {i3d_path}")
        models.video_features = load_i3d(i3d_path)
        models.i3d_source = os.path.abspath(i3d_path)
    return models


# --------------------------------------------------------------------------------------------
# predictions


class PredictionMismatchError(ValueError):
    """Predictions that record another input than the CSV row they are scored against (e.g. made
    from the train split and scored against eval.csv)."""


@dataclasses.dataclass
class Prediction:
    index: int
    status: str                      # "ok" | "missing" | "invalid"
    text: str = ""
    caption: str = ""
    think: str = ""
    video_path: str | None = None    # answer.mp4 when it exists
    detail: str = ""
    input_video_path: str | None = None   # as answer.json records it (``vans-jax predict --csv`` does)
    recorded_index: int | None = None     # answer.json's ``index``, when it has one


def read_prediction(predictions_dir: str, index: int) -> Prediction:
    """``<predictions_dir>/<index>/answer.json`` (+ ``answer.mp4``), see the module docstring."""
    d = os.path.join(predictions_dir, str(int(index)))
    path = os.path.join(d, ANSWER_JSON)
    if not os.path.isfile(path):
        return Prediction(index, "missing", detail=f"no {path}" + _error_json_reason(d))
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return Prediction(index, "invalid", detail=f"{path}: {type(e).__name__}: {e}")
    text, caption = (data.get("text"), data.get("caption")) if isinstance(data, dict) else (None, None)
    if not isinstance(caption, str) and not isinstance(text, str):
        return Prediction(index, "invalid", detail=f"{path}: needs a string 'caption' or 'text'")
    text = text if isinstance(text, str) else ""
    caption = caption.strip() if isinstance(caption, str) else extract_answer(text)
    think = data.get("think")
    think = think if isinstance(think, str) else parse_response(text)["think"]
    mp4 = os.path.join(d, ANSWER_MP4)
    recorded_input, recorded_index = data.get("input_video_path"), data.get("index")
    return Prediction(index, "ok", text, caption, think, mp4 if os.path.isfile(mp4) else None,
                      input_video_path=recorded_input if isinstance(recorded_input, str) else None,
                      recorded_index=recorded_index if type(recorded_index) is int else None)


def _error_json_reason(row_dir: str) -> str:
    """`` (error.json: reason: detail)`` when ``vans-jax predict`` recorded why the row failed."""
    try:
        with open(os.path.join(row_dir, "error.json"), encoding="utf-8") as f:
            err = json.load(f)
        return f" (error.json: {err.get('reason')}: {str(err.get('detail'))[:200]})"
    except (OSError, ValueError, AttributeError):
        return ""


def check_predictions_match(rows: Sequence[VNEPRow], preds: dict[int, Prediction], predictions_dir: str,
                            csv_path: str, max_listed: int = 10) -> int:
    """Cross-checks every readable prediction against the CSV row it is scored against: the
    ``input_video_path`` (and ``index``) its answer.json records must be the row's. Raises
    ``PredictionMismatchError`` naming the mismatched rows; returns how many predictions record no
    ``input_video_path`` (hand-made ones: nothing to check)."""
    mismatched, unverified = [], 0
    for row in rows:
        p = preds[row.index]
        if p.status != "ok":
            continue
        if p.input_video_path is None:
            unverified += 1
        elif os.path.normpath(p.input_video_path.strip()) != os.path.normpath(row.input_video_path):
            mismatched.append(f"row {row.index}: answer.json has input_video_path {p.input_video_path!r}, "
                              f"the CSV row {row.input_video_path!r}")
        elif p.recorded_index is not None and p.recorded_index != row.index:
            mismatched.append(f"row {row.index}: answer.json records index {p.recorded_index}")
    if mismatched:
        checked = sum(1 for r in rows if preds[r.index].status == "ok") - unverified
        more = f"; ... and {len(mismatched) - max_listed} more" if len(mismatched) > max_listed else ""
        raise PredictionMismatchError(
            f"{predictions_dir} does not match {csv_path}: {len(mismatched)} of {checked} predictions were made "
            f"for another input than their CSV row (another CSV or split?): "
            + "; ".join(mismatched[:max_listed]) + more)
    return unverified


# --------------------------------------------------------------------------------------------
# the scoring core: in-memory predictions (what `evaluate` reads from files, what the demo holds)


def read_ground_truth(path: str, config: EvalConfig) -> np.ndarray:
    """The ground-truth target video at the eval geometry: ``target_clip`` (nearest-frame re-timing
    to ``config.fps``, resize to cover + center crop, padded with its last frame) -> uint8
    (num_frames, height, width, 3). Raises ``VideoError`` / ``ValueError``."""
    frames, fps = read_video(path)
    return target_clip(frames, fps, config.num_frames, config.height, config.width, config.fps,
                       resample=config.resample)


def to_eval_geometry(video: np.ndarray, config: EvalConfig) -> np.ndarray:
    """A generated video at the eval size: every frame kept (not re-timed); resized to cover
    ``height x width`` and center-cropped when its size differs, else returned as is."""
    if video.shape[1:3] == (config.height, config.width):
        return video
    return resize_center_crop(video, config.height, config.width, resample=config.resample)


def score_predictions(texts: Sequence[str], captions: Sequence[str], references: Sequence[str],
                      videos: Sequence[np.ndarray | None] | None = None,
                      gt_videos: Sequence[np.ndarray | None] | None = None, *, models: Models | None = None,
                      config: EvalConfig = EvalConfig(), rouge_dtype=np.float64) -> list[dict]:
    """Scores predictions held in memory, one record per row: ``format`` (1.0 when the full
    response ``text`` follows the strict [Think]/[Ans] format with non-empty parts, else 0.0),
    ``rouge_l`` (the predicted ``caption`` vs the reference caption, rouge-score F-measure; in
    ``rouge_dtype``: float64 for `vans-jax eval`, float32 where the numbers are the Joint-GRPO
    rewards as the trainer computes them) and, where ``models.clip`` is given and the row has both
    a generated video (uint8 (F, H, W, 3), brought to the eval size by ``to_eval_geometry``) and a
    ground-truth one (``read_ground_truth``), ``clip_v`` and ``clip_t`` (``CONVENTIONS``).

    The CLIP features of all the rows are computed together (one ``encode_frames`` call on every
    generated frame, one on every ground-truth frame, one ``encode_texts`` on the references), and
    the similarities in one batch when every row has the same frame counts; so a caller's batching
    decides the compiled shapes (`evaluate` scores one row at a time, the demo a batch of rows)."""
    n = len(texts)
    if not (len(captions) == len(references) == n):
        raise ValueError(f"{n} texts, {len(captions)} captions and {len(references)} references")
    videos = [None] * n if videos is None else list(videos)
    gt_videos = [None] * n if gt_videos is None else list(gt_videos)
    if not (len(videos) == len(gt_videos) == n):
        raise ValueError(f"{n} rows but {len(videos)} videos and {len(gt_videos)} ground-truth videos")
    fmt = format_reward(list(texts))
    scorer = _rouge_scorer(False)
    recs = []
    for i in range(n):
        f = scorer.score(references[i], captions[i])["rougeL"].fmeasure   # score(target, prediction)
        recs.append({"format": float(fmt[i]), "rouge_l": float(np.asarray(f, rouge_dtype))})
    models = models if models is not None else Models()
    rows = [i for i in range(n) if videos[i] is not None and gt_videos[i] is not None]
    if models.clip is None or not rows:
        return recs
    from vans_jax.models.clip import encode_frames, encode_texts

    gens = [to_eval_geometry(np.asarray(videos[i]), config) for i in rows]
    used = [min(g.shape[0], np.asarray(gt_videos[i]).shape[0]) for g, i in zip(gens, rows)]
    gts = [np.asarray(gt_videos[i])[:k] for i, k in zip(rows, used)]
    fg = encode_frames(models.clip, np.concatenate(gens), batch_size=config.clip_batch_size)
    ft = encode_frames(models.clip, np.concatenate(gts), batch_size=config.clip_batch_size)
    txt = encode_texts(models.clip, models.tokenizer, [references[i] for i in rows])
    off_g = np.cumsum([0] + [g.shape[0] for g in gens])
    off_t = np.cumsum([0] + used)
    fg_rows = [fg[off_g[j]:off_g[j + 1]] for j in range(len(rows))]
    ft_rows = [ft[off_t[j]:off_t[j + 1]] for j in range(len(rows))]
    if len(set(used)) == 1 and len({g.shape[0] for g in gens}) == 1:    # one batch
        k = used[0]
        fgb = jnp.stack(fg_rows)
        cv = np.asarray(clip_video_similarity(fgb[:, :k], jnp.stack(ft_rows)))
        ct = np.asarray(clip_score(fgb, txt))
    else:                                                                 # row by row
        cv = np.asarray([clip_video_similarity(fg_rows[j][None, :used[j]], ft_rows[j][None])[0]
                         for j in range(len(rows))])
        ct = np.asarray([clip_score(fg_rows[j][None], txt[j:j + 1])[0] for j in range(len(rows))])
    for j, i in enumerate(rows):
        recs[i]["clip_v"], recs[i]["clip_t"] = float(cv[j]), float(ct[j])
    return recs


# --------------------------------------------------------------------------------------------
# streaming FVD features


class _FeatureQueue:
    """Videos waiting for the feature network, grouped by shape so each batch stacks; every
    feature row goes to the ``FeatureStats`` of its benchmarks."""

    def __init__(self, model, batch_size: int, stats: dict[str, FeatureStats], **preprocess):
        self.model, self.batch_size, self.stats, self.preprocess = model, batch_size, stats, preprocess
        self.pending: dict[tuple, list] = {}

    def add(self, video: np.ndarray, keys: Sequence[str]):
        group = self.pending.setdefault(video.shape, [])
        group.append((video, tuple(keys)))
        if len(group) >= self.batch_size:
            self._flush(video.shape)

    def _flush(self, shape):
        group = self.pending.pop(shape, [])
        if not group:
            return
        feats = i3d_features(self.model, np.stack([v for v, _ in group]), self.batch_size, **self.preprocess)
        for f, (_, keys) in zip(feats, group):
            for k in keys:
                self.stats[k].update(f[None])

    def finish(self):
        for shape in list(self.pending):
            self._flush(shape)


# --------------------------------------------------------------------------------------------
# the run


class _Progress:
    def __init__(self, total: int, enabled: bool, every_s: float = 5.0):
        self.total, self.enabled, self.every_s = total, enabled, every_s
        self.t0 = self.last = time.time()

    def __call__(self, done: int):
        now = time.time()
        if not self.enabled or (now - self.last < self.every_s and done < self.total and done > 1):
            return
        self.last = now
        rate = done / max(now - self.t0, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else float("nan")
        print(f"[eval] {done}/{self.total} rows  {rate:.2f} rows/s  eta {eta:.0f}s", file=sys.stderr, flush=True)


def _clean(x):
    """JSON-safe: numpy scalars -> Python, non-finite floats -> None."""
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(float(x)) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def _first(items, n=20):
    items = list(items)
    return items[:n] + (["..."] if len(items) > n else [])


def evaluate(predictions_dir: str, csv_path: str, video_root: str, output: str | None = None, *,
             models: Models | None = None, config: EvalConfig = EvalConfig(), method: str | None = None,
             exclude_missing: bool = False, progress: bool = True,
             log: Callable[[str], None] | None = None) -> dict:
    """Scores a predictions directory against the eval CSV; returns the result dict and, with
    ``output``, writes it as JSON plus the markdown table (same stem, ``.md``).

    Every prediction is first cross-checked against its CSV row (``check_predictions_match``: a
    mismatch raises). The headline metrics count every row the CSV has: a row that cannot be
    scored scores as a failure (``FAILURES``); ``exclude_missing`` scores only the rows that can
    be (the means over that subset are always in ``splits.<b>.scored``). ``complete`` (and
    ``coverage``) says whether every row was scored on every metric computed."""
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    predictions_dir = os.fspath(predictions_dir)
    if not os.path.isdir(predictions_dir):
        raise FileNotFoundError(f"predictions directory not found: {predictions_dir} "
                                f"(expected <DIR>/<row index>/{ANSWER_JSON} and {ANSWER_MP4})")
    models = models if models is not None else Models()
    if models.fvd_overrides:
        config = dataclasses.replace(config, **models.fvd_overrides)
    rows = read_vnep_csv(csv_path)
    if not rows:
        raise ValueError(f"{csv_path}: no usable rows ({rows.report.summary()})")
    t_start = time.time()

    preds = {r.index: read_prediction(predictions_dir, r.index) for r in rows}
    found = [i for i, p in preds.items() if p.status != "missing"]
    if not found:
        raise ValueError(f"{predictions_dir} holds no prediction for any of the {len(rows)} rows of {csv_path} "
                         f"(expected {predictions_dir}/<row index>/{ANSWER_JSON}, row indices "
                         f"{rows[0].index}..{rows[-1].index})")
    unverified = check_predictions_match(rows, preds, predictions_dir, csv_path)
    row_ids = {str(r.index) for r in rows}
    unmatched = sorted(n for n in os.listdir(predictions_dir)
                       if os.path.isdir(os.path.join(predictions_dir, n)) and n not in row_ids)

    def bench(row: VNEPRow) -> list[str]:
        return [row.kind, "all"] if row.kind in KINDS else ["all"]

    has_clip = models.clip is not None
    has_fvd = models.video_features is not None
    fvd_stats = {side: {b: FeatureStats() for b in BENCHMARKS} for side in ("gen", "gt")}
    fvd_pre = dict(num_frames=config.fvd_num_frames, size=config.fvd_size, sampling=config.fvd_sampling)
    queues = {side: _FeatureQueue(models.video_features, config.fvd_batch_size, fvd_stats[side], **fvd_pre)
              for side in fvd_stats} if has_fvd else {}

    counts = Counter()
    lists: dict[str, list] = {k: [] for k in ("missing_prediction", "invalid_prediction", "missing_video",
                                              "bad_video", "gt_video_error", "fps_mismatch")}
    texts = {b: ([], []) for b in BENCHMARKS}                       # (predicted captions, references)
    failed_refs = {b: [] for b in BENCHMARKS}                       # references of rows without a prediction
    clip_vals = {b: {"clip_v": [], "clip_t": []} for b in BENCHMARKS}
    n_video = Counter()
    samples = []
    prog = _Progress(len(rows), progress)
    need_video = has_clip or has_fvd

    for done, row in enumerate(rows, 1):
        p = preds[row.index]
        rec = {"index": row.index, "kind": row.kind, "status": p.status}
        samples.append(rec)
        if p.status != "ok":
            key = f"{p.status}_prediction"
            lists[key].append(row.index)
            rec["detail"] = p.detail
            for b in bench(row):
                failed_refs[b].append(row.caption)
            prog(done)
            continue
        counts["text_evaluated"] += 1
        for b in bench(row):
            texts[b][0].append(p.caption)
            texts[b][1].append(row.caption)
        rec["caption"] = p.caption
        rec["rouge_l"] = None
        gen = gt = None
        if p.video_path is None:
            rec["video"] = "missing_video"
            lists["missing_video"].append(row.index)
        elif need_video:
            gen, gt = _video_pair(p.video_path, os.path.join(video_root, row.output_video_path), config, rec)
            if rec["video"] in lists:
                lists[rec["video"]].append(row.index)
            if rec.get("generated_fps") is not None and abs(rec["generated_fps"] - config.fps) > 0.01 * config.fps:
                lists["fps_mismatch"].append(row.index)
        else:
            rec["video"] = "not_scored"
        # one row at a time (streaming: a row's videos are dropped once scored and queued for FVD)
        scored = score_predictions([p.text], [p.caption], [row.caption], [gen], [gt], models=models,
                                   config=config)[0]
        rec["rouge_l"] = scored["rouge_l"]
        if rec["video"] == "ok":
            counts["video_evaluated"] += 1
            for b in bench(row):
                n_video[b] += 1
            if has_clip:
                rec["clip_v"], rec["clip_t"] = scored["clip_v"], scored["clip_t"]
                for b in bench(row):
                    clip_vals[b]["clip_v"].append(scored["clip_v"])
                    clip_vals[b]["clip_t"].append(scored["clip_t"])
            if has_fvd:
                queues["gen"].add(gen, bench(row))
                queues["gt"].add(gt, bench(row))
        prog(done)

    for q in queues.values():
        q.finish()

    notes = []
    if models.random:
        notes.append("RANDOM MODELS (--random_models): clip_v, clip_t and fvd come from tiny randomly initialised "
                     "networks (test/demo mode); they measure nothing and are not comparable to any published number.")
    if not has_clip:
        notes.append("clip_v and clip_t are null: no CLIP model was given (--clip DIR).")
    if not has_fvd:
        notes.append("fvd is null: no I3D weights were given (--i3d FILE).")
    failure = ("left out of every metric: --exclude_missing" if exclude_missing
               else "an empty caption, 0 on every other metric")
    video_failure = ("text metrics only" if exclude_missing or not need_video
                     else "text metrics only; 0 on CLIP-V / CLIP-T, no FVD")
    for key, what in (("missing_prediction", f"have no answer.json ({failure})"),
                      ("invalid_prediction", f"have an unreadable answer.json ({failure})"),
                      ("missing_video", f"have no answer.mp4 ({video_failure})"),
                      ("bad_video", f"have an unreadable answer.mp4 ({video_failure})"),
                      ("gt_video_error", f"have an unreadable ground-truth video ({video_failure})"),
                      ("fps_mismatch", f"have an answer.mp4 whose frame rate is not {config.fps:g} fps "
                                       "(its frames are compared as they are, not re-timed)")):
        if lists[key]:
            notes.append(f"{len(lists[key])} of {len(rows)} rows {what}: indices {_first(lists[key])}")
    if unmatched:
        notes.append(f"{len(unmatched)} folder(s) in the predictions directory match no CSV row "
                     f"(ignored): {_first(unmatched)}")
    if unverified:
        notes.append(f"{unverified} answer.json file(s) record no input_video_path: not cross-checked against "
                     f"their CSV rows (vans-jax predict --csv records it)")

    splits = {}
    for b in BENCHMARKS:
        n_rows = sum(1 for r in rows if b in bench(r))
        hyps, refs = texts[b]
        scored = {m: None for m in METRICS}        # over the rows that could be scored
        if hyps:
            tm = caption_metrics(hyps, refs, extract=False)
            scored.update({f"bleu{n}": tm[f"bleu{n}"] for n in range(1, 5)}, rouge_l=tm["rougeL"])
        if has_clip and clip_vals[b]["clip_v"]:
            scored.update(clip_v=float(np.mean(clip_vals[b]["clip_v"])), clip_t=float(np.mean(clip_vals[b]["clip_t"])))
        if has_fvd and n_video[b] >= 2:
            scored["fvd"] = fvd_from_stats(fvd_stats["gen"][b], fvd_stats["gt"][b])
        elif has_fvd and n_rows:
            notes.append(f"fvd of '{b}' is null: {n_video[b]} video pair(s), at least 2 needed.")
        all_rows = dict(scored)                    # over every row, failures included (FAILURES)
        if failed_refs[b]:
            tm = caption_metrics(hyps + [""] * len(failed_refs[b]), refs + failed_refs[b], extract=False)
            all_rows.update({f"bleu{n}": tm[f"bleu{n}"] for n in range(1, 5)}, rouge_l=tm["rougeL"])
        if has_clip and n_rows and n_video[b] < n_rows:
            all_rows.update(clip_v=float(np.sum(clip_vals[b]["clip_v"])) / n_rows,
                            clip_t=float(np.sum(clip_vals[b]["clip_t"])) / n_rows)
        if has_fvd and n_video[b] < n_rows:
            all_rows["fvd"] = None
            if not exclude_missing and n_video[b] >= 2:
                notes.append(f"fvd of '{b}' is null: {n_rows - n_video[b]} of {n_rows} rows have no scored video "
                             f"pair and FVD cannot score a failure (the FVD of the {n_video[b]} pairs is in "
                             f"splits.{b}.scored.fvd; --exclude_missing makes it the headline).")
        out = dict(scored if exclude_missing else all_rows)
        out.update(num_rows=n_rows, num_text=len(hyps), num_video=n_video[b],
                   coverage={"text": len(hyps) / n_rows if n_rows else None,
                             "video": n_video[b] / n_rows if n_rows and need_video else None},
                   scored=scored)
        splits[b] = out

    failed_rows = sorted({i for k in ("missing_prediction", "invalid_prediction") for i in lists[k]}
                         | ({i for k in ("missing_video", "bad_video", "gt_video_error") for i in lists[k]}
                            if need_video else set()))
    if exclude_missing and failed_rows:
        notes.insert(0, f"--exclude_missing: the metrics cover only the rows that could be scored "
                        f"(coverage: text {splits['all']['num_text']}/{len(rows)}"
                        + (f", video {splits['all']['num_video']}/{len(rows)}" if need_video else "")
                        + "); not comparable with a complete run.")

    counts_out = {"rows": len(rows), "predictions": len(found), "unmatched_prediction_dirs": len(unmatched),
                  "unverified_predictions": unverified, "csv_skipped_rows": rows.report.num_skipped}
    counts_out.update(text_evaluated=counts["text_evaluated"], video_evaluated=counts["video_evaluated"])
    counts_out.update({k: len(v) for k, v in lists.items()})
    result = {
        **{m: splits["all"][m] for m in METRICS},
        "complete": not failed_rows,
        "coverage": splits["all"]["coverage"],
        "scoring": "exclude_missing" if exclude_missing else "failures_count",
        "failed_rows": failed_rows,
        "splits": splits,
        "counts": counts_out,
        "missing": {k: v for k, v in lists.items()},
        "method": method or os.path.basename(os.path.normpath(predictions_dir)),
        "models": models.describe(),
        "notes": notes,
        "conventions": CONVENTIONS,
        "config": dataclasses.asdict(config),
        "inputs": {"predictions": os.path.abspath(predictions_dir), "csv": os.path.abspath(csv_path),
                   "video_root": os.path.abspath(video_root)},
        "csv_report": rows.report.to_dict(),
        "elapsed_s": round(time.time() - t_start, 3),
        "samples": samples,
    }
    result = _clean(result)
    if output:
        write_outputs(result, output)
        log(f"[eval] wrote {output} and {markdown_path(output)}")
    return result


def _video_pair(gen_path: str, gt_path: str, config: EvalConfig, rec: dict):
    """(generated, ground truth) uint8 videos at the eval geometry, or Nones; sets ``rec["video"]``
    to "ok", "bad_video" or "gt_video_error" (and ``detail``)."""
    try:
        gen, rec["generated_fps"] = read_video(gen_path)
        gen = to_eval_geometry(gen, config)
    except VideoError as e:
        rec["video"], rec["detail"] = "bad_video", str(e)
        return None, None
    try:
        gt = read_ground_truth(gt_path, config)
    except (VideoError, ValueError) as e:
        rec["video"], rec["detail"] = "gt_video_error", str(e)
        return None, None
    rec["video"], rec["generated_frames"] = "ok", int(gen.shape[0])
    return gen, gt


# --------------------------------------------------------------------------------------------
# outputs

_COLUMNS = (("bleu1", "BLEU@1↑", 4), ("bleu2", "BLEU@2↑", 4), ("bleu3", "BLEU@3↑", 4), ("bleu4", "BLEU@4↑", 4),
            ("rouge_l", "ROUGE-L↑", 4), ("fvd", "FVD↓", 2), ("clip_v", "CLIP-V↑", 4), ("clip_t", "CLIP-T↑", 4))
_BENCH_NAMES = {"procedural": "Procedural", "predictive": "Predictive", "all": "All"}


def _fmt(v: float, digits: int) -> str:
    out = f"{v:.{digits}f}"
    return f"{0.0:.{digits}f}" if float(out) == 0 else out  # no "-0.00" from rounding noise


def markdown_path(output: str) -> str:
    return os.path.splitext(output)[0] + ".md"


def markdown_table(result: dict) -> str:
    """The paper's Table 1 layout: a line per benchmark (procedural, predictive; then all rows),
    columns BLEU@1..4, ROUGE-L, FVD, CLIP-V, CLIP-T; n/a for null metrics; notes below."""
    head = "| Benchmark | Method | " + " | ".join(c[1] for c in _COLUMNS) + " | scored text / video of n |"
    lines = [f"# VNEP evaluation: {result['method']}", "", head, "|" + "---|" * (len(_COLUMNS) + 3)]
    for b in BENCHMARKS:
        s = result["splits"][b]
        if not s["num_rows"] and b != "all":
            continue
        cells = ["n/a" if s[k] is None else _fmt(s[k], d) for k, _, d in _COLUMNS]
        lines.append(f"| {_BENCH_NAMES[b]} | {result['method']} | " + " | ".join(cells)
                     + f" | {s['num_text']} / {s['num_video']} of {s['num_rows']} |")
    c, cov = result["counts"], result["coverage"]
    pct = lambda x: "n/a" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    scoring = ("only the rows that could be scored (--exclude_missing; not comparable with a complete run)"
               if result["scoring"] == "exclude_missing" else
               "every row; a failed row scores 0 (empty caption) and FVD is n/a unless every row has a video")
    lines += ["", f"{c['rows']} rows, {c['predictions']} with a prediction, {c['text_evaluated']} scored on text, "
                  f"{c['video_evaluated']} on video (coverage: text {pct(cov['text'])}, video {pct(cov['video'])}"
                  f"{'' if result['complete'] else '; INCOMPLETE'}). Metrics over {scoring}. "
                  f"Models: CLIP {result['models']['clip'] or 'none'}, I3D {result['models']['i3d'] or 'none'}."]
    if result["notes"]:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in result["notes"]]
    return "\n".join(lines) + "\n"


def write_outputs(result: dict, output: str) -> None:
    d = os.path.dirname(os.path.abspath(output))
    os.makedirs(d, exist_ok=True)
    with open(output, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2, ensure_ascii=False)
    with open(markdown_path(output), "w", encoding="utf-8") as f:
        f.write(markdown_table(result))
