"""Training media in TensorBoard (train/media.py), read back with TensorBoard's own event reader
(``tensorboard.backend.event_processing.event_accumulator``): the rollout strip image, the
captions + reward-terms table, the completions and the reward / advantage histograms (synthetic
values), the same from a 2-step stage-2 run, the SFT-VDM renders of fixed captions, nothing on other steps."""
import io
import os

import numpy as np
import pytest

from tests.tiny import make_config
from vans_jax.train import loop, media
from vans_jax.train.metrics import create_writer

ea = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
SMALL = {"video.height": 32, "video.width": 32, "train.checkpoint_every": 0, "train.grpo.num_updates": 2,
         "train.grpo.clip_eps": 0.2}


def _read(logdir):
    acc = ea.EventAccumulator(str(logdir), size_guidance={ea.IMAGES: 0, ea.TENSORS: 0, ea.HISTOGRAMS: 0,
                                                          ea.SCALARS: 0})
    acc.Reload()
    return acc


def _text(acc, tag):
    # tensorboardX stores a text under TAG/text_summary (the text plugin's tensor summary)
    return [(e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors(tag + "/text_summary")]


def _image(event) -> np.ndarray:
    from PIL import Image
    return np.asarray(Image.open(io.BytesIO(event.encoded_image_string)))


def test_due():
    assert [s for s in range(1, 13) if media.due(4, s)] == [4, 8, 12]
    assert not any(media.due(0, s) for s in range(1, 10)) and not media.due(None, 3)


def test_grpo_media_round_trip(tmp_path):
    """Synthetic values through ``grpo_media`` and the clu writer, back through TensorBoard's reader."""
    g, f, h, w = 3, 5, 16, 16
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, (2 * g, f, h, w, 3), dtype=np.uint8)
    ex = [{"question": "What next?", "caption": "the red | square moves", "reference": frames[0, :3],
           "target": frames[1]}, {"question": "q2", "caption": "c2"}]
    rewards = {"v2": rng.random(2 * g), "c2": rng.random(2 * g)}
    adv = rng.normal(size=2 * g)
    caps = [f"caption {i}" for i in range(2 * g)]
    m = media.grpo_media(ex, caps, frames, rewards, adv, g, texts=[f"[Think]t{i}[/Think]" for i in range(2 * g)])
    writer = create_writer(str(tmp_path), asynchronous=False)
    media.write_media(writer, 7, m)
    writer.flush()
    writer.close()
    acc = _read(tmp_path)
    img = acc.Images("media/rollouts")
    assert [e.step for e in img] == [7]
    pic = _image(img[0])
    assert pic.shape[0] == (g + 2) * (media.THUMB + 4)              # input, truth, G rollouts
    # the first rollout's first frame is in its row, nearest-upscaled from 16 to 96 pixels
    y0, x0 = 2 * (media.THUMB + 4) + 2, media.LABEL_W
    assert np.array_equal(pic[y0:y0 + media.THUMB:6, x0:x0 + 96:6, :3], frames[0, 0])
    (step, table), = _text(acc, "media/rollouts_table")
    assert step == 7 and "the red \\| square moves" in table
    for i in range(g):
        assert f"| {i} | caption {i} | {rewards['v2'][i]:.4f} | {rewards['c2'][i]:.4f} | " \
               f"{rewards['v2'][i] + rewards['c2'][i]:.4f} | {adv[i]:+.4f} |" in table
    assert "caption 3" not in table                                  # the first prompt only
    assert "t2" in _text(acc, "media/completions")[0][1]
    for tag, values in (("media/reward/v2", rewards["v2"]), ("media/advantage", adv)):
        (hist,) = acc.Histograms(tag)
        assert hist.step == 7 and hist.histogram_value.num == 2 * g
        assert np.isclose(hist.histogram_value.sum, values.sum())


def test_stage2_run_writes_media(tiny_world, tmp_path):
    """A 2-step stage-2 run with ``train.log_media_every=2``: media at step 2 only, G rollouts shown."""
    cfg = make_config(tiny_world, str(tmp_path / "s2"), "grpo_stage2", **SMALL, **{"train.steps": 2,
                                                                                   "train.log_media_every": 2})
    loop.train(cfg, progress=False)
    acc = _read(tmp_path / "s2" / "tb")
    g = int(cfg.train.grpo.group_size)
    assert [e.step for e in acc.Images("media/rollouts")] == [2]
    pic = _image(acc.Images("media/rollouts")[0])
    assert pic.shape[0] == (min(g, media.MAX_ROLLOUTS) + 2) * (media.THUMB + 4)
    (step, table), = _text(acc, "media/rollouts_table")
    assert step == 2 and "| v2 | c2 | total | advantage |" in table
    assert sum(line.startswith("| ") and line[2].isdigit() for line in table.splitlines()) == g
    assert {"media/reward/v2", "media/reward/c2", "media/reward/total", "media/advantage"} <= \
        set(acc.Tags()["histograms"])
    assert acc.Histograms("media/advantage")[0].histogram_value.num == g * int(cfg.train.batch_size)
    assert "media/completions/text_summary" not in acc.Tags()["tensors"]           # stage 2 writes no completions
    assert [e.step for e in acc.Scalars("reward/total")] == [1, 2]    # the scalars are unchanged


@pytest.mark.parametrize("mode, tag", [("sft_vdm", "media/sft_vdm_captions")])   # stage 1's: the round trip
def test_sft_vdm_media(tiny_world, tmp_path, mode, tag):
    cfg = make_config(tiny_world, str(tmp_path / mode), mode, **SMALL, **{"train.steps": 1,
                                                                          "train.sft_vdm.log_media_every": 1})
    loop.train(cfg, progress=False)
    acc = _read(tmp_path / mode / "tb")
    assert [s for s, _ in _text(acc, tag)] == [1]
    if mode == "sft_vdm":
        n = min(int(cfg.train.media_samples), int(cfg.train.batch_size))
        pic = _image(acc.Images("media/sft_vdm_renders")[0])
        assert pic.shape[0] == 2 * n * (media.THUMB + 4)               # truth + render per caption
        assert _text(acc, tag)[0][1].count("**") == 2 * n
    else:
        assert acc.Images("media/rollouts")
