"""A damaged safetensors file is named with the tensor and the byte counts, not a reshape error."""
import numpy as np
import pytest

from vans_jax.convert.safetensors_io import Checkpoint, CheckpointError, SafetensorsFile, save_file


def test_truncated_file_names_file_tensor_and_bytes(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"a.weight": np.ones((4, 4), np.float32), "b.weight": np.ones((128, 128), np.float32)}, str(path))
    whole = path.read_bytes()
    assert SafetensorsFile(str(path)).get("b.weight").shape == (128, 128)
    path.write_bytes(whole[:-1000])
    with pytest.raises(CheckpointError) as e:
        Checkpoint(str(tmp_path))
    msg = str(e.value)
    assert str(path) in msg and "truncated" in msg and "'b.weight'" in msg and "[128, 128]" in msg
    assert f"the file has {len(whole) - 1000} bytes ({len(whole)} expected, 1000 missing)" in msg


def test_header_that_does_not_fit_the_shape(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"w": np.ones((2, 3), np.float32)}, str(path))
    raw = path.read_bytes().replace(b'"shape":[2,3]', b'"shape":[3,3]')
    path.write_bytes(raw)
    with pytest.raises(CheckpointError, match=r"tensor 'w' \(F32 \[3, 3\]\) needs 36 bytes but its header gives it 24"):
        SafetensorsFile(str(path))
