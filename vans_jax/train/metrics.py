"""Metric writers: clu's ``MetricWriter`` interface (async, logging, multi) with TensorBoard event
files written by tensorboardX, so no TensorFlow is needed.

clu's ``metric_writers`` package imports its TensorFlow summary writer at import time; when
TensorFlow is not installed a placeholder stands in for that one module, and the rest of clu
(interface, AsyncWriter, MultiWriter, LoggingWriter) is used as is.
"""
from __future__ import annotations

import importlib.util
import sys
import types
from typing import Any, Mapping


def _import_clu():
    name = "clu.metric_writers.summary_writer"
    if name not in sys.modules and importlib.util.find_spec("tensorflow") is None:
        stub = types.ModuleType(name)
        stub.SummaryWriter = None  # clu's TF writer; unavailable without TensorFlow
        sys.modules[name] = stub
    from clu import metric_writers
    return metric_writers


metric_writers = _import_clu()


class TensorBoardWriter(metric_writers.MetricWriter):
    """clu MetricWriter over a tensorboardX ``SummaryWriter`` (scalars, texts, images, histograms,
    hparams)."""

    def __init__(self, logdir: str):
        from tensorboardX import SummaryWriter
        self._w = SummaryWriter(logdir=logdir, flush_secs=10)

    def write_summaries(self, step: int, values: Mapping[str, Any], metadata=None):
        for k, v in values.items():
            self._w.add_scalar(k, float(v), step)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]):
        for k, v in scalars.items():
            self._w.add_scalar(k, float(v), step)

    def write_images(self, step: int, images: Mapping[str, Any]):
        for k, v in images.items():
            self._w.add_images(k, v, step, dataformats="NHWC")

    def write_videos(self, step: int, videos: Mapping[str, Any]):
        for k, v in videos.items():  # (N, T, H, W, C) uint8 -> tensorboardX wants (N, T, C, H, W)
            self._w.add_video(k, v.transpose(0, 1, 4, 2, 3), step, fps=4)

    def write_audios(self, step: int, audios: Mapping[str, Any], *, sample_rate: int):
        for k, v in audios.items():
            self._w.add_audio(k, v, step, sample_rate=sample_rate)

    def write_texts(self, step: int, texts: Mapping[str, str]):
        for k, v in texts.items():
            self._w.add_text(k, v, step)

    def write_histograms(self, step: int, arrays: Mapping[str, Any], num_buckets=None):
        for k, v in arrays.items():
            self._w.add_histogram(k, v, step)

    def write_hparams(self, hparams: Mapping[str, Any]):
        self._w.add_text("hparams", "\n".join(f"{k}: {v}" for k, v in sorted(hparams.items())), 0)

    def flush(self):
        self._w.flush()

    def close(self):
        self._w.close()


def create_writer(logdir: str, *, primary: bool = True, asynchronous: bool = True, log: bool = False):
    """TensorBoard (+ optional logging) writer on the primary host, logging only elsewhere."""
    if not primary:
        return metric_writers.LoggingWriter()
    writers = [TensorBoardWriter(logdir)]
    if log:
        writers.append(metric_writers.LoggingWriter())
    if asynchronous:
        return metric_writers.AsyncMultiWriter(writers)
    return metric_writers.MultiWriter(writers)
