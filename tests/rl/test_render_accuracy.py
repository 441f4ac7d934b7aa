import numpy as np
import pytest

from vans_jax.data import synthetic as S
from vans_jax.data.video_io import read_video, write_video
from vans_jax.rl.render_accuracy import (CONFUSION_LABELS, COLOR_NAMES, foreground_mask, mean_render_accuracy,
                                         pool_render_accuracy, render_accuracy)

CFG = S.WorldConfig()


def _clip(objs_per_frame):
    return S.render(objs_per_frame, CFG)


def _square(x, y, r=5, color="red"):
    return {"x": float(x), "y": float(y), "r": float(r), "shape": "square", "color": color}


def test_identical_frames_score_one():
    truth = _clip([[_square(20, 20), _square(44, 40, 4, "blue")]] * 3)
    r = render_accuracy(truth, truth)
    assert r["render_iou"] == 1.0 and r["render_color"] == 1.0
    assert r["render_color_groups"] == 6   # two colours in each of three frames
    # the mask holds the objects and nothing of the wall or the background
    m = foreground_mask(truth)
    assert m.sum() == 3 * (10 * 10 + 8 * 8)   # S.render's squares of half-size 5 and 4 are 10 and 8 wide


def test_shifted_recoloured_and_empty():
    truth = _clip([[_square(20, 20)]] * 2)                           # a 10x10 square
    shifted = _clip([[_square(25, 20)]] * 2)                         # 5 px right: overlap 5x10
    r = render_accuracy(shifted, truth)
    assert r["render_iou"] == pytest.approx(50 / (2 * 100 - 50))
    assert r["render_color"] == 1.0                                  # the overlap is red
    recoloured = _clip([[_square(20, 20, color="green")]] * 2)
    r = render_accuracy(recoloured, truth)
    assert r["render_iou"] == 1.0 and r["render_color"] == 0.0
    empty = _clip([[]] * 2)
    r = render_accuracy(empty, truth)
    assert r["render_iou"] == 0.0 and r["render_color"] == 0.0 and r["render_color_groups"] == 2
    # nothing to show and nothing shown: IoU 1, colour undefined
    r = render_accuracy(empty, empty)
    assert r["render_iou"] == 1.0 and np.isnan(r["render_color"]) and r["render_color_groups"] == 0
    # one frame right, one frame empty
    half = np.concatenate([truth[:1], empty[:1]])
    r = render_accuracy(half, truth)
    assert r["render_iou_per_frame"] == [1.0, 0.0] and r["render_color"] == 0.5


def test_two_colours_judged_separately_and_pooled_mean():
    truth = _clip([[_square(16, 32, 5, "red"), _square(46, 32, 5, "yellow")]])
    half_wrong = _clip([[_square(16, 32, 5, "red"), _square(46, 32, 5, "purple")]])
    r = render_accuracy(half_wrong, truth)
    assert r["render_color"] == 0.5 and r["render_iou"] == 1.0
    m = mean_render_accuracy([(truth, truth), (half_wrong, truth)])
    assert m["render_color"] == 0.75 and m["render_iou"] == 1.0 and m["num_clips"] == 2


def test_confusion_says_where_each_colour_went():
    R, Y, P = (COLOR_NAMES.index(c) for c in ("red", "yellow", "purple"))
    NONE = CONFUSION_LABELS.index("none")
    truth = _clip([[_square(16, 32, 5, "red"), _square(46, 32, 5, "yellow")]] * 2)
    # frame 0: red kept, yellow drawn purple; frame 1: red kept, yellow not drawn at all
    gen = _clip([[_square(16, 32, 5, "red"), _square(46, 32, 5, "purple")], [_square(16, 32, 5, "red")]])
    r = render_accuracy(gen, truth)
    c = np.asarray(r["render_color_confusion"])
    assert c.shape == (5, 6) and CONFUSION_LABELS[-1] == "none"
    assert c[R, R] == 2 and c[Y, P] == 1 and c[Y, NONE] == 1 and c.sum() == r["render_color_groups"] == 4
    assert np.trace(c[:, :5]) == r["render_color_right"] == 2
    # the colour is read in RGB: yellow dimmed to 60% (still foreground) is nearest red, at 80% still yellow
    for scale, read in ((0.8, Y), (0.6, R)):
        dim = (np.asarray(truth, np.float32) * scale).astype(np.uint8)
        assert np.asarray(render_accuracy(dim, truth)["render_color_confusion"])[Y, read] == 2
    # records that kept only the scalars (the demo's) pool as before, without the counts
    scalars = [{k: v for k, v in render_accuracy(g, truth).items() if k != "render_color_confusion"} for g in (gen, truth)]
    p = pool_render_accuracy(scalars)
    assert "render_color_confusion" not in p and p["render_color"] == 6 / 8
    pooled = mean_render_accuracy([(gen, truth), (truth, truth)])
    assert np.asarray(pooled["render_color_confusion"]).sum() == 8
    assert np.asarray(pooled["render_color_confusion"])[Y, Y] == 2 and pooled["render_color"] == 6 / 8


def test_survives_video_compression(tmp_path):
    # ground truth as the evaluation reads it (an mp4 of the world): the exact metric of a clip
    # against its own decoded copy stays at the top
    truth = _clip([[_square(20 + 2 * i, 20, 5, c) for c in ("green",)] + [_square(44, 44, 4, "purple")]
                   for i in range(5)])
    decoded, _ = read_video(write_video(tmp_path / "t.mp4", truth, fps=4.0))
    r = render_accuracy(decoded, truth)
    assert r["render_iou"] > 0.95 and r["render_color"] == 1.0


def test_bad_input_names_the_problem():
    a = _clip([[_square(20, 20)]] * 2)
    with pytest.raises(ValueError, match=r"differ in shape"):
        render_accuracy(a[:1], a)
    with pytest.raises(ValueError, match="uint8"):
        render_accuracy(a.astype(np.float32), a)


def test_blended_edges_of_a_decoded_truth_are_not_objects():
    # the evaluation's ground truth is a decoded mp4: the codec darkens a few pixels at a purple
    # object's edge to values like (36, 0, 64), which are foreground and nearest *red*. Such few-pixel
    # groups are not objects: a perfect render (the exact frames) gets every real object's colour right.
    exact = _clip([[_square(20, 20, 5, "purple"), _square(44, 44, 4, "yellow")]] * 2)
    truth = exact.copy()
    truth[:, 14, 26] = truth[:, 15, 26] = (36, 0, 64)          # just right of the purple square
    every = render_accuracy(exact, truth, min_group_pixels=1, color_tolerance=np.inf)
    assert every["render_color_groups"] == 6 and every["render_color"] == pytest.approx(4 / 6)
    counted = render_accuracy(exact, truth, color_tolerance=np.inf)   # 64x64: groups under 5 pixels dropped
    assert counted["render_color_groups"] == 4 and counted["render_color"] == 1.0
    # (36, 0, 64) is also far from every world colour, so the colour tolerance alone drops it too
    assert render_accuracy(exact, truth, min_group_pixels=1)["render_color_groups"] == 4
    # a real object as small as the world draws one is still counted: a 7x7 square (half-size 3)
    tiny = _clip([[_square(30, 30, 3, "blue")]])
    assert render_accuracy(tiny, tiny)["render_color_groups"] == 1


def test_codec_rims_far_from_every_colour_are_not_objects():
    # H.264 leaves a one-pixel (0, 0, 70) rim along a blue object's edge: foreground, nearest *green*
    # (194 from green, 194 from blue), and as long as the object's side, so the size rule keeps it
    from vans_jax.rl.render_accuracy import COLOR_TOLERANCE
    exact = _clip([[_square(30, 30, 5, "blue")]] * 2)
    truth = exact.copy()
    truth[:, 24, 25:36] = (0, 0, 70)                            # an 11-pixel rim just above the square
    assert exact[0, 24, 30].max() == 0 and exact[0, 26, 30].tolist() == list(S.COLORS["blue"])
    old = render_accuracy(exact, truth, color_tolerance=np.inf)  # grouped by nearest colour alone
    assert old["render_color_groups"] == 4 and old["render_color"] == pytest.approx(0.5)
    assert old["render_color_confusion"][COLOR_NAMES.index("green")][-1] == 2     # "green", nothing drawn
    r = render_accuracy(exact, truth)
    assert r["render_color_groups"] == 2 and r["render_color"] == 1.0
    # the tolerance is half the blue-purple distance; codec noise on a real colour stays inside it
    blue, purple = np.asarray(S.COLORS["blue"], float), np.asarray(S.COLORS["purple"], float)
    assert COLOR_TOLERANCE == pytest.approx(np.linalg.norm(blue - purple) / 2)
    noisy = truth.copy()
    noisy[:, 26:35, 26:35] = np.clip(noisy[:, 26:35, 26:35].astype(int) + (20, -20, -25), 0, 255)
    assert render_accuracy(exact, noisy)["render_color"] == 1.0
    # a render in the wrong colour is still wrong
    wrong = _clip([[_square(30, 30, 5, "purple")]] * 2)
    assert render_accuracy(wrong, truth)["render_color"] == 0.0
