"""The TFDS builder writes the grain source's examples (skipped when tensorflow-datasets is absent)."""
import importlib.util
import os
import sys

import numpy as np
import pytest

from vans_jax.data import synthetic as S
from vans_jax.data import tfds_vnep  # importable without tensorflow-datasets
from vans_jax.data.loader import PipelineConfig, VNEPSource

HAVE_TFDS = importlib.util.find_spec("tensorflow_datasets") is not None
needs_tfds = pytest.mark.skipif(not HAVE_TFDS, reason="tensorflow-datasets is not installed")

WCFG = S.WorldConfig()
PCFG = PipelineConfig(**WCFG.pipeline_kwargs())


def _assert_same(got: dict, want: dict):
    assert set(got) == set(want)
    for k, v in want.items():
        if isinstance(v, np.ndarray):
            assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
            np.testing.assert_array_equal(got[k], v, err_msg=k)
        else:
            assert type(got[k]) is type(v) and got[k] == v, k


@needs_tfds
def test_build_and_read_back(tmp_path):
    ws = S.generate_world(tmp_path / "world", "eval", 3)
    os.remove(os.path.join(ws.video_root, ws.rows[1].output_video_path))   # one bad row: skipped, counted
    builder = tfds_vnep.build(tmp_path / "tfds", {"eval": ws.csv_path}, ws.video_root, PCFG)
    assert "tensorflow" not in sys.modules                                 # no TensorFlow involved
    src = tfds_vnep.data_source(builder, "eval")
    assert len(src) == 2 and src.skipped == {"output_missing": 1}
    grain_src = VNEPSource(ws.csv_path, ws.video_root, PCFG)
    _assert_same(src[1], grain_src.load(2))                                # CSV order, the bad row left out
    assert src[0]["index"] == 0 and src[1]["kind"] in ("procedural", "predictive")

    # the prepared directory reads back on its own, and a second build reuses it
    again = tfds_vnep.data_source(builder.data_dir, "eval")
    _assert_same(again[0], grain_src.load(0))
    assert again.skipped == {"output_missing": 1}
    assert tfds_vnep.build(tmp_path / "tfds", ws.csv_path, ws.video_root, PCFG).data_dir == builder.data_dir
    files = os.listdir(builder.data_dir)
    assert any(f.startswith("vnep-eval.array_record") for f in files)


@needs_tfds
def test_bad_arguments(tmp_path):
    with pytest.raises(FileNotFoundError, match="CSV not found"):
        tfds_vnep.build(tmp_path, {"eval": str(tmp_path / "nope.csv")}, tmp_path, PCFG)
    (tmp_path / "x.csv").write_text("a\n")
    with pytest.raises(ValueError, match="encoding"):
        tfds_vnep.build(tmp_path, str(tmp_path / "x.csv"), tmp_path, PCFG, encoding="png")


def test_clear_error_without_tfds(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)   # import fails as if not installed
    with pytest.raises(ImportError, match="pip install tensorflow-datasets"):
        tfds_vnep.build(tmp_path, {"eval": "eval.csv"}, tmp_path)
