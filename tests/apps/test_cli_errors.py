"""Errors early and clear: wrong overrides (one line, the nearest key suggested), output paths that
cannot be written and model directories that do not exist, all before any model loads."""
import pytest

from vans_jax.apps import cli
from vans_jax.apps.configlib import UnknownConfigKey, apply_overrides, load_config


def test_wrongly_typed_override_is_one_line(capsys):
    with pytest.raises(ValueError) as e:
        load_config("tiny", ["--config.train.steps=abc"])
    assert str(e.value) == "--config.train.steps=abc: expected int (the field holds 2), got 'abc' (str)"
    assert cli.main(["train", "--config", "tiny", "--config.train.steps=abc"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "vans-jax train: error: --config.train.steps=abc: expected int (the field holds 2), " \
                          "got 'abc' (str)"


def test_unknown_key_suggests_the_nearest():
    cfg = load_config("tiny")
    with pytest.raises(UnknownConfigKey) as e:
        apply_overrides(cfg, ["--config.train.setps=3"])
    assert str(e.value) == "config has no field 'train.setps'; did you mean --config.train.steps?"
    with pytest.raises(KeyError, match=r"no 'trian'.*did you mean --config.train.steps\?"):
        apply_overrides(cfg, ["--config.trian.steps=3"])
    with pytest.raises(KeyError) as e:
        apply_overrides(cfg, ["--config.qqqqqq=1"])
    assert "did you mean" not in str(e.value)


def test_output_paths_checked_before_anything_loads(tmp_path, capsys):
    a_file = tmp_path / "taken"
    a_file.write_text("mine")
    assert cli.main(["predict", "--output_dir", str(a_file)]) == 2
    assert f"--output_dir {a_file} is an existing file, not a directory" in capsys.readouterr().err
    assert cli.main(["predict", "--output_dir", str(a_file / "sub")]) == 2
    assert f"{a_file} is a file" in capsys.readouterr().err
    assert cli.main(["memory-plan", "--output", str(tmp_path)]) == 2
    assert f"--output {tmp_path} is an existing directory" in capsys.readouterr().err
    assert a_file.read_text() == "mine"


def test_missing_model_directory_is_named(tmp_path, capsys):
    missing = tmp_path / "no_such_vlm"
    assert cli.main(["predict", "--vlm", str(missing), "--vdm", str(tmp_path), "--video", "x.mp4",
                     "--question", "q", "--output_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"--vlm {missing}: the directory does not exist" in err and "tokenizer" not in err
    from vans_jax.pipeline import VANSPipeline
    with pytest.raises(FileNotFoundError, match="the VLM directory .*no_such_vlm does not exist"):
        VANSPipeline.from_pretrained(missing, tmp_path)


def test_predict_size_checked_against_the_vdm_config_before_loading(capsys, tmp_path):
    # the shipped tiny VDM: multiples of 16, 4k+1 frames (README: checked before anything loads)
    assert cli.main(["predict", "--height", "60", "--output_dir", str(tmp_path / "o")]) == 2
    assert "height and width must be positive multiples of 16; got height=60, width=64" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_train_missing_csv_is_one_line_before_loading(tmp_path, capsys):
    missing = tmp_path / "train.csv"
    assert cli.main(["train", "--config", "tiny", f"--config.data.train_csv={missing}",
                     f"--config.train.workdir={tmp_path / 'w'}", "--config.vlm.path=/nonexistent/vlm"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["vans-jax train: vlm.path /nonexistent/vlm: the directory does not exist"], err
    assert cli.main(["train", "--config", "tiny", f"--config.data.train_csv={missing}",
                     f"--config.train.workdir={tmp_path / 'w'}"]) == 2
    assert capsys.readouterr().err.strip() == f"vans-jax train: data CSV {missing} does not exist"
