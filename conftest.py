"""Test-session setup shared by the whole suite (this file sits at the repository root, so
``tests`` and ``tools`` import from any working directory).

* JAX's persistent compilation cache, under pytest's cache directory (``.pytest_cache/jax``, or
  ``VANS_TEST_JAX_CACHE``): a program compiled by one test, or by a subprocess test (the setting
  travels in the environment), is loaded, not recompiled, by the next one that builds it.
* XLA's LLVM code generation without its expensive optimizations
  (``--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true``, added to
  ``XLA_FLAGS`` for this process and every subprocess test): XLA's own HLO passes (fusion, layout,
  algebraic simplification) are unchanged, compiling takes about a quarter less time, and on these
  tiny models compile time is most of the suite. ``VANS_TEST_XLA_FLAGS=""`` runs the suite with
  XLA's defaults, any other value replaces these flags.
* The ``vans-jax`` command's own XLA defaults (``vans_jax.apps.xla_env``), so that the suite runs
  what users run (``VANS_JAX_DEFAULT_XLA_FLAGS=0`` turns them off, as for the command).
* Compiled programs released after each test file once a worker holds more than
  ``RELEASE_FRACTION`` of the kernel's memory-mapping limit (``vans_jax.apps.compile_cache``
  explains why): a worker that kept them all reached 63,700 mappings and segfaulted inside
  ``backend_compile_and_load`` (the crashes of the 2026-12-04 CI runs).
* Session-scoped tiny models and data (``tests/tiny.py``), built once per run: ``tiny_vans``
  (a Qwen2.5-VL and a diffusers Wan directory plus input clips, for the pipeline / predict tests)
  and ``tiny_world`` (the trainer tests' synthetic world with VLM / VDM / CLIP directories).
"""
import os

import pytest

ROOT = os.path.dirname(os.path.abspath(__file__))
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def pytest_configure(config):
    flags = os.environ.get("VANS_TEST_XLA_FLAGS", FAST_COMPILE_FLAGS)
    if flags and flags not in os.environ.get("XLA_FLAGS", ""):    # before JAX starts (tests import it later)
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flags).strip()
    from vans_jax.apps.xla_env import apply_default_xla_flags
    apply_default_xla_flags()
    cache = os.environ.get("VANS_TEST_JAX_CACHE")
    if not cache:
        pytest_cache = getattr(config, "cache", None)   # absent with -p no:cacheprovider
        cache = str(pytest_cache.mkdir("jax")) if pytest_cache is not None else os.path.join(ROOT, ".pytest_cache",
                                                                                                "jax")
    # through the environment, so subprocess tests (CLI runs, multi-process tests) share it
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", cache)
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    # a size limit turns on JAX's file lock around every cache read and write: without it the two
    # workers (and subprocess tests) can read an entry another process is still writing
    from vans_jax.apps.compile_cache import DEFAULT_MAX_BYTES
    os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(DEFAULT_MAX_BYTES))
    # off unless VANS_TEST_JAX_CACHE_ON=1 (the suite's worker segfaults of 2026-12-04, first blamed on
    # the cache, were the mapping limit: _release_compiled_programs below)
    if os.environ.get("VANS_TEST_JAX_CACHE_ON", "") != "1":   # VANS_TEST_JAX_CACHE_ON=1: the cache on
        os.environ.setdefault("JAX_ENABLE_COMPILATION_CACHE", "false")


# clear JAX's caches after a test file once a worker holds more than this fraction of the mapping limit
RELEASE_FRACTION = float(os.environ.get("VANS_TEST_RELEASE_FRACTION", "0.25"))


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """After each test file: hand back the compiled programs' memory mappings when many are in use
    (module docstring). Torn down after the file's own module fixtures, so what they held is free."""
    yield
    from vans_jax.apps.compile_cache import release_compiled_programs

    release_compiled_programs(RELEASE_FRACTION)


@pytest.fixture(scope="session")
def tiny_vans(tmp_path_factory):
    """Tiny random VLM + VDM directories and two input clips (mp4)."""
    pytest.importorskip("diffusers")
    from tests import tiny
    from vans_jax.data.video_io import write_video

    root = tmp_path_factory.mktemp("tiny_vans")
    vlm, _, _ = tiny.build_vlm_dir(str(root / "vlm"))
    vdm = tiny.build_vdm_dir(str(root / "vdm"))
    clip = write_video(str(root / "clip.mp4"), tiny.moving_square(), fps=tiny.FPS)
    other = write_video(str(root / "other.mp4"), tiny.moving_square(color=(40, 60, 230), seed=5)[::-1], fps=tiny.FPS)
    return {"root": root, "vlm": vlm, "vdm": vdm, "clip": clip, "other": other}


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    pytest.importorskip("diffusers")
    from tests import tiny

    return tiny.build_tiny_world(str(tmp_path_factory.mktemp("tiny_world")))
