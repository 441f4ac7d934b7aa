"""Real-world videos (issue 16): streamed sampling, rotation, damaged files, variable frame rate.

Every input is written here with PyAV (a phone's display-matrix rotation, a VFR clip with our own
timestamps, truncated and byte-garbled mp4s), so the tests need no data files."""
import os
import subprocess
import sys
import warnings
from fractions import Fraction

import numpy as np
import pytest

from vans_jax.data.video_io import (
    VideoDamageWarning,
    VideoError,
    clip_indices,
    probe_video,
    read_video,
    reference_clip,
    sample_video,
    scan_video,
    target_clip,
    vlm_indices,
    write_video,
)
from vans_jax.models.qwen2_5_vl.processor import sample_frames_for_vlm

av = pytest.importorskip("av")


def _level_frames(n, h=32, w=48):
    """Frame i is a flat grey 8 + 20 * (i % 12) with a white top-left marker: identifiable after coding."""
    f = np.zeros((n, h, w, 3), np.uint8)
    for i in range(n):
        f[i] = 8 + 20 * (i % 12)
        f[i, :6, :6] = 255
    return f


def _which(frame):
    """The index (mod 12) a decoded _level_frames frame had."""
    return int(round((float(frame[8:, 8:].mean()) - 8) / 20))


def _encode(path, frames, *, rate=10, pts=None, time_base=None, gop=None, rotation=None, faststart=False,
            preset="medium"):
    c = av.open(str(path), "w", options={"movflags": "faststart"} if faststart else {})
    s = c.add_stream("libx264", rate=rate)
    s.height, s.width = frames.shape[1:3]
    s.pix_fmt = "yuv420p"
    s.options = {"crf": "18", "preset": preset, **({"g": str(gop), "keyint_min": str(gop)} if gop else {})}
    s.codec_context.thread_count = 1
    if time_base is not None:
        s.time_base = s.codec_context.time_base = time_base
    if rotation is not None:
        s.set_display_rotation(rotation)
    for i, a in enumerate(frames):
        vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(a), format="rgb24").reformat(format="yuv420p")
        if pts is not None:
            vf.pts, vf.time_base = pts[i], time_base
        for p in s.encode(vf):
            c.mux(p)
    for p in s.encode():
        c.mux(p)
    c.close()
    return str(path)


REQ = {"vlm": ("vlm", 6, 1.0), "ref": ("clip", 9, 5.0, "last"), "tgt": ("clip", 9, 5.0, "first")}


# ----------------------------------------------------------------------------- 1. only what is used

@pytest.mark.parametrize("n,fps", [(12, 8.0), (57, 5.5), (100, 30.0), (1, 11.0)])
def test_streamed_sampling_equals_the_whole_clip_rules(tmp_path, n, fps):
    """On constant-rate clips the timestamp rules pick exactly the frames the index rules pick."""
    p = write_video(tmp_path / "c.mp4", _level_frames(n), fps=fps)
    frames, rfps = read_video(p)
    for nv, sf, nr, of in [(6, 1.0, 9, 5.0), (4, 0.5, 33, 11.0), (6, 2.0, 5, 4.0)]:
        s = sample_video(p, {"vlm": ("vlm", nv, sf), "last": ("clip", nr, of, "last"),
                             "first": ("clip", nr, of, "first"), "uniform": ("clip", nr, of, "uniform")})
        vlm, vfps = sample_frames_for_vlm(frames, rfps, nv, sf)
        assert np.array_equal(s.frames["vlm"], vlm) and s.rates["vlm"] == pytest.approx(vfps)
        h, w = frames.shape[1:3]
        for mode in ("last", "uniform"):
            ref, valid = reference_clip(frames, rfps, nr, h, w, of, mode=mode, return_valid=True)
            assert np.array_equal(s.frames[mode], ref) and s.valid[mode] == valid, mode
        tgt, valid = target_clip(frames, rfps, nr, h, w, of, return_valid=True)
        assert np.array_equal(s.frames["first"], tgt) and s.valid["first"] == valid
        assert s.report.warning is None and s.report.decoded_frames == s.report.expected_frames == n


def test_long_clip_seeks_and_decodes_only_the_stretches_it_uses(tmp_path):
    """300 frames at 30 fps, a keyframe every 15: the VLM's 6 frames (0-5 s) and the last 9 frames
    at 5 fps decode from the keyframe before each; the middle is never decoded."""
    n = 300
    frames = _level_frames(n)
    p = _encode(tmp_path / "long.mp4", frames, rate=30, gop=15)
    s = sample_video(p, REQ, max_pixels=24 * 16)
    rep = s.report
    assert rep.decoded_frames == rep.expected_frames == n and rep.warning is None
    assert rep.frames_decoded_here < n // 2, rep           # seeking skipped most of the clip
    assert s.frames["vlm"].shape == (6, 16, 24, 3)           # scaled down to max_pixels as decoded
    # the VLM frames are frames 0, 30, ..., 150; the reference the last 9 of 50 re-timed frames
    assert [_which(f) for f in s.frames["vlm"]] == [(30 * k) % 12 for k in range(6)]
    assert [_which(f) for f in s.frames["ref"]] == [(6 * k) % 12 for k in range(41, 50)]
    full = sample_video(p, REQ)                              # same frames at full size
    assert np.array_equal(full.frames["vlm"], read_video(p)[0][::30][:6])


def _peak_rss_growth_mb(setup: str, call: str) -> float:
    """Peak resident memory a call adds in a fresh process over its size after ``setup`` (imports):
    VmHWM - VmRSS from /proc (``ru_maxrss`` would carry the forking pytest process' peak over)."""
    status = "dict(x.split(':', 1) for x in open('/proc/self/status'))"
    code = (f"{setup}\nbase = int({status}['VmRSS'].split()[0])\n{call}\n"
            f"print((int({status}['VmHWM'].split()[0]) - base) / 1024)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmRSS from /proc")
def test_memory_does_not_grow_with_the_clip(tmp_path):
    """Peak RSS the streamed reader adds on a 40 s clip vs a 2 s one (same size, 240x320): about
    equal; reading the whole 40 s clip (read_video) adds ~0.45 MB per frame."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)
    paths = {}
    for secs in (2, 40):
        frames = np.broadcast_to(base, (secs * 10, 240, 320, 3))
        paths[secs] = _encode(tmp_path / f"{secs}.mp4", frames, rate=10, gop=10, preset="ultrafast")
    setup = "from vans_jax.data.video_io import read_video, sample_video"
    call = "s = sample_video({!r}, {{'vlm': ('vlm', 6, 1.0), 'ref': ('clip', 33, 11.0, 'last')}})"
    short, long_ = (_peak_rss_growth_mb(setup, call.format(paths[s])) for s in (2, 40))
    whole = _peak_rss_growth_mb(setup, f"read_video({paths[40]!r})")
    print(f"peak RSS growth: 2 s clip {short:.0f} MB, 40 s clip {long_:.0f} MB, read_video {whole:.0f} MB")
    assert long_ < short + 20, (short, long_)
    assert whole > long_ + 100, (whole, long_)


# ----------------------------------------------------------------------------- 2. rotation

def test_display_matrix_rotation_comes_out_upright(tmp_path):
    """A phone's portrait clip: landscape pixels + a display matrix turning them 90 deg clockwise
    (``rotate=90``; PyAV/FFmpeg angle -90, counter-clockwise positive). The marker stored top-left
    is shown top-right, and the frames come out portrait."""
    frames = _level_frames(5, 32, 48)
    p = _encode(tmp_path / "rot.mp4", frames, rotation=-90)
    with av.open(p) as c:   # the file really carries it
        assert next(c.decode(video=0)).rotation == -90
    up, _ = read_video(p)
    assert up.shape == (5, 48, 32, 3)
    assert up[0, :5, -5:].min() > 200 and up[0, :5, :5].max() < 100       # marker top-right
    np.testing.assert_allclose(up[2].astype(float), np.rot90(frames[2], -1).astype(float), atol=12)
    s = sample_video(p, {"v": ("vlm", 2, 1.0)})
    assert s.frames["v"].shape == (2, 48, 32, 3) and s.report.rotation == -90
    assert np.array_equal(s.frames["v"][0], up[0])
    assert (probe_video(p).height, probe_video(p).width) == (48, 32)
    assert (probe_video(p, full_decode=True).height, probe_video(p, full_decode=True).width) == (48, 32)
    p180 = _encode(tmp_path / "r180.mp4", frames, rotation=180)
    assert read_video(p180)[0][0, -5:, -5:].min() > 200                     # marker bottom-right


def test_exif_orientation_of_a_still_image(tmp_path):
    from PIL import Image

    from vans_jax.pipeline import load_clip

    a = np.full((30, 40, 3), 90, np.uint8)
    a[:6, :6] = 255
    exif = Image.Exif()
    exif[0x0112] = 6        # "rotate 90 CW to display"
    path = tmp_path / "photo.jpg"
    Image.fromarray(a).save(path, quality=95, exif=exif)
    clip = load_clip(str(path))
    assert clip.is_image and clip.frames.shape == (1, 40, 30, 3)
    assert clip.frames[0, :4, -4:].min() > 200 and clip.frames[0, :4, :4].max() < 150
    with Image.open(path) as im:     # a PIL image handed over directly is turned upright too
        assert load_clip(im).frames.shape == (1, 40, 30, 3)


# ----------------------------------------------------------------------------- 3. damaged files

@pytest.fixture()
def noisy_mp4(tmp_path):
    """60 frames of noise (every frame about the same size) at 10 fps, moov first (a cut file opens)."""
    frames = np.random.default_rng(0).integers(0, 256, (60, 48, 64, 3), dtype=np.uint8)
    return _encode(tmp_path / "noisy.mp4", frames, rate=10, faststart=True)


def test_half_truncated_video_is_an_error_naming_both_numbers(noisy_mp4, tmp_path):
    data = open(noisy_mp4, "rb").read()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(VideoError) as ei:
        sample_video(cut, REQ)
    e = ei.value
    assert e.reason == "damaged" and "cut.mp4" in str(e) and "of 60 frames" in str(e) and "6.00 s" in str(e)
    decoded = int(str(e).split("(")[1].split(" of")[0])
    assert 20 <= decoded <= 35
    with pytest.raises(VideoError, match="damaged: .*cut.mp4.* of 60 frames decoded"):   # validate-data's check
        probe_video(cut, full_decode=True)
    assert probe_video(noisy_mp4, full_decode=True).num_frames == 60


def test_slightly_truncated_video_warns_and_reports(noisy_mp4, tmp_path):
    data = open(noisy_mp4, "rb").read()
    cut = tmp_path / "tail.mp4"
    cut.write_bytes(data[: int(len(data) * 0.9)])
    with pytest.warns(VideoDamageWarning, match="tail.mp4"):
        s = sample_video(cut, REQ)
    r = s.report
    assert r.expected_frames == 60 and 45 <= r.decoded_frames < 58 and r.decoded_duration < 5.9
    assert r.warning and f"{r.decoded_frames} of 60 frames" in r.warning
    d = r.to_dict()
    assert d["decoded_frames"] == r.decoded_frames and d["expected_frames"] == 60
    # the reference is the last frames that decoded, not frames from before the damage point
    last_good = r.decoded_frames - 1
    ref_idx, _ = clip_indices(s.timeline, 9, 5.0, "last")
    assert ref_idx[-1] >= last_good - 1


def test_garbled_video_warns_then_fails(noisy_mp4, tmp_path):
    data = bytearray(open(noisy_mp4, "rb").read())
    rng = np.random.default_rng(1)
    light = bytearray(data)
    pos = int(len(data) * 0.6)
    light[pos:pos + 3000] = rng.integers(0, 256, 3000, dtype=np.uint8).tobytes()
    (tmp_path / "light.mp4").write_bytes(bytes(light))
    with pytest.warns(VideoDamageWarning, match="decode error"):
        s = sample_video(tmp_path / "light.mp4", REQ)
    assert s.report.decode_errors >= 1 and s.report.decoded_frames < 60
    heavy = bytearray(data)
    start = len(data) // 5          # behind the moov atom: the frames, not the index
    for off in range(start, len(data) - 500, 1500):
        heavy[off:off + 400] = rng.integers(0, 256, 400, dtype=np.uint8).tobytes()
    (tmp_path / "heavy.mp4").write_bytes(bytes(heavy))
    with pytest.raises(VideoError) as ei:
        sample_video(tmp_path / "heavy.mp4", REQ)
    assert ei.value.reason in ("damaged", "corrupt") and "heavy.mp4" in str(ei.value)


# ----------------------------------------------------------------------------- 4. variable frame rate

def test_variable_frame_rate_is_sampled_by_timestamps(tmp_path):
    times_ms = [0, 100, 150, 900, 1000, 1700, 2600, 2650, 3100, 4000, 4500, 5200]
    frames = _level_frames(len(times_ms))
    p = _encode(tmp_path / "vfr.mp4", frames, rate=30, pts=times_ms, time_base=Fraction(1, 1000))
    tl = scan_video(p)
    np.testing.assert_allclose(tl.times, np.array(times_ms) / 1000)
    s = sample_video(p, {"vlm": ("vlm", 6, 1.0), "tgt": ("clip", 9, 2.0, "first")})

    def nearest(t):    # the frame shown nearest t (ties: the later one), by plain float arithmetic
        d = np.abs(np.array(times_ms) / 1000 - t)
        return int(np.flatnonzero(d == d.min())[-1])

    want_vlm = [nearest(k) for k in range(6)]                  # 0 s, 1 s, ..., 5 s
    assert want_vlm == [0, 4, 5, 8, 9, 11]                     # frame counting would give 0..5
    assert [_which(f) for f in s.frames["vlm"]] == want_vlm
    assert [_which(f) for f in s.frames["tgt"]] == [nearest(k / 2) for k in range(9)]
    assert s.valid["tgt"] == 9 and s.report.warning is None
    idx, fps = vlm_indices(tl, 6, 1.0)
    assert list(idx) == want_vlm and fps == 1.0


# ----------------------------------------------------------------------------- answer.json's "input"

class _FakePipe:
    """Stands in for VANSPipeline in predict_one: records the clip it got, answers a fixed video."""

    def __init__(self, settings):
        self.settings, self.sources, self.clips = settings, {"vlm": "fake", "vdm": "fake"}, []

    def __call__(self, clip, question, seed=0):
        from vans_jax.pipeline import VANSAnswer, VANSOutput

        s = self.settings
        self.clips.append(clip)
        self.vlm = clip.vlm_input(s)
        self.ref = clip.reference_input(s)
        video = np.zeros((s.num_frames, s.height, s.width, 3), np.uint8)
        a = VANSAnswer(question, "[Think]t[/Think][Ans]c[/Ans]", "t", "c", True, seed, clip.source, 3, video)
        return VANSOutput([a], video[None], s, {"vlm_s": 0.0, "vdm_s": 0.0})


def test_answer_json_records_how_the_input_read(noisy_mp4, tmp_path):
    import json

    from vans_jax.apps.predict import predict_one, prepare_input
    from vans_jax.pipeline import VANSSettings

    s = VANSSettings(height=32, width=48, num_frames=5, reference_frames=9, fps=5.0, vlm_num_frames=4)
    data = open(noisy_mp4, "rb").read()
    cut = tmp_path / "tail.mp4"
    cut.write_bytes(data[: int(len(data) * 0.9)])
    with pytest.warns(VideoDamageWarning):
        clip, q, extra = prepare_input(str(cut), "what next?", str(tmp_path / "out"), settings=s)
    assert clip.frames is None and clip.sampled is not None      # not decoded whole
    pipe, logs = _FakePipe(s), []
    rec = predict_one(pipe, clip, q, str(tmp_path / "out"), extra=extra, log=logs.append)
    inp = rec["input"]
    assert inp["expected_frames"] == 60 and 45 <= inp["decoded_frames"] < 58
    assert inp["decoded_frames"] == rec["input_frames"] and inp["expected_duration_s"] == pytest.approx(6.0)
    assert f"{inp['decoded_frames']} of 60 frames" in inp["warning"] and "tail.mp4" in inp["warning"]
    assert any("damaged video" in m for m in logs)
    assert json.load(open(tmp_path / "out" / "answer.json"))["input"] == inp
    assert pipe.vlm[0].shape == (4, 48, 64, 3) and pipe.ref.shape == (9, 32, 48, 3)
    assert os.path.exists(tmp_path / "out" / "answer_strip.png")
    # other settings than the clip was loaded with: it reads the file again for them
    frames6, _ = clip.vlm_input(s.replace(vlm_num_frames=6))
    assert frames6.shape[0] == 6 and clip.sample_key[0] == 6
    # a clean file: no warning, the numbers agree; the settings-driven sampling is the one used
    rec = predict_one(_FakePipe(s), prepare_input(noisy_mp4, "q", str(tmp_path / "o2"), settings=s)[0], "q",
                      str(tmp_path / "o2"), log=logs.append)
    assert rec["input"]["warning"] is None and rec["input"]["decoded_frames"] == rec["input"]["expected_frames"] == 60
    # too damaged: prepare_input fails before any model would load
    half = tmp_path / "half.mp4"
    half.write_bytes(data[: len(data) // 2])
    with pytest.raises(VideoError, match="half.mp4"):
        prepare_input(str(half), "q", str(tmp_path / "o3"), settings=s)
