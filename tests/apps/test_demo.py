"""`vans-jax demo`: the quick end-to-end run on the shipped tiny synthetic-world models
(data/models/tiny_world), the comparison's order / hand-over / resume logic with training and
scoring stubbed, the in-memory hand-over of models between the stages (what the exports reload
as), and the one scoring core shared with `vans-jax eval`."""
import dataclasses
import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from vans_jax.apps import cli
from vans_jax.apps import demo
from vans_jax.apps.tiny_world import tiny_world_paths

needs_world = pytest.mark.skipif(not os.path.isfile(tiny_world_paths()["defaults"]),
                                 reason="the tiny world models are not built (python -m tools.tiny_world.build)")


@needs_world
def test_quick_demo_writes_everything(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--quick", "--output_dir", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    for side in ("before", "after"):
        assert set(m[side]) >= {"total_reward", "rouge_l", "clip_v", "clip_t", "format"}
        assert m[side]["num_samples"] == 4
        assert abs(m[side]["total_reward"] - sum(m[side][k] for k in ("format", "rouge_l", "clip_v", "clip_t"))) < 1e-5
        assert 0.0 <= m[side]["render_iou"] <= 1.0 and 0.0 <= m[side]["render_color"] <= 1.0   # exact diagnostics
    for d in ("before", "after"):
        rows = [r for r in os.listdir(out / d) if (out / d / r / "answer.json").exists()]
        assert len(rows) == 4 and all((out / d / r / "answer.mp4").exists() for r in rows)
    assert (out / "contact_sheet.png").stat().st_size > 0
    page = (out / "index.html").read_text()        # demo.write_index (tests/apps/test_demo_html.py: in Chromium)
    assert page.count("<video ") == 4 * 4 and 'src="after/' in page and "Joint-GRPO (after)" in page
    for stage in ("grpo_stage1", "grpo_stage2"):
        assert any(f.startswith("events.out.tfevents") for f in os.listdir(out / "runs" / stage / "tb"))
        assert json.loads((out / "runs" / stage / "final_metrics.json").read_text())["step"] == 2
    assert (out / "runs" / "grpo_stage1" / "export" / "vlm" / "config.json").exists()      # exports still written
    assert (out / "runs" / "grpo_stage2" / "export" / "vdm" / "transformer").is_dir()
    assert "vlm/loss" in m["training"]["stage1"] and "dit/loss" in m["training"]["stage2"]
    assert "Joint-GRPO (after)" in (out / "metrics.md").read_text()
    st = m["settings"]                             # the training settings recorded (demo.training_settings)
    # the world's stage 2 (configs/tiny_world.py): 4 prompts a step, rewards r_c2 + the exact render metric
    assert st["stage2_steps"] == 2 and st["stage2_batch_size"] == 4 and st["stage2_rewards"] == "c2,world"
    assert st["quick"] and "reward/world" in m["training"]["stage2"] and "reward/world" not in m["training"]["stage1"]
    assert "reward/c2" in m["training"]["stage2"] and "reward/v2" not in m["training"]["stage2"]


# ----------------------------------------------------------------------------- --compare, stubbed


def stub_compare(monkeypatch, fake_train, sft, on_score):
    """`demo --compare` with training, loading and scoring stubbed: ``on_score(vlm, vdm)`` records a
    scored pair and returns a number from which every metric is derived (distinct models, distinct metrics)."""
    from vans_jax.train import loop

    def fake_score(models, env, out_dir, progress):
        x = on_score(models.vlm, models.vdm) / 100.0
        m = {"format": 1.0, "rouge_l": x, "clip_v": x / 2, "clip_t": x / 4}
        m["total_reward"] = sum(m.values())
        m.update(render_iou=x / 3, render_color=x / 5)
        return {"metrics": dict(m, num_samples=4)}

    monkeypatch.setattr(loop, "train", fake_train)
    monkeypatch.setattr(demo, "_load_models", lambda cfg: sft)
    monkeypatch.setattr(demo, "_score", fake_score)


@needs_world
def test_compare_order_handover_and_resume(tmp_path, monkeypatch):
    """`vans-jax demo --compare` with training and scoring stubbed: per seed grpo_vlm, stage 1 and
    stage 2 train once each (stage 1's models reused by Joint-GRPO, stage 2 starting from stage 1's
    trained models), every variant scored with its own models; a second call finds every (variant,
    seed) done and neither trains nor scores; a missing pair is redone alone."""
    from vans_jax.train import loop

    sft = loop.LoadedModels(vlm="sft-vlm", tokenizer="tok", vdm="sft-vdm", clip="clip", clip_tokenizer="ctok")
    trained, scored = [], []

    def fake_train(cfg, *, progress=True, stop_after=None, models=None):
        mode, seed = str(cfg.train.mode), int(cfg.seed)
        trained.append((mode, seed, models, str(cfg.vlm.path)))
        new = dataclasses.replace(models)
        if mode in ("grpo_vlm", "grpo_stage1"):
            new.vlm = f"{mode}-vlm-s{seed}"
        else:
            new.vdm = f"{mode}-vdm-s{seed}"
        exports = {"vlm": f"/export/{mode}/s{seed}/vlm"} if mode != "grpo_stage2" else {"vdm": "/export/vdm"}
        return {"step": 2, "reward/total": 1.0, "exports": exports, "models": new}

    stub_compare(monkeypatch, fake_train, sft, lambda vlm, vdm: scored.append((vlm, vdm)) or len(vlm) + 3 * len(vdm))
    releases = []                                         # after each variant: compiled programs released
    monkeypatch.setattr(demo.compile_cache, "release_compiled_programs", lambda: releases.append(len(scored)))
    out = tmp_path / "cmp"
    args = ["demo", "--compare", "--quick", "--seeds", "3", "--output_dir", str(out)]
    assert cli.main(args) == 0
    assert releases == [2, 3, 4]                          # after each variant's score (the first is SFT's)

    assert [(m, s) for m, s, _, _ in trained] == [("grpo_vlm", 3), ("grpo_stage1", 3), ("grpo_stage2", 3)]
    assert trained[0][2] is sft and trained[1][2] is sft
    assert trained[2][2].vlm == "grpo_stage1-vlm-s3" and trained[2][2].vdm == "sft-vdm"   # stage 1's models
    assert trained[2][3] == "/export/grpo_stage1/s3/vlm"                                  # recorded in its config
    assert scored == [("sft-vlm", "sft-vdm"), ("grpo_vlm-vlm-s3", "sft-vdm"), ("grpo_stage1-vlm-s3", "sft-vdm"),
                      ("grpo_stage1-vlm-s3", "grpo_stage2-vdm-s3")]
    r = json.loads((out / "compare.json").read_text())
    assert set(r["runs"]) == {"grpo_vlm", "stage1", "joint_grpo"} and r["seeds"] == [3]
    assert r["sft"]["num_samples"] == 4 and r["summary"]["joint_grpo"]["clip_v"]["n"] == 1
    assert r["runs"]["joint_grpo"]["3"]["clip_v"] != r["runs"]["stage1"]["3"]["clip_v"]
    assert "Joint-GRPO (stage 1 + stage 2)" in (out / "compare.md").read_text()

    trained.clear(), scored.clear()                       # resumed: everything is done
    assert cli.main(args) == 0
    assert trained == [] and scored == []
    assert json.loads((out / "compare.json").read_text())["runs"] == r["runs"]

    del r["runs"]["joint_grpo"]["3"]                      # one pair missing, and a new seed
    (out / "compare.json").write_text(json.dumps(r))
    assert cli.main(args[:4] + ["3", "4"] + args[5:]) == 0
    assert [(m, s) for m, s, _, _ in trained] == [("grpo_stage1", 3), ("grpo_stage2", 3), ("grpo_vlm", 4),
                                                  ("grpo_stage1", 4), ("grpo_stage2", 4)]
    assert scored[0] == ("grpo_stage1-vlm-s3", "grpo_stage2-vdm-s3") and len(scored) == 4
    r2 = json.loads((out / "compare.json").read_text())
    assert r2["seeds"] == [3, 4] and r2["summary"]["stage1"]["rouge_l"]["n"] == 2
    assert r2["runs"]["stage1"]["3"] == r["runs"]["stage1"]["3"]


@needs_world
def test_compare_table2_rows_share_runs(tmp_path, monkeypatch):
    """`--variants table2`: the ten rows of the paper's Table 2, in its order; a run with the same
    history is trained once per seed (stage 1 for the stage-2 ablations and Joint-GRPO), the reward
    ablations train with their rewards disabled, "isolated then cascaded" runs grpo_vdm on top of the
    grpo_vlm run (its VLM kept, its DiT trained), and an unknown name is an error naming it."""
    from vans_jax.train import loop

    sft = loop.LoadedModels(vlm="sft-vlm", tokenizer="tok", vdm="sft-vdm", clip="clip", clip_tokenizer="ctok")
    trained, scored = [], {}

    def fake_train(cfg, *, progress=True, stop_after=None, models=None):
        mode, off = str(cfg.train.mode), str(cfg.train.grpo.disabled_rewards)
        trained.append((mode, off, os.path.basename(str(cfg.train.workdir))))
        new = dataclasses.replace(models)
        tag = mode + (f"[-{off}]" if off else "")
        if mode in ("grpo_vlm", "grpo_stage1", "grpo_all_in_one"):
            new.vlm = f"{models.vlm}>{tag}"
        if mode in ("grpo_vdm", "grpo_stage2", "grpo_all_in_one"):
            new.vdm = f"{models.vdm}>{tag}"
        return {"step": 2, "exports": {}, "models": new}

    stub_compare(monkeypatch, fake_train, sft, lambda vlm, vdm: scored.setdefault((vlm, vdm), len(vlm) + len(vdm)))
    out = tmp_path / "t2"
    assert cli.main(["demo", "--compare", "--quick", "--seeds", "1", "--variants", "table2",
                     "--output_dir", str(out)]) == 0
    assert [(m, o) for m, o, _ in trained] == [
        ("grpo_vlm", ""), ("grpo_vdm", ""), ("grpo_vdm", ""), ("grpo_stage1", ""), ("grpo_stage1", "t1"),
        ("grpo_stage1", "v1"), ("grpo_stage2", "c2"), ("grpo_stage2", "v2"), ("grpo_all_in_one", ""),
        ("grpo_stage2", "")]
    assert len({w for _, _, w in trained}) == len(trained)          # each run its own work directory
    r = json.loads((out / "compare.json").read_text())
    assert list(r["runs"]) == list(demo.TABLE2_ORDER)
    pairs = set(scored)
    assert ("sft-vlm>grpo_vlm", "sft-vdm>grpo_vdm") in pairs                       # isolated then cascaded
    assert ("sft-vlm", "sft-vdm>grpo_vdm") in pairs                                # VDM only
    assert ("sft-vlm>grpo_stage1", "sft-vdm>grpo_stage2[-c2]") in pairs            # joint without r_c2
    assert ("sft-vlm>grpo_all_in_one", "sft-vdm>grpo_all_in_one") in pairs
    assert r["variants"]["joint_no_v2"]["runs"] == [dict(mode="grpo_stage1", overrides={}),
                                                    dict(mode="grpo_stage2", overrides={"disabled_rewards": "v2"})]
    table = (out / "compare.md").read_text()
    assert table.index("GRPO on the VDM only") < table.index("Stage 1 without r_t1") < table.index("All-in-one")

    trained.clear()                                                  # a default run next to it: all done
    assert cli.main(["demo", "--compare", "--quick", "--seeds", "1", "--output_dir", str(out)]) == 0
    assert trained == [] and len(json.loads((out / "compare.json").read_text())["runs"]) == 10
    assert cli.main(["demo", "--compare", "--quick", "--variants", "stage3", "--output_dir", str(out)]) == 2
    assert demo.resolve_variants(None) == ("grpo_vlm", "stage1", "joint_grpo")
    assert demo.resolve_variants(["joint_grpo,grpo_vdm"]) == ("grpo_vdm", "joint_grpo")

    trained.clear()                                                  # the nulls: shuffled advantages
    shuffled = []
    orig = fake_train

    def fake_train_nulls(cfg, **kw):
        shuffled.append((str(cfg.train.mode), bool(cfg.train.grpo.shuffle_advantages)))
        return orig(cfg, **kw)

    monkeypatch.setattr(loop, "train", fake_train_nulls)
    assert demo.resolve_variants(["nulls", "default"]) == ("grpo_vlm", "grpo_vdm_null", "stage1", "joint_grpo",
                                                           "joint_grpo_null")
    assert cli.main(["demo", "--compare", "--quick", "--seeds", "1", "--variants", "nulls",
                     "--output_dir", str(out)]) == 0
    # a new call: stage 1 again in its own work directory (a real run resumes it finished), then the null stage 2
    assert shuffled == [("grpo_vdm", True), ("grpo_stage1", False), ("grpo_stage2", True)]
    assert trained[1][2] == "grpo_stage1" and trained[2][2].startswith("grpo_stage1__grpo_stage2-shuffle")
    r = json.loads((out / "compare.json").read_text())
    assert list(r["runs"])[-1] == "joint_grpo_null" and r["runs"]["grpo_vdm_null"]["1"]
    assert "Joint-GRPO, stage 2 with shuffled advantages (null)" in (out / "compare.md").read_text()


# ----------------------------------------------------------------------------- in-memory hand-over


def _flat(model):
    return {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model))}


def _same(a, b):
    fa, fb = _flat(a), _flat(b)
    assert set(fa) == set(fb), sorted(set(fa) ^ set(fb))[:5]
    bad = [k for k in fa if fa[k].dtype != fb[k].dtype or not np.array_equal(np.asarray(fa[k]), np.asarray(fb[k]))]
    assert not bad, bad[:5]
    assert str(nnx.graphdef(a)) == str(nnx.graphdef(b))


@needs_world
def test_handover_is_what_loading_and_the_export_give(tmp_path):
    """`train(models=...)` adds to a given VLM exactly the LoRA adapters loading it with LoRA adds,
    and hands on the trained VLM as its export reloads: LoRA merged, no adapters, same weights."""
    from vans_jax import parallel
    from vans_jax.apps.configlib import load_config
    from vans_jax.models import qwen2_5_vl as qwen
    from vans_jax.models.lora import has_lora
    from vans_jax.train import loop

    cfg = load_config("tiny_world", [])
    mesh = parallel.make_mesh(dict(cfg.mesh))
    base, _ = loop.load_vlm(cfg, mesh, lora=False)
    with_lora = loop.add_lora(base, cfg, mesh)
    _same(with_lora, loop.load_vlm(cfg, mesh, lora=True)[0])
    assert not has_lora(base)                                       # the given model is unchanged

    # a "trained" adapter (B != 0), then merge in memory vs export + reload
    graphdef, state = nnx.split(with_lora)
    bump = lambda p, x: x + 0.01 * jax.random.normal(jax.random.key(len(p)), x.shape, x.dtype) if "lora_b" in str(p) else x
    trained = nnx.merge(graphdef, jax.tree_util.tree_map_with_path(bump, state))
    merged = loop.merged_vlm(trained)
    assert has_lora(trained) and not has_lora(merged)
    qwen.export_pretrained(trained, str(tmp_path / "vlm"))
    _same(merged, qwen.from_pretrained(str(tmp_path / "vlm"), dtype=cfg.vlm.dtype, mesh=mesh,
                                       attn_impl=cfg.vlm.attn_impl, remat=cfg.vlm.remat))

    # a part trained in full is a copy: the updates' donation never deletes the given arrays
    copy = loop.copy_module(base)
    for k, v in _flat(copy).items():
        assert v.unsafe_buffer_pointer() != _flat(base)[k].unsafe_buffer_pointer()
    _same(copy, base)


# ----------------------------------------------------------------------------- one scoring core


class _FakePipe:
    """Answers each row with a fixed text and a given video (what VANSPipeline returns)."""

    def __init__(self, settings, answers):
        self.settings, self.answers = settings, answers

    def __call__(self, clips, questions, seed=0):
        out = self.answers[:len(questions)]
        self.answers = self.answers[len(questions):]
        return out


def test_demo_and_eval_score_the_same(tmp_path):
    """The demo's in-memory scoring and `vans-jax eval` on the same predictions written to files
    agree: the answer videos are mp4-decoded frames, so both see the same pixels."""
    from vans_jax.data import synthetic as S
    from vans_jax.data.csv_format import read_vnep_csv
    from vans_jax.data.video_io import read_video, write_video
    from vans_jax.eval import runner
    from vans_jax.pipeline import VANSAnswer, VANSSettings

    ws = S.generate_world(tmp_path / "world", "eval", 6, seed=7)
    rows = list(read_vnep_csv(ws.csv_path))
    settings = VANSSettings(height=64, width=64, num_frames=9, fps=4.0, n_ref=3, reference_frames=9)
    config = demo.eval_config(settings)
    models = runner.random_models()
    pred = tmp_path / "pred"
    answers = []
    for i, r in enumerate(rows):
        gt = runner.read_ground_truth(os.path.join(ws.video_root, r.output_video_path), config)
        video = gt if i % 2 else np.ascontiguousarray(255 - gt[::-1])    # right, or wrong, futures
        caption = r.caption if i % 3 else "a purple cube flies away"
        text = f"[Think]{r.think}[/Think][Ans]{caption}[/Ans]"
        d = pred / str(r.index)
        d.mkdir(parents=True)
        write_video(str(d / "answer.mp4"), video, fps=settings.fps)
        decoded, _ = read_video(str(d / "answer.mp4"))
        (d / "answer.json").write_text(json.dumps({"text": text, "caption": caption}))
        answers.append(VANSAnswer(question=r.question, text=text, think=r.think, caption=caption, valid_format=True,
                                  seed=i, source="", num_tokens=0, video=decoded))

    mem = demo.predict_and_score(_FakePipe(settings, answers), models, ws.csv_path, ws.video_root, None,
                                 batch_size=4, progress=False)
    files = runner.evaluate(str(pred), ws.csv_path, ws.video_root, None, models=models, config=config,
                            progress=False)
    by_index = {s["index"]: s for s in files["samples"]}
    assert len(mem["per_sample"]) == len(rows) and files["counts"]["video_evaluated"] == len(rows)
    for p in mem["per_sample"]:
        f = by_index[p["index"]]
        assert p["format"] == 1.0
        assert p["rouge_l"] == float(np.float32(f["rouge_l"]))          # the demo's: float32, as the reward
        assert p["clip_v"] == pytest.approx(f["clip_v"], abs=1e-6)
        assert p["clip_t"] == pytest.approx(f["clip_t"], abs=1e-6)
    assert len({round(p["clip_v"], 4) for p in mem["per_sample"]}) > 1   # the wrong futures score differently
    assert mem["metrics"]["clip_v"] == pytest.approx(files["clip_v"], abs=1e-6)
    # the file path's own numbers come from the same core, one row at a time
    one = runner.score_predictions([answers[0].text], [answers[0].caption], [rows[0].caption], [answers[0].video],
                                   [runner.read_ground_truth(os.path.join(ws.video_root, rows[0].output_video_path),
                                                             config)], models=models, config=config)[0]
    assert one["clip_v"] == by_index[rows[0].index]["clip_v"] and one["rouge_l"] == by_index[rows[0].index]["rouge_l"]
