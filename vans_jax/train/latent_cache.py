"""The SFT-VDM latent cache: the frozen VAE's latents of each clip and the frozen UMT5's embeddings of
each caption, computed once and reused, so an SFT-VDM step runs the DiT alone.

What is cached (all exactly what the uncached step computes; the VAE encodes the posterior mean, so
it is deterministic):

* ``latents``: ``sampling.wan.encode_video`` of a target clip -> ``(z, T_lat, h, w)`` float32;
* ``ref``: ``rl.rollouts.reference_latents`` of an input clip at the render settings ->
  ``(z, n_ref, h, w)`` float32;
* ``context``: ``sampling.wan.encode_text`` of a caption -> ``(L, d)``, stored without its zero tail
  (the encoder zeroes every position after the caption's tokens) and padded back on reading.

Keys. An entry is keyed by its content: the SHA-1 of the clip's uint8 bytes and shape (or of the
caption's UTF-8), so a changed video or caption is a new entry and nothing goes stale when the data
change. Entries live in a namespace keyed by the models and settings: a fingerprint of the VAE's and
of the text encoder's weights (each leaf's path, shape, dtype and a strided sample of up to
4,096 values), the text length and the reference settings; a retrained VAE or text encoder
writes to a new namespace and never reads an old entry.

Storage: ``<dir>/<namespace>/<kind>/<key[:2]>/<key>.npy`` (written atomically: a temporary file,
then a rename; a damaged file is recomputed and overwritten), plus an in-memory copy of everything
read or written up to ``memory_bytes``. ``dir`` is shared by runs and processes (several processes
may write one entry: they write the same bytes). Turn it on with ``train.sft_vdm.latent_cache``:
``"auto"`` (default: ``<workdir>/latent_cache``; off without a workdir), a directory, or ``"off"``.

Several processes: each looks up its own rows; when any process misses one, every process runs the
uncached (global, collective) encode of the whole batch and stores its own rows, so the collectives
stay in step.

Skipping the decode (``CachedSource``). With every entry of an example cached, its clips are needed
only for their keys, so decoding them is wasted. ``CachedSource`` wraps the data source: each example
the step has cached leaves an alias, ``<namespace>/sources/<key[:2]>/<key>.json``, from a source key
(both video files' absolute paths, sizes, modification times and inodes, the sampling settings
``PipelineConfig``, the decoding code and PyAV's version) to the content keys of its clips; an example whose alias
and entries exist is then given without its clips (``target`` and ``reference`` None, the content
keys in ``cached_keys``). A rewritten video is a new source key (decoded again); an entry gone from
the cache makes the step decode the example after all (``CachedSource.load_full``).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os

import jax
import numpy as np

from .._files import atomic_path, write_atomic

# what each kind of entry encodes: the example field it is computed from (and keyed by)
SOURCES = {"latents": "target", "ref": "reference", "context": "caption"}


def content_key(x) -> str:
    """SHA-1 of a uint8 array's shape and bytes, or of a string's UTF-8."""
    h = hashlib.sha1()
    if isinstance(x, str):
        h.update(b"str:" + x.encode("utf-8"))
    else:
        a = np.ascontiguousarray(np.asarray(x))
        h.update(f"{a.dtype}:{a.shape}:".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _leaf_sample(x, n: int = 4096) -> np.ndarray:
    """At most ``n`` evenly strided values of an array, taken where it lives (a multi-GB encoder is
    not copied to the host); of this process's first piece when its shards span processes."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = x.addressable_shards[0].data      # a per-process fingerprint (each process's cache its own)
    flat = jax.numpy.ravel(x) if isinstance(x, jax.Array) else np.ravel(np.asarray(x))
    return np.asarray(jax.device_get(flat[:: max(1, flat.size // n)][:n]))


def weights_fingerprint(module) -> str:
    """A fingerprint of an NNX module's weights: every leaf's path, shape, dtype and a strided sample
    of at most 4,096 of its values (cheap on multi-GB encoders; any retraining changes it)."""
    from flax import nnx

    h = hashlib.sha1()
    state = nnx.state(module)
    for path, leaf in sorted(jax.tree_util.tree_leaves_with_path(state), key=lambda kv: jax.tree_util.keystr(kv[0])):
        h.update(f"{jax.tree_util.keystr(path)}:{tuple(np.shape(leaf))}:{np.dtype(leaf.dtype)}:".encode())
        if np.size(leaf):
            h.update(np.ascontiguousarray(_leaf_sample(leaf)).tobytes())
    return h.hexdigest()


def entry_path(namespace_dir: str, kind: str, key: str) -> str:
    """Where an entry of ``kind`` with content key ``key`` lives in a cache namespace."""
    return os.path.join(namespace_dir, kind, key[:2], key + ".npy")


class LatentCache:
    """See the module docstring. ``get(kind, key)`` -> array or None; ``put(kind, key, array)``."""

    def __init__(self, directory: str, vdm, render, *, memory_bytes: int = 2 << 30):
        self.settings = {"vae": weights_fingerprint(vdm.vae), "text_encoder": weights_fingerprint(vdm.text_encoder),
                         "text_len": int(vdm.text_len), "n_ref": int(render.n_ref), "height": int(render.height),
                         "width": int(render.width), "version": 1}
        self.namespace = hashlib.sha1(json.dumps(self.settings, sort_keys=True).encode()).hexdigest()[:16]
        self.dir = os.path.join(os.fspath(directory), self.namespace)
        os.makedirs(self.dir, exist_ok=True)
        info = os.path.join(self.dir, "settings.json")
        if not os.path.exists(info):
            write_atomic(info, json.dumps(self.settings, indent=2).encode())
        self.text_len = int(vdm.text_len)
        self.memory_bytes = int(memory_bytes)
        self._mem: dict[tuple[str, str], np.ndarray] = {}
        self._mem_used = 0
        self.hits = self.misses = self.damaged = 0
        self._dtypes: dict = {}

    def _path(self, kind: str, key: str) -> str:
        return entry_path(self.dir, kind, key)

    def _remember(self, kind, key, a):
        if self._mem_used + a.nbytes <= self.memory_bytes:
            self._mem[(kind, key)] = a
            self._mem_used += a.nbytes

    def get(self, kind: str, key: str):
        a = self._mem.get((kind, key))
        if a is None:
            p = self._path(kind, key)
            if os.path.exists(p):
                try:
                    a = np.load(p, allow_pickle=False)
                except Exception:      # damaged (a killed writer cannot leave one: writes are atomic)
                    self.damaged += 1
                    a = None
                if a is not None:
                    self._remember(kind, key, a)
        if a is None:
            self.misses += 1
            return None
        self.hits += 1
        dtype = self._dtype(kind)
        if kind == "context":          # stored without its zero tail
            out = np.zeros((self.text_len,) + a.shape[1:], dtype)
            out[: a.shape[0]] = a
            return out
        return a.astype(dtype, copy=False)

    def _dtype(self, kind: str):
        """The dtype the encoder gave (entries are stored as float32: .npy has no bfloat16)."""
        if kind not in self._dtypes:
            p = os.path.join(self.dir, kind, "dtype.txt")
            name = open(p).read().strip() if os.path.exists(p) else "float32"
            self._dtypes[kind] = jax.numpy.dtype(name)
        return self._dtypes[kind]

    def put(self, kind: str, key: str, value) -> None:
        a = np.asarray(value)
        if kind not in self._dtypes or self._dtypes[kind] != a.dtype:
            os.makedirs(os.path.join(self.dir, kind), exist_ok=True)
            write_atomic(os.path.join(self.dir, kind, "dtype.txt"), str(a.dtype).encode())
            self._dtypes[kind] = a.dtype
        a = a.astype(np.float32)
        if kind == "context":
            nz = np.flatnonzero(np.any(a != 0, axis=tuple(range(1, a.ndim))))
            a = a[: int(nz[-1]) + 1 if nz.size else 0]
        a = np.ascontiguousarray(a)
        p = self._path(kind, key)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with atomic_path(p) as tmp, open(tmp, "wb") as f:
            np.save(f, a, allow_pickle=False)
        self._remember(kind, key, a)

    def stats(self) -> dict:
        return {"hits": self.hits, "misses": self.misses, "damaged": self.damaged,
                "memory_mb": round(self._mem_used / 2 ** 20, 1), "dir": self.dir}


@functools.lru_cache(maxsize=1)
def decoder_fingerprint() -> str:
    """What a decoded clip depends on besides the file and the settings: the decoding and resizing
    code (``data.video_io``, ``data.loader``: their source files' bytes) and PyAV's version."""
    import av
    from ..data import loader, video_io

    h = hashlib.sha1(f"av:{av.__version__}:".encode())
    for mod in (video_io, loader):
        with open(mod.__file__, "rb") as f:
            h.update(f.read())
    return h.hexdigest()


# what an aliased example takes from its CSV row or from the wrapper, not from its alias
_OWN_FIELDS = ("index", "question", "think", "caption", "kind", "source_key", "cached_keys", "source_index")
# the example fields a latent-cache alias stands for (the clips are not decoded) and what it keeps of them
ALIASED = {"latents": "target", "ref": "reference"}


class CachedSource:
    """A data source (``data.loader.VNEPSource``) whose examples already in the latent cache
    ``namespace_dir`` (``LatentCache.dir``) come without their clips: see the module docstring.
    Picklable (grain's worker processes read through it); ``kinds`` are the cached kinds a step needs."""

    def __init__(self, source, namespace_dir: str, kinds=("latents", "context", "ref")):
        self.source = source
        self.dir = os.fspath(namespace_dir)
        self.kinds = tuple(kinds)

    def __len__(self) -> int:
        return len(self.source)

    def __repr__(self) -> str:
        return f"CachedSource({self.source!r}, {self.dir!r})"

    def __getattr__(self, name):          # the wrapped source's attributes (rows, csv_report, ...)
        if name == "source":
            raise AttributeError(name)
        return getattr(self.source, name)

    def source_key(self, i: int) -> str | None:
        """The key of example ``i``'s files as they are now and of how they are sampled, or None when a
        file cannot be read (the example is then loaded, and its error reported, as without the cache)."""
        row = self.source.rows[int(i)]
        files = []
        for rel in (row.input_video_path, row.output_video_path):
            path = os.path.abspath(self.source.path(rel))
            try:
                st = os.stat(path)
            except OSError:
                return None
            files.append([path, st.st_size, st.st_mtime_ns, st.st_ino])
        cfg = self.source.config
        settings = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else repr(cfg)
        blob = json.dumps({"files": files, "pipeline": settings, "decoder": decoder_fingerprint(),
                           "version": 1}, sort_keys=True, default=str)
        return hashlib.sha1(blob.encode()).hexdigest()

    def alias_path(self, key: str) -> str:
        return os.path.join(self.dir, "sources", key[:2], key + ".json")

    def entry_path(self, kind: str, key: str) -> str:
        return entry_path(self.dir, kind, key)

    def _alias(self, key: str) -> dict | None:
        try:
            with open(self.alias_path(key)) as f:
                alias = json.load(f)
        except (OSError, ValueError):
            return None
        keys = alias.get("keys") if isinstance(alias, dict) else None
        need = [k for k in self.kinds if k in ALIASED]
        if not isinstance(keys, dict) or any(not isinstance(keys.get(k), str) for k in need):
            return None
        if not all(os.path.exists(self.entry_path(k, keys[k])) for k in need):
            return None
        return alias

    def __getitem__(self, i: int) -> dict:
        key = self.source_key(i)
        alias = self._alias(key) if key else None
        if alias is None:
            ex = self.source[int(i)]
            if "error" not in ex:
                ex.update(source_key=key, cached_keys=None, source_index=int(i))
                if ex.get("target") is not None:
                    ex["target_frames"] = int(np.shape(ex["target"])[0])
            return ex
        row = self.source.rows[int(i)]
        out = {"index": int(row.index), "question": row.question, "think": row.think, "caption": row.caption,
               "kind": row.kind}
        out.update(alias.get("fields", {}))
        out.update({k: None for k in alias.get("arrays", [])})     # the same fields as a decoded example
        out.update(source_key=key, cached_keys=dict(alias["keys"]), source_index=int(i))
        return out

    def load_full(self, example: dict) -> dict:
        """``example`` with its clips (decoded now) when it came from its alias; as it is otherwise."""
        if example.get("cached_keys") is None:
            return example
        full = self.source.load(int(example["source_index"]))      # a VideoError names the file
        full.update(source_key=example.get("source_key"), cached_keys=None, source_index=example["source_index"],
                    target_frames=int(np.shape(full["target"])[0]))
        return full

    def remember(self, example: dict, keys: dict) -> None:
        """Writes ``example``'s alias: its source key -> ``keys`` (the content keys of its cached
        entries), its scalar fields and the names of the fields an aliased example gives as None."""
        sk = example.get("source_key")
        if not sk or example.get("cached_keys") is not None:
            return
        arrays = sorted(k for k, v in example.items() if isinstance(v, np.ndarray))
        fields = {k: v.item() if isinstance(v, np.generic) else v for k, v in example.items()
                  if k not in arrays and k not in _OWN_FIELDS and isinstance(v, (int, float, str, bool, np.generic))}
        fields["target_frames"] = int(np.shape(example["target"])[0])
        arrays += sorted(k for k in example if k not in arrays and k not in fields and k not in _OWN_FIELDS)
        alias = {"keys": {k: keys[k] for k in ALIASED if k in keys}, "fields": fields, "arrays": arrays}
        p = self.alias_path(sk)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        write_atomic(p, json.dumps(alias).encode())


def cache_dir(setting: str, workdir: str) -> str | None:
    """``train.sft_vdm.latent_cache`` -> a directory or None: ``"off"``/``""`` -> None, ``"auto"`` ->
    ``<workdir>/latent_cache``, anything else is the directory."""
    s = str(setting or "").strip()
    if s.lower() in ("", "off", "none", "false", "0"):
        return None
    if s.lower() == "auto":
        return os.path.join(workdir, "latent_cache") if workdir else None
    return os.path.expanduser(s)


__all__ = ["LatentCache", "CachedSource", "content_key", "weights_fingerprint", "cache_dir", "SOURCES"]
