"""A tiny deterministic "world" of VNEP samples in the VANS-Data format.

Every sample is a scene of simple objects on a black canvas framed by a grey
wall.  The scene is simulated for ``input_frames + target_frames`` steps; the
first ``input_frames`` frames are the input clip, the rest the ground-truth
next-event clip (``target[0]`` is the simulation step right after
``input[-1]``: no duplicated frame).  Question / think / caption are short
templates over a small vocabulary and are a deterministic function of the
hidden scene parameters, and those parameters are visible in the input clip,
so the answer (and the target video) follows from what is seen.

Event types (``EVENTS``), see ``data/SYNTHETIC_WORLD.md`` for the templates:

* predictive ("What will happen next?"): ``bounce`` (ball close to a wall hits
  it and bounces back), ``keep_moving`` (ball far from the wall keeps going),
  ``grow`` / ``shrink`` (circle keeps changing size), ``collide`` (two balls on
  the same line meet and bounce apart), ``pass`` (two balls on different lines
  pass each other), ``fall`` (ball accelerating downward lands on the ground).
* procedural ("What should ... do next?"): ``move_pattern`` (a shape moves in
  a repeating sequence of directions, one move per ``segment`` frames; answer:
  the next move), ``color_cycle`` (a shape cycles through 2-3 colours; answer:
  the next colour), ``build`` (blocks are added in a row / stack with a
  repeating colour pattern; answer: the next block).

Splits: a scene belongs to exactly one split by a hash of its parameters
(``scene_hash`` -> bucket of 10: 0-7 train, 8 rl, 9 eval); ``generate_world``
draws scenes from ``np.random.default_rng(seed)`` (default seeds
``SPLIT_SEEDS``) and rejects those of other splits and duplicates, so the
splits never overlap whatever the seeds.  Generation is sequential, so the
first ``n`` samples of a larger run equal a run of ``n``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections import Counter
from typing import Callable, Sequence

import numpy as np

from .csv_format import VNEPRow, write_vnep_csv
from .video_io import check_vae_frames, write_video

__all__ = [
    "COLORS",
    "SHAPES",
    "DIRECTIONS",
    "EVENTS",
    "PREDICTIVE_EVENTS",
    "PROCEDURAL_EVENTS",
    "SPLITS",
    "SPLIT_SEEDS",
    "WorldConfig",
    "SceneSpec",
    "WorldSplit",
    "sample_scene",
    "simulate",
    "render",
    "render_scene",
    "scene_texts",
    "scene_hash",
    "split_of",
    "scene_from_row",
    "generate_world",
    "world_texts",
]

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (60, 90, 240),
    "yellow": (230, 210, 40),
    "purple": (170, 70, 210),
}
SHAPES = ("square", "circle", "triangle")
DIRECTIONS: dict[str, tuple[int, int]] = {"right": (1, 0), "left": (-1, 0), "up": (0, -1), "down": (0, 1)}
_OPPOSITE = {"right": "left", "left": "right", "up": "down", "down": "up"}
_WALL_NAME = {"right": "right wall", "left": "left wall", "up": "top wall", "down": "bottom wall"}
_BACK = {"right": "back to the left", "left": "back to the right", "up": "back down", "down": "back up"}
WALL_RGB = (128, 128, 128)
BG_RGB = (0, 0, 0)

PREDICTIVE_EVENTS = ("bounce", "keep_moving", "grow", "shrink", "collide", "pass", "fall")
PROCEDURAL_EVENTS = ("move_pattern", "color_cycle", "build")
EVENTS = PREDICTIVE_EVENTS + PROCEDURAL_EVENTS
SPLITS = ("train", "rl", "eval")
SPLIT_SEEDS = {"train": 0, "rl": 1, "eval": 2}
_SPLIT_BUCKETS = {"train": range(0, 8), "rl": range(8, 9), "eval": range(9, 10)}
PREDICTIVE_QUESTION = "What will happen next?"


@dataclasses.dataclass(frozen=True)
class WorldConfig:
    """Canvas and clip geometry.  ``input_frames`` must be ``1 + k*segment``;
    ``target_frames`` must be 4k+1 (video VAE)."""

    height: int = 64
    width: int = 64
    fps: float = 4.0
    input_frames: int = 11
    target_frames: int = 9
    segment: int = 2  # frames per move / colour / block in procedural scenes
    wall: int = 2
    events: tuple = EVENTS
    procedural_fraction: float = 0.5

    def __post_init__(self):
        if self.height < 32 or self.width < 32:
            raise ValueError(f"WorldConfig: canvas must be at least 32x32, got {self.height}x{self.width}")
        if self.segment < 1 or (self.input_frames - 1) % self.segment != 0 or self.input_frames < 1 + 2 * self.segment:
            raise ValueError(
                f"WorldConfig: input_frames must be 1 + k*segment with k >= 2, got {self.input_frames} (segment={self.segment})"
            )
        check_vae_frames(self.target_frames, "WorldConfig.target_frames")
        bad = [e for e in self.events if e not in EVENTS]
        if bad or not self.events:
            raise ValueError(f"WorldConfig: unknown events {bad}; choose from {EVENTS}")

    @property
    def total_frames(self) -> int:
        return self.input_frames + self.target_frames

    @property
    def moves_in_input(self) -> int:
        return (self.input_frames - 1) // self.segment

    def geometry(self) -> dict:
        """The parts of the config that change what a scene looks like (hashed)."""
        return {
            "h": self.height, "w": self.width, "n_in": self.input_frames,
            "n_out": self.target_frames, "seg": self.segment, "wall": self.wall,
        }

    def pipeline_kwargs(self) -> dict:
        """Settings for :class:`vans_jax.data.loader.PipelineConfig` that keep the
        world's clips at native size and rate (VLM frames = one per segment)."""
        return dict(
            num_vlm_frames=min(6, self.moves_in_input + 1),
            vlm_sample_fps=self.fps / self.segment,
            target_frames=self.target_frames,
            target_height=self.height,
            target_width=self.width,
            target_fps=self.fps,
            reference_frames=max(1, (self.input_frames - 1) // 4 * 4 + 1),
            reference_height=self.height,
            reference_width=self.width,
            reference_fps=self.fps,
        )


@dataclasses.dataclass(frozen=True)
class SceneSpec:
    event: str
    params: dict

    @property
    def kind(self) -> str:
        return "predictive" if self.event in PREDICTIVE_EVENTS else "procedural"

    def to_json(self) -> str:
        return json.dumps({"event": self.event, **self.params}, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, s: str) -> "SceneSpec":
        d = json.loads(s)
        ev = d.pop("event")
        return cls(ev, d)


@dataclasses.dataclass
class WorldSplit:
    split: str
    seed: int
    csv_path: str
    video_root: str
    rows: list
    event_counts: Counter
    scene_hashes: list


# --------------------------------------------------------------------------- #
# geometry helpers
# --------------------------------------------------------------------------- #
def _bounds(cfg: WorldConfig, r: float) -> tuple[float, float, float, float]:
    """Allowed centre range (xmin, xmax, ymin, ymax) for an object of half-size r."""
    return cfg.wall + r, cfg.width - cfg.wall - r, cfg.wall + r, cfg.height - cfg.wall - r


def _fold(p: float, lo: float, hi: float) -> float:
    """Reflect a free 1-D trajectory into [lo, hi] (elastic walls)."""
    span = hi - lo
    if span <= 0:
        return lo
    q = (p - lo) % (2 * span)
    return lo + (q if q <= span else 2 * span - q)


def _choice(rng, seq):
    return seq[int(rng.integers(len(seq)))]


def _q(x: float) -> float:
    return float(round(float(x) * 4) / 4)  # quarter pixels: exact in JSON, hashable


def _ball(color, x, y, r, shape="circle"):
    return {"shape": shape, "color": color, "x": float(x), "y": float(y), "r": float(r)}


# --------------------------------------------------------------------------- #
# events: sampler (rng, cfg) -> params | None, simulate (p, cfg) -> frames of objects,
# texts (p, cfg) -> (question, think, caption)
# --------------------------------------------------------------------------- #
def _sample_wall_motion(rng, cfg, bounce: bool):
    color = _choice(rng, list(COLORS))
    d = _choice(rng, list(DIRECTIONS))
    r = float(_choice(rng, [3, 4]))
    s = float(_choice(rng, [1.5, 2.0, 2.5, 3.0] if bounce else [1.0, 1.5, 2.0]))
    n_in, n_out = cfg.input_frames, cfg.target_frames
    if bounce:  # hits the wall in the first half of the target clip
        t_hit = int(rng.integers(n_in, n_in + n_out // 2))
    else:  # would hit only well after the target clip ends
        t_hit = int(rng.integers(n_in + n_out + 2, n_in + n_out + 2 + n_in))
    xmin, xmax, ymin, ymax = _bounds(cfg, r)
    dx, dy = DIRECTIONS[d]
    lo, hi = (xmin, xmax) if dx else (ymin, ymax)
    start = hi - s * t_hit if (dx + dy) > 0 else lo + s * t_hit
    if not (lo <= start <= hi):
        return None
    plo, phi = (ymin, ymax) if dx else (xmin, xmax)
    perp = float(rng.integers(math.ceil(plo), math.floor(phi) + 1))
    x0, y0 = (start, perp) if dx else (perp, start)
    return {"color": color, "dir": d, "r": r, "speed": s, "x0": _q(x0), "y0": _q(y0), "t_hit": t_hit}


def _sim_wall_motion(p, cfg):
    xmin, xmax, ymin, ymax = _bounds(cfg, p["r"])
    dx, dy = DIRECTIONS[p["dir"]]
    out = []
    for t in range(cfg.total_frames):
        x = _fold(p["x0"] + dx * p["speed"] * t, xmin, xmax)
        y = _fold(p["y0"] + dy * p["speed"] * t, ymin, ymax)
        out.append([_ball(p["color"], x, y, p["r"])])
    return out


def _txt_bounce(p, cfg):
    c, d = p["color"], p["dir"]
    w = _WALL_NAME[d]
    think = f"The {c} ball is moving {d} and it is close to the {w}. It will reach the {w} soon, so it will bounce back."
    return PREDICTIVE_QUESTION, think, f"The {c} ball hits the {w} and bounces {_BACK[d]}."


def _txt_keep(p, cfg):
    c, d = p["color"], p["dir"]
    w = _WALL_NAME[d]
    think = f"The {c} ball is moving {d}. The {w} is still far away, so it will keep moving {d}."
    return PREDICTIVE_QUESTION, think, f"The {c} ball keeps moving {d}."


def _sample_size_change(rng, cfg, grow: bool):
    color = _choice(rng, list(COLORS))
    dr = float(_choice(rng, [0.5, 0.75, 1.0]))
    T = cfg.total_frames
    if grow:
        r0 = float(_choice(rng, [2.0, 3.0, 4.0]))
        r_max = r0 + dr * (T - 1)
    else:
        r_end = float(_choice(rng, [1.5, 2.0, 3.0]))
        r0 = r_end + dr * (T - 1)
        r_max = r0
    xmin, xmax, ymin, ymax = _bounds(cfg, r_max)
    if xmin > xmax or ymin > ymax:
        return None
    x = float(rng.integers(math.ceil(xmin), math.floor(xmax) + 1))
    y = float(rng.integers(math.ceil(ymin), math.floor(ymax) + 1))
    return {"color": color, "dr": dr if grow else -dr, "r0": r0, "x": x, "y": y}


def _sim_size_change(p, cfg):
    return [[_ball(p["color"], p["x"], p["y"], p["r0"] + p["dr"] * t)] for t in range(cfg.total_frames)]


def _txt_grow(p, cfg):
    c = p["color"]
    think = f"The {c} circle is getting bigger in every frame, so it will keep growing."
    return PREDICTIVE_QUESTION, think, f"The {c} circle keeps growing."


def _txt_shrink(p, cfg):
    c = p["color"]
    think = f"The {c} circle is getting smaller in every frame, so it will keep shrinking."
    return PREDICTIVE_QUESTION, think, f"The {c} circle keeps shrinking."


def _sample_two_balls(rng, cfg, collide: bool):
    c1, c2 = (str(c) for c in rng.permutation(list(COLORS))[:2])
    r = 3.0
    s = float(_choice(rng, [1.0, 1.5, 2.0]))
    n_in, n_out = cfg.input_frames, cfg.target_frames
    t_meet = int(rng.integers(n_in, n_in + n_out // 2))  # contact (collide) / crossing (pass)
    xmin, xmax, ymin, ymax = _bounds(cfg, r)
    gap0 = (2 * r if collide else 0.0) + 2 * s * t_meet  # centre distance at t=0
    if xmin + gap0 > xmax:
        return None
    x1 = float(_q(rng.uniform(xmin, xmax - gap0)))
    x2 = x1 + gap0
    if collide:
        y = float(rng.integers(math.ceil(ymin), math.floor(ymax) + 1))
        y1 = y2 = y
    else:
        ys = np.arange(math.ceil(ymin), math.floor(ymax) + 1)
        y1 = float(_choice(rng, list(ys)))
        far = [float(v) for v in ys if abs(v - y1) >= 2 * r + 4]
        if not far:
            return None
        y2 = _choice(rng, far)
    p = {"c1": c1, "c2": c2, "r": r, "speed": s, "x1": x1, "x2": _q(x2), "y1": y1, "y2": y2, "t_meet": t_meet}
    if collide:  # reject if the two balls would touch again inside the clip
        frames = _sim_two_balls(dict(p, collide=True), cfg)
        for t in range(t_meet + 1, cfg.total_frames):
            a, b = frames[t]
            if abs(a["x"] - b["x"]) < 2 * r:
                return None
    return p


def _sim_two_balls(p, cfg):
    r, s, tm = p["r"], p["speed"], p["t_meet"]
    xmin, xmax, ymin, ymax = _bounds(cfg, r)
    collide = p.get("collide", p["y1"] == p["y2"])
    out = []
    for t in range(cfg.total_frames):
        if collide and t > tm:
            a = _fold(p["x1"] + s * tm - s * (t - tm), xmin, xmax)
            b = _fold(p["x2"] - s * tm + s * (t - tm), xmin, xmax)
        else:
            a = _fold(p["x1"] + s * t, xmin, xmax)
            b = _fold(p["x2"] - s * t, xmin, xmax)
        out.append([_ball(p["c1"], a, p["y1"], r), _ball(p["c2"], b, p["y2"], r)])
    return out


def _txt_collide(p, cfg):
    c1, c2 = p["c1"], p["c2"]
    think = (f"The {c1} ball moves right and the {c2} ball moves left on the same line. "
             f"They are getting closer, so they will collide and bounce apart.")
    return PREDICTIVE_QUESTION, think, f"The {c1} ball and the {c2} ball collide and bounce apart."


def _txt_pass(p, cfg):
    c1, c2 = p["c1"], p["c2"]
    think = (f"The {c1} ball moves right and the {c2} ball moves left on different lines. "
             f"They will not touch, so they will pass each other.")
    return PREDICTIVE_QUESTION, think, f"The {c1} ball and the {c2} ball pass each other."


def _sample_fall(rng, cfg):
    color = _choice(rng, list(COLORS))
    r = float(_choice(rng, [3, 4]))
    g = float(_choice(rng, [0.25, 0.375, 0.5]))
    n_in, n_out = cfg.input_frames, cfg.target_frames
    t_land = int(rng.integers(n_in, n_in + n_out // 2))
    xmin, xmax, ymin, ymax = _bounds(cfg, r)
    y0 = ymax - 0.5 * g * t_land**2
    if y0 < ymin:
        return None
    x = float(rng.integers(math.ceil(xmin), math.floor(xmax) + 1))
    return {"color": color, "r": r, "g": g, "x": x, "y0": _q(y0), "t_land": t_land}


def _sim_fall(p, cfg):
    ymax = _bounds(cfg, p["r"])[3]
    return [[_ball(p["color"], p["x"], min(ymax, p["y0"] + 0.5 * p["g"] * t * t), p["r"])] for t in range(cfg.total_frames)]


def _txt_fall(p, cfg):
    c = p["color"]
    think = f"The {c} ball is falling faster and faster toward the ground, so it will land on the ground."
    return PREDICTIVE_QUESTION, think, f"The {c} ball falls and lands on the ground."


def _all_patterns():
    dirs = list(DIRECTIONS)
    return [[d] for d in dirs] + [[a, b] for a in dirs for b in dirs if a != b]


def _move_offsets(pattern, step, cfg):
    """Per-frame (dx, dy) offsets from the start for the whole clip."""
    offs = [(0.0, 0.0)]
    x = y = 0.0
    for t in range(1, cfg.total_frames):
        move = (t - 1) // cfg.segment
        dx, dy = DIRECTIONS[pattern[move % len(pattern)]]
        x, y = x + dx * step, y + dy * step
        offs.append((x, y))
    return offs


def _sample_move(rng, cfg):
    color = _choice(rng, list(COLORS))
    shape = _choice(rng, list(SHAPES))
    r = float(_choice(rng, [3, 4]))
    step = float(_choice(rng, [2, 3]))
    pattern = _choice(rng, _all_patterns())
    offs = _move_offsets(pattern, step, cfg)
    oxs, oys = [o[0] for o in offs], [o[1] for o in offs]
    xmin, xmax, ymin, ymax = _bounds(cfg, r)
    lo_x, hi_x = xmin - min(oxs), xmax - max(oxs)
    lo_y, hi_y = ymin - min(oys), ymax - max(oys)
    if lo_x > hi_x or lo_y > hi_y:
        return None
    x0 = float(rng.integers(math.ceil(lo_x), math.floor(hi_x) + 1))
    y0 = float(rng.integers(math.ceil(lo_y), math.floor(hi_y) + 1))
    return {"color": color, "shape": shape, "r": r, "step": step, "pattern": list(pattern), "x0": x0, "y0": y0}


def _sim_move(p, cfg):
    offs = _move_offsets(p["pattern"], p["step"], cfg)
    return [[_ball(p["color"], p["x0"] + ox, p["y0"] + oy, p["r"], p["shape"])] for ox, oy in offs]


def _txt_move(p, cfg):
    c, sh, pat = p["color"], p["shape"], p["pattern"]
    k = cfg.moves_in_input
    seen = [pat[i % len(pat)] for i in range(k)]
    nxt = pat[k % len(pat)]
    think = (f"The {c} {sh} moved {', then '.join(seen)}. "
             f"The moves repeat, so next it should move {nxt}.")
    return f"What should the {c} {sh} do next?", think, f"Move the {c} {sh} {nxt}."


def _color_at(cycle, t, seg):
    return cycle[math.ceil(t / seg) % len(cycle)]


def _sample_color_cycle(rng, cfg):
    shape = _choice(rng, list(SHAPES))
    period = int(_choice(rng, [2, 3]))
    cycle = [str(c) for c in rng.permutation(list(COLORS))[:period]]
    r = float(_choice(rng, [5, 6, 8]))
    xmin, xmax, ymin, ymax = _bounds(cfg, r)
    x = float(rng.integers(math.ceil(xmin), math.floor(xmax) + 1))
    y = float(rng.integers(math.ceil(ymin), math.floor(ymax) + 1))
    return {"shape": shape, "cycle": cycle, "r": r, "x": x, "y": y}


def _sim_color_cycle(p, cfg):
    return [[_ball(_color_at(p["cycle"], t, cfg.segment), p["x"], p["y"], p["r"], p["shape"])]
            for t in range(cfg.total_frames)]


def _txt_color_cycle(p, cfg):
    sh, cyc = p["shape"], p["cycle"]
    k = cfg.moves_in_input
    seen = [cyc[i % len(cyc)] for i in range(k + 1)]
    nxt = cyc[(k + 1) % len(cyc)]
    think = f"The {sh} changed color: {', '.join(seen)}. The colors repeat, so it should turn {nxt} next."
    return f"What should the {sh} do next?", think, f"Turn the {sh} {nxt}."


def _num_blocks(t, seg):
    return 1 + math.ceil(t / seg)


def _sample_build(rng, cfg):
    orient = _choice(rng, ["row", "stack"])
    period = int(_choice(rng, [1, 2, 3]))
    colors = [str(c) for c in rng.permutation(list(COLORS))[:period]]
    n_max = _num_blocks(cfg.total_frames - 1, cfg.segment)
    length = (cfg.width if orient == "row" else cfg.height) - 2 * cfg.wall - 2
    b = min(6, length // n_max - 1)  # block side, 1px gap
    if b < 2:
        return None
    pitch = b + 1
    if orient == "row":
        across = cfg.height - 2 * cfg.wall - b
        start = cfg.wall + 1
    else:
        across = cfg.width - 2 * cfg.wall - b
        start = cfg.height - cfg.wall - b  # top edge of the bottom block (stands on the floor)
    off = int(rng.integers(0, across + 1)) + cfg.wall
    return {"orient": orient, "colors": colors, "b": b, "pitch": pitch, "start": start, "off": off}


def _sim_build(p, cfg):
    b, pitch = p["b"], p["pitch"]
    h = b / 2.0
    out = []
    for t in range(cfg.total_frames):
        objs = []
        for i in range(_num_blocks(t, cfg.segment)):
            col = p["colors"][i % len(p["colors"])]
            if p["orient"] == "row":
                x, y = p["start"] + i * pitch + h, p["off"] + h
            else:
                x, y = p["off"] + h, p["start"] - i * pitch + h
            objs.append({"shape": "block", "color": col, "x": x, "y": y, "r": h})
        out.append(objs)
    return out


def _txt_build(p, cfg):
    cols = p["colors"]
    k = cfg.moves_in_input
    seen = [cols[i % len(cols)] for i in range(k + 1)]
    nxt = cols[(k + 1) % len(cols)]
    where, order = ("on the right", "from left to right") if p["orient"] == "row" else ("on top", "from the bottom up")
    think = f"Blocks are added {order}: {', '.join(seen)}. The colors repeat, so the next block is {nxt}."
    return "What should I do next?", think, f"Place a {nxt} block {where}."


@dataclasses.dataclass(frozen=True)
class _Event:
    sample: Callable
    simulate: Callable
    texts: Callable


_EVENTS: dict[str, _Event] = {
    "bounce": _Event(lambda r, c: _sample_wall_motion(r, c, True), _sim_wall_motion, _txt_bounce),
    "keep_moving": _Event(lambda r, c: _sample_wall_motion(r, c, False), _sim_wall_motion, _txt_keep),
    "grow": _Event(lambda r, c: _sample_size_change(r, c, True), _sim_size_change, _txt_grow),
    "shrink": _Event(lambda r, c: _sample_size_change(r, c, False), _sim_size_change, _txt_shrink),
    "collide": _Event(lambda r, c: _sample_two_balls(r, c, True), _sim_two_balls, _txt_collide),
    "pass": _Event(lambda r, c: _sample_two_balls(r, c, False), _sim_two_balls, _txt_pass),
    "fall": _Event(_sample_fall, _sim_fall, _txt_fall),
    "move_pattern": _Event(_sample_move, _sim_move, _txt_move),
    "color_cycle": _Event(_sample_color_cycle, _sim_color_cycle, _txt_color_cycle),
    "build": _Event(_sample_build, _sim_build, _txt_build),
}


# --------------------------------------------------------------------------- #
# public scene API
# --------------------------------------------------------------------------- #
def sample_scene(rng: np.random.Generator, config: WorldConfig = WorldConfig(), max_tries: int = 1000) -> SceneSpec:
    """Draw one scene (event, then its parameters; infeasible draws are retried)."""
    proc = [e for e in config.events if e in PROCEDURAL_EVENTS]
    pred = [e for e in config.events if e in PREDICTIVE_EVENTS]
    if proc and pred:
        pool = proc if rng.random() < config.procedural_fraction else pred
    else:
        pool = proc or pred
    ev = _choice(rng, pool)  # event first, so infeasible draws do not skew the event mix
    for _ in range(max_tries):
        p = _EVENTS[ev].sample(rng, config)
        if p is not None:
            return SceneSpec(ev, p)
    raise RuntimeError(f"sample_scene: no feasible {ev!r} scene in {max_tries} tries; canvas too small for {config}?")


def simulate(spec: SceneSpec, config: WorldConfig = WorldConfig()) -> list[list[dict]]:
    """Object states for all ``input_frames + target_frames`` steps."""
    return _EVENTS[spec.event].simulate(spec.params, config)


def scene_texts(spec: SceneSpec, config: WorldConfig = WorldConfig()) -> tuple[str, str, str]:
    """``(question, think, caption)`` -- a pure function of the scene parameters."""
    return _EVENTS[spec.event].texts(spec.params, config)


_GRIDS: dict = {}


def _grid(h, w):
    key = (h, w)
    if key not in _GRIDS:
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        _GRIDS[key] = (xx + 0.5, yy + 0.5)
    return _GRIDS[key]


def render(states: Sequence[Sequence[dict]], config: WorldConfig = WorldConfig()) -> np.ndarray:
    """Rasterise object states to ``uint8 (T, H, W, 3)`` frames."""
    h, w, wall = config.height, config.width, config.wall
    xx, yy = _grid(h, w)
    base = np.zeros((h, w, 3), np.uint8)
    base[:] = BG_RGB
    base[:wall], base[-wall:], base[:, :wall], base[:, -wall:] = WALL_RGB, WALL_RGB, WALL_RGB, WALL_RGB
    out = np.empty((len(states), h, w, 3), np.uint8)
    for t, objs in enumerate(states):
        f = base.copy()
        for o in objs:
            x, y, r = o["x"], o["y"], o["r"]
            sh = o["shape"]
            if sh == "circle":
                m = (xx - x) ** 2 + (yy - y) ** 2 <= r * r
            elif sh in ("square", "block"):
                m = (np.abs(xx - x) <= r) & (np.abs(yy - y) <= r)
            elif sh == "triangle":
                top = y - r
                m = (yy >= top) & (yy <= y + r) & (np.abs(xx - x) <= (yy - top) / 2.0 + 0.5)
            else:
                raise ValueError(f"unknown shape {sh!r}")
            f[m] = COLORS[o["color"]]
        out[t] = f
    return out


def render_scene(spec: SceneSpec, config: WorldConfig = WorldConfig()) -> tuple[np.ndarray, np.ndarray]:
    """``(input_frames, target_frames)`` uint8 clips of the scene."""
    frames = render(simulate(spec, config), config)
    return frames[: config.input_frames], frames[config.input_frames :]


def scene_hash(spec: SceneSpec, config: WorldConfig = WorldConfig()) -> str:
    blob = json.dumps({"scene": json.loads(spec.to_json()), "geometry": config.geometry()}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()


def split_of(spec_or_hash, config: WorldConfig = WorldConfig()) -> str:
    h = spec_or_hash if isinstance(spec_or_hash, str) else scene_hash(spec_or_hash, config)
    bucket = int(h[:8], 16) % 10
    for name, rng_ in _SPLIT_BUCKETS.items():
        if bucket in rng_:
            return name
    raise AssertionError(bucket)


def scene_from_row(row: VNEPRow) -> SceneSpec:
    """The hidden scene of a generated row (its ``scene`` column)."""
    return SceneSpec.from_json(row.extra["scene"])


def generate_world(
    out_dir,
    split: str,
    num_samples: int,
    seed: int | None = None,
    config: WorldConfig = WorldConfig(),
    *,
    write_videos: bool = True,
    max_tries_per_sample: int = 10_000,
) -> WorldSplit:
    """Write ``<out_dir>/<split>.csv`` and ``<out_dir>/videos/<split>_<i>/{0,1}.mp4``.

    The CSV is in the VANS-Data layout (paths relative to the video root
    ``<out_dir>/videos``) plus bookkeeping columns ``name``, ``kind``,
    ``event``, ``scene`` (JSON of the hidden parameters), ``scene_hash``,
    ``split``, ``fps``.  Videos are H.264 at ``config.fps``.
    """
    if split not in SPLITS:
        raise ValueError(f"generate_world: split must be one of {SPLITS}, got {split!r}")
    seed = SPLIT_SEEDS[split] if seed is None else int(seed)
    rng = np.random.default_rng(seed)
    out_dir = os.fspath(out_dir)
    video_root = os.path.join(out_dir, "videos")
    os.makedirs(video_root, exist_ok=True)
    seen: set[str] = set()
    rows, hashes, counts = [], [], Counter()
    for i in range(num_samples):
        for _ in range(max_tries_per_sample):
            spec = sample_scene(rng, config)
            h = scene_hash(spec, config)
            if h not in seen and split_of(h) == split:
                break
        else:
            raise RuntimeError(f"generate_world: could not find a new {split} scene after {max_tries_per_sample} tries")
        seen.add(h)
        name = f"{split}_{i:05d}"
        inp_rel, out_rel = f"{name}/0.mp4", f"{name}/1.mp4"
        if write_videos:
            inp, tgt = render_scene(spec, config)
            write_video(os.path.join(video_root, inp_rel), inp, fps=config.fps)
            write_video(os.path.join(video_root, out_rel), tgt, fps=config.fps)
        q, think, cap = scene_texts(spec, config)
        extra = {"name": name, "event": spec.event, "scene": spec.to_json(), "scene_hash": h,
                 "split": split, "fps": repr(float(config.fps))}
        rows.append(VNEPRow(i, inp_rel, out_rel, q, think, cap, spec.kind, extra))
        hashes.append(h)
        counts[spec.event] += 1
    csv_path = write_vnep_csv(rows, os.path.join(out_dir, f"{split}.csv"))
    return WorldSplit(split, seed, csv_path, video_root, rows, counts, hashes)


def world_texts(config: WorldConfig = WorldConfig()) -> list[str]:
    """Every question / think / caption the world can produce (sorted, unique):
    the corpus to train a tiny tokenizer on."""
    texts: set[str] = set()
    cols = list(COLORS)

    def add(ev, p):
        texts.update(_EVENTS[ev].texts(p, config))

    for c in cols:
        for d in DIRECTIONS:
            add("bounce", {"color": c, "dir": d})
            add("keep_moving", {"color": c, "dir": d})
        add("grow", {"color": c})
        add("shrink", {"color": c})
        add("fall", {"color": c})
        for c2 in cols:
            if c2 != c:
                add("collide", {"c1": c, "c2": c2})
                add("pass", {"c1": c, "c2": c2})
        for sh in SHAPES:
            for pat in _all_patterns():
                add("move_pattern", {"color": c, "shape": sh, "pattern": pat})
    import itertools

    for sh in SHAPES:
        for n in (2, 3):
            for cyc in itertools.permutations(cols, n):
                add("color_cycle", {"shape": sh, "cycle": list(cyc)})
    for orient in ("row", "stack"):
        for n in (1, 2, 3):
            for cyc in itertools.permutations(cols, n):
                add("build", {"orient": orient, "colors": list(cyc)})
    return sorted(texts)


def moving_square(num_frames: int = 12, height: int = 40, width: int = 56, color=(220, 40, 40), seed: int = 0):
    """A coloured square moving left to right over a textured background: uint8 (T, H, W, 3). Not a
    world scene: a generic input clip for demos, benchmarks and tests."""
    rng = np.random.default_rng(seed)
    bg = (rng.integers(0, 60, size=(height, width, 3)) + np.array([20, 70, 30])).astype(np.uint8)
    frames = np.repeat(bg[None], num_frames, axis=0)
    size = height // 3
    for t in range(num_frames):
        x = int(t * (width - size) / max(num_frames - 1, 1))
        y = height // 2 - size // 2
        frames[t, y:y + size, x:x + size] = color
    return frames


def split_plan(num_samples: int, split: str = "all") -> dict[str, int]:
    """Samples per split: ``all`` = 80 / 10 / 10 train / rl / eval (at least one each)."""
    if split != "all":
        return {split: num_samples}
    n_rl = n_eval = max(1, num_samples // 10)
    return {"train": max(1, num_samples - n_rl - n_eval), "rl": n_rl, "eval": n_eval}


def make_splits(output_dir: str, counts: dict[str, int], *, seed: int = 0, config: WorldConfig = WorldConfig(),
                tokenizer_corpus: bool = False) -> dict:
    """The world's splits under ``output_dir`` (``<split>.csv`` + ``videos/``), the one entry point
    (``vans-jax make-data``). Split ``s`` uses seed ``SPLIT_SEEDS[s] + 3 * seed``: the same ``seed``
    gives an identical CSV and identical decoded frames, different seeds different scenes, and the splits never share scenes.
    ``tokenizer_corpus`` also writes ``world_texts.txt`` (every caption/question the world uses)."""
    out = {}
    for split, n in counts.items():
        if split not in SPLIT_SEEDS:
            raise ValueError(f"unknown split {split!r}; expected one of {tuple(SPLIT_SEEDS)}")
        if n > 0:
            out[split] = generate_world(output_dir, split, n, seed=SPLIT_SEEDS[split] + 3 * seed, config=config)
    if tokenizer_corpus:
        path = os.path.join(output_dir, "world_texts.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.write("\n".join(world_texts(config)) + "\n")
        out["tokenizer_corpus"] = path
    return out
