"""`vans-jax memory-plan` on the tiny config (a fresh process: it asks JAX for fake CPU devices):
every row's bytes add up, parameters match an independent count and shrink with sharding, LoRA
trains (and stores optimizer state for) a small part, remat lowers activations; mesh parsing."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from vans_jax.apps import memory_plan
from vans_jax.apps.configlib import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_parse_mesh():
    assert memory_plan.parse_mesh("1") == {}
    assert memory_plan.parse_mesh("8") == {"fsdp": 8}
    assert memory_plan.parse_mesh("fsdp=4, tensor=2") == {"fsdp": 4, "tensor": 2}
    with pytest.raises(ValueError, match="unknown axis 'model'"):
        memory_plan.parse_mesh("model=2")
    with pytest.raises(ValueError, match="positive integer"):
        memory_plan.parse_mesh("fsdp=0")
    assert memory_plan.output_paths("out/p.md") == ("out/p.json", "out/p.md")
    assert memory_plan.output_paths("out/p.json") == ("out/p.json", "out/p.md")


@pytest.mark.slow
def test_memory_plan_tiny(tmp_path):
    out = tmp_path / "plan.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "vans_jax.apps.cli", "memory-plan", "--config", "configs/tiny.py",
                           "--meshes", "1", "fsdp=2,tensor=2", "--remat", "none", "full", "--output", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    table = (tmp_path / "plan.md").read_text()
    rows = {(r["workload"], r["mesh_text"], r["remat"]): r for r in result["rows"]}
    assert len(rows) == 8 and set(result["workloads"]) == {"vlm_stage1", "dit_stage2"}
    for key, r in rows.items():
        b = r["bytes"]
        assert all(isinstance(b[k], int) and b[k] > 0 for k in b), key
        assert b["total"] == b["params"] + b["grads"] + b["optimizer"] + b["activations"], key
        # AdamW: two moments shaped (and sharded) like the gradients, plus a step count
        assert 2 * b["grads"] <= b["optimizer"] <= 2 * b["grads"] + 64, key
        assert set(r["fits"]) == {name for name, _ in memory_plan.ACCELERATORS} and all(r["fits"].values())
        assert f"| {r['mesh_text']} | {r['devices']} |" in table
    cfg = load_config("configs/tiny.py")
    for name in ("vlm_stage1", "dit_stage2"):
        one, sharded = rows[(name, "1", "none")], rows[(name, "fsdp=2,tensor=2", "none")]
        # parameters on one device = an independent count from the abstract model
        w = memory_plan.WORKLOAD_BUILDERS[name](cfg, memory_plan.PlanSettings())
        params = nnx.state(nnx.eval_shape(lambda: w.make_model("none")), nnx.Param)
        nbytes = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(params))
        assert one["bytes"]["params"] == nbytes and one["total_parameters"] == sum(
            int(np.prod(x.shape)) for x in jax.tree.leaves(params))
        # 4 devices: at most a quarter of every sharded parameter, never more than the whole
        assert nbytes / 4 <= sharded["bytes"]["params"] < nbytes, name
        assert rows[(name, "1", "full")]["bytes"]["activations"] < one["bytes"]["activations"], name
    vlm, dit = rows[("vlm_stage1", "1", "none")], rows[("dit_stage2", "1", "none")]
    assert vlm["trainable_parameters"] < vlm["total_parameters"] / 10          # LoRA only
    assert dit["trainable_parameters"] == dit["total_parameters"]               # full fine-tune
    assert dit["bytes"]["grads"] == dit["bytes"]["params"]
    assert vlm["batch"]["rows"] == cfg.train.grpo.group_size and vlm["batch"]["completion_tokens"] == 24
    assert rows[("vlm_stage1", "fsdp=2,tensor=2", "none")]["batch"]["rows_per_device"] == cfg.train.grpo.group_size / 2
    assert "Least recomputing remat policy that fits" in table


@pytest.mark.slow
def test_memory_plan_sequence_parallel_rows(tmp_path):
    """--seq-parallel adds DiT rows (only on meshes with a sequence axis) next to today's; a kind that
    cannot run on a mesh (Ulysses with heads that do not divide) is listed as not planned, with why."""
    out = tmp_path / "plan.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "vans_jax.apps.cli", "memory-plan", "--config", "configs/tiny.py",
                           "--workloads", "dit_stage2", "--meshes", "fsdp=2", "sequence=4", "--remat", "full",
                           "--seq-parallel", "none", "ring", "ulysses", "--output", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    rows = {(r["mesh_text"], r["seq_parallel"]): r for r in result["rows"]}
    assert set(rows) == {("fsdp=2", "none"), ("sequence=4", "none"), ("sequence=4", "ring")}
    none, ring = rows[("sequence=4", "none")]["bytes"], rows[("sequence=4", "ring")]["bytes"]
    assert ring["params"] == none["params"] and ring["activations"] > 0
    (sk,) = result["skipped"]
    assert sk["seq_parallel"] == "ulysses" and "2 heads per device do not divide" in sk["reason"]
    table = (tmp_path / "plan.md").read_text()
    assert "| sequence=4 | 4 | 1 video | full | ring |" in table and "not planned: dit_stage2 mesh sequence=4" in table
