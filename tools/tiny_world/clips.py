"""A generated synthetic-world split (``vans_jax.data.synthetic.generate_world``) in memory: the
input and target clips (decoded, or rendered again from the scenes) with their captions, for training
the world's tiny models."""
from __future__ import annotations

import dataclasses
import os

import numpy as np

from vans_jax.data.csv_format import read_vnep_csv
from vans_jax.data.synthetic import WorldConfig, render_scene, scene_from_row, scene_hash
from vans_jax.data.video_io import read_video


@dataclasses.dataclass
class WorldClips:
    split: str
    inputs: np.ndarray      # uint8 (N, F_in, H, W, 3): the input clips
    targets: np.ndarray     # uint8 (N, F_out, H, W, 3): the ground-truth next events
    captions: list[str]     # the target clips' captions
    events: list[str]       # the event names (``bounce``, ``build``, ...)

    def __len__(self) -> int:
        return len(self.captions)


SOURCES = ("video", "render")


def load_world_clips(world_dir: str, split: str, max_samples: int | None = None, *, source: str = "video",
                     config: WorldConfig = WorldConfig()) -> WorldClips:
    """Reads ``<world_dir>/<split>.csv`` and its (input, target) clips.

    source="video": decodes the mp4 files under ``<world_dir>/videos`` (what the pipeline, the
    rewards and the evaluation see: H.264, yuv420p). source="render": renders the clips again from
    each row's hidden scene (``scene`` column) with the simulator -- the exact frames before
    encoding, ~25x faster than decoding; ``config`` must be the world's geometry (checked against
    the rows' ``scene_hash``). All clips of a split must share one shape (as the generator writes them)."""
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    csv_path = os.path.join(os.fspath(world_dir), f"{split}.csv")
    if not os.path.isfile(csv_path):
        raise FileNotFoundError(f"no {split}.csv in {world_dir}: generate the world first "
                                f"(vans_jax.data.synthetic.generate_world(dir, {split!r}, n))")
    rows = list(read_vnep_csv(csv_path))
    if max_samples is not None:
        rows = rows[:max_samples]
    if not rows:
        raise ValueError(f"{csv_path} has no samples")
    root = os.path.join(os.fspath(world_dir), "videos")
    inputs, targets = [], []
    for row in rows:
        if source == "render":
            spec = scene_from_row(row)
            if scene_hash(spec, config) != row.extra.get("scene_hash"):
                raise ValueError(f"{csv_path} row {row.index}: the scene does not hash to its scene_hash with "
                                 f"the given WorldConfig geometry {config.geometry()}; pass the world's config")
            inp, tgt = render_scene(spec, config)
        else:
            inp, _ = read_video(os.path.join(root, row.input_video_path))
            tgt, _ = read_video(os.path.join(root, row.output_video_path))
        for what, clip, ref in (("input", inp, inputs), ("target", tgt, targets)):
            if ref and clip.shape != ref[0].shape:
                raise ValueError(f"{split} row {row.index}: {what} clip has shape {clip.shape}, "
                                 f"the first row's has {ref[0].shape}")
            ref.append(clip)
    return WorldClips(split, np.stack(inputs), np.stack(targets), [r.caption for r in rows],
                      [r.extra.get("event", r.kind) for r in rows])
