"""``vans-jax predict`` without noise: the default run (the shipped tiny models, no PyTorch) prints only
its own progress on stderr, an invalid response is reported once, the files it writes get the umask's
permissions, and a killed run's temporary files are cleaned by the next run."""
import os
import stat
import subprocess
import sys
import warnings

import numpy as np
import pytest

from tests.tiny import ROOT
from vans_jax import _files
from vans_jax.apps import predict
from vans_jax.pipeline import Clip, InvalidResponseWarning, VANSAnswer, VANSOutput, VANSSettings


def _dead_pid():
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)


@pytest.mark.slow
def test_default_predict_is_quiet_and_honours_the_umask(tmp_path):
    out = tmp_path / "pred"
    out.mkdir()
    # what a run killed while writing answer.json left behind
    stale = out / f"{_files.TMP_PREFIX}{_dead_pid()}-{_files._HOST}-0a1b-answer.json"
    stale.write_text('{"te')
    code = ("import os, sys\n"
            "os.umask(0o027)\n"
            "sys.modules['torch'] = None          # as on a machine without PyTorch\n"
            "from vans_jax.apps.cli import main\n"
            f"sys.exit(main(['predict', '--output_dir', {str(out)!r}]))\n")
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("TRANSFORMERS_NO_ADVISORY_WARNINGS", None)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "caption:" in proc.stdout
    noise = [line for line in proc.stderr.splitlines() if not line.startswith("[predict] ")]
    assert noise == [], noise           # no "ignoring unknown setting(s) ['world']", PyTorch or bos_token_id lines
    names = sorted(p.name for p in out.iterdir())
    assert names == ["answer.json", "answer.mp4", "answer_strip.png", "input.mp4"]    # the stale file is gone
    for name in names:
        assert stat.S_IMODE(os.stat(out / name).st_mode) == 0o640, name                # 0o666 & ~0o027


def test_an_invalid_response_is_reported_once(tmp_path):
    settings = VANSSettings(height=16, width=16, num_frames=1, fps=4.0)

    class Pipe:                     # the pipeline's side of it: a fallback answer and its warning
        sources = {"vlm": "v", "vdm": "d"}

        def __init__(self):
            self.settings = settings

        def __call__(self, clip, question, seed=0):
            warnings.warn(InvalidResponseWarning("1 of 1 VLM response(s) have no valid block"), stacklevel=2)
            a = VANSAnswer(question=question, text="[Ans]up[/Think][Ans]down", think="", caption="up down",
                           valid_format=False, seed=seed, source="clip", num_tokens=5,
                           video=np.zeros((1, 16, 16, 3), np.uint8))
            return VANSOutput([a], a.video[None], settings, {"vlm_s": 0.0, "vdm_s": 0.0})

    said = []
    clip = Clip(np.zeros((3, 16, 16, 3), np.uint8), 4.0, "clip")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = predict.predict_one(Pipe(), clip, "q", str(tmp_path), log=said.append)
    assert [w for w in caught if issubclass(w.category, InvalidResponseWarning)] == []
    assert len(said) == 1 and "no valid [Think]..[/Think][Ans]..[/Ans] block" in said[0]
    assert data["valid_format"] is False and data["caption"] == "up down"
