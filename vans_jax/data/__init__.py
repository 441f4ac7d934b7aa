"""VANS data: VANS-Data CSV format, video I/O, a synthetic world, grain pipeline.

Submodules: ``csv_format``, ``video_io`` (PyAV), ``synthetic``, ``loader``
(grain; imports jax).  The names below are re-exported lazily, so importing
``vans_jax.data`` itself is cheap.
"""

from .._lazy import lazy_exports

_EXPORTS = {
    ".csv_format": ("CSVReport", "VNEPFormatError", "VNEPRow", "VNEPRowList", "infer_kind", "read_vnep_csv",
                    "write_vnep_csv"),
    ".video_io": ("VideoError", "VideoInfo", "probe_video", "read_video", "reference_clip", "resize_center_crop",
                  "target_clip", "write_video"),
    ".synthetic": ("WorldConfig", "generate_world", "world_texts"),
    ".loader": ("DatasetReport", "PipelineConfig", "VNEPSource", "make_dataset", "skip_stats", "validate_dataset"),
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
