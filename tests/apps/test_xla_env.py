"""vans-jax's XLA defaults (``vans_jax.apps.xla_env``): added to XLA_FLAGS only when every XLA in the
environment knows the flag (an unknown flag aborts the process), never over the user's own setting,
never after JAX's backends started, and off with VANS_JAX_DEFAULT_XLA_FLAGS=0."""
import json
import os
import subprocess
import sys

from vans_jax.apps import xla_env

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FLAG, VALUE = xla_env.DEFAULT_XLA_FLAGS[0]


def fake_lib(tmp_path, name, knows):
    path = tmp_path / name
    path.write_bytes(b"\0" * 64 + (FLAG.lstrip("-").encode() if knows else b"xla_cpu_something_else") + b"\0" * 64)
    return str(path)


def test_added_when_every_xla_knows_it(tmp_path):
    libs = {"jaxlib": [fake_lib(tmp_path, "a.so", True)], "jax_plugins": [fake_lib(tmp_path, "b.so", True)]}
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    rec = xla_env.apply_default_xla_flags(env, libs)
    assert rec == {"applied": [f"{FLAG}={VALUE}"], "skipped": {}}
    assert env["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=8 {FLAG}={VALUE}"
    env = {}
    xla_env.apply_default_xla_flags(env, libs)
    assert env["XLA_FLAGS"] == f"{FLAG}={VALUE}"


def test_not_added_when_a_plugin_or_jaxlib_lacks_it(tmp_path):
    libs = {"jaxlib": [fake_lib(tmp_path, "a.so", True)], "jax_plugins": [fake_lib(tmp_path, "b.so", False)]}
    env = {}
    rec = xla_env.apply_default_xla_flags(env, libs)
    assert rec["applied"] == [] and "jax_plugins does not know" in rec["skipped"][FLAG] and "XLA_FLAGS" not in env
    rec = xla_env.apply_default_xla_flags(env, {"jaxlib": [fake_lib(tmp_path, "c.so", False)]})
    assert "jaxlib does not know" in rec["skipped"][FLAG] and "XLA_FLAGS" not in env
    rec = xla_env.apply_default_xla_flags(env, {"jaxlib": []})
    assert "not found" in rec["skipped"][FLAG]
    missing = {"jaxlib": [str(tmp_path / "gone.so")]}
    assert "could not read jaxlib" in xla_env.apply_default_xla_flags(env, missing)["skipped"][FLAG]


def test_user_setting_and_opt_out_win(tmp_path):
    libs = {"jaxlib": [fake_lib(tmp_path, "a.so", True)]}
    env = {"XLA_FLAGS": f"{FLAG}=default"}
    rec = xla_env.apply_default_xla_flags(env, libs)
    assert rec["applied"] == [] and "already in XLA_FLAGS" in rec["skipped"][FLAG]
    assert env["XLA_FLAGS"] == f"{FLAG}=default"
    env = {xla_env.OPT_OUT_ENV: "0"}
    rec = xla_env.apply_default_xla_flags(env, libs)
    assert rec["applied"] == [] and xla_env.OPT_OUT_ENV in rec["skipped"][FLAG] and "XLA_FLAGS" not in env


def run_python(code, env_extra):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", xla_env.OPT_OUT_ENV)}
    env.update(env_extra, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


CODE = """
import json, os
from vans_jax.apps import xla_env
rec = xla_env.apply_default_xla_flags()
import jax, jax.numpy as jnp
x = jnp.arange(320 * 256, dtype=jnp.float32).reshape(320, 256) / 1e4
w = jnp.linspace(-1, 1, 256 * 64, dtype=jnp.float32).reshape(256, 64)
g = jax.jit(jax.grad(lambda w: jnp.sum(jnp.tanh(x @ w) ** 2)))(w)
late = xla_env.apply_default_xla_flags()
print(json.dumps(dict(rec=rec, late=late, flags=os.environ.get("XLA_FLAGS", ""), g=g.sum().item(),
                      gmax=float(abs(g).max()))))
"""


def test_real_environment_process_survives_and_results_agree():
    """In a fresh process on this machine's real jaxlib: the flag goes in when jaxlib knows it (and the
    process runs a jitted gradient without XLA aborting on it), a second call after JAX started changes
    nothing, and the gradient equals the one computed with the defaults off."""
    on = run_python(CODE, {})
    off = run_python(CODE, {xla_env.OPT_OUT_ENV: "0"})
    known, why = xla_env.known_to_xla(FLAG)
    if known:
        assert on["rec"]["applied"] == [f"{FLAG}={VALUE}"] and FLAG in on["flags"]
    else:
        assert on["rec"]["applied"] == [] and FLAG not in on["flags"] and on["rec"]["skipped"][FLAG] == why
    assert on["late"]["applied"] == [] and FLAG not in off["flags"]
    assert "started" in on["late"]["skipped"][FLAG] or "already in XLA_FLAGS" in on["late"]["skipped"][FLAG]
    assert abs(on["g"] - off["g"]) <= 1e-5 * max(1.0, abs(off["g"])) and on["gmax"] > 0
