"""Equal CPU resources for both sides of the bench: the same number of threads for XLA's CPU pool
and for torch (intra-op and inter-op), set before either starts and measured afterwards, plus the
OpenMP wait policy torch's threads run under. The result goes into the JSON as ``threads``.

Why the wait policy. torch's CPU kernels (ATen, MKL, oneDNN) run on GNU OpenMP (libgomp). Without
``OMP_WAIT_POLICY`` libgomp lets an idle worker busy-wait (``GOMP_SPINCOUNT``, 300,000 spins) before
it sleeps, and every op splits its work statically into one chunk per thread, then waits at a
barrier for all of them. On a CPU shared with other processes (2 cores, load 2-3) the spinning
threads spend their scheduler share while waiting, get preempted, and an op waits for its
preempted chunk for a whole time slice: a 192x256x256 ``nn.Linear`` on 2 threads took 13-16 ms
(median of 200-300 calls) instead of 0.2-0.4 ms. With ``OMP_WAIT_POLICY=PASSIVE`` idle workers
sleep at once and are scheduled promptly when woken: median 0.28-0.46 ms in the same conditions
(1 thread: 0.26-0.31 ms). It is not JAX's threads: torch in a process without JAX stalled too (p90
11.6 ms, max 68 ms in one of two runs; PASSIVE: p90 0.38-0.42 ms). libgomp reads the variable when
it is loaded (``import torch``), so the bench sets it before it imports torch
(``bench.omp_wait_policy``) and says in the JSON when it could not (torch already imported)."""
from __future__ import annotations

import os
import sys

XLA_POOL_THREAD_NAME = "tf_XLAEigen"     # the names of the threads of XLA:CPU's intra-op pool (Linux)


def cores_available() -> int:
    """The cores this process may run on (its CPU affinity), else ``os.cpu_count()``."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def xla_pool_threads() -> int | None:
    """The number of threads in XLA's CPU intra-op pool of this process, counted by name in
    /proc/self/task (None where there is no /proc)."""
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return None
    n = 0
    for t in tasks:
        try:
            with open(f"/proc/self/task/{t}/comm") as f:
                n += f.read().strip() == XLA_POOL_THREAD_NAME
        except OSError:                  # the thread ended while we looked
            pass
    return n


def xla_client_started() -> bool:
    """Whether this process has created its XLA clients (after which PJRT_NPROC has no effect)."""
    from jax._src import xla_bridge

    return bool(xla_bridge.backends_are_initialized())


def requested_threads(cfg) -> int:
    if "reference_threads" in cfg:
        raise ValueError("bench config: reference_threads was replaced by threads (both sides' CPU threads; 0: the "
                         "cores available)")
    threads = int(cfg.get("threads", 0))
    if threads < 0:
        raise ValueError(f"bench threads must be >= 0 (0: the cores available, {cores_available()}), got {threads}")
    return threads or cores_available()


def prepare(cfg) -> dict:
    """Before JAX's client and torch start: sizes XLA's CPU pool (``PJRT_NPROC``) and sets libgomp's
    wait policy for torch. Returns the record the run completes with ``finish``."""
    threads = requested_threads(cfg)
    record = dict(requested=int(cfg.get("threads", 0)), threads=threads, cores_available=cores_available())
    before = os.environ.get("PJRT_NPROC")
    if xla_client_started():
        record["xla_how"] = (f"the XLA CPU client had already started in this process (PJRT_NPROC="
                             f"{before!r} then); its pool size is measured, not set")
    else:
        os.environ["PJRT_NPROC"] = str(threads)
        record["xla_how"] = (f"PJRT_NPROC={threads} set by the bench before the XLA CPU client started"
                             + (f" (was {before!r})" if before not in (None, str(threads)) else ""))
    policy = str(cfg.get("omp_wait_policy", "PASSIVE"))
    if "torch" in sys.modules:
        record["omp_how"] = ("torch was imported before the bench started: libgomp read OMP_WAIT_POLICY then "
                             f"(now {os.environ.get('OMP_WAIT_POLICY')!r})")
    elif policy:
        os.environ["OMP_WAIT_POLICY"] = policy
        record["omp_how"] = f"OMP_WAIT_POLICY={policy} set by the bench before importing torch"
    else:
        record["omp_how"] = "left to the environment (bench.omp_wait_policy is empty)"
    return record


def set_torch_threads(torch, threads: int) -> str:
    """torch's intra-op and inter-op threads to ``threads``; how it went, in words."""
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
        return f"torch.set_num_threads({threads}) and torch.set_num_interop_threads({threads})"
    except RuntimeError as e:       # torch allows it once, before any inter-op work
        return (f"torch.set_num_threads({threads}); inter-op threads already fixed in this process "
                f"({str(e).strip()})")


def finish(record: dict, torch, torch_how: str | None, backend: str) -> dict:
    """Completes ``record`` once both sides have started: the measured XLA pool, torch's threads,
    whether they are equal, and what cannot be made equal. On the CPU, an XLA pool of another size
    than requested is an error (the client started earlier in this process with other settings)."""
    threads = record["threads"]
    xla = xla_pool_threads()
    if backend == "cpu" and xla not in (None, threads):
        raise ValueError(f"bench threads={threads} but XLA's CPU pool in this process has {xla} threads (its "
                         f"client started before the bench, PJRT_NPROC={os.environ.get('PJRT_NPROC')!r}); run the "
                         f"bench in a fresh process or set --config.threads={xla}")
    record["xla"] = dict(intra_op=xla, how=record.pop("xla_how"))
    if torch is not None:
        record["torch"] = dict(intra_op=torch.get_num_threads(), inter_op=torch.get_num_interop_threads(),
                               how=torch_how)
        equal = xla == torch.get_num_threads() == torch.get_num_interop_threads() == threads
    else:
        record["torch"] = None
        equal = None
    record["openmp"] = dict(wait_policy=os.environ.get("OMP_WAIT_POLICY"),
                            spin_count=os.environ.get("GOMP_SPINCOUNT"), how=record.pop("omp_how"))
    record["equal"] = equal
    record["not_equal"] = differences(backend)
    return record


def differences(backend: str) -> list[str]:
    """What equal thread counts do not make equal: the kernels each side runs."""
    out = ["kernels: XLA compiles and fuses the whole step (its own CPU / GPU code and library calls); "
           "torch runs eager ops one kernel each (no torch.compile)"]
    if backend == "cpu":
        out += ["GEMMs and convolutions: XLA:CPU's runtime kernels vs torch's MKL / oneDNN "
                "(torch.__config__.show())",
                "scheduling: XLA's pool shares an op's blocks among whichever threads are free; torch's OpenMP "
                "gives each thread a fixed chunk and waits for all, so outside load on one core delays a "
                "whole torch op"]
    else:
        out += ["attention: ours per the config's attn_impl (auto: cuDNN flash attention through "
                "jax.nn.dot_product_attention in bf16 / fp16, else the XLA einsum path) vs torch's "
                "scaled_dot_product_attention, which picks its own backend (flash, memory-efficient, cuDNN or "
                "math)",
                "GEMMs: XLA's autotuned cuBLAS(Lt) / Triton fusions vs torch's cuBLAS calls",
                "host threads only feed the device here: the thread counts set the CPU side (input "
                "preparation, dispatch), not the device's compute"]
    return out
