"""`vans-jax demo --quick` on the shipped tiny synthetic-world models (data/models/tiny_world): the
README's first command in a shortened form (a few eval samples, two Joint-GRPO steps per stage)."""
import json
import os

import pytest

from vans_jax import cli
from vans_jax.world import tiny_world_paths

pytestmark = pytest.mark.skipif(not os.path.isfile(tiny_world_paths()["defaults"]),
                                reason="the tiny world models are not built (python -m vans_jax.world.build)")


def test_quick_demo_writes_everything(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--quick", "--output_dir", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    for side in ("before", "after"):
        assert set(m[side]) >= {"total_reward", "rouge_l", "clip_v", "clip_t", "format"}
        assert m[side]["num_samples"] == 4
        assert abs(m[side]["total_reward"] - sum(m[side][k] for k in ("format", "rouge_l", "clip_v", "clip_t"))) < 1e-5
    for d in ("before", "after"):
        rows = [r for r in os.listdir(out / d) if (out / d / r / "answer.json").exists()]
        assert len(rows) == 4 and all((out / d / r / "answer.mp4").exists() for r in rows)
    assert (out / "contact_sheet.png").stat().st_size > 0
    for stage in ("grpo_stage1", "grpo_stage2"):
        assert any(f.startswith("events.out.tfevents") for f in os.listdir(out / "runs" / stage / "tb"))
        assert json.loads((out / "runs" / stage / "final_metrics.json").read_text())["step"] == 2
    assert "Joint-GRPO (after)" in (out / "metrics.md").read_text()
