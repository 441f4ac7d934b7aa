"""`vans-jax bench` gives both sides the same CPU threads: XLA's pool (PJRT_NPROC, counted from the
pool's own threads) and torch's intra-op and inter-op threads, and says how in the JSON."""
import json
import os
import subprocess
import sys

import jax
import pytest

from vans_jax.apps import cli
from vans_jax.apps.bench import resources

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def bench_in_fresh_process(tmp_path, threads: int) -> dict:
    out = tmp_path / f"bench_{threads}.json"
    env = {k: v for k, v in os.environ.items() if k not in ("PJRT_NPROC", "NPROC", "OMP_WAIT_POLICY")}
    env["PYTHONPATH"] = ROOT
    proc = subprocess.run([sys.executable, "-m", "vans_jax.apps.cli", "bench", "--config", "configs/bench_cpu.py",
                           "--output", str(out), "--config.sections=('matmul',)", "--config.matmul.size=64",
                           "--config.matmul.repeats=2", f"--config.threads={threads}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out) as f:
        return json.load(f)


@pytest.mark.parametrize("threads", [1, 2])
def test_bench_sets_and_records_equal_threads(tmp_path, threads):
    pytest.importorskip("torch")
    result = bench_in_fresh_process(tmp_path, threads)
    t = result["threads"]
    assert t["requested"] == t["threads"] == threads and t["cores_available"] == resources.cores_available()
    # measured, not echoed: XLA's pool threads counted in /proc, torch's from torch itself
    assert t["xla"]["intra_op"] == t["torch"]["intra_op"] == t["torch"]["inter_op"] == threads and t["equal"] is True
    assert f"PJRT_NPROC={threads} set by the bench" in t["xla"]["how"]
    assert f"set_num_threads({threads})" in t["torch"]["how"]
    assert f"set_num_interop_threads({threads})" in t["torch"]["how"]
    assert t["openmp"]["wait_policy"] == "PASSIVE" and "before importing torch" in t["openmp"]["how"]
    assert any("MKL" in d for d in t["not_equal"])
    matmul = result["figures"][0]
    assert f"{threads} XLA threads" in matmul["ours"]["device"]
    assert f"{threads} intra-op / {threads} inter-op threads" in matmul["reference"]["device"]
    assert result["environment"]["PJRT_NPROC"] == str(threads)


def test_a_started_xla_pool_of_another_size_is_an_error(tmp_path, capsys):
    jax.devices()                    # this process's client (and pool) exist before the bench
    pool = resources.xla_pool_threads()
    assert pool and pool >= 1
    assert cli.main(["bench", "--config", "configs/bench_cpu.py", "--output", str(tmp_path / "x.json"),
                     "--config.reference=False", "--config.sections=('matmul',)", "--config.matmul.size=64",
                     f"--config.threads={pool + 1}"]) == 2
    err = capsys.readouterr().err
    assert f"bench threads={pool + 1} but XLA's CPU pool in this process has {pool} threads" in err
    assert f"--config.threads={pool}" in err
    assert cli.main(["bench", "--config", "configs/bench_cpu.py", "--output", str(tmp_path / "x.json"),
                     "--config.reference=False", "--config.sections=('matmul',)", "--config.threads=-1"]) == 2
    assert "bench threads must be >= 0" in capsys.readouterr().err


def test_the_old_reference_threads_setting_is_named():
    from vans_jax.apps.configlib import load_config

    cfg = load_config("configs/bench_cpu.py", ["--config.sections=('matmul',)"])
    cfg.reference_threads = 1
    with pytest.raises(ValueError, match="reference_threads was replaced by threads"):
        resources.prepare(cfg)
