"""Streaming safetensors I/O without torch.

Reading memory-maps each file and hands out one tensor at a time, so peak host memory stays
near the largest tensor. bf16 tensors come back as ``ml_dtypes.bfloat16`` numpy arrays.
A checkpoint is either one ``*.safetensors`` file or several with a
``*.safetensors.index.json`` (``weight_map``), as Hugging Face and diffusers write them.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Iterator, Mapping

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint file or key is missing, malformed or does not fit the model."""


def _read_header(path: str):
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise CheckpointError(f"{path}: not a safetensors file (shorter than its 8-byte header size)")
            (n,) = struct.unpack("<Q", raw)
            if n > os.path.getsize(path):
                raise CheckpointError(f"{path}: not a safetensors file (header size {n} exceeds the file)")
            header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    header.pop("__metadata__", None)
    return header, 8 + n


class SafetensorsFile:
    """One safetensors file, tensors read lazily through a memory map."""

    def __init__(self, path: str):
        if not os.path.isfile(path):
            raise CheckpointError(f"missing weight file {path}")
        self.path = path
        self.header, self.offset = _read_header(path)
        self._mm = None
        self._check_sizes()

    def _check_sizes(self):
        """Every tensor's byte range fits its shape and dtype and lies inside the file (a truncated
        download is named here, not by a reshape error later)."""
        present = os.path.getsize(self.path)
        expected = self.offset + max((int(i["data_offsets"][1]) for i in self.header.values()), default=0)
        for key, info in sorted(self.header.items(), key=lambda kv: int(kv[1]["data_offsets"][1])):
            start, end = (int(x) for x in info["data_offsets"])
            if info["dtype"] in _DTYPES:
                need = int(np.prod(info["shape"], dtype=np.int64)) * np.dtype(_DTYPES[info["dtype"]]).itemsize
                if end - start != need:
                    raise CheckpointError(f"{self.path}: tensor {key!r} ({info['dtype']} {list(info['shape'])}) "
                                          f"needs {need} bytes but its header gives it {end - start}: corrupt file")
            if self.offset + end > present:
                raise CheckpointError(
                    f"{self.path} is truncated: tensor {key!r} ({info['dtype']} {list(info['shape'])}) ends at byte "
                    f"{self.offset + end}, the file has {present} bytes ({expected} expected, "
                    f"{expected - present} missing)")

    def keys(self):
        return list(self.header)

    def shape(self, key):
        return tuple(self.header[key]["shape"])

    def get(self, key) -> np.ndarray:
        info = self.header[key]
        if info["dtype"] not in _DTYPES:
            raise CheckpointError(f"{self.path}: tensor {key!r} has unsupported dtype {info['dtype']}")
        if self._mm is None:
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        start, end = info["data_offsets"]
        buf = self._mm[self.offset + start: self.offset + end]
        return np.frombuffer(buf, dtype=_DTYPES[info["dtype"]]).reshape(info["shape"])


class Checkpoint:
    """All tensors of a checkpoint directory (or a single file), keyed by name."""

    def __init__(self, path: str, *, prefix: str = "model"):
        self.files: dict[str, SafetensorsFile] = {}
        self.where: dict[str, str] = {}
        if os.path.isfile(path):
            self._add(path)
            return
        if not os.path.isdir(path):
            raise CheckpointError(f"checkpoint path {path} does not exist")
        index = [f for f in sorted(os.listdir(path)) if f.endswith(".safetensors.index.json")]
        if index:
            with open(os.path.join(path, index[0])) as f:
                weight_map = json.load(f).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{os.path.join(path, index[0])}: no 'weight_map'")
            for fname in sorted(set(weight_map.values())):
                self._add(os.path.join(path, fname))
            return
        singles = [f for f in sorted(os.listdir(path)) if f.endswith(".safetensors")]
        if not singles:
            raise CheckpointError(f"no *.safetensors files in {path}")
        for fname in singles:
            self._add(os.path.join(path, fname))

    def _add(self, file):
        st = SafetensorsFile(file)
        self.files[file] = st
        for k in st.keys():
            self.where[k] = file

    def keys(self):
        return list(self.where)

    def __contains__(self, key):
        return key in self.where

    def shape(self, key):
        return self.files[self.where[key]].shape(key)

    def get(self, key) -> np.ndarray:
        if key not in self.where:
            raise CheckpointError(f"key {key!r} not found in checkpoint")
        return self.files[self.where[key]].get(key)

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        for k in self.where:
            yield k, self.get(k)


def save_file(tensors: Mapping[str, np.ndarray], path: str, metadata: Mapping[str, str] | None = None):
    """Writes a safetensors file from numpy arrays (bf16 via ml_dtypes), streaming one tensor at
    a time to disk."""
    header = {}
    offset = 0
    arrays = {}
    for k, v in tensors.items():
        a = np.asarray(v)
        a = a if a.flags.c_contiguous else a.copy(order="C")  # (ascontiguousarray would make 0-d arrays 1-d)
        if a.dtype not in _NAMES:
            raise CheckpointError(f"cannot save tensor {k!r} of dtype {a.dtype}")
        header[k] = {"dtype": _NAMES[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        arrays[k] = a
    header["__metadata__"] = dict(metadata or {"format": "pt"})
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for a in arrays.values():
            f.write(a.tobytes())
    os.replace(tmp, path)
