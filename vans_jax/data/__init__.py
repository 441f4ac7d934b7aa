"""VANS data: VANS-Data CSV format, video I/O, a synthetic world, grain pipeline.

Submodules: ``csv_format``, ``video_io`` (PyAV), ``synthetic``, ``pipeline``
(grain; imports jax).  The names below are re-exported lazily, so importing
``vans_jax.data`` itself is cheap.
"""

import importlib

_EXPORTS = {
    "csv_format": ("CSVReport", "VNEPFormatError", "VNEPRow", "VNEPRowList", "infer_kind", "read_vnep_csv",
                   "write_vnep_csv"),
    "video_io": ("VideoError", "VideoInfo", "probe_video", "read_video", "reference_clip", "resize_center_crop",
                 "target_clip", "write_video"),
    "synthetic": ("WorldConfig", "generate_world", "world_texts"),
    "pipeline": ("DatasetReport", "PipelineConfig", "VNEPSource", "make_dataset", "skip_stats", "validate_dataset"),
}
_WHERE = {name: mod for mod, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
