import os

import numpy as np
import pytest

from vans_jax.data.video_io import (
    VideoError,
    probe_video,
    read_video,
    reference_clip,
    resample_indices,
    resize_center_crop,
    target_clip,
    write_video,
)


def _clip(t=9, h=48, w=64):
    """Smooth gradient + a moving block: compresses well, easy to compare."""
    yy, xx = np.mgrid[0:h, 0:w]
    frames = np.zeros((t, h, w, 3), np.uint8)
    for i in range(t):
        frames[i, ..., 0] = (xx * 255 // max(w - 1, 1)).astype(np.uint8)
        frames[i, ..., 1] = (yy * 255 // max(h - 1, 1)).astype(np.uint8)
        frames[i, ..., 2] = 40
        frames[i, 10:26, 4 + 4 * i: 20 + 4 * i] = (250, 250, 250)
    return frames


def test_roundtrip(tmp_path):
    frames = _clip()
    p = write_video(tmp_path / "sub" / "a.mp4", frames, fps=11)
    assert os.path.exists(p) and not [f for f in os.listdir(tmp_path / "sub") if f.startswith(".tmp")]
    out, fps = read_video(p)
    assert out.dtype == np.uint8 and out.shape == frames.shape
    assert fps == pytest.approx(11.0)
    err = np.abs(out.astype(np.int16) - frames.astype(np.int16))
    assert err.mean() < 3.0, err.mean()
    # the moving block is where it should be in every frame
    assert (out[:, 12:24, :, :].mean(-1) > 200).sum() > 0
    for i in range(frames.shape[0]):
        assert out[i, 18, 4 + 4 * i + 8].min() > 200
    info = probe_video(p)
    assert (info.num_frames, info.height, info.width) == (9, 48, 64) and info.fps == pytest.approx(11)
    assert probe_video(p, full_decode=True).exact
    first, _ = read_video(p, max_frames=2)
    assert first.shape[0] == 2
    # fractional fps survives
    p2 = write_video(tmp_path / "b.mp4", frames[:5], fps=4.0)
    assert read_video(p2)[1] == pytest.approx(4.0)


def test_odd_sizes_are_padded(tmp_path):
    frames = _clip(t=5, h=33, w=45)
    out, _ = read_video(write_video(tmp_path / "odd.mp4", frames, fps=8))
    assert out.shape == (5, 34, 46, 3)
    err = np.abs(out[:, :33, :45].astype(np.int16) - frames.astype(np.int16)).mean()
    assert err < 3.0


def test_bad_files_raise_video_error(tmp_path):
    with pytest.raises(VideoError) as ei:
        read_video(tmp_path / "missing.mp4")
    assert ei.value.reason == "missing" and "missing.mp4" in str(ei.value)
    junk = tmp_path / "junk.mp4"
    # fixed bytes: random ones are now and then probed as some container without a video stream
    # (reason "no_video_stream", seen once in CI)
    junk.write_bytes(b"this is not a video file\n" * 80)
    with pytest.raises(VideoError) as ei:
        read_video(junk)
    assert ei.value.reason == "corrupt" and "junk.mp4" in str(ei.value)
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(VideoError, match="empty.mp4"):
        read_video(empty)
    # truncated real file (moov atom lost)
    good = write_video(tmp_path / "g.mp4", _clip(t=5), fps=5)
    data = open(good, "rb").read()
    trunc = tmp_path / "trunc.mp4"
    trunc.write_bytes(data[: len(data) // 3])
    with pytest.raises(VideoError) as ei:
        read_video(trunc)
    assert ei.value.reason in ("corrupt", "empty")
    with pytest.raises(VideoError):
        probe_video(junk)
    with pytest.raises(ValueError, match="uint8"):
        write_video(tmp_path / "f.mp4", np.zeros((2, 8, 8, 3), np.float32))


@pytest.mark.parametrize("src", [(100, 200), (480, 640), (352, 640), (720, 1280), (640, 352), (30, 30)])
def test_resize_center_crop_sizes(src):
    h, w = src
    frames = np.zeros((2, h, w, 3), np.uint8)
    out = resize_center_crop(frames, 352, 640)
    assert out.shape == (2, 352, 640, 3) and out.dtype == np.uint8
    assert resize_center_crop(frames[0], 64, 96).shape == (64, 96, 3)


def test_resize_center_crop_keeps_the_centre():
    f = np.zeros((1, 100, 300, 3), np.uint8)
    f[:, 40:60, 140:160] = 255  # centre square
    f[:, :, :50] = 128  # left band: cropped away for a 1:1 target
    out = resize_center_crop(f, 50, 50, resample="bilinear")
    assert out[0, 25, 25].min() > 200 and out[0, 25, 2].max() == 0
    same = resize_center_crop(f, 100, 300)
    assert np.array_equal(same, f) and same is not f
    with pytest.raises(ValueError):
        resize_center_crop(f, 10, 10, resample="box-ish")


def test_target_clip_time_resampling_and_padding():
    fps = 30.0
    n = 40
    frames = np.zeros((n, 8, 8, 3), np.uint8)
    frames[..., 0] = np.arange(n, dtype=np.uint8)[:, None, None]  # frame id in red
    clip, valid = target_clip(frames, fps, num_frames=9, height=8, width=8, out_fps=11, return_valid=True)
    idx = np.floor(np.arange(9) * 30 / 11 + 0.5).astype(int)
    assert clip.shape == (9, 8, 8, 3) and valid == 9
    assert list(clip[:, 0, 0, 0]) == list(idx)
    # a short clip: 1 s at 30 fps -> 33 frames at 11 fps needs 3 s: last frame repeated
    clip, valid = target_clip(frames[:30], fps, num_frames=33, height=8, width=8, out_fps=11, return_valid=True)
    assert clip.shape[0] == 33 and valid == 11
    assert (clip[valid:, 0, 0, 0] == 29).all()
    with pytest.raises(ValueError, match="4k\\+1"):
        target_clip(frames, fps, num_frames=32, height=8, width=8)
    ind, v = resample_indices(10, 11, 11, 5)
    assert list(ind) == [0, 1, 2, 3, 4] and v == 5


def test_reference_clip_modes():
    frames = np.zeros((20, 8, 8, 3), np.uint8)
    frames[..., 0] = np.arange(20, dtype=np.uint8)[:, None, None]
    last, valid = reference_clip(frames, 10, num_frames=5, height=8, width=8, out_fps=10, return_valid=True)
    assert list(last[:, 0, 0, 0]) == [15, 16, 17, 18, 19] and valid == 5
    first = reference_clip(frames, 10, num_frames=5, height=8, width=8, out_fps=10, mode="first")
    assert list(first[:, 0, 0, 0]) == [0, 1, 2, 3, 4]
    uni = reference_clip(frames, 10, num_frames=5, height=8, width=8, mode="uniform")
    assert list(uni[:, 0, 0, 0]) == [0, 5, 10, 14, 19]
    short, valid = reference_clip(frames[:3], 10, num_frames=5, height=8, width=8, out_fps=10, return_valid=True)
    assert list(short[:, 0, 0, 0]) == [0, 0, 0, 1, 2] and valid == 3
    with pytest.raises(ValueError, match="4k\\+1"):
        reference_clip(frames, 10, num_frames=6, height=8, width=8)


def test_scan_cache_reuses_timelines_until_the_file_changes(tmp_path, monkeypatch):
    from vans_jax.data import video_io

    calls = []
    real = video_io.scan_video
    monkeypatch.setattr(video_io, "scan_video", lambda p: calls.append(p) or real(p))
    monkeypatch.setattr(video_io, "_scan_cache", video_io.collections.OrderedDict())
    p = write_video(tmp_path / "a.mp4", _clip(), fps=8)
    first = video_io.sample_video(p, {"x": ("clip", 4, 8.0)})
    again = video_io.sample_video(p, {"x": ("clip", 4, 8.0)})
    assert len(calls) == 1 and again.timeline is first.timeline
    np.testing.assert_array_equal(first.frames["x"], again.frames["x"])
    write_video(p, _clip(t=13), fps=8)                       # rewritten: scanned again
    assert video_io.sample_video(p, {"x": ("clip", 4, 8.0)}).timeline.num_frames == 13 and len(calls) == 2
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00" * 64)
    for _ in range(2):                                       # errors are not cached
        with pytest.raises(VideoError):
            video_io.sample_video(bad, {"x": ("clip", 4, 8.0)})
    assert calls.count(str(bad)) == 2
    monkeypatch.setattr(video_io, "SCAN_CACHE_SIZE", 1)
    video_io.sample_video(write_video(tmp_path / "b.mp4", _clip(), fps=8), {"x": ("clip", 4, 8.0)})
    assert list(video_io._scan_cache) and all(k[0].endswith("b.mp4") for k in video_io._scan_cache)
