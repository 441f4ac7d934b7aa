"""The `vans-jax` command and config overrides."""
import json

import pytest

from vans_jax.apps import cli
from vans_jax.apps.configlib import apply_overrides, load_config


def test_overrides_are_typed_and_checked():
    cfg = load_config("tiny", ["--config.vlm.dtype=bfloat16", "--config.generation.temperature=1",
                               "--config.generation.max_new_tokens=5", "--config.vlm.lora.targets=['q_proj']"])
    assert cfg.vlm.dtype == "bfloat16"
    assert cfg.generation.temperature == 1.0 and isinstance(cfg.generation.temperature, float)
    assert cfg.generation.max_new_tokens == 5
    assert tuple(cfg.vlm.lora.targets) == ("q_proj",)
    with pytest.raises(KeyError, match="vlm.nope"):
        apply_overrides(cfg, ["--config.vlm.nope=1"])
    with pytest.raises(ValueError, match="must look like"):
        apply_overrides(cfg, ["--config.vlm.dtype"])
    with pytest.raises(FileNotFoundError, match="not_a_config"):
        load_config("not_a_config")


def test_full_config_matches_the_3b_and_1_3b_numbers():
    from vans_jax.models.qwen2_5_vl import Qwen2_5_VLConfig

    cfg = load_config("vans")
    q = Qwen2_5_VLConfig.from_hf_dict(cfg.vlm.model.to_dict())
    assert (q.text.hidden_size, q.text.num_hidden_layers, q.text.num_attention_heads, q.text.num_key_value_heads,
            q.text.intermediate_size, q.text.vocab_size, q.text.mrope_section) == (2048, 36, 16, 2, 11008, 151936,
                                                                                   (16, 24, 24))
    assert (q.vision.depth, q.vision.hidden_size, q.vision.intermediate_size, q.vision.fullatt_block_indexes,
            q.vision.window_size) == (32, 1280, 3420, (7, 15, 23, 31), 112)
    assert q.tie_word_embeddings
    assert cfg.vdm.model.dim == 1536 and cfg.vdm.model.num_layers == 30


def test_demo_writes_answers(tmp_path, capsys):
    out = tmp_path / "demo.json"
    rc = cli.main(["demo", "--vlm_only", "--output", str(out), "--config.generation.max_new_tokens=6",
                   "--config.generation.num_return_sequences=2"])
    assert rc == 0
    result = json.loads(out.read_text())
    assert len(result["answers"]) == 2
    assert all(1 <= a["tokens"] <= 6 and set(a) >= {"text", "think", "caption", "valid_format", "logprob"}
               for a in result["answers"])
    assert result["vlm_frames"] == 6 and result["timings"]["new_tokens"] >= 2
    assert "tokens/s" in capsys.readouterr().out


def test_demo_bad_override_is_a_clear_error(capsys):
    assert cli.main(["demo", "--config.vlm.not_a_field=3"]) == 2
    assert "config has no field 'vlm.not_a_field'" in capsys.readouterr().err


def test_make_data_then_validate(tmp_path, capsys):
    out = tmp_path / "world"
    assert cli.main(["make-data", "--output_dir", str(out), "--num_samples", "12", "--seed", "3"]) == 0
    assert (out / "train.csv").exists() and (out / "rl.csv").exists() and (out / "eval.csv").exists()
    again = tmp_path / "again"
    assert cli.main(["make-data", "--output_dir", str(again), "--num_samples", "12", "--seed", "3"]) == 0
    assert (out / "eval.csv").read_bytes() == (again / "eval.csv").read_bytes()  # same seed, same files
    report = tmp_path / "report.json"
    rc = cli.main(["validate-data", "--csv", str(out / "eval.csv"), "--video_root", str(out / "videos"),
                   "--output", str(report)])
    text = capsys.readouterr().out
    assert report.exists() and "eval.csv" in text
    data = json.loads(report.read_text())
    assert data["errors"] == {} and rc == 0
    # a corrupt video is reported, the command does not crash, the exit code says "not ok"
    sorted((out / "videos").glob("eval_*/*.mp4"))[0].write_bytes(b"not a video")
    rc = cli.main(["validate-data", "--csv", str(out / "eval.csv"), "--video_root", str(out / "videos")])
    assert rc == 1
    assert "corrupt" in capsys.readouterr().out
