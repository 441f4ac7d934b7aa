"""Nothing lost, errors early: a finished run rerun changes nothing, a resumed run's metrics.jsonl
holds each step once, and what can be checked without the models (data files, work directory, the
mode of the run already there, the video size) is checked before any model loads."""
import json
import os

import numpy as np
import pytest

from tests.tiny import make_config
from vans_jax.train import loop
from vans_jax.train.checkpoint import Checkpointer


@pytest.fixture
def no_model_loads(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a model was loaded")
    monkeypatch.setattr(loop, "prepare_models", refuse)


def _steps(path):
    return [json.loads(line)["step"] for line in open(path).read().splitlines()]


def test_resume_drops_replayed_rows_then_a_finished_rerun_is_a_no_op(tiny_world, tmp_path, monkeypatch, capsys):
    work = str(tmp_path / "run")
    cfg = make_config(tiny_world, work, "sft_vlm", **{"train.steps": 4, "train.checkpoint_every": 2})
    loop.train(cfg, progress=False, stop_after=3)      # steps 1-3 logged, checkpoint at 2: step 3 is replayed
    jsonl = os.path.join(work, "metrics.jsonl")
    assert _steps(jsonl) == [1, 2, 3]
    with open(jsonl, "a") as f:
        f.write('{"loss": 1.0, "st')                    # a line cut short by a kill
    final = loop.train(cfg, progress=False)
    assert _steps(jsonl) == [1, 2, 3, 4]
    assert final["step"] == 4 and "loss" in final and set(final["exports"]) == {"vlm"}
    final_path = os.path.join(work, "final_metrics.json")
    before = open(final_path, "rb").read()
    exported = os.path.join(work, "export", "vlm", "model.safetensors")
    stamp = os.stat(exported).st_mtime_ns
    assert json.loads(before) == {k: v for k, v in final.items()}

    # the same command again: nothing loaded, trained, exported or rewritten; its results returned
    monkeypatch.setattr(loop, "prepare_models", lambda *a, **k: pytest.fail("a finished run loaded its models"))
    capsys.readouterr()
    again = loop.train(cfg, progress=True)
    assert "already finished (4 steps): nothing to do" in capsys.readouterr().out
    assert again == json.loads(before)
    assert open(final_path, "rb").read() == before and os.stat(exported).st_mtime_ns == stamp
    assert _steps(jsonl) == [1, 2, 3, 4]


def test_other_mode_in_workdir_is_refused_before_loading(tiny_world, tmp_path, no_model_loads):
    work = tmp_path / "run"
    ckpt = Checkpointer(str(work / "checkpoints"), every=1, use_async=False)
    ckpt.save(3, {"dit": {"w": np.zeros(2, np.float32)}}, {}, {"step": 3, "mode": "sft_vdm"})
    ckpt.close()
    with pytest.raises(ValueError, match=f"{work} holds a sft_vdm run; this command is sft_vlm"):
        loop.train(make_config(tiny_world, str(work), "sft_vlm"), progress=False)
    with pytest.raises(ValueError, match="holds a sft_vdm run at step 3, past this command's 2 steps"):
        loop.train(make_config(tiny_world, str(work), "sft_vdm", **{"train.steps": 2}), progress=False)


@pytest.mark.parametrize("override, error", [
    ({"data.train_csv": "/nonexistent/train.csv"}, "data CSV /nonexistent/train.csv does not exist"),
    ({"data.video_root": "/nonexistent/videos"}, "data.video_root /nonexistent/videos is not a directory"),
    ({"vlm.path": "/nonexistent/vlm"}, "vlm.path /nonexistent/vlm: the directory does not exist"),
])
def test_bad_paths_are_named_before_loading(tiny_world, tmp_path, no_model_loads, override, error):
    with pytest.raises((FileNotFoundError, ValueError), match=error):
        loop.train(make_config(tiny_world, str(tmp_path / "w"), "sft_vlm", **override), progress=False)


def test_workdir_that_is_a_file_and_bad_video_size_before_loading(tiny_world, tmp_path, no_model_loads):
    taken = tmp_path / "taken"
    taken.write_text("mine")
    with pytest.raises(ValueError, match=f"train.workdir {taken}: {taken} is a file"):
        loop.train(make_config(tiny_world, str(taken), "sft_vlm"), progress=False)
    assert taken.read_text() == "mine"
    with pytest.raises(ValueError, match="multiples of 16; got height=30, width=32"):
        loop.train(make_config(tiny_world, str(tmp_path / "w"), "sft_vdm", **{"video.height": 30}), progress=False)
    with pytest.raises(ValueError, match="4k\\+1 frames"):
        loop.train(make_config(tiny_world, str(tmp_path / "w"), "grpo_stage2", **{"video.num_frames": 8}),
                   progress=False)
