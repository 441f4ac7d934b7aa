"""The evaluation runner and `vans-jax eval` on a tiny synthetic world with tiny random models."""
import json
import os
import shutil

import numpy as np
import pytest

from vans_jax.apps import cli
from vans_jax.data import synthetic as S
from vans_jax.data.csv_format import read_vnep_csv
from vans_jax.data.video_io import read_video, write_video
from vans_jax.eval import runner

N = 8
GEOMETRY = ["--num_frames", "9", "--height", "64", "--width", "64", "--fps", "4"]  # the world's own clips
CONFIG = runner.EvalConfig(num_frames=9, height=64, width=64, fps=4.0)
TABLE_COLUMNS = ("BLEU@1", "BLEU@2", "BLEU@3", "BLEU@4", "ROUGE-L", "FVD", "CLIP-V", "CLIP-T")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    ws = S.generate_world(tmp_path_factory.mktemp("eworld"), "eval", N, seed=5)
    kinds = [r.kind for r in ws.rows]
    assert kinds.count("procedural") == 3 and kinds.count("predictive") == 5  # the plan below relies on it
    return ws


@pytest.fixture(scope="module")
def models():
    return runner.random_models()


def _write(pred_dir, row, *, caption=None, video=None, text_only=False, fps=4.0):
    d = pred_dir / str(row.index)
    d.mkdir(parents=True, exist_ok=True)
    cap = row.caption if caption is None else caption
    text = f"[Think]{row.think}[/Think][Ans]{cap}[/Ans]"
    data = {"text": text} if text_only else {"text": text, "caption": cap, "think": row.think}
    (d / "answer.json").write_text(json.dumps(data))
    if video is not None:
        if isinstance(video, bytes):
            (d / "answer.mp4").write_bytes(video)
        else:
            write_video(str(d / "answer.mp4"), video, fps=fps)


def _perfect(pred_dir, world, row):
    _write(pred_dir, row)
    shutil.copy(os.path.join(world.video_root, row.output_video_path), pred_dir / str(row.index) / "answer.mp4")


def test_cli_perfect_predictions(world, tmp_path, capsys):
    pred = tmp_path / "perfect"
    for row in world.rows:
        _perfect(pred, world, row)
    out = tmp_path / "res" / "perfect.json"
    rc = cli.main(["eval", "--predictions", str(pred), "--csv", world.csv_path, "--video_root", world.video_root,
                   "--output", str(out), "--random_models", *GEOMETRY])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "[eval] 8/8 rows" in captured.err                       # progress
    assert "| Procedural |" in captured.out                        # the table is printed too
    r = json.loads(out.read_text())
    for b in ("procedural", "predictive", "all"):
        s = r["splits"][b]
        for n in range(1, 5):
            assert s[f"bleu{n}"] == pytest.approx(1.0, abs=1e-8)
        assert s["rouge_l"] == pytest.approx(1.0)
        assert s["clip_v"] == pytest.approx(1.0, abs=1e-5)
        assert -1.0 <= s["clip_t"] <= 1.0
        assert s["fvd"] == pytest.approx(0.0, abs=1e-5)
    assert (r["splits"]["procedural"]["num_rows"], r["splits"]["predictive"]["num_rows"]) == (3, 5)
    assert all(r[m] == r["splits"]["all"][m] for m in runner.METRICS)
    assert r["counts"]["missing_prediction"] == 0 and r["counts"]["video_evaluated"] == N
    assert r["models"]["random_models"] is True and any("RANDOM MODELS" in n for n in r["notes"])
    assert set(r["conventions"]) >= {"text", "clip_v", "clip_t", "fvd", "gt_video"}
    md = (tmp_path / "res" / "perfect.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| Benchmark"))
    assert all(c in header for c in TABLE_COLUMNS)
    assert "| Procedural | perfect |" in md and "| Predictive | perfect |" in md and "RANDOM MODELS" in md


def test_mixed_predictions_are_counted_not_fatal(world, models, tmp_path):
    rows = read_vnep_csv(world.csv_path)
    pred = tmp_path / "mixed"
    video_root = tmp_path / "videos"
    shutil.copytree(world.video_root, video_root)
    _perfect(pred, world, rows[0])                                              # predictive, perfect
    # rows[1]: no prediction at all
    _perfect(pred, world, rows[2])                                              # procedural, perfect
    _write(pred, rows[3])                                                       # procedural, no video
    gt4, _ = read_video(os.path.join(world.video_root, rows[4].output_video_path))
    _write(pred, rows[4], caption="A purple cube flies away slowly.", video=255 - gt4, fps=8.0)  # wrong, 8 fps
    (pred / str(rows[5].index)).mkdir()
    (pred / str(rows[5].index) / "answer.json").write_text("{not json")        # invalid
    _write(pred, rows[6], text_only=True, video=b"\x00garbage" * 50)           # caption from text; bad mp4
    _perfect(pred, world, rows[7])
    os.remove(video_root / rows[7].output_video_path)                          # ground truth unreadable
    (pred / "999").mkdir()                                                      # matches no row
    out = tmp_path / "mixed.json"

    r = runner.evaluate(str(pred), world.csv_path, str(video_root), str(out), models=models, config=CONFIG,
                        exclude_missing=True, progress=False)   # the scored subset (failures: test_runner_failures)
    c = r["counts"]
    assert (c["rows"], c["predictions"], c["missing_prediction"], c["invalid_prediction"]) == (8, 7, 1, 1)
    assert (c["missing_video"], c["bad_video"], c["gt_video_error"], c["fps_mismatch"]) == (1, 1, 1, 1)
    assert (c["text_evaluated"], c["video_evaluated"], c["unmatched_prediction_dirs"]) == (6, 3, 1)
    assert r["missing"]["missing_prediction"] == [1] and r["missing"]["invalid_prediction"] == [5]
    assert (r["missing"]["missing_video"], r["missing"]["bad_video"], r["missing"]["gt_video_error"]) == ([3], [6], [7])
    proc, predv, all_ = (r["splits"][b] for b in ("procedural", "predictive", "all"))
    assert (proc["num_text"], proc["num_video"], predv["num_text"], predv["num_video"]) == (3, 2, 3, 1)
    assert proc["bleu1"] < 0.9 and proc["rouge_l"] < 0.9                       # one wrong caption of three
    assert predv["bleu4"] == pytest.approx(1.0, abs=1e-8) and predv["rouge_l"] == pytest.approx(1.0)
    # (a random CLIP barely tells images apart: the inverted video scores a little below 1)
    assert proc["clip_v"] < 1.0 - 1e-5 and predv["clip_v"] == pytest.approx(1.0, abs=1e-5)
    assert proc["fvd"] > 1e-3 and all_["fvd"] > 1e-3
    assert predv["fvd"] is None and any("'predictive' is null" in n for n in r["notes"])
    samples = {s["index"]: s for s in r["samples"]}
    assert samples[1]["status"] == "missing" and samples[5]["status"] == "invalid"
    assert samples[6]["caption"] == rows[6].caption and samples[6]["video"] == "bad_video"
    assert samples[4]["clip_v"] < 1.0 - 1e-4 and samples[7]["video"] == "gt_video_error"
    md = (tmp_path / "mixed.md").read_text()
    assert "1 of 8 rows have no answer.json" in md and "frame rate is not 4 fps" in md and "| Predictive | mixed |" in md
    assert json.loads(out.read_text())["counts"] == c


def test_without_models_video_metrics_are_null(world, tmp_path):
    pred = tmp_path / "textonly"
    for row in world.rows[:3]:
        _perfect(pred, world, row)
    r = runner.evaluate(str(pred), world.csv_path, world.video_root, None, config=CONFIG, exclude_missing=True,
                        progress=False)
    assert r["bleu1"] == pytest.approx(1.0, abs=1e-8)
    assert r["clip_v"] is None and r["clip_t"] is None and r["fvd"] is None
    assert any("--clip DIR" in n for n in r["notes"]) and any("--i3d FILE" in n for n in r["notes"])
    assert r["counts"]["missing_prediction"] == N - 3 and r["models"]["random_models"] is False
    assert "| n/a | n/a | n/a |" in runner.markdown_table(r)


def test_cli_errors(world, tmp_path, capsys):
    base = ["--csv", world.csv_path, "--video_root", world.video_root, "--output", str(tmp_path / "x.json")]
    assert cli.main(["eval", "--predictions", str(tmp_path / "nope"), *base]) == 2
    assert "predictions directory not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli.main(["eval", "--predictions", str(tmp_path / "empty"), *base]) == 2
    assert "holds no prediction for any of the 8 rows" in capsys.readouterr().err
    assert cli.main(["eval", "--predictions", str(tmp_path / "empty"), *base, "--random_models",
                     "--clip", str(tmp_path)]) == 2
    assert "cannot be combined" in capsys.readouterr().err
    assert cli.main(["eval", "--predictions", str(tmp_path / "empty"), *base, "--num_frames", "10"]) == 2
    assert "4k+1" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_read_prediction_and_byte_tokenizer(tmp_path):
    (tmp_path / "3").mkdir()
    (tmp_path / "3" / "answer.json").write_text(json.dumps({"text": "[Think] a [/Think][Ans] b c [/Ans]"}))
    p = runner.read_prediction(str(tmp_path), 3)
    assert (p.status, p.caption, p.think, p.video_path) == ("ok", "b c", "a", None)
    assert runner.read_prediction(str(tmp_path), 4).status == "missing"
    (tmp_path / "5").mkdir()
    (tmp_path / "5" / "answer.json").write_text(json.dumps({"caption": 3}))
    assert runner.read_prediction(str(tmp_path), 5).status == "invalid"
    enc = runner.ByteTokenizer()(["ab", "x" * 100], max_length=8)
    assert enc["input_ids"][0].tolist() == [257, 98, 99, 258, 0, 0, 0, 0]
    assert enc["attention_mask"].sum(1).tolist() == [4, 8] and enc["input_ids"][1, -1] == 258
    assert np.asarray(enc["input_ids"]).shape == (2, 8)
