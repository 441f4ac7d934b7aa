"""`vans-jax demo --quick` on the shipped tiny synthetic-world models (data/models/tiny_world): the
README's first command in a shortened form (a few eval samples, two Joint-GRPO steps per stage)."""
import json
import os

import pytest

from vans_jax.apps import cli
from vans_jax.apps.tiny_world import tiny_world_paths

pytestmark = pytest.mark.skipif(not os.path.isfile(tiny_world_paths()["defaults"]),
                                reason="the tiny world models are not built (python -m tools.tiny_world.build)")


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


def test_quick_compare_writes_every_variant(tmp_path):
    """`vans-jax demo --compare`: SFT, GRPO-on-VLM-only, stage 1 only and Joint-GRPO, scored on the same
    eval split; resumable (a second call finds every (variant, seed) done and trains nothing)."""
    out = tmp_path / "cmp"
    assert cli.main(["demo", "--compare", "--quick", "--seeds", "3", "--output_dir", str(out)]) == 0
    r = json.loads((out / "compare.json").read_text())
    assert set(r["runs"]) == {"grpo_vlm", "stage1", "joint_grpo"} and r["seeds"] == [3]
    for m in [r["sft"]] + [r["runs"][v]["3"] for v in r["runs"]]:
        assert m["num_samples"] == 4
        assert abs(m["total_reward"] - sum(m[k] for k in ("format", "rouge_l", "clip_v", "clip_t"))) < 1e-5
    assert r["summary"]["joint_grpo"]["clip_v"]["n"] == 1
    # stage 2 changed the DiT, so the Joint-GRPO videos differ from stage 1's (same captions' VLM)
    assert r["runs"]["joint_grpo"]["3"]["clip_v"] != r["runs"]["stage1"]["3"]["clip_v"]
    for mode in ("grpo_vlm", "grpo_stage1", "grpo_stage2"):
        assert json.loads((out / "runs" / "seed3" / mode / "final_metrics.json").read_text())["step"] == 2
    assert "Joint-GRPO (stage 1 + stage 2)" in (out / "compare.md").read_text()
    logs = {m: (out / "runs" / "seed3" / m / "metrics.jsonl").read_text() for m in ("grpo_vlm", "grpo_stage2")}
    assert cli.main(["demo", "--compare", "--quick", "--seeds", "3", "--output_dir", str(out)]) == 0
    assert json.loads((out / "compare.json").read_text())["runs"] == r["runs"]
    assert {m: (out / "runs" / "seed3" / m / "metrics.jsonl").read_text() for m in logs} == logs
