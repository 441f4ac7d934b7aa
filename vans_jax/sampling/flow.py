"""Flow-matching samplers for the Wan DiT: shifted flow schedule, Euler, UniPC (order 2, bh2,
flow prediction; step-for-step equal to diffusers' ``UniPCMultistepScheduler(prediction_type=
"flow_prediction", use_flow_sigmas=True, flow_shift=s)``), the Flow-GRPO SDE step with its
Gaussian log-density, the KL between two such steps, classifier-free guidance and ``sample``:
the whole denoising loop as one ``jax.lax.scan`` under ``jax.jit``.

Conventions: x_sigma = (1 - sigma) x0 + sigma * noise, the model predicts v = noise - x0, and a
step goes from sigmas[i] to sigmas[i+1] (< sigmas[i]); timesteps = sigma * 1000 truncated to
integers as diffusers and the Wan repo do. Everything here runs in fp32.

VANS conditioning: ``ref_latents`` (B, C, n_ref, H, W) are clean reference frames. Each model
call sees ``concat([ref_latents, x], time axis)`` with the same timestep and returns only the
target frames, so the sampler state holds only the target latents and the clean references
are, in effect, put back after every step.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..models.wan.dit import trim_text_context

# ----------------------------------------------------------------------------- schedule


def shift_sigmas(sigmas, shift: float):
    """sigma' = s * sigma / (1 + (s - 1) * sigma)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def flow_sigmas(num_steps: int, shift: float = 5.0, num_train_timesteps: int = 1000):
    """The shifted flow schedule exactly as diffusers' UniPC (use_flow_sigmas) sets it.

    Returns (sigmas float32 (num_steps + 1,) ending with 0, timesteps float32 (num_steps,)).
    sigmas[0] == 1 is nudged to 1 - 1e-6 (as diffusers does, to keep log(1 - sigma) finite);
    timesteps = int(sigma * num_train_timesteps), held as float32.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    s = np.linspace(1.0, 1.0 / num_train_timesteps, num_steps + 1)[:-1]
    s = shift_sigmas(s, float(shift))
    if abs(s[0] - 1.0) < 1e-6:
        s[0] -= 1e-6
    timesteps = (s * num_train_timesteps).astype(np.int64).astype(np.float32)
    sigmas = np.concatenate([s, [0.0]]).astype(np.float32)
    return sigmas, timesteps


# ----------------------------------------------------------------------------- ODE steps


def euler_step(x, v, sigma, sigma_next):
    """Deterministic flow step x' = x + (sigma_next - sigma) * v."""
    return x + (sigma_next - sigma) * v


class UniPCState(NamedTuple):
    """Carry of the UniPC state machine (all arrays shaped like the latents)."""
    x0_prev: jax.Array       # data prediction of the previous step (m_{i-1})
    x0_prev2: jax.Array      # of the step before (m_{i-2})
    last_sample: jax.Array   # sample the previous predictor started from (after correction)


def unipc_init(x) -> UniPCState:
    z = jnp.zeros_like(x, dtype=jnp.float32)
    return UniPCState(z, z, z)


def _lambda(sigma):
    # log-SNR of the flow schedule: alpha = 1 - sigma
    return jnp.log(1.0 - sigma) - jnp.log(sigma)


def _unipc_order(i, n):
    # lower_order_final with solver_order 2: order 1 at the first and the last step
    return jnp.minimum(jnp.minimum(2, n - i), i + 1)


def unipc_step(state: UniPCState, model_output, sample, step, sigmas):
    """One UniPC step (predictor order 2 / bh2 with the UniC corrector, flow prediction).

    state: carry from ``unipc_init`` / the previous call; model_output: velocity at
    ``sample`` and sigmas[step]; step: int (may be traced); sigmas: (N+1,) schedule.
    Returns (next sample at sigmas[step + 1], new state). Scalar coefficients are selected
    with ``where`` so unused branches (inf/nan at the boundaries) never touch tensors.
    """
    f32 = jnp.float32
    sigmas = jnp.asarray(sigmas, f32)
    n = sigmas.shape[0] - 1
    i = jnp.asarray(step, jnp.int32)
    x = sample.astype(f32)
    x0 = x - sigmas[i] * model_output.astype(f32)
    m1, m2, last = state

    def base_coeffs(s_t, s_s0):
        lam_t, lam_s0 = _lambda(s_t), _lambda(s_s0)
        h = lam_t - lam_s0
        hh = -h
        h_phi_1 = jnp.expm1(hh)
        b_h = jnp.expm1(hh)  # bh2
        alpha_t = 1.0 - s_t
        return h, hh, h_phi_1, b_h, alpha_t, lam_s0

    # ---- corrector UniC at step i (i > 0) with the previous step's order
    ic = jnp.maximum(i - 1, 0)
    order_c = _unipc_order(ic, n)
    s_t, s_s0 = sigmas[i], sigmas[ic]
    h, hh, h_phi_1, b_h, alpha_t, lam_s0 = base_coeffs(s_t, s_s0)
    r1 = (_lambda(sigmas[jnp.maximum(i - 2, 0)]) - lam_s0) / h
    h_phi_k = h_phi_1 / hh - 1.0
    b1 = h_phi_k / b_h
    b2 = (h_phi_k / hh - 0.5) * 2.0 / b_h
    rho0 = (b1 - b2) / (1.0 - r1)      # solve [[1, 1], [r1, 1]] rho = [b1, b2]
    rho1 = b1 - rho0
    two = order_c == 2
    use_c = i > 0
    # x_c = c_last * last + c_m0 * m1 + c_d1 * (m2 - m1) + c_dt * (x0 - m1)
    c_last = jnp.where(use_c, s_t / s_s0, 0.0)
    c_m0 = jnp.where(use_c, -alpha_t * h_phi_1, 0.0)
    c_d1 = jnp.where(use_c & two, -alpha_t * b_h * rho0 / r1, 0.0)
    c_dt = jnp.where(use_c, -alpha_t * b_h * jnp.where(two, rho1, 0.5), 0.0)
    x_c = c_last * last + c_m0 * m1 + c_d1 * (m2 - m1) + c_dt * (x0 - m1)
    x = jnp.where(use_c, x_c, x)

    # ---- predictor UniP from sigmas[i] to sigmas[i+1]
    order_p = _unipc_order(i, n)
    s_t, s_s0 = sigmas[i + 1], sigmas[i]
    h, hh, h_phi_1, b_h, alpha_t, lam_s0 = base_coeffs(s_t, s_s0)
    r1 = (_lambda(sigmas[jnp.maximum(i - 1, 0)]) - lam_s0) / h
    p_x = s_t / s_s0
    p_m0 = -alpha_t * h_phi_1
    p_d1 = jnp.where(order_p == 2, -alpha_t * b_h * 0.5 / r1, 0.0)
    x_next = p_x * x + p_m0 * x0 + p_d1 * (m1 - x0)
    return x_next, UniPCState(x0, m1, x)


# ----------------------------------------------------------------------------- SDE (Flow-GRPO)


class SDEStep(NamedTuple):
    prev_sample: jax.Array   # x' (B, ...)
    log_prob: jax.Array      # (B,) mean over non-batch elements of log N(x'; mean, std^2)
    mean: jax.Array          # (B, ...)
    std: jax.Array           # scalar std_t * sqrt(-dt)


def sde_std_t(sigma, sigmas, noise_level: float = 0.7, std_form: str = "flow_grpo"):
    """std_t of the Flow-GRPO SDE at ``sigma``.

    "flow_grpo": sqrt(sigma / (1 - sigma)) * noise_level, with sigmas[1] in the denominator at
    sigma == 1 (a sigma within 1e-5 of 1, i.e. diffusers' 1 - 1e-6 first sigma, counts as 1).
    "wan": s_min + (s_max - s_min) * sigma with s_max = sigmas[1], s_min = sigmas[-1].
    """
    sigmas = jnp.asarray(sigmas, jnp.float32)
    sigma = jnp.asarray(sigma, jnp.float32)
    if std_form == "flow_grpo":
        denom_sigma = jnp.where(sigma >= 1.0 - 1e-5, sigmas[1], sigma)
        return jnp.sqrt(sigma / (1.0 - denom_sigma)) * noise_level
    if std_form == "wan":
        s_max, s_min = sigmas[1], sigmas[-1]
        return s_min + (s_max - s_min) * sigma
    raise ValueError(f"unknown std_form {std_form!r}; expected 'flow_grpo' or 'wan'")


def sde_mean_std(x, v, sigma, sigma_next, std_t):
    """Mean and std (std_t * sqrt(-dt)) of the Flow-GRPO SDE transition, fp32."""
    x = x.astype(jnp.float32)
    v = v.astype(jnp.float32)
    dt = sigma_next - sigma
    mean = x * (1.0 + std_t ** 2 / (2.0 * sigma) * dt) + v * (1.0 + std_t ** 2 * (1.0 - sigma) / (2.0 * sigma)) * dt
    return mean, std_t * jnp.sqrt(-dt)


def gaussian_log_prob(x, mean, std):
    """Mean over non-batch elements of log N(x; mean, std^2) (std scalar or broadcastable)."""
    x = jax.lax.stop_gradient(x.astype(jnp.float32))
    lp = -((x - mean) ** 2) / (2.0 * std ** 2) - jnp.log(std) - math.log(math.sqrt(2.0 * math.pi))
    return jnp.mean(lp, axis=tuple(range(1, lp.ndim)))


def sde_step(x, v, sigmas, step, *, rng=None, eps=None, prev_sample=None, noise_level: float = 0.7,
             std_form: str = "flow_grpo", deterministic: bool = False) -> SDEStep:
    """Flow-GRPO SDE step from sigmas[step] to sigmas[step + 1] with its log-probability.

    Give ``prev_sample`` to score a stored transition, else ``eps`` (standard normal, shaped
    like x) or ``rng`` to draw one. ``deterministic``: x' = x + dt * v (the Euler step), still
    scored under the SDE Gaussian.
    """
    sigmas = jnp.asarray(sigmas, jnp.float32)
    i = jnp.asarray(step, jnp.int32)
    sigma, sigma_next = sigmas[i], sigmas[i + 1]
    std_t = sde_std_t(sigma, sigmas, noise_level, std_form)
    mean, std = sde_mean_std(x, v, sigma, sigma_next, std_t)
    if prev_sample is None:
        if deterministic:
            prev_sample = euler_step(x.astype(jnp.float32), v.astype(jnp.float32), sigma, sigma_next)
        else:
            if eps is None:
                if rng is None:
                    raise ValueError("sde_step needs prev_sample, eps or rng")
                eps = jax.random.normal(rng, x.shape, jnp.float32)
            prev_sample = mean + std * eps.astype(jnp.float32)
    prev_sample = prev_sample.astype(jnp.float32)
    return SDEStep(prev_sample, gaussian_log_prob(prev_sample, mean, std), mean, std)


def gaussian_kl(mean, ref_mean, std):
    """KL between two equal-variance Gaussian steps: mean((mu - mu_ref)^2) / (2 std^2), per batch row."""
    d = (mean.astype(jnp.float32) - ref_mean.astype(jnp.float32)) ** 2
    return jnp.mean(d, axis=tuple(range(1, d.ndim))) / (2.0 * std ** 2)


# ----------------------------------------------------------------------------- guidance


def cfg_combine(cond, uncond, guidance_scale):
    """uncond + g * (cond - uncond), in fp32."""
    cond = cond.astype(jnp.float32)
    uncond = uncond.astype(jnp.float32)
    return uncond + guidance_scale * (cond - uncond)


def guided_velocity(model: Callable, x, timestep, context, uncond_context=None, guidance_scale=1.0,
                    ref_latents=None, context_pad=None):
    """Velocity for the target latents x (B, C, T, H, W) at a timestep (a scalar, or one per row (B,)).

    Prepends the clean ``ref_latents`` on the time axis (their outputs are dropped by the model
    via ``n_ref``). With ``uncond_context`` the conditional and unconditional passes run as one
    batch of 2B and are combined with ``cfg_combine``. ``context_pad``: the contexts were trimmed by
    ``models.wan.trim_text_context`` (both to one length), the number of zero rows dropped.
    """
    kw = {} if context_pad is None else {"context_pad": context_pad}
    b = x.shape[0]
    n_ref = 0
    x_in = x
    if ref_latents is not None:
        n_ref = ref_latents.shape[2]
        x_in = jnp.concatenate([ref_latents.astype(x.dtype), x], axis=2)
    t = jnp.broadcast_to(jnp.asarray(timestep, jnp.float32), (b,))
    if uncond_context is None:
        return model(x_in, t, context, n_ref=n_ref, **kw).astype(jnp.float32)
    x2 = jnp.concatenate([x_in, x_in], axis=0)
    ctx2 = jnp.concatenate([context, uncond_context.astype(context.dtype)], axis=0)
    out = model(x2, jnp.concatenate([t, t]), ctx2, n_ref=n_ref, **kw)
    return cfg_combine(out[:b], out[b:], guidance_scale)


# ----------------------------------------------------------------------------- sampling loop


class Trajectory(NamedTuple):
    """Step-major records of one ``sample`` call (N = number of steps)."""
    latents: jax.Array     # (N + 1, B, C, T, H, W): x before each step, then the final latents
    log_probs: jax.Array   # (N, B): SDE log-probabilities (0 where the step was deterministic)
    means: jax.Array       # (N, B, C, T, H, W): SDE means (the deterministic next sample elsewhere)
    sigmas: jax.Array      # (N + 1,)
    timesteps: jax.Array   # (N,)
    sde_mask: jax.Array    # (N,) bool: which steps were stochastic


MODES = ("unipc", "euler", "sde")


@functools.partial(jax.jit, static_argnames=("graphdef", "mode", "std_form", "return_trajectory"))
def _sample_jit(graphdef, state, noise, context, uncond_context, guidance_scale, ref_latents, sigmas, timesteps,
                sde_mask, rng, noise_level, context_pad, *, mode, std_form, return_trajectory):
    model = nnx.merge(graphdef, state)
    n = timesteps.shape[0]
    x = noise.astype(jnp.float32)

    def step(carry, i):
        x, ustate = carry
        v = guided_velocity(model, x, timesteps[i], context, uncond_context, guidance_scale, ref_latents,
                            context_pad)
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        lp = jnp.zeros((x.shape[0],), jnp.float32)
        if mode == "unipc":
            x_next, ustate = unipc_step(ustate, v, x, i, sigmas)
            mean = x_next
        elif mode == "euler":
            x_next = euler_step(x, v, sigma, sigma_next)
            mean = x_next
        else:
            det = euler_step(x, v, sigma, sigma_next)
            out = sde_step(x, v, sigmas, i, rng=jax.random.fold_in(rng, i), noise_level=noise_level,
                           std_form=std_form)
            use = sde_mask[i]
            x_next = jnp.where(use, out.prev_sample, det)
            mean = jnp.where(use, out.mean, det)
            lp = jnp.where(use, out.log_prob, lp)
        ys = (x, lp, mean) if return_trajectory else None
        return (x_next, ustate), ys

    ustate = unipc_init(x) if mode == "unipc" else ()
    (x, _), ys = jax.lax.scan(step, (x, ustate), jnp.arange(n))
    if not return_trajectory:
        return x
    xs, lps, means = ys
    return x, Trajectory(jnp.concatenate([xs, x[None]], axis=0), lps, means, sigmas, timesteps, sde_mask)


def sample(model, noise, context, *, uncond_context=None, guidance_scale: float = 5.0, ref_latents=None,
           num_steps: int = 50, shift: float = 5.0, mode: str = "unipc", rng=None,
           sde_window: tuple[int, int] | None = None, noise_level: float = 0.7, std_form: str = "flow_grpo",
           return_trajectory: bool = False, sigmas=None, timesteps=None, trim_context: bool = True):
    """Denoises ``noise`` (B, C, T, H, W) with the DiT ``model`` in one jitted ``lax.scan``.

    context / uncond_context: (B, L, text_dim) text embeddings; uncond_context=None disables
    CFG (single pass), otherwise both passes run batched. ref_latents: (B, C, n_ref, H, W)
    clean VANS reference latents or None (plain T2V).
    mode: "unipc" (diffusers-equal UniPC), "euler" (deterministic ODE) or "sde" (Flow-GRPO SDE
    on the steps in ``sde_window`` = [start, end), default all, Euler elsewhere; needs ``rng``).
    sigmas/timesteps: override the ``flow_sigmas(num_steps, shift)`` schedule.
    trim_context: run the DiT on the contexts without their shared all-zero tail
    (``models.wan.trim_text_context``; the same velocities) when the model allows it
    (``trims_text_context``); False: on all L positions.
    Returns the final latents (fp32), or (latents, Trajectory) with ``return_trajectory``.
    """
    if mode not in MODES:
        raise ValueError(f"unknown sampler mode {mode!r}; expected one of {MODES}")
    if sigmas is None:
        sigmas, ts = flow_sigmas(num_steps, shift)
        timesteps = ts if timesteps is None else timesteps
    elif timesteps is None:
        timesteps = np.asarray(sigmas[:-1], np.float32) * 1000.0
    sigmas = jnp.asarray(sigmas, jnp.float32)
    timesteps = jnp.asarray(timesteps, jnp.float32)
    n = int(timesteps.shape[0])
    if sigmas.shape[0] != n + 1:
        raise ValueError(f"need len(sigmas) == len(timesteps) + 1, got {sigmas.shape[0]} and {n}")
    start, end = (0, n) if sde_window is None else sde_window
    mask = (np.arange(n) >= start) & (np.arange(n) < end) if mode == "sde" else np.zeros(n, bool)
    if mode == "sde" and rng is None:
        raise ValueError("mode 'sde' needs rng")
    if rng is None:
        rng = jax.random.key(0)
    pad = None
    if trim_context and getattr(model, "trims_text_context", lambda: False)():
        (context, uncond_context), pad = trim_text_context(context, uncond_context)
    graphdef, state = nnx.split(model)
    return _sample_jit(graphdef, state, noise, context, uncond_context, jnp.asarray(guidance_scale, jnp.float32),
                       ref_latents, sigmas, timesteps, jnp.asarray(mask), rng,
                       jnp.asarray(noise_level, jnp.float32), None if pad is None else jnp.float32(pad),
                       mode=mode, std_form=std_form,
                       return_trajectory=return_trajectory)
