"""``vans-jax predict`` on tiny random model directories: one clip (answer.json, a decodable
answer.mp4 of the requested size/length/rate, the strip), determinism, the shipped-tiny-models
default, a CSV run that ``vans-jax eval`` reads, resuming, and clear errors."""
import dataclasses
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from tests import tiny as T  # noqa: E402
from vans_jax.apps import cli, predict  # noqa: E402
from vans_jax.data import synthetic  # noqa: E402
from vans_jax.data.video_io import read_video, write_video  # noqa: E402
from vans_jax.eval import runner  # noqa: E402
from vans_jax.pipeline import VANSSettings  # noqa: E402
from vans_jax.apps.tiny_world import ENV  # noqa: E402

Q = "What will happen next?"
SETTING_FLAGS = [x for k, v in T.SETTINGS.items() for x in (f"--{k}", str(v))]


@pytest.fixture(scope="module")
def dirs(tiny_vans):
    return tiny_vans


def run(*argv):
    return cli.main(["predict", *argv])


def models(d):
    return ["--vlm", d["vlm"], "--vdm", d["vdm"]]


def test_every_setting_is_a_flag():
    fields = {f.name: type(f.default) for f in dataclasses.fields(VANSSettings)}
    assert {k: t for k, (t, _) in predict.SETTING_ARGS.items()} == fields


@pytest.mark.slow
def test_one_clip(dirs, tmp_path, capsys):
    out = str(tmp_path / "0")
    assert run(*models(dirs), "--video", dirs["clip"], "--question", Q, "--output_dir", out, "--seed", "3",
               *SETTING_FLAGS) == 0
    assert "caption:" in capsys.readouterr().out
    data = json.load(open(os.path.join(out, "answer.json")))
    assert data["question"] == Q and data["seed"] == 3 and data["input_video"] == dirs["clip"]
    assert isinstance(data["text"], str) and data["text"] and data["valid_format"] is False   # random VLM
    assert data["caption"] == data["text"].strip() and data["fallback_used"] is True and data["think"] == ""
    assert data["settings"] == VANSSettings(**T.SETTINGS).to_dict()
    assert data["settings"]["num_steps"] == 2 and data["video_frames"] == T.F and data["video_size"] == [T.H, T.W]
    assert data["models"]["vlm"] == dirs["vlm"] and data["models"]["dit"] is None
    assert {"vlm_s", "vdm_s", "total_s"} <= set(data["timings"])
    assert data["input_frames"] == 12 and data["input_fps"] == pytest.approx(T.FPS)
    frames, fps = read_video(os.path.join(out, "answer.mp4"))
    assert frames.shape == (T.F, T.H, T.W, 3) and fps == pytest.approx(T.FPS)
    # strip: 6 input frames (40x56 -> 32x45), an 8 px gap, the 5 answer frames (32x48)
    strip = np.asarray(Image.open(os.path.join(out, "answer_strip.png")))
    assert strip.shape == (T.H, 6 * 45 + 8 + 5 * T.W, 3)
    assert np.all(strip[:, 6 * 45:6 * 45 + 8] == 255)
    # the eval runner reads it as a prediction
    pred = runner.read_prediction(str(tmp_path), 0)
    assert pred.status == "ok" and pred.caption == data["caption"] and pred.video_path

    # same seed, same everything (a fresh load)
    out2 = str(tmp_path / "again")
    assert run(*models(dirs), "--video", dirs["clip"], "--question", Q, "--output_dir", out2, "--seed", "3",
               "--no_strip", *SETTING_FLAGS) == 0
    again = json.load(open(os.path.join(out2, "answer.json")))
    assert again["text"] == data["text"] and not os.path.exists(os.path.join(out2, "answer_strip.png"))
    np.testing.assert_array_equal(read_video(os.path.join(out2, "answer.mp4"))[0], frames)


def test_cli_errors(dirs, tmp_path, capsys):
    out = str(tmp_path / "o")
    assert run("--vlm", dirs["vlm"], "--video", dirs["clip"], "--question", Q, "--output_dir", out) == 2
    assert "give both --vlm and --vdm" in capsys.readouterr().err
    assert run(*models(dirs), "--csv", "x.csv", "--output_dir", out) == 2
    assert "--csv needs --video_root" in capsys.readouterr().err
    assert run(*models(dirs), "--video", dirs["clip"], "--question", Q, "--output_dir", out, *SETTING_FLAGS,
               "--num_frames", "6") == 2
    assert "4k+1" in capsys.readouterr().err
    assert run(*models(dirs), "--video", str(tmp_path / "nope.mp4"), "--question", Q, "--output_dir", out,
               *SETTING_FLAGS) == 2
    assert "missing" in capsys.readouterr().err and not os.path.exists(os.path.join(out, "answer.json"))
    assert run(*models(dirs), "--video", dirs["clip"], "--question", Q, "--output_dir", out, *SETTING_FLAGS,
               "--height", "40") == 2
    assert "multiples of 16" in capsys.readouterr().err
    assert run(*models(dirs), "--video", dirs["clip"], "--question", "", "--output_dir", out, *SETTING_FLAGS) == 2
    assert "question 0 is empty" in capsys.readouterr().err
    assert run(*models(dirs), "--question", Q, "--output_dir", out, *SETTING_FLAGS) == 2
    assert "--video is required" in capsys.readouterr().err


def test_default_models_are_the_shipped_tiny_world(dirs, tmp_path, monkeypatch, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv(ENV, str(empty))
    with pytest.raises(FileNotFoundError, match="tiny synthetic-world models are missing"):
        predict.resolve_models()
    assert run("--output_dir", str(tmp_path / "o")) == 2
    assert "tiny synthetic-world models are missing" in capsys.readouterr().err

    # a world in the shipped layout: its defaults.json drives everything; no --video = a synthetic clip
    world = tmp_path / "world"
    world.mkdir()
    os.symlink(dirs["vlm"], world / "vlm")
    os.symlink(dirs["vdm"], world / "vdm")
    (world / "clip").mkdir()
    (world / "defaults.json").write_text(json.dumps(T.SETTINGS))
    monkeypatch.setenv(ENV, str(world))
    out = str(tmp_path / "tiny")
    assert run("--output_dir", out, "--num_steps", "3") == 0
    data = json.load(open(os.path.join(out, "answer.json")))
    assert data["settings"] == VANSSettings(**T.SETTINGS).replace(num_steps=3).to_dict()
    gt = data["ground_truth"]
    assert data["question"] == gt["question"] and gt["caption"] and data["input_video"].endswith("input.mp4")
    assert read_video(os.path.join(out, "input.mp4"))[0].shape[0] == synthetic.WorldConfig().input_frames
    assert read_video(os.path.join(out, "answer.mp4"))[0].shape == (T.F, T.H, T.W, 3)


@pytest.fixture(scope="module")
def world_csv(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("csv_world"))
    ws = synthetic.generate_world(root, "eval", 3)
    return ws.csv_path, ws.video_root, ws.rows


@pytest.mark.slow
def test_csv_run_resume_and_eval(dirs, world_csv, tmp_path, capsys):
    csv_path, video_root, rows = world_csv
    pred = str(tmp_path / "pred")
    hidden = str(tmp_path / "hidden.mp4")
    shutil.move(os.path.join(video_root, rows[1].input_video_path), hidden)     # row 1's input is missing
    args = [*models(dirs), "--csv", csv_path, "--video_root", video_root, "--output_dir", pred, "--batch_size", "2",
            *SETTING_FLAGS]
    assert run(*args) == 1                                                           # a failed row: exit 1
    printed = capsys.readouterr()
    assert "3 rows: 2 predicted, 0 already done, 1 failed" in printed.out and "[predict]" in printed.err
    for i in (0, 2):
        data = json.load(open(os.path.join(pred, str(i), "answer.json")))
        assert data["index"] == i and data["question"] == rows[i].question and data["seed"] == i
        assert read_video(os.path.join(pred, str(i), "answer.mp4"))[0].shape == (T.F, T.H, T.W, 3)
    err = json.load(open(os.path.join(pred, "1", "error.json")))
    assert err["reason"] == "input_video" and "missing" in err["detail"]
    assert not os.path.exists(os.path.join(pred, "1", "answer.json"))
    summary = json.load(open(os.path.join(pred, "predict_summary.json")))
    assert (summary["computed"], summary["failed"], summary["fallback_used"]) == (2, 1, 2)

    result = runner.evaluate(pred, csv_path, video_root, progress=False)
    assert result["counts"]["predictions"] == 2 and result["counts"]["missing_prediction"] == 1
    assert result["counts"]["text_evaluated"] == 2 and result["bleu1"] is not None

    # resume: row 0 is done; row 2 was "killed" after its video (no answer.json); row 1's video is back
    shutil.move(hidden, os.path.join(video_root, rows[1].input_video_path))
    row0 = os.path.join(pred, "0", "answer.json")
    stamp, text2 = os.stat(row0).st_mtime_ns, json.load(open(os.path.join(pred, "2", "answer.json")))["text"]
    video2 = read_video(os.path.join(pred, "2", "answer.mp4"))[0]
    os.remove(os.path.join(pred, "2", "answer.json"))
    assert not predict.is_finished(os.path.join(pred, "2")) and predict.is_finished(os.path.join(pred, "0"))
    assert run(*args) == 0
    assert "3 rows: 2 predicted, 1 already done, 0 failed" in capsys.readouterr().out
    assert os.stat(row0).st_mtime_ns == stamp
    assert not os.path.exists(os.path.join(pred, "1", "error.json"))
    assert os.path.isfile(os.path.join(pred, "1", "answer.json"))
    # row 2 redone in a batch of two (rows 1, 2) instead of alone: same text, the same video up to batch numerics
    assert json.load(open(os.path.join(pred, "2", "answer.json")))["text"] == text2
    assert np.abs(read_video(os.path.join(pred, "2", "answer.mp4"))[0].astype(int) - video2.astype(int)).mean() < 1.0
    assert run(*args) == 0 and "0 predicted, 3 already done" in capsys.readouterr().out


def test_csv_fallback_error(dirs, world_csv, tmp_path, capsys):
    csv_path, video_root, _ = world_csv
    pred = str(tmp_path / "strict")
    assert run(*models(dirs), "--csv", csv_path, "--video_root", video_root, "--output_dir", pred, "--limit", "1",
               *SETTING_FLAGS, "--fallback", "error") == 1
    err = json.load(open(os.path.join(pred, "0", "error.json")))
    assert err["reason"] == "invalid_response" and isinstance(err["text"], str)
    assert not os.path.exists(os.path.join(pred, "0", "answer.mp4"))
    assert "1 rows: 0 predicted, 0 already done, 1 failed" in capsys.readouterr().out


def test_csv_bad_row_does_not_sink_its_batch(dirs, world_csv, tmp_path, capsys):
    """A row the VLM cannot take (frames smaller than a 14x14 patch) fails alone: its batch is
    retried row by row and the other row is predicted."""
    from vans_jax.data.csv_format import write_vnep_csv

    _, video_root, rows = world_csv
    root = tmp_path / "videos"
    shutil.copytree(video_root, root)
    write_video(str(root / "small.mp4"), T.moving_square(num_frames=12, height=8, width=8), fps=T.FPS)
    csv_path = write_vnep_csv([rows[0], dataclasses.replace(rows[1], input_video_path="small.mp4")],
                              str(tmp_path / "mixed.csv"))
    pred = str(tmp_path / "pred")
    assert run(*models(dirs), "--csv", csv_path, "--video_root", str(root), "--output_dir", pred,
               "--batch_size", "2", *SETTING_FLAGS) == 1
    assert "2 rows: 1 predicted, 0 already done, 1 failed" in capsys.readouterr().out
    assert predict.is_finished(os.path.join(pred, "0"))
    err = json.load(open(os.path.join(pred, "1", "error.json")))
    assert err["reason"] == "error" and "14x14 patch" in err["detail"]


def test_world_config_describes_the_shipped_models():
    """configs/tiny_world.py sizes the DiT and VLM that the build trains and the memory plan and bench
    report; the shipped directories must be those sizes (a new DiT shipped without its config, or the
    reverse, fails here)."""
    from vans_jax.apps.configlib import load_config
    from vans_jax.apps.tiny_world import tiny_world_paths

    cfg = load_config("tiny_world")
    paths = tiny_world_paths(os.path.dirname(cfg.vdm.path))
    dit = json.load(open(os.path.join(paths["vdm"], "transformer", "config.json")))
    m = cfg.vdm.model
    assert (dit["num_attention_heads"] * dit["attention_head_dim"], dit["num_layers"], dit["num_attention_heads"],
            dit["ffn_dim"], dit["text_dim"], dit["freq_dim"], tuple(dit["patch_size"]), dit["in_channels"]) == \
        (m.dim, m.num_layers, m.num_heads, m.ffn_dim, m.text_dim, m.freq_dim, tuple(m.patch_size), m.in_channels)
    text = json.load(open(os.path.join(paths["vlm"], "config.json")))["text_config"]
    v = cfg.vlm.model
    assert (text["hidden_size"], text["intermediate_size"], text["num_hidden_layers"], text["num_attention_heads"],
            text["num_key_value_heads"]) == (v.hidden_size, v.intermediate_size, v.num_hidden_layers,
                                             v.num_attention_heads, v.num_key_value_heads)
