"""Flow-matching noise schedules: training-time noise levels and the samplers' step tables.

Flow matching as Wan trains it: x_σ = (1 − σ)·x₀ + σ·ε for a noise level σ ∈ [0, 1], the
model predicts the velocity ε − x₀, and the model's timestep input is σ·1000. A shift s > 1
moves noise levels towards pure noise, σ ↦ s·σ / (1 + (s − 1)·σ) (large videos need more
denoising at high noise; Wan uses 3.0 at 480p and 5.0 at 720p).

The inference schedules equal diffusers' (`FlowMatchEulerDiscreteScheduler.set_timesteps` and
`UniPCMultistepScheduler.set_timesteps` with `use_flow_sigmas`), quirks included: the Euler
scheduler's grid is shifted twice (once when built, once per `set_timesteps`), and UniPC feeds the
model integer timesteps. They are host-side NumPy tables with the noise levels rounded to float32
as diffusers stores them (near σ = 1, α = 1 − σ depends on that rounding); the samplers turn them
into per-step coefficients for one `lax.scan`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

NUM_TRAIN_TIMESTEPS = 1000


def shift_sigmas(sigmas, shift: float):
    """σ ↦ shift·σ / (1 + (shift − 1)·σ); NumPy or JAX arrays."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def training_sigmas(key: jax.Array, shape: tuple[int, ...], shift: float) -> jax.Array:
    """Noise levels for training: uniform on [0, 1), then shifted (float32)."""
    return shift_sigmas(jax.random.uniform(key, shape, jnp.float32), shift)


def noisy_sample(clean: jax.Array, noise: jax.Array, sigmas: jax.Array) -> jax.Array:
    """x_σ = (1 − σ)·x₀ + σ·ε, with σ broadcast from the leading (batch) axes."""
    sigmas = sigmas.reshape(sigmas.shape + (1,) * (clean.ndim - sigmas.ndim))
    return (1 - sigmas) * clean + sigmas * noise


def velocity_target(clean: jax.Array, noise: jax.Array) -> jax.Array:
    """The flow-matching regression target ε − x₀."""
    return noise - clean


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Noise levels σ₀ > … > σ_N = 0 (N + 1 values) and the model's timestep input at each of the N steps."""

    sigmas: np.ndarray
    timesteps: np.ndarray

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)


def flow_euler_schedule(num_steps: int, shift: float, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> Schedule:
    """diffusers' `FlowMatchEulerDiscreteScheduler(shift=shift).set_timesteps(num_steps)`."""
    train_sigmas = shift_sigmas(np.arange(num_train_timesteps, 0, -1, dtype=np.float64) / num_train_timesteps, shift)
    sigma_max, sigma_min = train_sigmas[0], train_sigmas[-1]
    sigmas = np.linspace(sigma_max, sigma_min, num_steps)
    sigmas = shift_sigmas(sigmas, shift).astype(np.float32)  # the second shift of diffusers' scheduler
    return Schedule(np.append(sigmas, 0.0).astype(np.float64), sigmas.astype(np.float64) * num_train_timesteps)


def unipc_flow_schedule(num_steps: int, shift: float, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> Schedule:
    """diffusers' `UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=shift,
    prediction_type="flow_prediction").set_timesteps(num_steps)` (final σ zero)."""
    sigmas = shift_sigmas(np.linspace(1, 1 / num_train_timesteps, num_steps + 1)[:-1], shift)
    if abs(sigmas[0] - 1) < 1e-6:
        sigmas[0] -= 1e-6  # diffusers: keeps log(α) finite in the first updates
    timesteps = np.trunc(sigmas * num_train_timesteps)  # cast to int64 by diffusers
    return Schedule(np.append(sigmas, 0.0).astype(np.float32).astype(np.float64), timesteps)


def from_strength(schedule: Schedule, strength: float) -> Schedule:
    """The steps of `schedule` from noise level `strength` on (image-to-image, SDEdit): sampling then
    starts from a partly noised image at the first σ ≤ strength (1 = the whole schedule)."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    below = np.flatnonzero(schedule.sigmas[:-1] <= strength + 1e-6)
    start = int(below[0]) if below.size else schedule.num_steps - 1  # at least the last step
    return Schedule(schedule.sigmas[start:], schedule.timesteps[start:])
