"""View-dependent colour from spherical-harmonic coefficients, degrees 0 to 3, as gsplat 1.5.3.

gsplat evaluates the real SH basis with Sloan's formulas ("Efficient Spherical Harmonic
Evaluation", JCGT 2013), in its own sign convention and coefficient order (`_eval_sh_bases_fast`,
`sh_coeffs_to_color_fast`), at the unit direction from the camera centre to the Gaussian's mean.
`rasterization()` then adds 0.5 and clamps at 0 (to match the original 3DGS CUDA code), so a
degree-0 coefficient of 0 is mid-grey.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vfusion3d_jax.rendering.splatting.projection import normalize

MAX_SH_DEGREE = 3
SH_C0 = 0.2820947917738781
SH_C1 = 0.48860251190292


def num_sh_bases(degree: int) -> int:
    return (degree + 1) ** 2


def sh_basis(degree: int, directions: jax.Array) -> jax.Array:
    """gsplat's SH basis [..., (degree+1)^2] at unit directions [..., 3]."""
    if not 0 <= degree <= MAX_SH_DEGREE:
        raise ValueError(f"sh_degree must be in [0, {MAX_SH_DEGREE}], got {degree}")
    x, y, z = jnp.moveaxis(directions, -1, 0)
    bases = [jnp.full_like(x, SH_C0)]
    if degree >= 1:
        bases += [-SH_C1 * y, SH_C1 * z, -SH_C1 * x]
    if degree >= 2:
        z2 = z * z
        c1, s1 = x * x - y * y, 2 * x * y  # cos(2 phi), sin(2 phi) times rho^2
        bases += [
            0.5462742152960395 * s1,
            -1.092548430592079 * z * y,
            0.9461746957575601 * z2 - 0.3153915652525201,
            -1.092548430592079 * z * x,
            0.5462742152960395 * c1,
        ]
    if degree >= 3:
        polar = -2.285228997322329 * z2 + 0.4570457994644658
        c2, s2 = x * c1 - y * s1, x * s1 + y * c1
        bases += [
            -0.5900435899266435 * s2,
            1.445305721320277 * z * s1,
            polar * y,
            z * (1.865881662950577 * z2 - 1.119528997770346),
            polar * x,
            1.445305721320277 * z * c1,
            -0.5900435899266435 * c2,
        ]
    return jnp.stack(bases, axis=-1)


def sh_to_color(degree: int, directions: jax.Array, coefficients: jax.Array) -> jax.Array:
    """gsplat's `spherical_harmonics`: directions [..., 3] (any length; normalised here) and
    coefficients [..., K, 3] with K >= (degree+1)^2 -> raw colour [..., 3]. Coefficients past the
    degree's count are ignored (they get a zero gradient)."""
    count = num_sh_bases(degree)
    if coefficients.shape[-2] < count:
        raise ValueError(f"sh_degree {degree} needs {count} coefficients per Gaussian, got {coefficients.shape[-2]}")
    basis = sh_basis(degree, normalize(directions))
    return jnp.einsum("...k,...kc->...c", basis, coefficients[..., :count, :], precision=jax.lax.Precision.HIGHEST)


def camera_center(viewmat: jax.Array) -> jax.Array:
    """World position [3] of the camera of a rigid 4x4 world-to-camera matrix: -R^T t.

    gsplat inverts the whole matrix; for a rigid transform the two agree (up to rounding)."""
    return -jnp.matmul(viewmat[:3, :3].T, viewmat[:3, 3], precision=jax.lax.Precision.HIGHEST)


def view_dependent_colors(degree: int, means: jax.Array, coefficients: jax.Array, viewmat: jax.Array) -> jax.Array:
    """Colours [N, 3] of Gaussians at `means` [N, 3] with SH `coefficients` [N, K, 3] seen from the
    camera `viewmat`, as `rasterization()` makes them: max(SH(mean - camera) + 0.5, 0)."""
    raw = sh_to_color(degree, means - camera_center(viewmat), coefficients)
    return jnp.maximum(raw + 0.5, 0.0)
