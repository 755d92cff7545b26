"""3D Gaussians to and from `.ply`, in the layout of the original 3D Gaussian Splatting code, which
the common viewers read (SuperSplat, antimatter15/splat, gsplat's and nerfstudio's exporters).

Binary little-endian, one `vertex` element, float32 properties in this order:

    x y z                  position (world)
    nx ny nz               normals, all zero (unused; written because the reference layout has them)
    f_dc_0 f_dc_1 f_dc_2   degree-0 SH coefficient: (rgb − 0.5) / C0, C0 = 0.28209479177387814
    opacity                logit(opacity)
    scale_0 scale_1 scale_2  log(scale)
    rot_0 rot_1 rot_2 rot_3  unit quaternion (w, x, y, z)

Viewers apply sigmoid, exp and 0.5 + C0·f_dc themselves, so what they show equals what
`render_gaussians` draws (SH degree 0, no `f_rest_*`). `write_gaussians_ply` writes atomically
(a temporary file in the same folder, then a rename; a `gs://` URL is uploaded whole), like the
other writers of `inference/media.py`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from etils import epath

from vfusion3d_jax.inference.media import write_atomically
from vfusion3d_jax.models.flexrm import Gaussians

SH_C0 = 0.28209479177387814
PROPERTIES = ("x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2", "opacity",
              "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3")
# Opacities this close to 0 or 1 are clipped before the logit, so that it stays finite.
_OPACITY_EPS = 1e-7


def _header(count: int) -> bytes:
    lines = ["ply", "format binary_little_endian 1.0", f"element vertex {count}"]
    lines += [f"property float {name}" for name in PROPERTIES]
    lines.append("end_header")
    return ("\n".join(lines) + "\n").encode("ascii")


def gaussians_to_rows(gaussians: Gaussians) -> np.ndarray:
    """One object's Gaussians -> (N, 17) float32 rows in the PLY's property order."""
    arrays = {name: np.asarray(getattr(gaussians, name), np.float64)
              for name in ("means", "quats", "scales", "opacities", "colors")}
    if arrays["means"].ndim != 2:
        raise ValueError(f"write one object's Gaussians (means (N, 3)), got means of shape {arrays['means'].shape}; "
                         "index the batch first: gaussians[i]")
    count = arrays["means"].shape[0]
    quats = arrays["quats"] / np.linalg.norm(arrays["quats"], axis=-1, keepdims=True)
    opacities = np.clip(arrays["opacities"].reshape(count), _OPACITY_EPS, 1 - _OPACITY_EPS)
    rows = np.concatenate([
        arrays["means"], np.zeros((count, 3)), (arrays["colors"] - 0.5) / SH_C0,
        np.log(opacities / (1 - opacities))[:, None], np.log(arrays["scales"]), quats], axis=1)
    return rows.astype("<f4")


def rows_to_gaussians(rows: np.ndarray) -> Gaussians:
    """(N, 17) rows in the PLY's property order -> Gaussians (NumPy float32)."""
    rows = rows.astype(np.float64)
    quats = rows[:, 13:17]
    return Gaussians(
        means=rows[:, 0:3].astype(np.float32),
        quats=(quats / np.linalg.norm(quats, axis=-1, keepdims=True)).astype(np.float32),
        scales=np.exp(rows[:, 10:13]).astype(np.float32),
        opacities=(1 / (1 + np.exp(-rows[:, 9]))).astype(np.float32),
        colors=(0.5 + SH_C0 * rows[:, 6:9]).astype(np.float32))


def write_gaussians_ply(gaussians: Gaussians, path: str | os.PathLike) -> Path | epath.Path:
    """Writes one object's Gaussians (means (N, 3), ...) as a 3DGS `.ply`; returns the path."""
    rows = gaussians_to_rows(gaussians)

    def write(temporary: str) -> None:
        with open(temporary, "wb") as file:
            file.write(_header(rows.shape[0]))
            file.write(rows.tobytes())

    return write_atomically(path, write)


def read_gaussians_ply(path: str | os.PathLike) -> Gaussians:
    """Reads a `.ply` written by `write_gaussians_ply` (or any binary little-endian 3DGS `.ply` whose
    vertex properties are all float and include these; extra ones such as `f_rest_*` are ignored)."""
    data = epath.Path(path).read_bytes()
    end = data.find(b"end_header\n")
    if not data.startswith(b"ply\n") or end < 0:
        raise ValueError(f"{path}: not a PLY file")
    header = data[:end].decode("ascii").splitlines()
    if "format binary_little_endian 1.0" not in header:
        raise ValueError(f"{path}: only binary little-endian PLY is supported")
    count, names = None, []
    for line in header:
        words = line.split()
        if words[:2] == ["element", "vertex"]:
            count = int(words[2])
        elif words[:1] == ["element"] and count is not None:
            raise ValueError(f"{path}: elements after 'vertex' are not supported")
        elif words[:1] == ["property"] and count is not None:
            if words[1] != "float":
                raise ValueError(f"{path}: property {words[-1]!r} is {words[1]}, not float")
            names.append(words[-1])
    missing = [name for name in PROPERTIES if name not in names]
    if count is None or missing:
        raise ValueError(f"{path}: not a 3D Gaussian PLY (missing {missing or 'the vertex element'})")
    table = np.frombuffer(data, "<f4", count=count * len(names), offset=end + len(b"end_header\n"))
    table = table.reshape(count, len(names))
    return rows_to_gaussians(table[:, [names.index(name) for name in PROPERTIES]])
