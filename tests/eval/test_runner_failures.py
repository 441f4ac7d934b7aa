"""`vans-jax eval` scores honestly: predictions are cross-checked against their CSV rows, and missing
or unreadable predictions count as failures in the headline numbers (coverage, exit code 1),
unless --exclude_missing."""
import json
import math
import os
import shutil

import pytest

from tests.eval.test_runner import CONFIG, GEOMETRY
from vans_jax.apps import cli
from vans_jax.data import synthetic as S
from vans_jax.eval import runner
from vans_jax.eval.text_metrics import tokenize

N = 4


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    root = tmp_path_factory.mktemp("fworld")
    return S.generate_world(root, "eval", N, seed=11), S.generate_world(root, "train", 2, seed=12)


def _predict(pred_dir, row, world, *, input_video_path=None, index=None, caption=None, video=True):
    """What `vans-jax predict --csv` writes for a row (answer.json records the row's input and index)."""
    d = pred_dir / str(row.index)
    d.mkdir(parents=True, exist_ok=True)
    cap = row.caption if caption is None else caption
    (d / "answer.json").write_text(json.dumps({
        "text": f"[Think]{row.think}[/Think][Ans]{cap}[/Ans]", "caption": cap, "think": row.think,
        "index": row.index if index is None else index,
        "input_video_path": row.input_video_path if input_video_path is None else input_video_path}))
    if video:
        shutil.copy(os.path.join(world.video_root, row.output_video_path), d / "answer.mp4")


def _eval_cli(pred, world, out, *extra):
    return cli.main(["eval", "--predictions", str(pred), "--csv", world.csv_path, "--video_root", world.video_root,
                     "--output", str(out), "--quiet", *GEOMETRY, *extra])


def test_predictions_of_another_split_are_an_error_naming_the_rows(worlds, tmp_path, capsys):
    ev, train = worlds
    pred = tmp_path / "made_on_train"
    for row in train.rows:                       # predict --csv train.csv: rows 0 and 1 of the train split
        _predict(pred, row, train)
    rc = _eval_cli(pred, ev, tmp_path / "r.json")
    err = capsys.readouterr().err
    assert rc == 2 and not (tmp_path / "r.json").exists()
    assert "does not match" in err and ev.csv_path in err and "2 of 2 predictions" in err
    for i in (0, 1):
        assert (f"row {i}: answer.json has input_video_path {train.rows[i].input_video_path!r}, "
                f"the CSV row {ev.rows[i].input_video_path!r}") in err
    # one wrong row among right ones is enough; a wrong recorded index is caught too
    pred2 = tmp_path / "one_wrong"
    for row in ev.rows:
        _predict(pred2, row, ev, video=False)
    _predict(pred2, ev.rows[2], ev, video=False, input_video_path=ev.rows[3].input_video_path)
    with pytest.raises(runner.PredictionMismatchError, match=r"1 of 4 predictions .*row 2: answer.json has "):
        runner.evaluate(str(pred2), ev.csv_path, ev.video_root, progress=False)
    _predict(pred2, ev.rows[2], ev, video=False, index=3)
    with pytest.raises(runner.PredictionMismatchError, match="row 2: answer.json records index 3"):
        runner.evaluate(str(pred2), ev.csv_path, ev.video_root, progress=False)
    _predict(pred2, ev.rows[2], ev, video=False)
    r = runner.evaluate(str(pred2), ev.csv_path, ev.video_root, progress=False)
    assert r["counts"]["unverified_predictions"] == 0 and r["complete"]   # text only: no video needed


def _partial(pred, ev):
    """Rows 0 and 1 perfect, row 2 without answer.json, row 3 with an unreadable one."""
    for row in ev.rows[:2]:
        _predict(pred, row, ev)
    (pred / "2").mkdir()
    (pred / "2" / "error.json").write_text(json.dumps({"reason": "input_video", "detail": "missing file"}))
    (pred / "3").mkdir()
    (pred / "3" / "answer.json").write_text("{truncated")


def test_missing_and_unreadable_predictions_are_failures(worlds, tmp_path, capsys):
    ev, _ = worlds
    pred = tmp_path / "partial"
    _partial(pred, ev)
    out = tmp_path / "partial.json"
    rc = _eval_cli(pred, ev, out, "--random_models")
    err = capsys.readouterr().err
    assert rc == 1 and "incomplete: 2 of 4 rows could not be scored (rows [2, 3]; scored as failures)" in err
    r = json.loads(out.read_text())
    assert r["complete"] is False and r["failed_rows"] == [2, 3] and r["scoring"] == "failures_count"
    assert r["coverage"] == {"text": 0.5, "video": 0.5}
    assert (r["counts"]["missing_prediction"], r["counts"]["invalid_prediction"]) == (1, 1)
    scored, all_ = r["splits"]["all"]["scored"], r["splits"]["all"]
    # the two predictions that exist are perfect ...
    assert scored["rouge_l"] == pytest.approx(1.0) and scored["bleu4"] == pytest.approx(1.0, abs=1e-8)
    assert scored["clip_v"] == pytest.approx(1.0, abs=1e-5) and scored["fvd"] == pytest.approx(0.0, abs=1e-5)
    # ... the headline counts the two failures: ROUGE-L and CLIP 0, BLEU an empty caption (brevity penalty)
    assert r["rouge_l"] == all_["rouge_l"] == pytest.approx(0.5)
    assert r["clip_v"] == pytest.approx(scored["clip_v"] / 2) and r["clip_t"] == pytest.approx(scored["clip_t"] / 2)
    c = sum(len(tokenize(row.caption)) for row in ev.rows[:2])
    ref = c + sum(len(tokenize(row.caption)) for row in ev.rows[2:])
    for n in (1, 4):                                         # precisions stay 1, BP = exp(1 - r / c)
        assert r[f"bleu{n}"] == pytest.approx(math.exp(1 - ref / c), rel=1e-6) and ref > c
    assert r["fvd"] is None and any("FVD cannot score a failure" in n for n in r["notes"])
    samples = {s["index"]: s for s in r["samples"]}
    assert "error.json: input_video: missing file" in samples[2]["detail"] and samples[3]["status"] == "invalid"
    md = (tmp_path / "partial.md").read_text()
    assert "coverage: text 50.0%, video 50.0%; INCOMPLETE" in md and "a failed row scores 0" in md
    assert "2 / 2 of 4 |" in md and "(an empty caption, 0 on every other metric)" in md

    # --exclude_missing: the headline is the scored subset; still exit 1, the output says so
    out2 = tmp_path / "existing.json"
    assert _eval_cli(pred, ev, out2, "--random_models", "--exclude_missing") == 1
    assert "left out: --exclude_missing" in capsys.readouterr().err
    r2 = json.loads(out2.read_text())
    assert r2["scoring"] == "exclude_missing" and r2["coverage"] == r["coverage"] and not r2["complete"]
    for m in runner.METRICS:
        assert r2[m] == pytest.approx(scored[m], abs=1e-9)
    assert r2["rouge_l"] == pytest.approx(1.0) and r2["fvd"] == pytest.approx(0.0, abs=1e-5)
    assert "not comparable with a complete run" in r2["notes"][0]


def test_a_partly_broken_run_no_longer_beats_a_complete_one(worlds, tmp_path):
    ev, _ = worlds
    partial, complete = tmp_path / "partial", tmp_path / "complete"
    _partial(partial, ev)
    for row in ev.rows[:2]:
        _predict(complete, row, ev, video=False)
    for row in ev.rows[2:]:                                  # complete, but two poor answers
        _predict(complete, row, ev, video=False, caption="A purple cube flies away slowly.")
    kw = dict(config=CONFIG, progress=False)
    p = runner.evaluate(str(partial), ev.csv_path, ev.video_root, **kw)
    c = runner.evaluate(str(complete), ev.csv_path, ev.video_root, **kw)
    assert c["complete"] and c["coverage"] == {"text": 1.0, "video": None}   # no video metrics: none needed
    for m in ("bleu1", "bleu2", "rouge_l"):
        assert p[m] < c[m], m
    # the old behaviour (failures dropped) ranked them the other way round
    p_old = runner.evaluate(str(partial), ev.csv_path, ev.video_root, exclude_missing=True, **kw)
    assert p_old["rouge_l"] > c["rouge_l"]


def test_complete_run_exits_0_and_headline_equals_scored(worlds, tmp_path, capsys):
    ev, _ = worlds
    pred = tmp_path / "all"
    for row in ev.rows:
        _predict(pred, row, ev, video=row.index != 1)        # no answer.mp4 for row 1: fine without video metrics
    assert _eval_cli(pred, ev, tmp_path / "a.json") == 0
    r = json.loads((tmp_path / "a.json").read_text())
    assert r["complete"] and r["failed_rows"] == [] and r["counts"]["missing_video"] == 1
    assert all(r[m] == r["splits"]["all"]["scored"][m] for m in runner.METRICS)
    assert "incomplete" not in capsys.readouterr().err
