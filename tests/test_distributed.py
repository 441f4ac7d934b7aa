"""Multi-host settings read from the environment (vans_jax.parallel.distributed_settings) and the
host-local -> global batch helpers on one process (one device, and 4 fake ones in a subprocess);
several processes: tests/test_multihost.py."""
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from vans_jax import parallel
from tests.utils import xla_flags  # noqa: E402


@pytest.mark.parametrize("nodelist, host", [
    ("node01", "node01"),
    ("gpu[003-005,009],cpu1", "gpu003"),
    ("gpu[7,3-4]", "gpu7"),
    ("a1,b[2-3]", "a1"),
    ("rack[1-2]-n[07-08]", "rack1-n07"),
    ("dgx-h100-[0012-0020]", "dgx-h100-0012"),
])
def test_first_slurm_host(nodelist, host):
    assert parallel.first_slurm_host(nodelist) == host


def test_first_slurm_host_errors():
    with pytest.raises(ValueError, match="empty"):
        parallel.first_slurm_host(" ")
    with pytest.raises(ValueError, match="unclosed"):
        parallel.first_slurm_host("gpu[1-2")


def test_single_process_is_none():
    assert parallel.distributed_settings({}) is None
    assert parallel.distributed_settings({"SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_JOB_NODELIST": "n1"}) is None
    assert parallel.distributed_settings({"JAX_COORDINATOR_ADDRESS": "h", "JAX_NUM_PROCESSES": "1",
                                          "JAX_PROCESS_ID": "0"}) is None
    # explicit off wins over everything
    assert parallel.distributed_settings({"VANS_DISTRIBUTED": "off", "SLURM_NTASKS": "4", "SLURM_PROCID": "1",
                                          "SLURM_JOB_NODELIST": "n[1-4]"}) is None
    assert parallel.initialize_distributed({}) is None          # no-op: jax stays single-process
    assert jax.process_count() == 1


def test_jax_variables():
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.2", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    assert parallel.distributed_settings(env) == dict(coordinator_address="10.0.0.2:8476", num_processes=4,
                                                      process_id=3)
    env.update(JAX_COORDINATOR_ADDRESS="10.0.0.2:1234", JAX_LOCAL_DEVICE_IDS="0,1")
    got = parallel.distributed_settings(env)
    assert got["coordinator_address"] == "10.0.0.2:1234" and got["local_device_ids"] == [0, 1]
    # JAX_* take precedence over SLURM
    env.update(SLURM_NTASKS="8", SLURM_PROCID="5", SLURM_JOB_NODELIST="n[1-8]")
    assert parallel.distributed_settings(env)["process_id"] == 3


def test_slurm_variables():
    env = {"SLURM_NTASKS": "16", "SLURM_PROCID": "9", "SLURM_JOB_NODELIST": "gpu[010-013]", "SLURM_JOB_ID": "4242"}
    assert parallel.distributed_settings(env) == dict(coordinator_address="gpu010:8718", num_processes=16,
                                                      process_id=9)
    # inside an srun step the step's node list is used; JAX_COORDINATOR_PORT sets the port
    env.update(SLURM_STEP_NODELIST="gpu[012-013]", JAX_COORDINATOR_PORT="5000")
    assert parallel.distributed_settings(env)["coordinator_address"] == "gpu012:5000"


def test_auto_and_errors():
    assert parallel.distributed_settings({"VANS_DISTRIBUTED": "auto"}) == {"auto": True}
    with pytest.raises(ValueError, match="VANS_DISTRIBUTED='maybe'"):
        parallel.distributed_settings({"VANS_DISTRIBUTED": "maybe"})
    with pytest.raises(ValueError, match="JAX_PROCESS_ID missing"):
        parallel.distributed_settings({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"})
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES='two' is not an integer"):
        parallel.distributed_settings({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two",
                                       "JAX_PROCESS_ID": "0"})
    with pytest.raises(ValueError, match="process id 2 is not in \\[0, 2\\)"):
        parallel.distributed_settings({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2",
                                       "JAX_PROCESS_ID": "2"})
    with pytest.raises(ValueError, match="SLURM_PROCID is not set"):
        parallel.distributed_settings({"SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "n[1-2]"})
    with pytest.raises(ValueError, match="JAX_LOCAL_DEVICE_IDS"):
        parallel.distributed_settings({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2",
                                       "JAX_PROCESS_ID": "0", "JAX_LOCAL_DEVICE_IDS": "0;1"})


def test_host_local_batch_to_global_single_process():
    mesh = parallel.make_mesh({"data": -1})
    batch = {"x": np.arange(12, dtype=np.float32).reshape(2, 6), "ids": np.arange(2, dtype=np.int32)}
    out = parallel.host_local_batch_to_global(batch, mesh)
    np.testing.assert_array_equal(np.asarray(out["x"]), batch["x"])
    assert out["ids"].dtype == np.int32 and out["x"].shape == (2, 6)
    # a pytree of specs; a spec longer than the array is a clear error
    out = parallel.host_local_batch_to_global(batch, mesh, {"x": P(None, None), "ids": P()})
    assert out["x"].sharding.spec == P(None, None)
    with pytest.raises(ValueError, match=r"batch\['ids'\]: spec .* more entries"):
        parallel.host_local_batch_to_global(batch, mesh, {"x": P(), "ids": P(None, None)})


FOUR_DEVICES = r'''
import numpy as np
from jax.sharding import PartitionSpec as P
from vans_jax import parallel
mesh = parallel.make_mesh({"data": 2, "fsdp": 2})
assert parallel.batch_spec(mesh) == P(("data", "fsdp"))
assert parallel.batch_spec(mesh, 1) == P(None, ("data", "fsdp"))
# one process: axes that do not divide the rows are dropped (the batch replicated over them)
assert parallel.batch_spec(mesh, 0, 6) == P("data") and parallel.batch_spec(mesh, 0, 3) == P(None)
out = parallel.host_local_batch_to_global({"a": np.arange(6.0), "b": np.arange(8.0).reshape(8, 1)}, mesh)
assert out["a"].sharding.spec == P("data") and out["b"].sharding.spec == P(("data", "fsdp"))
np.testing.assert_array_equal(np.asarray(out["a"]), np.arange(6.0))
w = parallel.device_put_global({"w": np.ones((4, 2))}, parallel.NamedSharding(mesh, P("fsdp")))["w"]
assert w.sharding.spec == P("fsdp") and float(w.sum()) == 8.0
print("OK")
'''


def test_batch_spec_on_four_devices():
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=root,
               XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=4"))
    out = subprocess.run([sys.executable, "-c", FOUR_DEVICES], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "OK", out.stderr[-3000:]
