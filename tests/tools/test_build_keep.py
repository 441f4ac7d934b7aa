"""``python -m tools.tiny_world.build --keep vlm,clip``: the stages of kept parts are seeded from a
previous build's output so that a rebuild trains only the video half."""
import json
import os

import pytest

from tools.tiny_world.build import SFT_PHASES, _recipe_key, keep_stages, measure_data, vae_decoder_recipe, vdm_arch


def _previous(tmp_path, **over):
    prev = tmp_path / "prev"
    for part in ("vlm", "clip", "vdm/vae"):
        (prev / part).mkdir(parents=True)
        (prev / part / "config.json").write_text(json.dumps({"part": part}))
    phases = [dict(ph, loss=0.1, token_accuracy=0.9, wall_s=10.0 * (i + 1)) for i, ph in enumerate(SFT_PHASES["sft_vlm"])]
    report = {"train_samples": 1500, "eval_samples": 100, "seed": 0, "tokenizer": {"vocab_size": 523},
              "sft_vlm": {"loss": 0.04, "step": 4000, "phases": phases, "wall_s": 30.0},
              "clip": {"eval": {"retrieval_top1_video": 0.2}, "wall_s": 5.0},
              "vae": {"eval_psnr_target": 24.8, "wall_s": 7.0},
              # the first SFT-VDM phase only: the rest of SFT_PHASES["sft_vdm"] trains on top
              "sft_vdm": {"loss": 0.2, "phases": [dict(SFT_PHASES["sft_vdm"][0], loss=0.3, wall_s=3.0)], "wall_s": 3.0}}
    report.update(over)
    (prev / "BUILD.json").write_text(json.dumps(report))
    return str(prev)


def _marker(work, name):
    with open(os.path.join(work, f"{name}.done.json")) as f:
        return json.load(f)


def test_keep_seeds_the_stages_the_build_looks_up(tmp_path):
    prev, work = _previous(tmp_path), str(tmp_path / "work")
    os.makedirs(work)
    key = {"train_samples": 1500, "eval_samples": 100, "quick": False, "seed": 0}
    seeded = keep_stages(["vlm", "clip"], prev, work, key)
    n = len(SFT_PHASES["sft_vlm"])
    assert seeded == ["vlm_init", "sft_vlm"] + [f"sft_vlm_{i + 1}" for i in range(1, n)] + ["clip"]
    # the keys the build's stage() computes for these stages (build.sft_phases), so they are reused
    src = os.path.join(work, "vlm_init")
    for i, ph in enumerate(SFT_PHASES["sft_vlm"]):
        done = _marker(work, "sft_vlm" if i == 0 else f"sft_vlm_{i + 1}")
        assert done["key"] == json.loads(json.dumps(dict(key, phase=ph, init=src, after=list(SFT_PHASES["sft_vlm"][:i]))))
        assert done["report"]["wall_s"] == 10.0 * (i + 1) and done["report"]["kept_from"] == os.path.abspath(prev)
        src = done["report"]["exports"]["vlm"]
    assert json.load(open(os.path.join(src, "config.json"))) == {"part": "vlm"}     # the last phase's export: the model
    assert _marker(work, "clip")["key"] == key and _marker(work, "vlm_init")["report"]["vocab_size"] == 523
    assert json.load(open(os.path.join(work, "clip", "config.json"))) == {"part": "clip"}
    assert keep_stages(["vlm"], prev, work, key) == []                 # stages already there are left alone


def test_keep_refuses_another_world_and_unknown_parts(tmp_path):
    work = str(tmp_path / "work")
    os.makedirs(work)
    key = {"train_samples": 32, "eval_samples": 100, "quick": False, "seed": 0}
    with pytest.raises(ValueError, match="was built with"):
        keep_stages(["vlm"], _previous(tmp_path), work, key)
    with pytest.raises(ValueError, match="unknown part 'vae'"):
        keep_stages(["vae"], str(tmp_path / "prev"), work, dict(key, train_samples=1500))
    with pytest.raises(FileNotFoundError, match="no BUILD.json"):
        keep_stages(["vlm"], str(tmp_path / "nothing"), work, key)
    assert keep_stages([], str(tmp_path / "nothing"), work, key) == []


def test_keep_vdm_seeds_the_vae_and_the_phases_it_ran(tmp_path):
    prev, work = _previous(tmp_path), str(tmp_path / "work")
    os.makedirs(work)
    key = {"train_samples": 1500, "eval_samples": 100, "quick": False, "seed": 0}
    assert keep_stages(["vdm"], prev, work, key) == ["vae", "sft_vdm"]
    assert _marker(work, "vae")["report"]["eval_psnr_target"] == 24.8
    assert json.load(open(os.path.join(work, "vae", "config.json"))) == {"part": "vdm/vae"}   # the build's vae_dir
    done = _marker(work, "sft_vdm")
    # the key the build computes (its vdm_init has the same transformer and VAE configs as the kept DiT)
    assert done["key"] == json.loads(json.dumps(dict(key, phase=SFT_PHASES["sft_vdm"][0], init=os.path.join(work, "vdm_init"),
                                                     after=[], model={"vae": {"part": "vdm/vae"}})))
    # a phase the next phase of the build starts from: the previous build's whole vdm directory
    assert os.path.isfile(os.path.join(done["report"]["exports"]["vdm"], "vae", "config.json"))
    assert done["report"]["loss"] == 0.3 and done["report"]["wall_s"] == 3.0


def test_keep_vdm_keeps_the_decoder_stage_only_when_the_previous_build_had_it(tmp_path):
    key = {"train_samples": 1500, "eval_samples": 100, "quick": False, "seed": 0}
    prev, work = _previous(tmp_path, vae_decoder={"eval_psnr_target": 26.5, "wall_s": 9.0}), str(tmp_path / "work")
    os.makedirs(work)
    assert keep_stages(["vdm"], prev, work, key) == ["vae", "vae_decoder", "sft_vdm"]
    done = _marker(work, "vae_decoder")
    # the key the build's stage computes, so the build reuses it instead of fine-tuning the shipped decoder again
    assert done["key"] == dict(key, recipe=_recipe_key(vae_decoder_recipe(False)))
    assert done["key"]["recipe"]["trainable"] == "decoder" and done["report"]["eval_psnr_target"] == 26.5
    assert json.load(open(os.path.join(work, "vae_decoder", "config.json"))) == {"part": "vdm/vae"}
    # a build from before the stage: its VAE is a first-stage one, which this build's decoder stage trains
    prev2, work2 = _previous(tmp_path / "old"), str(tmp_path / "work2")
    os.makedirs(work2)
    assert keep_stages(["vdm"], prev2, work2, key) == ["vae", "sft_vdm"]
    assert not os.path.exists(os.path.join(work2, "vae_decoder.done.json"))


def test_keep_vdm_refuses_phases_that_are_not_the_recipe(tmp_path):
    bad = [dict(SFT_PHASES["sft_vdm"][0], lr=1.0, wall_s=1.0)]
    prev, work = _previous(tmp_path, sft_vdm={"phases": bad}), str(tmp_path / "work")
    os.makedirs(work)
    with pytest.raises(ValueError, match="are not the first phases of SFT_PHASES"):
        keep_stages(["vdm"], prev, work, {"train_samples": 1500, "eval_samples": 100, "quick": False, "seed": 0})


def test_vdm_arch_tells_dit_sizes_and_vaes_apart(tmp_path):
    """The SFT-VDM stages' keys hold ``vdm_arch`` of the DiT they start from: another DiT size or
    another VAE (its latent statistics) gives another key, so the build trains those phases again."""
    def vdm(name, dim, std):
        d = tmp_path / name
        for sub, cfg in (("transformer", {"_class_name": "WanTransformer3DModel", "num_layers": 4, "dim": dim,
                                          "_diffusers_version": name}),
                         ("vae", {"z_dim": 16, "latents_std": [std] * 16})):
            (d / sub).mkdir(parents=True)
            (d / sub / "config.json").write_text(json.dumps(cfg))
        return str(d)
    a = vdm("a", 128, 0.5)
    assert vdm_arch(a) == {"transformer": {"num_layers": 4, "dim": 128}, "vae": {"z_dim": 16, "latents_std": [0.5] * 16}}
    assert vdm_arch(vdm("b", 128, 0.5)) == vdm_arch(a)        # bookkeeping fields (_diffusers_version) aside
    assert vdm_arch(vdm("c", 192, 0.5)) != vdm_arch(a)
    assert vdm_arch(vdm("d", 128, 0.25)) != vdm_arch(a)


def test_measure_data_grows_when_more_clips_are_asked(tmp_path):
    """``--measure --num_samples N`` after a call that wrote fewer clips measures N clips, not the old
    split's (before: a 32-clip split was reused for 96 silently); the split is deterministic, so the
    clips already there stay the same."""
    from vans_jax.data.csv_format import read_vnep_csv
    data = measure_data(str(tmp_path), 8)
    first = [(r.caption, r.output_video_path) for r in read_vnep_csv(os.path.join(data, "eval.csv"))]
    assert len(first) == 8
    assert measure_data(str(tmp_path), 5) == data          # enough clips: left alone
    assert len(list(read_vnep_csv(os.path.join(data, "eval.csv")))) == 8
    more = [(r.caption, r.output_video_path) for r in read_vnep_csv(os.path.join(measure_data(str(tmp_path), 10), "eval.csv"))]
    assert len(more) == 10 and more[:8] == first
