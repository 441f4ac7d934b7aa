"""`vans-jax train --help` lists every mode and main keys that exist."""
import re

import pytest

from vans_jax.apps import cli
from vans_jax.apps.configlib import load_config
from vans_jax.train import loop
from vans_jax.train.modes import MAIN_KEYS, MODE_DOCS


def test_train_help_lists_modes_and_real_keys(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert set(MODE_DOCS) == set(loop.MODES)
    for mode in loop.MODES:
        assert re.search(rf"^  {mode} ", out, re.M), mode
    cfg = load_config("vans")
    for keys, _ in MAIN_KEYS:
        for key in keys.split(" / "):
            key = key.split(",")[0].replace("<mode>", "sft_vdm")
            node = cfg
            for part in key.split("."):
                assert part in node, f"{key} is not a key of configs/vans.py"
                node = node[part]


def test_predict_eta_excludes_the_first_batch(monkeypatch, capsys):
    from vans_jax.apps import predict
    clock = iter([0.0, 100.0, 110.0, 120.0])         # construction, then three batches of 2 rows
    monkeypatch.setattr(predict.time, "time", lambda: next(clock))
    p = predict._Progress(10, True, every_s=0.0)
    p(2, 2, 0, 0)                                     # the first batch: 100 s, compiling included
    p(4, 4, 0, 0)
    p(6, 6, 0, 0)
    lines = capsys.readouterr().err.strip().splitlines()
    assert "eta ? (the first batch compiles)" in lines[0]
    assert "eta 30s" in lines[1]          # 2 rows in 10 s -> 6 rows left in 30 s (not 6 x 100/2)
    assert "eta 20s" in lines[2]
