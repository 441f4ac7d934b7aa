"""`vans-jax serve` without a browser or models: the arguments and `--help` need no Gradio, every bad
request becomes one sentence for the page (never a traceback), a failing model does not wedge the
server, answers are written as `predict` writes them, and only the last `keep` requests stay."""
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from vans_jax.apps import serve
from vans_jax.pipeline import VANSAnswer, VANSOutput, VANSSettings

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
S = VANSSettings(height=32, width=32, num_frames=5, fps=4.0, num_steps=2, cfg_scale=3.0, n_ref=0,
                 vlm_num_frames=2, vlm_sample_fps=2.0, reference_frames=5)


class FakePipe:
    """The pipeline's interface as ServeApp uses it; ``fail`` makes the next call raise."""

    def __init__(self):
        self.settings, self.sources, self.calls, self.fail = S, {"vlm": "fake", "vdm": "fake"}, [], None

    def resolve_settings(self, **kw):
        return self.settings.replace(**kw).validate()

    def __call__(self, clip, question, *, seed, num_futures, progress, **kw):
        self.calls.append(dict(question=question, seed=seed, num_futures=num_futures, **kw))
        if self.fail is not None:
            e, self.fail = self.fail, None
            raise e
        progress("VLM: ...")
        s = self.resolve_settings(**kw)
        answers = []
        for k in range(num_futures):
            a = VANSAnswer(question=question, text=f"[Think]t{k}[/Think][Ans]cap {k}[/Ans]", think=f"t{k}",
                           caption=f"cap {k}", valid_format=True, seed=seed + k, source="<fake>",
                           num_tokens=3)
            a.video = np.full((s.num_frames, s.height, s.width, 3), 40 * k, np.uint8)
            answers.append(a)
        return VANSOutput(answers, np.stack([a.video for a in answers]), s, {"vlm_s": 0.0, "vdm_s": 0.0})


@pytest.fixture
def still(tmp_path):
    from PIL import Image
    p = tmp_path / "still.png"
    Image.fromarray(np.full((40, 48, 3), 120, np.uint8)).save(p)
    return str(p)


def test_serve_help_needs_no_gradio():
    code = ("import sys\nfrom vans_jax.apps import cli\ntry:\n    cli.main(['serve', '--help'])\nexcept SystemExit:\n"
            "    pass\nassert 'gradio' not in sys.modules, 'gradio imported by --help'\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=ROOT))
    assert r.returncode == 0, r.stderr
    for flag in ("--vlm", "--vdm", "--dit", "--lora", "--mesh", "--host", "--port", "--num_steps"):
        assert flag in r.stdout


@pytest.mark.parametrize("make, question, expect", [
    (lambda d: None, "What next?", "Upload a video or a still image first"),
    (lambda d: _write(d / "notes.txt", b"hello"), "What next?", "is not a video or an image"),
    (lambda d: _write(d / "empty.mp4", b""), "What next?", "empty.mp4 is empty (0 bytes)"),
    (lambda d: _write(d / "broken.mp4", b"\x00" * 64 + os.urandom(500)), "What next?", "Could not read broken.mp4"),
    (lambda d: _write(d / "broken.png", b"\x89PNG not really"), "What next?", "Could not read broken.png"),
    (lambda d: str(d / "gone.mp4"), "What next?", "did not arrive"),
    ("still", "   ", "Type a question"),
])
def test_bad_requests_get_one_sentence(tmp_path, still, make, question, expect):
    pipe = FakePipe()
    app = serve.ServeApp(pipe, str(tmp_path / "out"), log=lambda m: None)
    upload = still if make == "still" else make(tmp_path)
    with pytest.raises(serve.ServeError) as e:
        app.respond(upload, question)
    assert expect in str(e.value)
    assert "Traceback" not in str(e.value) and str(tmp_path) not in str(e.value)    # no server paths either
    assert not pipe.calls                   # rejected before the models run


def _write(path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def test_futures_settings_and_files(tmp_path, still):
    pipe = FakePipe()
    seen = []
    app = serve.ServeApp(pipe, str(tmp_path / "out"), log=lambda m: None)
    r = app.respond(still, " What will happen next? ", num_steps=3, cfg_scale=2.5, seed=7, num_futures=3,
                    temperature=0.5, progress=lambda f, t: seen.append((f, t)))
    assert pipe.calls[-1] == dict(question="What will happen next?", seed=7, num_futures=3, num_steps=3,
                                  cfg_scale=2.5, temperature=0.5)
    assert [f["seed"] for f in r.futures] == [7, 8, 9] and r.caption == "cap 0" and r.think == "t0"
    assert len(r.videos) == 3 and all(os.path.isfile(v) for v in r.videos)
    data = json.loads(open(os.path.join(os.path.dirname(r.videos[2]), "answer.json")).read())
    assert data["caption"] == "cap 2" and data["seed"] == 9 and data["settings"]["num_steps"] == 3
    assert data["input"]["is_image"] is True
    assert os.path.isfile(r.strip)
    assert "3 future(s), 3 steps, CFG 2.5, seed 7" in r.status
    fracs = [f for f, _ in seen]
    assert fracs == sorted(fracs) and fracs[-1] == 1.0 and any(t.startswith("VLM") for _, t in seen)
    with pytest.raises(serve.ServeError, match="Number of futures must be 1 to 8"):
        app.respond(still, "q", num_futures=9)
    with pytest.raises(serve.ServeError, match="Settings not accepted"):
        app.respond(still, "q", num_steps=0)


def test_a_failing_model_does_not_wedge_the_server(tmp_path, still):
    pipe = FakePipe()
    logged = []
    app = serve.ServeApp(pipe, str(tmp_path / "out"), log=logged.append)
    pipe.fail = RuntimeError("device out of memory")
    with pytest.raises(serve.ServeError, match=r"Generation failed \(RuntimeError: device out of memory\)"):
        app.respond(still, "What next?")
    assert any("Traceback" in m for m in logged)         # the traceback goes to the server's log
    assert app.respond(still, "What next?").caption == "cap 0"     # the lock was released


def test_only_the_last_requests_are_kept(tmp_path, still):
    app = serve.ServeApp(FakePipe(), str(tmp_path / "out"), keep=2, log=lambda m: None)
    for _ in range(4):
        app.respond(still, "What next?")
    assert sorted(os.listdir(tmp_path / "out" / "requests")) == ["00003", "00004"]


def test_serve_without_gradio_says_how_to_install(monkeypatch, capsys):
    import importlib.util
    from vans_jax.apps import cli
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "gradio" else real(n, *a))
    assert cli.main(["serve"]) == 2
    assert 'pip install -e ".[app]"' in capsys.readouterr().err
