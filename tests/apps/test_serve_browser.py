"""`vans-jax serve` in a real browser: headless Chromium opens the page served by one Gradio server
(the shipped tiny-world models, 2 sampler steps), uploads a PyAV-written clip, submits, and waits
until the answer video has loaded a playable video of the right duration; a second test uploads a
broken file and finds the error message in the page, then the server still answers."""
import os
import time

import numpy as np
import pytest

from tests.apps.browser import chrome, save_screenshot
from vans_jax.apps.tiny_world import tiny_world_paths

pytestmark = pytest.mark.skipif(not os.path.isfile(tiny_world_paths()["defaults"]),
                                reason="the tiny world models are not built (python -m tools.tiny_world.build)")

STEPS = 2


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if os.environ.get("CI"):          # in the test extra: under CI a missing Gradio fails, never skips
        import gradio  # noqa: F401
    else:
        pytest.importorskip("gradio")
    from vans_jax.apps import serve
    from vans_jax.apps.predict import resolve_models
    from vans_jax.pipeline import VANSPipeline

    vlm, vdm, settings, _ = resolve_models()
    pipe = VANSPipeline.from_pretrained(vlm, vdm, dtype="float32", settings=settings.replace(num_steps=STEPS))
    out = tmp_path_factory.mktemp("serve")
    app = serve.ServeApp(pipe, str(out), examples=serve.write_examples(str(out / "examples"), 1), log=lambda m: None)
    page, url = serve.launch(app, "127.0.0.1", _free_port(), block=False)
    yield {"url": url, "app": app}
    page.close()


@pytest.fixture(scope="module")
def browser():
    d = chrome()
    yield d
    d.quit()


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(driver, script: str, timeout: float, what: str):
    t_end = time.time() + timeout
    while time.time() < t_end:
        v = driver.execute_script(script)
        if v:
            return v
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; status box: "
                         f"{driver.execute_script(STATUS_JS)!r}")


STATUS_JS = "const e = document.querySelector('#status'); return e ? e.innerText : null;"
VIDEO_JS = ("const v = document.querySelector('#answer_video video');"
            "return v && v.readyState >= 1 && v.duration > 0 ? [v.readyState, v.duration, v.videoWidth, "
            "v.videoHeight, v.currentSrc] : null;")


def _ask(driver, url: str, upload: str, question: str):
    from selenium.webdriver.common.by import By

    driver.get(url)
    _wait(driver, "return document.querySelector('#submit') !== null", 60, "the page")
    driver.find_element(By.CSS_SELECTOR, "#upload input[type=file]").send_keys(upload)
    stem, ext = os.path.splitext(os.path.basename(upload))      # the page shows them on two lines
    _wait(driver, f"const t = document.querySelector('#upload').innerText; "
                  f"return t.includes({stem!r}) && t.includes({ext!r});", 30, "the upload")
    box = driver.find_element(By.CSS_SELECTOR, "#question textarea")
    box.clear()
    box.send_keys(question)
    driver.find_element(By.CSS_SELECTOR, "#submit").click()


def test_upload_clip_and_watch_the_answer(server, browser, tmp_path):
    from vans_jax.apps.predict import _synthetic_clip
    from vans_jax.data.video_io import write_video

    frames, fps, question, _, _ = _synthetic_clip(3)          # a scene of the world the tiny models know
    clip = write_video(str(tmp_path / "clip.mp4"), frames, fps=fps)
    _ask(browser, server["url"], clip, question)
    state, duration, w, h, src = _wait(browser, VIDEO_JS, 600, "the answer video to load")
    s = server["app"].settings
    assert state >= 1 and (w, h) == (s.width, s.height)
    assert abs(duration - s.num_frames / s.fps) < 0.3, (duration, s.num_frames / s.fps)
    # the video element plays it: time advances
    t0 = browser.execute_script("const v = document.querySelector('#answer_video video'); v.muted = true; v.play(); "
                                "return v.currentTime;")
    _wait(browser, f"return document.querySelector('#answer_video video').currentTime != {t0}", 20, "playback")
    status = browser.execute_script(STATUS_JS)
    assert "Answered in" in status and f"{STEPS} steps" in status
    caption = browser.execute_script("return document.querySelector('#caption textarea').value")
    assert caption.strip()
    assert not browser.execute_script("const g = document.querySelector('#futures_gallery'); "
                                      "return g !== null && g.offsetParent !== null;")    # one future: no gallery
    req = sorted(os.listdir(os.path.join(server["app"].output_dir, "requests")))[-1]
    assert os.path.isfile(os.path.join(server["app"].output_dir, "requests", req, "0", "answer.json"))
    shot = save_screenshot(browser, tmp_path, "serve_answer.png")
    assert os.path.getsize(shot) > 10_000


def test_broken_upload_gets_a_message_and_the_server_keeps_serving(server, browser, tmp_path):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + np.random.default_rng(0).bytes(4000))
    _ask(browser, server["url"], str(bad), "What will happen next?")
    status = _wait(browser, "const e = document.querySelector('#status'); "
                            "return e && e.innerText.includes('Error') ? e.innerText : null;", 120, "the error message")
    assert "Could not read broken.mp4" in status, status
    assert "Traceback" not in browser.page_source
    save_screenshot(browser, tmp_path, "serve_error.png")
    # still serving: the same page answers a good request (a still image this time)
    from PIL import Image
    img = tmp_path / "still.png"
    Image.fromarray(np.full((64, 64, 3), (200, 40, 40), np.uint8)).save(img)
    _ask(browser, server["url"], str(img), "What will happen next?")
    _wait(browser, VIDEO_JS, 300, "the answer video after an error")
    assert "Answered in" in browser.execute_script(STATUS_JS)


def test_an_example_is_one_click_away(server, browser):
    """Clicking the synthetic-world example fills the upload and the question."""
    from selenium.webdriver.common.by import By

    path, question = server["app"].examples[0]
    browser.get(server["url"])
    _wait(browser, "return document.querySelector('#submit') !== null", 60, "the page")
    cell = next(e for e in browser.find_elements(By.CSS_SELECTOR, "td, button, div")
                if e.text.strip() == os.path.basename(path))
    cell.click()
    _wait(browser, "const t = document.querySelector('#upload').innerText; return t.includes('example_0');", 30,
          "the example in the upload")
    _wait(browser, f"return document.querySelector('#question textarea').value === {question!r}", 30,
          "the example's question")
