"""launch/gpu_check.sh --reduced: the one-call GPU check's every section on tiny models, on CPU, in
a fresh process (as on the GPU machine), writing its JSON; so the check cannot rot between the rare
sessions that have a GPU."""
import json
import os
import subprocess

import pytest

from vans_jax.apps import gpu_check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_full_config_is_the_issue_workload():
    c = gpu_check.check_config(reduced=False)
    assert c.dtype == "bfloat16" and c.wan.attn_impl == "auto" and c.vlm.attn_impl == "auto"
    assert (c.dit.n_ref, c.dit.target_frames, c.dit.height, c.dit.width) == (6, 9, 352, 640)   # 13,200 tokens
    assert (c.vlm.num_return_sequences, c.vlm.max_new_tokens) == (8, 256)
    assert (c.pipeline.num_steps, c.pipeline.height, c.pipeline.width, c.pipeline.num_frames) == (50, 352, 640, 33)
    assert c.pipeline.guidance_scale > 1 and c.wan.dit.num_layers == 30 and c.vlm.model.num_hidden_layers == 36


@pytest.mark.slow
def test_reduced_check_runs_on_cpu(tmp_path):
    out = tmp_path / "check.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(["bash", os.path.join(ROOT, "launch", "gpu_check.sh"), str(out), "--reduced"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    r = json.loads(out.read_text())
    assert r["reduced"] and r["errors"] == {} and list(r["section_seconds"]) == list(gpu_check.SECTIONS)
    assert r["threads"]["equal"] is True, r["threads"]     # the bench's equal threads, recorded
    s = r["summary"]
    names = {f["name"] for f in r["figures"]}
    assert {"matmul", "vlm_logits", "dit_forward", "vlm_generate", "pipeline_t2v"} <= names
    assert "dit_train_step" not in names and "pipeline_vans" not in names
    # parity against the references on the same weights (fp32 here: tight)
    assert s["dit_parity"]["parity_rel_err"] < 1e-3 and s["vlm_parity"]["parity_rel_err"] < 1e-3, s
    assert s["vlm_parity"]["argmax_agreement"] == 1.0
    assert s["dit_forward"]["ours_tflops_per_s"] > 0 and s["dit_forward"]["fraction_of_measured_matmul"] > 0
    assert s["captions"]["ours_steady_s"] > 0 and s["captions"]["reference_steady_s"] > 0
    assert s["generation"]["ours_steady_s"] > 0 and s["generation"]["reference_steady_s"] > 0
    assert set(s["targets"]["met"]) == {"pipeline_t2v_s", "dit_fraction_of_matmul", "vlm_generate_s"}
