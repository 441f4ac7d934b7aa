"""`vans-jax demo`'s index.html (``demo.write_index``) on a tiny fake demo output directory (two
samples of the synthetic world, PyAV-written before/after answers): the page lists the metrics and
per sample the four videos with their captions, links them relatively, and in headless Chromium
every video loads (``readyState``, ``duration``, frame size)."""
import os
import time

import numpy as np
import pytest

from tests.apps.browser import chrome, save_screenshot
from vans_jax.apps import demo
from vans_jax.data import synthetic
from vans_jax.data.csv_format import read_vnep_csv
from vans_jax.data.video_io import write_video

F, H, W, FPS = 9, 64, 64, 4.0


@pytest.fixture(scope="module")
def fake_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    ws = synthetic.generate_world(str(out / "data"), "eval", 2)
    rows = list(read_vnep_csv(ws.csv_path))
    rng = np.random.default_rng(0)
    before, after = [], []
    for side, recs, cap in (("before", before, "the square stays <here>"), ("after", after, "the square turns green")):
        for r in rows:
            write_video(str(out / side / str(r.index) / "answer.mp4"),
                        rng.integers(0, 255, (F, H, W, 3), dtype=np.uint8), fps=FPS)
            m = {k: float(rng.random()) for k in demo.METRICS}
            recs.append(dict(index=int(r.index), question=r.question, gt_caption=r.caption, caption=cap, **m))
    mean = lambda recs: {k: float(np.mean([x[k] for x in recs])) for k in demo.METRICS} | {"num_samples": len(recs)}
    result = {"before": mean(before), "after": mean(after), "settings": {"stage1_steps": 2, "stage2_steps": 2}}
    path = demo.write_index(str(out), result, before, after, rows, os.path.join(str(out / "data"), "videos"))
    return {"out": out, "path": path, "rows": rows, "result": result}


def test_index_lists_metrics_videos_and_captions(fake_demo):
    html = open(fake_demo["path"], encoding="utf-8").read()
    for r in fake_demo["rows"]:
        i = r.index
        for src in (f"data/videos/{r.input_video_path}", f"data/videos/{r.output_video_path}",
                    f"before/{i}/answer.mp4", f"after/{i}/answer.mp4"):
            assert f'src="{src}"' in html and os.path.isfile(fake_demo["out"] / src)
        assert f'id="sample-{i}"' in html
    assert html.count("<video ") == 4 * len(fake_demo["rows"])
    assert "the square stays &lt;here&gt;" in html and "<here>" not in html        # escaped
    res = fake_demo["result"]
    for k in demo.METRICS:
        assert f"<td>{res['before'][k]:.4f}</td>" in html and f"{res['after'][k] - res['before'][k]:+.4f}" in html
    assert "http://" not in html and "https://" not in html and "<script" not in html    # self-contained


def test_index_videos_load_in_chromium(fake_demo, tmp_path):
    d = chrome()
    try:
        d.get("file://" + fake_demo["path"])
        js = ("return Array.from(document.querySelectorAll('video')).map(v => [v.readyState, v.duration, "
              "v.videoWidth, v.videoHeight, v.error ? v.error.code : 0]);")
        t_end = time.time() + 60
        while time.time() < t_end:
            states = d.execute_script(js)
            if states and all(s[0] >= 1 and s[1] > 0 for s in states):
                break
            time.sleep(0.5)
        assert len(states) == 4 * len(fake_demo["rows"])
        for s in states:
            assert s[4] == 0 and s[0] >= 1, states                 # no media error, metadata loaded
            assert s[2] > 0 and s[3] > 0, states
        answers = states[2::4] + states[3::4]                     # before / after of each sample
        assert all(abs(s[1] - F / FPS) < 0.3 and (s[2], s[3]) == (W, H) for s in answers), answers
        time.sleep(1.0)                                           # a frame of each painted for the picture
        assert os.path.getsize(save_screenshot(d, tmp_path, "demo_index.png")) > 10_000
    finally:
        d.quit()
