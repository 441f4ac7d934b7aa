"""grain input pipeline for VNEP (VANS-Data) samples, and a dataset validator.

Pipeline (``make_dataset``)::

    MapDataset.source(VNEPSource)          # random access, decodes one sample
      [shard_start:shard_end]               # per-host shard (contiguous, grain.even_split)
      .shuffle(seed)                        # deterministic, reshuffled every epoch
      .repeat(num_epochs)                   # None = forever
      .to_iter_dataset(ReadOptions)         # decode in `read_threads` threads
      .mp_prefetch(num_workers)             # optional worker processes
      SkipAndBatch(batch_size)              # main process: drop bad samples, count, collate

Each element of ``VNEPSource`` is a dict::

    index            int    row index in the CSV (VNEPRow.index)
    question, think, caption, kind   str
    vlm_frames       uint8 (num_vlm_frames, H, W, 3)   (native size unless vlm_height/width)
    vlm_fps          float  effective rate of vlm_frames (pass to preprocess_videos)
    input_fps        float
    reference        uint8 (reference_frames, rh, rw, 3)   VAE conditioning clip (input video)
    reference_valid  int    real (non-padded) frames in `reference`
    target           uint8 (target_frames, th, tw, 3)      VAE target (output video)
    target_valid     int    real (non-padded) frames in `target`

Videos are not decoded whole: only the frames a sample uses, picked by presentation timestamp
(``video_io.sample_video``; variable frame rates are timed right, rotated phone clips come out
upright). A video of which less than ``video_io.MIN_DECODED_FRACTION`` decodes is ``*_damaged``.

A sample whose video is missing / corrupt / damaged / too short is not raised: the
source returns a small marker ``{"index": i, "error": reason, "detail": msg}``
and the top ``SkipAndBatch`` iterator drops it and counts it by reason
(``skip_stats(iterator)``).  Counting happens in the main process, so the
counters are right with worker processes too, and they are part of the
iterator state (``get_state`` / ``set_state``): a resumed run keeps counting.

Batches are dicts: arrays of equal shape are stacked (``np.stack``), Python
numbers become ``np.int64`` / ``np.float32`` arrays, strings (and arrays of
differing shapes, e.g. native-size VLM frames of different videos) stay
Python lists.

Determinism: the element order depends only on (rows, seed, shard, num_epochs);
it does not depend on ``read_threads``.  Batch composition (not the set of
samples) can change with ``num_workers > 0`` when samples are skipped,
because grain slices the stream per worker.
"""

from __future__ import annotations

import dataclasses
import os
from collections import Counter
from typing import Sequence

import grain
import numpy as np

from .csv_format import CSVReport, VNEPFormatError, VNEPRow, read_vnep_csv
from .video_io import (
    VideoError,
    check_vae_frames,
    probe_video,
    resample_indices,
    resize_center_crop,
    sample_video,
)

__all__ = [
    "PipelineConfig",
    "VNEPSource",
    "SkipAndBatchIterDataset",
    "make_dataset",
    "skip_stats",
    "collate",
    "shard_bounds",
    "DatasetReport",
    "validate_dataset",
]


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """What a sample looks like.  Defaults follow VANS: 6 VLM frames at 1 fps,
    33-frame 352x640 clips at 11 fps for the VAE."""

    num_vlm_frames: int = 6
    vlm_sample_fps: float = 1.0
    vlm_height: int | None = None  # None: native size
    vlm_width: int | None = None
    target_frames: int = 33
    target_height: int = 352
    target_width: int = 640
    target_fps: float = 11.0
    reference_frames: int = 33
    reference_height: int = 352
    reference_width: int = 640
    reference_fps: float = 11.0
    reference_mode: str = "last"
    resample: str = "bicubic"
    min_input_frames: int = 1
    min_output_frames: int = 1
    load_target: bool = True

    # fields an experiment config sets elsewhere (one place each): field -> (section, key)
    FROM_EXPERIMENT = {
        "num_vlm_frames": ("vlm", "num_frames"), "vlm_sample_fps": ("vlm", "sample_fps"),
        "target_frames": ("video", "num_frames"), "target_height": ("video", "height"),
        "target_width": ("video", "width"), "target_fps": ("video", "fps"),
        "reference_height": ("video", "height"), "reference_width": ("video", "width"),
        "reference_fps": ("video", "fps"),
    }

    @classmethod
    def from_experiment(cls, cfg) -> "PipelineConfig":
        """The sample layout of an experiment config: frame counts, sizes and rates from ``vlm.*`` and
        ``video.*`` (the frames the models see are the frames the data gives), the rest from
        ``data.pipeline`` (``reference_frames``, ``reference_mode``, ``resample``, ...). Setting a
        derived field in ``data.pipeline`` is an error naming where it is set."""
        own = dict(cfg.data.get("pipeline", {}) or {})
        for k in own:
            if k in cls.FROM_EXPERIMENT:
                sec, key = cls.FROM_EXPERIMENT[k]
                raise ValueError(f"data.pipeline.{k} is derived from {sec}.{key}: set --config.{sec}.{key} instead")
        derived = {k: cfg[sec][key] for k, (sec, key) in cls.FROM_EXPERIMENT.items()}
        derived = {k: float(v) if k.endswith("fps") else int(v) for k, v in derived.items()}
        return cls(**derived, **own)

    def __post_init__(self):
        check_vae_frames(self.target_frames, "PipelineConfig.target_frames")
        check_vae_frames(self.reference_frames, "PipelineConfig.reference_frames")
        if (self.vlm_height is None) != (self.vlm_width is None):
            raise ValueError("PipelineConfig: set both vlm_height and vlm_width, or neither")


class VNEPSource:
    """Random-access source over VANS-Data rows (grain ``RandomAccessDataSource``).

    ``rows`` is a CSV path or a sequence of :class:`VNEPRow`; video paths are
    joined to ``video_root`` (absolute paths are used as they are).
    ``__getitem__`` never raises for bad videos (returns an error marker, see
    the module docstring); :meth:`load` does (``VideoError``).
    """

    def __init__(self, rows: str | os.PathLike | Sequence[VNEPRow], video_root, config: PipelineConfig = PipelineConfig()):
        if isinstance(rows, (str, os.PathLike)):
            rows = read_vnep_csv(rows)
        self.csv_report: CSVReport | None = getattr(rows, "report", None)
        self.rows = list(rows)
        self.video_root = os.fspath(video_root)
        self.config = config

    def __len__(self) -> int:
        return len(self.rows)

    def __repr__(self) -> str:
        return f"VNEPSource({len(self)} rows, video_root={self.video_root!r})"

    def path(self, rel: str) -> str:
        return os.path.join(self.video_root, rel)

    def _sample(self, rel: str, which: str, min_frames: int, requests: dict):
        """Decode only the requested frames of one video (``video_io.sample_video``: by timestamp,
        upright); a damaged file below the threshold is ``<which>_damaged``, one above it is used."""
        try:
            sv = sample_video(self.path(rel), requests, warn=False)
        except VideoError as e:
            raise VideoError(e.path, f"{which}_{e.reason}", e.detail) from None
        if sv.report.decoded_frames < min_frames:
            raise VideoError(self.path(rel), f"{which}_too_short", f"{sv.report.decoded_frames} frames < {min_frames}")
        return sv

    def load(self, i: int) -> dict:
        row = self.rows[i]
        c = self.config
        sv = self._sample(row.input_video_path, "input", c.min_input_frames, {
            "vlm": ("vlm", c.num_vlm_frames, c.vlm_sample_fps),
            "reference": ("clip", c.reference_frames, c.reference_fps, c.reference_mode)})
        vlm, vlm_fps = sv.frames["vlm"], sv.rates["vlm"]
        if c.vlm_height is not None:
            vlm = resize_center_crop(vlm, c.vlm_height, c.vlm_width, resample=c.resample)
        ref = resize_center_crop(sv.frames["reference"], c.reference_height, c.reference_width, resample=c.resample)
        out = {
            "index": int(row.index),
            "question": row.question,
            "think": row.think,
            "caption": row.caption,
            "kind": row.kind,
            "vlm_frames": np.ascontiguousarray(vlm),
            "vlm_fps": float(vlm_fps),
            "input_fps": float(sv.timeline.fps),
            "reference": ref,
            "reference_valid": int(sv.valid["reference"]),
        }
        if c.load_target:
            tv = self._sample(row.output_video_path, "output", c.min_output_frames,
                              {"target": ("clip", c.target_frames, c.target_fps, "first")})
            out["target"] = resize_center_crop(tv.frames["target"], c.target_height, c.target_width,
                                               resample=c.resample)
            out["target_valid"] = int(tv.valid["target"])
        return out

    def __getitem__(self, i: int) -> dict:
        try:
            return self.load(int(i))
        except VideoError as e:
            return {"index": int(self.rows[int(i)].index), "error": e.reason, "detail": str(e)}
        except Exception as e:  # a bug in decoding one sample must not kill the run
            return {"index": int(self.rows[int(i)].index), "error": "decode_error", "detail": f"{type(e).__name__}: {e}"}


# --------------------------------------------------------------------------- #
# skip + batch (top of the pipeline, main process)
# --------------------------------------------------------------------------- #
def collate(examples: Sequence[dict]) -> dict:
    out = {}
    for k in examples[0]:
        vals = [e[k] for e in examples]
        v0 = vals[0]
        if isinstance(v0, np.ndarray) and all(isinstance(v, np.ndarray) and v.shape == v0.shape for v in vals):
            out[k] = np.stack(vals)
        elif isinstance(v0, (bool, np.bool_)):
            out[k] = np.asarray(vals, np.bool_)
        elif isinstance(v0, (int, np.integer)):
            out[k] = np.asarray(vals, np.int64)
        elif isinstance(v0, (float, np.floating)):
            out[k] = np.asarray(vals, np.float32)
        else:
            out[k] = list(vals)
    return out


class _SkipAndBatchIterator(grain.DatasetIterator):
    def __init__(self, parent, batch_size: int, drop_remainder: bool, max_examples: int):
        super().__init__(parent)
        self._batch_size = batch_size
        self._drop_remainder = drop_remainder
        self._max_examples = max_examples
        self.skipped: Counter = Counter()
        self.examples: list = []
        self.seen = 0
        self.yielded = 0

    def __next__(self):
        batch = []
        while len(batch) < self._batch_size:
            try:
                el = next(self._parent)
            except StopIteration:
                break
            self.seen += 1
            if isinstance(el, dict) and "error" in el:
                self.skipped[el["error"]] += 1
                if len(self.examples) < self._max_examples:
                    self.examples.append([int(el.get("index", -1)), el["error"], el.get("detail", "")])
                continue
            batch.append(el)
        if not batch or (self._drop_remainder and len(batch) < self._batch_size):
            raise StopIteration
        self.yielded += len(batch)
        return collate(batch)

    def get_state(self) -> dict:
        return {
            "parent": self._parent.get_state(),
            "skipped": dict(self.skipped),
            "seen": self.seen,
            "yielded": self.yielded,
        }

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["parent"])
        self.skipped = Counter(state.get("skipped", {}))
        self.seen = int(state.get("seen", 0))
        self.yielded = int(state.get("yielded", 0))

    def stats(self) -> dict:
        return {
            "seen": self.seen,
            "yielded": self.yielded,
            "skipped": dict(self.skipped),
            "num_skipped": sum(self.skipped.values()),
            "examples": list(self.examples),
        }

    def __str__(self) -> str:
        return f"SkipAndBatchDatasetIterator(batch_size={self._batch_size})"


class SkipAndBatchIterDataset(grain.IterDataset):
    """Drops error markers (counting them by reason) and batches the rest."""

    def __init__(self, parent, batch_size: int, *, drop_remainder: bool = False, max_examples: int = 50):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        super().__init__(parent)
        self._batch_size = int(batch_size)
        self._drop_remainder = bool(drop_remainder)
        self._max_examples = int(max_examples)

    def __iter__(self):
        return _SkipAndBatchIterator(self._parent.__iter__(), self._batch_size, self._drop_remainder, self._max_examples)

    def __str__(self) -> str:
        return f"SkipAndBatchIterDataset(batch_size={self._batch_size}, drop_remainder={self._drop_remainder})"


def skip_stats(iterator) -> dict:
    """Counters of the pipeline's skip/batch stage: ``seen``, ``yielded``,
    ``skipped`` (reason -> count), ``num_skipped``, ``examples`` (first
    [index, reason, detail] triples).  Finds the stage anywhere in the
    iterator tree (so wrapping iterators are fine)."""
    todo = [iterator]
    while todo:
        it = todo.pop()
        if isinstance(it, _SkipAndBatchIterator):
            return it.stats()
        todo.extend(getattr(it, "_parents", ()))
    raise ValueError("skip_stats: no SkipAndBatch stage in this iterator (was it built by make_dataset?)")


def shard_bounds(num_examples: int, shard_index: int, shard_count: int, drop_remainder: bool) -> tuple[int, int]:
    """Contiguous [start, end) of one shard, same split as grain's ``even_split``:
    equal sizes ``n // count`` with ``drop_remainder``, else the first
    ``n % count`` shards get one extra row."""
    if shard_count < 1 or not 0 <= shard_index < shard_count:
        raise ValueError(f"bad shard {shard_index}/{shard_count}")
    size, rem = divmod(int(num_examples), int(shard_count))
    if drop_remainder:
        start = shard_index * size
        return start, start + size
    start = shard_index * size + min(shard_index, rem)
    return start, start + size + (1 if shard_index < rem else 0)


def _ensure_absl_flags_parsed() -> None:
    """grain 0.2.x reads an absl flag when starting worker processes and fails
    with ``UnparsedFlagAccessError`` in scripts that do not use ``absl.app``
    (google/grain#1355).  Mark the flags parsed (defaults) if nobody has."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def make_dataset(
    source: VNEPSource,
    *,
    batch_size: int,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = 1,
    shard_index: int | None = None,
    shard_count: int | None = None,
    shard_options=None,
    shard_drop_remainder: bool = True,
    drop_remainder: bool = False,
    num_workers: int = 0,
    worker_buffer_size: int = 1,
    read_threads: int = 0,
    prefetch_buffer_size: int = 4,
):
    """Build the grain ``IterDataset`` of batches (see the module docstring).

    Sharding: ``shard_index`` / ``shard_count`` (or a grain ``ShardOptions``
    as ``shard_options``, whose ``drop_remainder`` then applies) default to
    ``jax.process_index()`` / ``jax.process_count()`` (grain
    ``ShardByJaxProcess``); shards are contiguous ranges of rows and, with
    ``shard_drop_remainder`` (default), all of the same size so every host
    runs the same number of steps.  Each shard is shuffled with ``seed``
    (a different permutation every epoch).  ``num_epochs=None`` repeats
    forever.  ``iter(ds)`` gives a checkpointable grain ``DatasetIterator``
    (``get_state`` / ``set_state``).
    """
    if (shard_index is None) != (shard_count is None):
        raise ValueError("make_dataset: pass both shard_index and shard_count, or neither")
    if shard_options is not None:
        if shard_index is not None:
            raise ValueError("make_dataset: pass shard_options or shard_index/shard_count, not both")
        shard_index, shard_count = shard_options.shard_index, shard_options.shard_count
        shard_drop_remainder = shard_options.drop_remainder
    elif shard_index is None:
        opts = grain.sharding.ShardByJaxProcess(drop_remainder=shard_drop_remainder)
        shard_index, shard_count = opts.shard_index, opts.shard_count
    start, end = shard_bounds(len(source), shard_index, shard_count, shard_drop_remainder)
    if end <= start:
        raise ValueError(
            f"make_dataset: shard {shard_index}/{shard_count} of {len(source)} rows is empty "
            f"(fewer rows than shards?)"
        )
    ds = grain.MapDataset.source(source)[start:end]
    if shuffle:
        ds = ds.shuffle(seed=int(seed) % 2**32)
    if num_epochs != 1:
        ds = ds.repeat(num_epochs)
    ids = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch_buffer_size))
    if num_workers > 0:
        _ensure_absl_flags_parsed()
        ids = ids.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=worker_buffer_size))
    return SkipAndBatchIterDataset(ids, batch_size, drop_remainder=drop_remainder)


# --------------------------------------------------------------------------- #
# validation
# --------------------------------------------------------------------------- #
@dataclasses.dataclass
class DatasetReport:
    csv_path: str
    video_root: str
    csv: dict | None = None  # CSVReport.to_dict()
    fatal: str | None = None  # the CSV itself is unusable
    rows_checked: int = 0
    rows_ok: int = 0
    errors: Counter = dataclasses.field(default_factory=Counter)
    warnings: Counter = dataclasses.field(default_factory=Counter)
    bad_indices: list = dataclasses.field(default_factory=list)
    examples: list = dataclasses.field(default_factory=list)  # [index, path, reason, detail]

    @property
    def ok(self) -> bool:
        return self.fatal is None and not self.errors and not (self.csv and self.csv.get("skipped"))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["errors"], d["warnings"], d["ok"] = dict(self.errors), dict(self.warnings), self.ok
        return d

    def summary(self) -> str:
        lines = [f"dataset: {self.csv_path}", f"video root: {self.video_root}"]
        if self.fatal:
            lines.append(f"FATAL: {self.fatal}")
            return "\n".join(lines)
        c = self.csv or {}
        lines.append(
            f"csv rows: {c.get('total_rows', 0)} (kept {c.get('kept', 0)}, malformed {sum(c.get('skipped', {}).values())})"
        )
        for r, n in sorted(c.get("skipped", {}).items()):
            lines.append(f"  malformed {r}: {n}")
        lines.append(f"rows checked: {self.rows_checked}, ok: {self.rows_ok}, bad: {self.rows_checked - self.rows_ok}")
        for r, n in sorted(self.errors.items()):
            lines.append(f"  error {r}: {n}")
        for r, n in sorted(self.warnings.items()):
            lines.append(f"  warning {r}: {n}")
        if self.examples:
            lines.append("examples:")
            for idx, path, reason, detail in self.examples:
                lines.append(f"  row {idx}: {reason}: {path}" + (f" ({detail})" if detail else ""))
        lines.append("OK" if self.ok else "PROBLEMS FOUND")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def validate_dataset(
    csv_path,
    video_root,
    *,
    config: PipelineConfig = PipelineConfig(),
    full_decode: bool = True,
    check_output: bool = True,
    max_rows: int | None = None,
    max_examples: int = 20,
    progress=None,
) -> DatasetReport:
    """Check every row of a VANS-Data CSV without stopping.

    Per row: the input (and output, with ``check_output``) video exists,
    decodes (all frames with ``full_decode``, else header + first frame) and
    has at least ``config.min_input_frames`` / ``min_output_frames`` frames.
    Errors are counted by reason (``input_missing``, ``input_corrupt``,
    ``input_empty``, ``input_no_video_stream``, ``input_too_short``, same with
    ``output_``).  Warnings (not errors): ``input_shorter_than_vlm_span``
    (VLM sampling falls back to even spacing), ``output_padded`` (output
    shorter than ``target_frames / target_fps`` s: last frame repeated),
    ``empty_think``.  A missing or unusable CSV sets ``fatal``.
    ``progress`` (optional) is called as ``progress(done, total)``.
    """
    csv_path, video_root = os.fspath(csv_path), os.fspath(video_root)
    rep = DatasetReport(csv_path, video_root)
    try:
        rows = read_vnep_csv(csv_path)
    except (OSError, VNEPFormatError, UnicodeError) as e:
        rep.fatal = f"{type(e).__name__}: {e}"
        return rep
    rep.csv = rows.report.to_dict()
    rep.warnings.update(rows.report.warnings)
    c = config
    todo = rows if max_rows is None else rows[:max_rows]

    def check(row, rel, which, min_frames):
        path = os.path.join(video_root, rel)
        try:
            info = probe_video(path, full_decode=full_decode)
        except VideoError as e:
            return None, f"{which}_{e.reason}", path, e.detail
        except Exception as e:
            return None, f"{which}_corrupt", path, f"{type(e).__name__}: {e}"
        if info.num_frames < min_frames:
            return None, f"{which}_too_short", path, f"{info.num_frames} frames < {min_frames}"
        return info, None, path, ""

    for n, row in enumerate(todo):
        rep.rows_checked += 1
        problems = []
        info, err, path, detail = check(row, row.input_video_path, "input", c.min_input_frames)
        if err:
            problems.append((path, err, detail))
        elif np.floor((c.num_vlm_frames - 1) * info.fps / c.vlm_sample_fps + 0.5) >= info.num_frames:
            rep.warnings["input_shorter_than_vlm_span"] += 1
        if check_output:
            info, err, path, detail = check(row, row.output_video_path, "output", c.min_output_frames)
            if err:
                problems.append((path, err, detail))
            elif resample_indices(info.num_frames, info.fps, c.target_fps, c.target_frames)[1] < c.target_frames:
                rep.warnings["output_padded"] += 1
        if problems:
            rep.bad_indices.append(row.index)
            for path, err, detail in problems:
                rep.errors[err] += 1
                if len(rep.examples) < max_examples:
                    rep.examples.append([row.index, path, err, detail])
        else:
            rep.rows_ok += 1
        if progress is not None:
            progress(n + 1, len(todo))
    return rep
