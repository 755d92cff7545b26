"""Samplers for flow-matching models: flow Euler and UniPC, each one jitted `lax.scan` over steps.

A sampler integrates from pure noise (σ₀ ≈ 1) to a sample (σ_N = 0) with a `velocity`
function (x, timestep) → predicted ε − x₀. Both equal diffusers' schedulers step for step
(`FlowMatchEulerDiscreteScheduler.step`; `UniPCMultistepScheduler.step` with
`prediction_type="flow_prediction"`, `predict_x0`, the bh2 B(h), `lower_order_final`). UniPC's
predictor and corrector are linear in the current sample and the recent x₀ predictions, with
coefficients that depend on the noise levels only; they are computed on the host in float64
(`unipc_coefficients`), so the scanned step is a few multiply-adds.

Guidance (`guided_velocity`) evaluates the conditions in one batch, as in Wan's pipelines.
The velocity runs inside `lax.scan`: an NNX model must enter it as state, merged inside
(`nnx.merge(graphdef, state, copy=True)`), not as a module captured by the closure.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vfusion3d_jax.diffusion.schedules import NUM_TRAIN_TIMESTEPS, Schedule

Velocity = Callable[[jax.Array, jax.Array], jax.Array]  # (sample, timestep scalar) -> velocity


def euler_sample(velocity: Velocity, initial: jax.Array, schedule: Schedule, *,
                 return_trajectory: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
    """x_{i+1} = x_i + (σ_{i+1} − σ_i)·v(x_i, t_i). Returns the sample (and every x_i, (N + 1, ...))."""
    sigmas = jnp.asarray(schedule.sigmas, jnp.float32)
    steps = (jnp.asarray(schedule.timesteps, jnp.float32), sigmas[1:] - sigmas[:-1])

    def step(x, per_step):
        timestep, delta = per_step
        x = (x + delta * velocity(x, timestep).astype(jnp.float32)).astype(initial.dtype)
        return x, x

    final, trajectory = jax.lax.scan(step, initial, steps)
    return (final, jnp.concatenate([initial[None], trajectory])) if return_trajectory else final


@dataclasses.dataclass(frozen=True)
class UniPCCoefficients:
    """Per step i (N rows): corrector x_i ← c_x·x_{i−1} + Σ_j c_m[j]·m_{i−j} (j = 0 … order), then
    predictor x_{i+1} = p_x·x_i + Σ_j p_m[j]·m_{i−j} (j = 0 … order − 1); m_k = x_k − σ_k·v_k."""

    corrector_x: np.ndarray   # (N,); row 0 unused (no corrector before the first prediction)
    corrector_m: np.ndarray   # (N, order + 1)
    predictor_x: np.ndarray   # (N,)
    predictor_m: np.ndarray   # (N, order)


def _log_snr(sigma: float) -> float:
    """λ = log(α) − log(σ) with α = 1 − σ (flow form); +inf at σ = 0."""
    with np.errstate(divide="ignore"):
        return float(np.log(1 - sigma) - np.log(sigma))


def _bh_terms(h: float, order: int, ratios: Sequence[float]):
    """diffusers' B(h) = expm1(−h) (bh2) with φ₁ and the R, b of the order conditions."""
    hh = -h  # predict_x0
    h_phi_1 = math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1 if np.isfinite(hh) else -1.0
    b_h = math.expm1(hh)
    ranks = np.array(list(ratios) + [1.0])
    rows, rhs, factorial = [], [], 1
    for k in range(1, order + 1):
        rows.append(ranks ** (k - 1))
        rhs.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial if np.isfinite(hh) else -1 / factorial
    return h_phi_1, b_h, np.array(rows), np.array(rhs)


def unipc_coefficients(sigmas: np.ndarray, order: int = 2) -> UniPCCoefficients:
    """The coefficients of diffusers' UniPC (bh2, predict_x0, lower_order_final) for `sigmas` (N + 1,)."""
    num_steps = len(sigmas) - 1
    lambdas = [_log_snr(s) for s in sigmas]
    alphas = 1 - np.asarray(sigmas, np.float64)
    corrector_x, corrector_m = np.zeros(num_steps), np.zeros((num_steps, order + 1))
    predictor_x, predictor_m = np.zeros(num_steps), np.zeros((num_steps, order))
    previous_order = 0
    for i in range(num_steps):
        if i > 0:  # corrector of x_i with the previous step's order, using m_i
            p, h = previous_order, lambdas[i] - lambdas[i - 1]
            ratios = [(lambdas[i - 1 - k] - lambdas[i - 1]) / h for k in range(1, p)]
            h_phi_1, b_h, rows, rhs = _bh_terms(h, p, ratios)
            rhos = np.array([0.5]) if p == 1 else np.linalg.solve(rows, rhs)
            scale = alphas[i] * b_h
            corrector_x[i] = sigmas[i] / sigmas[i - 1]
            corrector_m[i, 1] = -alphas[i] * h_phi_1 + scale * rhos[-1]  # m_{i−1}
            corrector_m[i, 0] = -scale * rhos[-1]                         # m_i
            for k, ratio in enumerate(ratios, start=1):                  # D1_k = (m_{i−1−k} − m_{i−1}) / r_k
                corrector_m[i, 1 + k] -= scale * rhos[k - 1] / ratio
                corrector_m[i, 1] += scale * rhos[k - 1] / ratio
        p = min(order, num_steps - i, i + 1)  # lower_order_final and the multistep warm-up
        h = lambdas[i + 1] - lambdas[i]
        ratios = [(lambdas[i - k] - lambdas[i]) / h for k in range(1, p)]
        h_phi_1, b_h, rows, rhs = _bh_terms(h, p, ratios)
        rhos = np.array([0.5]) if p == 2 else (np.linalg.solve(rows[:-1, :-1], rhs[:-1]) if p > 2 else np.zeros(0))
        predictor_x[i] = sigmas[i + 1] / sigmas[i]
        predictor_m[i, 0] = -alphas[i + 1] * h_phi_1
        for k, ratio in enumerate(ratios, start=1):                      # D1_k = (m_{i−k} − m_i) / r_k
            predictor_m[i, k] -= alphas[i + 1] * b_h * rhos[k - 1] / ratio
            predictor_m[i, 0] += alphas[i + 1] * b_h * rhos[k - 1] / ratio
        previous_order = p
    return UniPCCoefficients(corrector_x, corrector_m, predictor_x, predictor_m)


def unipc_sample(velocity: Velocity, initial: jax.Array, schedule: Schedule, *, order: int = 2,
                 return_trajectory: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
    """UniPC in flow form, diffusers' defaults for Wan (order 2). Returns the sample (and every
    sample after each step's prediction, (N + 1, ...), as diffusers' `step` returns them)."""
    coefficients = unipc_coefficients(np.asarray(schedule.sigmas, np.float64), order)
    table = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), dataclasses.astuple(coefficients))
    per_step = (jnp.asarray(schedule.timesteps, jnp.float32), jnp.asarray(schedule.sigmas[:-1], jnp.float32)) + table
    zeros = jnp.zeros_like(initial, jnp.float32)

    def step(carry, inputs):
        x, last_x, history = carry  # history: m_{i−1} … m_{i−order}
        timestep, sigma, corrector_x, corrector_m, predictor_x, predictor_m = inputs
        m = x.astype(jnp.float32) - sigma * velocity(x, timestep).astype(jnp.float32)
        outputs = (m,) + history
        corrected = corrector_x * last_x + sum(c * o for c, o in zip(corrector_m, outputs))
        x = jnp.where(corrector_x != 0, corrected, x.astype(jnp.float32))  # no corrector at step 0
        predicted = predictor_x * x + sum(c * o for c, o in zip(predictor_m, outputs))
        return (predicted.astype(initial.dtype), x, outputs[:-1]), predicted.astype(initial.dtype)

    carry = (initial, zeros, (zeros,) * order)
    (final, _, _), trajectory = jax.lax.scan(step, carry, per_step)
    return (final, jnp.concatenate([initial[None], trajectory])) if return_trajectory else final


SAMPLERS = {"euler": euler_sample, "unipc": unipc_sample}


def guided_velocity(model_velocity: Callable[..., jax.Array], conditions: Sequence[dict],
                    scales: Sequence[float], interval: tuple[float, float] = (0.0, 1.0)) -> Velocity:
    """Classifier-free guidance over nested conditions, evaluated as one batch.

    `conditions` = [c₀, c₁, …, c_K] from the least to the most conditioned (e.g. nothing, image,
    image + text), each a dict of model keyword arguments with the batch leading; `scales` K
    guidance scales: v = v₀ + Σ_k g_k·(v_k − v_{k−1}). With one scale this is Wan's
    v_uncond + g·(v_cond − v_uncond); a scale of 1 everywhere gives v_K.

    Guidance applies only at noise levels σ = timestep / NUM_TRAIN_TIMESTEPS inside `interval`
    (low, high), both ends included; elsewhere the velocity is the fully conditioned v_K alone, one
    prediction instead of K + 1 (guidance in a limited interval, Kynkäänniemi et al. 2024). The
    default covers every step.
    """
    if len(scales) != len(conditions) - 1:
        raise ValueError(f"{len(conditions)} conditions need {len(conditions) - 1} guidance scales, got {len(scales)}")
    batched = jax.tree.map(lambda *parts: jnp.concatenate(parts), *conditions)
    copies = len(conditions)

    def guided(x: jax.Array, timestep: jax.Array) -> jax.Array:
        outputs = jnp.split(model_velocity(jnp.concatenate([x] * copies), timestep, **batched), copies)
        result = outputs[0]
        for scale, lower, higher in zip(scales, outputs[:-1], outputs[1:]):
            result = result + scale * (higher - lower)
        return result

    def conditioned(x: jax.Array, timestep: jax.Array) -> jax.Array:
        return model_velocity(x, timestep, **conditions[-1])

    if tuple(interval) == (0.0, 1.0):
        return guided  # σ never leaves [0, 1]: every step guided, no branch in the program

    def velocity(x: jax.Array, timestep: jax.Array) -> jax.Array:
        sigma = jnp.asarray(timestep, jnp.float32) / NUM_TRAIN_TIMESTEPS
        inside = (sigma >= interval[0]) & (sigma <= interval[1])
        return jax.lax.cond(inside, guided, conditioned, x, timestep)

    return velocity
