"""The world build's two chains side by side (``python -m tools.tiny_world.build --chains parallel``):
the CPU split, each chain's environment and command line, and ``run_chains`` on real processes
(concurrent, pinned, logged; a failing chain stops the other and is named). The whole quick build in
both modes is too slow for the suite (~4 min); the README's build section quotes that run."""
import json
import os
import sys
import time

import pytest

from tools.tiny_world import build as b


def test_split_cpus_gives_the_dit_chain_the_larger_half():
    assert b.split_cpus([1, 0]) == {"vdm": [0], "vlm": [1]}
    assert b.split_cpus(range(4)) == {"vdm": [0, 1], "vlm": [2, 3]}
    assert b.split_cpus([3, 7, 5]) == {"vdm": [3, 5], "vlm": [7]}
    with pytest.raises(ValueError, match="needs 2 CPUs"):
        b.split_cpus([0])


def test_chain_env_single_core_eigen_unless_the_user_chose():
    env = b.chain_env([2], {"PATH": "/bin"})
    assert env["OMP_NUM_THREADS"] == "1" and env["XLA_FLAGS"] == "--xla_cpu_multi_thread_eigen=false"
    env = b.chain_env([2], {"XLA_FLAGS": "--xla_foo=1 --xla_cpu_multi_thread_eigen=true"})
    assert env["XLA_FLAGS"] == "--xla_foo=1 --xla_cpu_multi_thread_eigen=true"
    env = b.chain_env([0, 1, 2], {"XLA_FLAGS": "--xla_foo=1"})
    assert env["OMP_NUM_THREADS"] == "3" and env["XLA_FLAGS"] == "--xla_foo=1"


def test_chain_command_parses_back_to_the_same_build(tmp_path):
    argv = b.chain_command("vdm", out="rel_out", work=str(tmp_path / "w"), train_samples=32, eval_samples=8,
                           quick=True, seed=3)
    assert argv[:3] == [sys.executable, "-m", "tools.tiny_world.build"]
    a = b.parser().parse_args(argv[3:])
    assert (a.chain, a.train_samples, a.eval_samples, a.quick, a.seed, a.keep) == ("vdm", 32, 8, True, 3, "")
    assert a.out == os.path.abspath("rel_out") and a.work == str(tmp_path / "w")   # the child runs in the repo


def test_build_refuses_unknown_modes(tmp_path):
    with pytest.raises(ValueError, match="chains must be"):
        b.build(str(tmp_path / "o"), str(tmp_path / "w"), chains="both")
    with pytest.raises(ValueError, match="chain must be one of"):
        b.build(str(tmp_path / "o"), str(tmp_path / "w"), chain="clip")


_PROBE = """
import json, os, sys, time
t0 = time.time()
print("hello from", sys.argv[1], flush=True)
time.sleep(1.5)
aff = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
json.dump({"start": t0, "end": time.time(), "cpus": aff, "xla": os.environ.get("XLA_FLAGS", ""),
           "omp": os.environ.get("OMP_NUM_THREADS"), "cwd": os.getcwd()}, open(sys.argv[2], "w"))
"""


def _cpus():
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


@pytest.mark.skipif(len(_cpus()) < 2, reason="needs 2 CPUs")
def test_run_chains_runs_both_at_once_pinned_and_logged(tmp_path):
    cpus = b.split_cpus(_cpus())
    cmds = {n: [sys.executable, "-c", _PROBE, n, str(tmp_path / f"{n}.json")] for n in b.CHAINS}
    info = b.run_chains(cmds, str(tmp_path), cpus, poll_s=0.1)
    got = {n: json.load(open(tmp_path / f"{n}.json")) for n in b.CHAINS}
    # they overlapped in time: each started before the other ended
    assert got["vlm"]["start"] < got["vdm"]["end"] and got["vdm"]["start"] < got["vlm"]["end"]
    for n in b.CHAINS:
        if got[n]["cpus"] is not None:
            assert got[n]["cpus"] == cpus[n]
        assert got[n]["omp"] == str(len(cpus[n])) and got[n]["cwd"] == b.REPO
        assert info[n]["cpus"] == cpus[n] and info[n]["wall_s"] >= 1.5
        assert info[n]["started_at"] <= got[n]["start"] < got[n]["end"] <= info[n]["ended_at"] + 1.0
        assert f"hello from {n}" in open(info[n]["log"]).read()
        assert info[n]["log"] == str(tmp_path / f"chain_{n}.log")


@pytest.mark.skipif(len(_cpus()) < 2, reason="needs 2 CPUs")
def test_a_failing_chain_stops_the_other_and_is_named(tmp_path):
    cpus = b.split_cpus(_cpus())
    pid_file = tmp_path / "pid"
    slow = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
    fail = "import sys, time; time.sleep(1.0); print('boom: no data in the split'); sys.exit(3)"
    cmds = {"vdm": [sys.executable, "-c", slow], "vlm": [sys.executable, "-c", fail]}
    t = time.perf_counter()
    with pytest.raises(RuntimeError) as e:
        b.run_chains(cmds, str(tmp_path), cpus, poll_s=0.1)
    assert time.perf_counter() - t < 60      # the 120 s chain was stopped, not waited for
    msg = str(e.value)
    assert "'vlm'" in msg and "exit status 3" in msg and "boom: no data in the split" in msg
    assert str(tmp_path / "chain_vlm.log") in msg and "resume" in msg
    pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):   # reaped: no such process any more
        os.kill(pid, 0)
