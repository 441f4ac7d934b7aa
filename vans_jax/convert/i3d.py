"""I3D checkpoints (the pytorch-i3d port's state-dict keys) -> ``vans_jax.models.i3d.I3D``: the key
table as data, a coverage check naming every missing / unexpected / mis-shaped key, ``load_i3d``."""
from __future__ import annotations

import os
import re
from typing import Mapping

import numpy as np
from flax import nnx

from ..models.i3d import I3D
from ..models.layers import resolve_dtype
from .loading import RenamedCheckpoint, check_keys, load_into, open_checkpoint
from .safetensors_io import CheckpointError


IGNORED_KEYS = r".*\.bn\.num_batches_tracked"

TRANSFORMS = {
    "identity": lambda a: a,
    "conv3d": lambda a: np.transpose(a, (2, 3, 4, 1, 0)),  # torch (O, I, T, H, W) -> (T, H, W, I, O)
}

# The key mapping (data): our leaf -> (the port's leaf, transform); module paths are the same on
# both sides (``Mixed_4e.b2b`` is ``Mixed_4e.b2b``).
LEAF_MAP = {
    "conv3d.kernel": ("conv3d.weight", "conv3d"),
    "conv3d.bias": ("conv3d.bias", "identity"),
    "bn.scale": ("bn.weight", "identity"),
    "bn.bias": ("bn.bias", "identity"),
    "bn.mean": ("bn.running_mean", "identity"),
    "bn.var": ("bn.running_var", "identity"),
}


def _torch_shape(shape: tuple, transform: str) -> tuple:
    if transform == "conv3d":
        t, h, w, i, o = shape
        return (o, i, t, h, w)
    return tuple(shape)


def torch_key(path: str) -> tuple[str, str]:
    """(the port's state-dict key, transform) for one of our parameter paths."""
    for leaf, (tleaf, transform) in LEAF_MAP.items():
        if path.endswith("." + leaf):
            return path[: -len(leaf)] + tleaf, transform
    raise CheckpointError(f"no I3D key rule for parameter {path!r}")


def key_table(model: I3D) -> dict[str, tuple[str, str, tuple]]:
    """The port's key -> (our path, transform, torch shape) for every variable of ``model``."""
    table = {}
    for path, var in nnx.to_flat_state(nnx.state(model)):
        path = ".".join(str(p) for p in path)
        key, transform = torch_key(path)
        table[key] = (path, transform, _torch_shape(tuple(var.get_value().shape), transform))
    return table


def check_coverage(ckpt, model: I3D) -> dict:
    """Raises ``CheckpointError`` naming every missing, unexpected and mis-shaped key (``*.num_batches_tracked``
    is ignored); returns the key table."""
    table = key_table(model)
    ignored = re.compile(IGNORED_KEYS + r"\Z")
    check_keys(ckpt, table, "I3D", ignore=lambda k: bool(ignored.match(k)))
    return table


def state_dict_to_numpy(state_dict: Mapping) -> dict[str, np.ndarray]:
    """A torch state dict (tensors) -> {key: numpy array}, without importing torch."""
    out = {}
    for k, v in state_dict.items():
        if hasattr(v, "detach"):
            v = v.detach().cpu().numpy()
        out[k] = np.asarray(v)
    return out


def load_i3d(path_or_dict, dtype="float32", mesh=None, *, num_classes: int | None = None) -> I3D:
    """An ``I3D`` from a pytorch-i3d state dict: a safetensors file or directory, or an in-memory
    {key: array} dict (e.g. ``state_dict_to_numpy(torch.load("rgb_imagenet.pt"))``). A ``module.``
    prefix (``nn.DataParallel``) is stripped. ``num_classes`` defaults to the checkpoint's
    (``logits.conv3d.bias``: 400 for rgb_imagenet, 157 for rgb_charades)."""
    if isinstance(path_or_dict, (str, os.PathLike)):
        src = os.fspath(path_or_dict)
        if os.path.isfile(src) and not src.endswith(".safetensors"):
            raise CheckpointError(
                f"{src}: not a safetensors file. For a torch .pt/.pth state dict: "
                "load_i3d(state_dict_to_numpy(torch.load(path, map_location='cpu'))) or save it as safetensors first")
    ckpt = open_checkpoint(path_or_dict)
    if any(k.startswith("module.") for k in ckpt.keys()):
        ckpt = RenamedCheckpoint(ckpt, lambda k: k[len("module."):] if k.startswith("module.") else k)
    if num_classes is None:
        if "logits.conv3d.bias" not in set(ckpt.keys()):
            raise CheckpointError("I3D checkpoint lacks 'logits.conv3d.bias' (cannot infer num_classes)")
        num_classes = int(ckpt.shape("logits.conv3d.bias")[0])
    dt = resolve_dtype(dtype)
    abstract = nnx.eval_shape(lambda: I3D(num_classes, dtype=dt))
    table = check_coverage(ckpt, abstract)
    rules = [(re.escape(key), path, transform) for key, (path, transform, _) in table.items()]
    ignored = re.compile(IGNORED_KEYS + r"\Z")
    return load_into(abstract, ckpt, rules, TRANSFORMS, dtype=dt, mesh=mesh, skip=lambda k: bool(ignored.match(k)))
