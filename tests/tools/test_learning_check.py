"""The learning check's plumbing (a 1-step run) and the shuffled-advantage control."""
import json
import os

import numpy as np
import pytest

from vans_jax.apps.tiny_world import tiny_world_paths
from vans_jax.train.grpo import shuffle_within_groups


def test_shuffle_within_groups_keeps_each_group():
    adv = np.arange(12, dtype=np.float32)
    out = shuffle_within_groups(adv, 4, np.random.default_rng(0))
    assert out.shape == adv.shape and not np.array_equal(out, adv)
    for g in range(3):
        assert sorted(out[4 * g:4 * g + 4]) == sorted(adv[4 * g:4 * g + 4])   # only moved within its group
    again = shuffle_within_groups(adv, 4, np.random.default_rng(0))
    np.testing.assert_array_equal(out, again)                                 # deterministic per seed


@pytest.mark.skipif(not os.path.isfile(tiny_world_paths()["defaults"]), reason="the tiny world models are not built")
def test_quick_learning_check_runs_both_arms(tmp_path):
    from tools.learning_check import run
    r = run(str(tmp_path), steps=1, seeds=(0,), eval_prompts=2, quick=True, progress=False)
    saved = json.loads((tmp_path / "learning_check.json").read_text())
    assert saved["runs"] == r["runs"] and set(r["runs"]["0"]) == {"real", "shuffled"}
    assert all(np.isfinite(v) for v in [r["before"], *r["runs"]["0"].values()])
    assert (tmp_path / "learning_check.md").read_text().startswith("grpo_vdm")
    for ex in [r["before_extras"], *r["extras"]["0"].values()]:   # the renders' video metrics, whatever the reward
        assert set(ex) == {"clip_v", "clip_t", "render_iou"} and -1 <= ex["clip_v"] <= 1 and 0 <= ex["render_iou"] <= 1
    assert saved["extras"] == r["extras"]
    for arm in ("real", "shuffled"):
        rows = [json.loads(line) for line in open(tmp_path / "runs" / f"{arm}_s0" / "metrics.jsonl")]
        assert any(k.startswith("reward/") and k.endswith(":redness") for k in rows[-1])
