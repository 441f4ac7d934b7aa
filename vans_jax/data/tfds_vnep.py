"""A TFDS dataset builder for VNEP (VANS-Data) samples: the grain source's examples, pre-decoded.

Every example is what ``pipeline.VNEPSource.load`` returns for a CSV row (same keys, same arrays)::

    index                              int64   row index in the CSV (VNEPRow.index)
    question, think, caption, kind     text
    vlm_frames                         uint8 (num_vlm_frames, H, W, 3)  (H, W: native size unless vlm_height/width)
    vlm_fps, input_fps                 float64
    reference, reference_valid         uint8 (reference_frames, rh, rw, 3), int64
    target, target_valid               uint8 (target_frames, th, tw, 3), int64   (when ``load_target``)

Rows whose videos are missing / corrupt / too short are skipped and counted by reason; the counts
are stored in the prepared dataset's ``metadata.json`` (``skipped``: {split: {reason: n}}). Example
order is the CSV order (shuffling disabled), so a split reads back in the order of ``VNEPSource``
less the skipped rows.

Storage: ``array_record`` files (random access, what grain reads); video arrays are ``Tensor``
features with ``zlib`` encoding by default (``encoding="none"`` stores them raw). No TensorFlow
is needed: only ``tensorflow-datasets`` (imported lazily; a clear ``ImportError`` says what to
install). ``tfds.features.Video`` / ``Image`` are not used because they need TensorFlow.

Usage::

    from vans_jax.data import tfds_vnep
    builder = tfds_vnep.build("~/tfds", {"eval": "data/eval.csv"}, "data/videos", PipelineConfig())
    source = tfds_vnep.data_source(builder, "eval")       # len() / [i] -> the VNEPSource dict
    ds = grain.MapDataset.source(source)

The builder config (``VnepConfig``) carries the CSV paths, the video root and the
``PipelineConfig`` fields; its default name (``t33_352x640_<hash>``) encodes the target geometry
and a hash of the inputs, so a different CSV or geometry never reuses an older build.
``data_source`` also takes the prepared directory (``<data_dir>/vnep/<config>/<version>``), which
reads without the CSVs or the videos.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from collections import Counter
from typing import Mapping

import numpy as np

from .loader import PipelineConfig, VNEPSource

__all__ = ["build", "data_source", "builder_class", "features_spec", "TfdsVNEPSource", "ENCODINGS", "NAME", "DATASET_VERSION"]

NAME = "vnep"
DATASET_VERSION = "1.0.0"
ENCODINGS = ("zlib", "none")
TEXT_KEYS = ("question", "think", "caption", "kind")
INT_KEYS = ("index", "reference_valid", "target_valid")
FLOAT_KEYS = ("vlm_fps", "input_fps")


def _tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("vans_jax.data.tfds_vnep needs tensorflow-datasets: `pip install tensorflow-datasets` "
                          "(TensorFlow itself is not needed: the builder writes array_record files)") from e
    return tfds


def features_spec(config: PipelineConfig, encoding: str = "zlib"):
    """The ``tfds.features.FeaturesDict`` of an example for this pipeline config."""
    tfds = _tfds()
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
    enc = tfds.features.Encoding.ZLIB if encoding == "zlib" else tfds.features.Encoding.NONE
    video = lambda shape: tfds.features.Tensor(shape=shape, dtype=np.uint8, encoding=enc)  # noqa: E731
    spec = {k: tfds.features.Text() for k in TEXT_KEYS}
    spec.update({"index": np.int64, "vlm_fps": np.float64, "input_fps": np.float64, "reference_valid": np.int64})
    spec["vlm_frames"] = video((config.num_vlm_frames, config.vlm_height, config.vlm_width, 3))
    spec["reference"] = video((config.reference_frames, config.reference_height, config.reference_width, 3))
    if config.load_target:
        spec["target"] = video((config.target_frames, config.target_height, config.target_width, 3))
        spec["target_valid"] = np.int64
    return tfds.features.FeaturesDict(spec)


@functools.cache
def builder_class():
    """(Vnep builder class, VnepConfig class); defined on first use so that importing this module
    does not need tensorflow-datasets (and the builder is registered once)."""
    tfds = _tfds()

    @dataclasses.dataclass
    class VnepConfig(tfds.core.BuilderConfig):
        csv_paths: dict = dataclasses.field(default_factory=dict)   # split name -> CSV path
        video_root: str = ""
        pipeline: dict = dataclasses.field(default_factory=dict)    # PipelineConfig fields
        encoding: str = "zlib"

    class Vnep(tfds.core.GeneratorBasedBuilder):
        """VNEP samples (question, think, caption, kind, VLM frames, reference and target clips)."""

        name = NAME
        VERSION = tfds.core.Version(DATASET_VERSION)
        RELEASE_NOTES = {DATASET_VERSION: "VNEPSource examples, array_record, zlib-encoded video tensors."}
        BUILDER_CONFIG_CLASS = VnepConfig
        # Nothing is downloaded, so no checksums file next to the code. (tfds 4.9's own ``code_path``
        # also needs the ``importlib_resources`` backport, which it does not install on Python >= 3.9.)
        code_path = None

        def _pipeline(self) -> PipelineConfig:
            return PipelineConfig(**self.builder_config.pipeline)

        def _info(self):
            self._skipped = tfds.core.MetadataDict(skipped={})
            return tfds.core.DatasetInfo(
                builder=self, description=__doc__.split("\n\n")[0],
                features=features_spec(self._pipeline(), self.builder_config.encoding),
                disable_shuffling=True, metadata=self._skipped)

        def _split_generators(self, dl_manager):
            cfg = self.builder_config
            if not cfg.csv_paths:
                raise ValueError("VnepConfig.csv_paths is empty: nothing to build")
            return {split: self._generate_examples(split, path) for split, path in cfg.csv_paths.items()}

        def _generate_examples(self, split, csv_path):
            source = VNEPSource(csv_path, self.builder_config.video_root, self._pipeline())
            skipped = Counter()
            for i in range(len(source)):
                ex = source[i]
                if "error" in ex:
                    skipped[ex["error"]] += 1
                    continue
                yield int(ex["index"]), ex
            self._skipped["skipped"][split] = dict(skipped)

    return Vnep, VnepConfig


def _default_name(csv_paths: Mapping[str, str], video_root: str, pipeline: dict, encoding: str) -> str:
    key = json.dumps({"csv": {k: os.path.abspath(v) for k, v in sorted(csv_paths.items())},
                      "video_root": os.path.abspath(video_root), "pipeline": pipeline, "encoding": encoding},
                     sort_keys=True)
    digest = hashlib.sha1(key.encode()).hexdigest()[:10]
    return f"t{pipeline['target_frames']}_{pipeline['target_height']}x{pipeline['target_width']}_{digest}"


def build(data_dir, csv_paths: Mapping[str, str] | str, video_root, pipeline: PipelineConfig = PipelineConfig(), *,
          config_name: str | None = None, encoding: str = "zlib", download_and_prepare: bool = True):
    """The ``Vnep`` builder for these CSVs (``{split: csv}``; a single path uses its file stem as
    the split name, e.g. ``eval.csv`` -> ``eval``), prepared under ``data_dir`` unless
    ``download_and_prepare=False``. An existing build of the same config is reused."""
    _tfds()
    if isinstance(csv_paths, (str, os.PathLike)):
        csv_paths = {os.path.splitext(os.path.basename(os.fspath(csv_paths)))[0]: os.fspath(csv_paths)}
    csv_paths = {k: os.path.abspath(os.fspath(v)) for k, v in csv_paths.items()}
    for split, path in csv_paths.items():
        if not os.path.isfile(path):
            raise FileNotFoundError(f"split {split!r}: CSV not found: {path}")
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
    video_root = os.path.abspath(os.fspath(video_root))
    fields = dataclasses.asdict(pipeline)
    name = config_name or _default_name(csv_paths, video_root, fields, encoding)
    Vnep, VnepConfig = builder_class()
    config = VnepConfig(name=name, version=DATASET_VERSION, csv_paths=csv_paths, video_root=video_root, pipeline=fields,
                        encoding=encoding, description=f"VNEP from {sorted(csv_paths.items())}")
    builder = Vnep(config=config, data_dir=os.path.expanduser(os.fspath(data_dir)), file_format="array_record")
    if download_and_prepare:
        builder.download_and_prepare()
    return builder


class TfdsVNEPSource:
    """A prepared split as a grain random-access source yielding the ``VNEPSource`` dicts (text as
    ``str``, integers / floats as Python numbers, videos as uint8 arrays)."""

    def __init__(self, source, skipped: dict | None = None):
        self._source = source
        self.skipped = dict(skipped or {})

    def __len__(self) -> int:
        return len(self._source)

    def __repr__(self) -> str:
        return f"TfdsVNEPSource({len(self)} examples)"

    def __getitem__(self, i: int) -> dict:
        ex = dict(self._source[int(i)])
        for k in TEXT_KEYS:
            v = ex[k]
            ex[k] = v.decode("utf-8") if isinstance(v, bytes) else str(v)
        for k in INT_KEYS:
            if k in ex:
                ex[k] = int(ex[k])
        for k in FLOAT_KEYS:
            ex[k] = float(ex[k])
        return ex


def data_source(builder_or_dir, split: str) -> TfdsVNEPSource:
    """One split of a prepared build: a builder from ``build`` or the prepared directory."""
    tfds = _tfds()
    builder = builder_or_dir
    if isinstance(builder_or_dir, (str, os.PathLike)):
        builder = tfds.builder_from_directory(os.fspath(builder_or_dir))
    skipped = dict(builder.info.metadata or {}).get("skipped", {}).get(split, {}) if builder.info.metadata else {}
    return TfdsVNEPSource(builder.as_data_source(split=split), skipped)
