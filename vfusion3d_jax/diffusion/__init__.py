"""Flow-matching diffusion: noise schedules, samplers and guidance (stateless; sampling is a `lax.scan`)."""

from vfusion3d_jax.diffusion.samplers import SAMPLERS, euler_sample, guided_velocity, unipc_sample
from vfusion3d_jax.diffusion.schedules import (Schedule, flow_euler_schedule, from_strength, noisy_sample,
                                               shift_sigmas, training_sigmas, unipc_flow_schedule, velocity_target)

__all__ = ["SAMPLERS", "Schedule", "euler_sample", "flow_euler_schedule", "from_strength", "guided_velocity",
           "noisy_sample", "shift_sigmas", "training_sigmas", "unipc_flow_schedule", "unipc_sample", "velocity_target"]
