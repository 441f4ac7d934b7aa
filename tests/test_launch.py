"""The multi-host launchers: shell syntax, the one gcloud command for all TPU workers (dry run), and
the SLURM script's environment (srun and vans-jax replaced by stubs) with XLA flags that this
jaxlib's XLA accepts."""
import os
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU = os.path.join(ROOT, "launch", "tpu_pod.sh")
SLURM = os.path.join(ROOT, "launch", "slurm.sbatch")


@pytest.mark.parametrize("script", [TPU, SLURM, os.path.join(ROOT, "launch", "single_host.sh")])
def test_shell_syntax(script):
    assert subprocess.run(["bash", "-n", script], capture_output=True).returncode == 0


def test_tpu_pod_one_command_for_all_workers():
    env = dict(os.environ, DRY_RUN="1", TPU_NAME="vans-v5p-64", ZONE="us-east5-a", PROJECT="proj")
    out = subprocess.run([TPU, "--config", "configs/vans.py", "--config.train.workdir=gs://b/run 1"], env=env,
                         capture_output=True, text=True, check=True).stdout
    argv = shlex.split(out)
    assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "vans-v5p-64"]
    assert "--worker=all" in argv and argv[argv.index("--zone") + 1] == "us-east5-a"
    assert argv[argv.index("--project") + 1] == "proj"
    remote = argv[argv.index("--command") + 1]
    assert "export VANS_DISTRIBUTED=auto" in remote and "--xla_tpu_overlap_compute_collective_tc=true" in remote
    # the user's arguments reach `vans-jax train` intact on the workers
    assert shlex.split(remote.split("exec ", 1)[1]) == ["vans-jax", "train", "--config", "configs/vans.py",
                                                         "--config.train.workdir=gs://b/run 1"]
    missing = subprocess.run([TPU, "--config", "x"], env={"PATH": os.environ["PATH"]}, capture_output=True, text=True)
    assert missing.returncode != 0 and "TPU_NAME" in missing.stderr


def test_slurm_environment_and_xla_flags(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/sh\nwhile [ "${1#--}" != "$1" ]; do shift; done\nexec "$@"\n')
    (bin_dir / "vans-jax").write_text('#!/bin/sh\nprintf "%s\\n" "$XLA_FLAGS" "$XLA_PYTHON_CLIENT_MEM_FRACTION" '
                                      '"$NCCL_DEBUG" "$@"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_NNODES="2", SLURM_NTASKS="2",
               SLURM_JOB_NODELIST="gpu[01-02]", SLURM_JOB_ID="77")
    env.pop("XLA_FLAGS", None)
    out = subprocess.run(["bash", SLURM, "--config", "configs/vans.py", "--config.mesh.fsdp=-1"], env=env,
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0].startswith("vans-jax: 2 node(s) [gpu[01-02]], 2 process(es)")
    flags, fraction, nccl, *args = out[1:]
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in flags and fraction == "0.9" and nccl == "WARN"
    assert args == ["train", "--config", "configs/vans.py", "--config.mesh.fsdp=-1"]
    # every flag is one XLA knows (an unknown flag aborts JAX at start-up)
    check = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], capture_output=True, text=True,
                           env=dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu"))
    assert check.returncode == 0, check.stderr[-2000:]
