"""The bench's `train` and `predict` sections: SFT-VLM / SFT-VDM steps of the world config and
`vans-jax predict` end to end on the shipped tiny models, timed with their spread, no reference."""
import json
import math

import pytest

from vans_jax.apps import cli
from vans_jax.apps.configlib import load_config


def positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.slow
def test_bench_times_sft_steps_and_predict(tmp_path):
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "--config", "configs/bench_cpu.py", "--output", str(out), "--config.reference=False",
                     "--config.sections=('train', 'predict')", "--config.train.steps=2", "--config.repeats=2"]) == 0
    result = json.loads(out.read_text())
    figs = {f["name"]: f for f in result["figures"]}
    assert list(figs) == ["train_sft_vlm_step", "train_sft_vdm_step", "predict"]
    for f in figs.values():
        o = f["ours"]
        assert o["repeats"] == 2 and 0 < o["min_s"] <= o["steady_s"] <= o["max_s"] and positive(o["warmup_s"]), f
        assert f["reference"] is None and f["verdict"] is None and f["reference_reason"], f
    vlm, vdm = figs["train_sft_vlm_step"], figs["train_sft_vdm_step"]
    assert vlm["shape"]["batch"] == vdm["shape"]["batch"] == 2 and vdm["shape"]["video"] == [9, 64, 64]
    world = load_config("tiny_world")
    assert vdm["shape"]["layers"] == world.vdm.model.num_layers and vdm["shape"]["dim"] == world.vdm.model.dim
    assert vlm["shape"]["layers"] == world.vlm.model.num_hidden_layers
    assert positive(vlm["metrics"]["loss"]) and positive(vdm["metrics"]["loss"])
    p = figs["predict"]
    assert positive(p["ours"]["load_s"]) and {"vlm_s", "vdm_s"} <= set(p["ours"]["phases_s"])
    assert p["shape"]["video"] == [9, 64, 64] and "| predict |" in (tmp_path / "bench.md").read_text()
