"""Orbit clips for the video diffusion model: which views of an orbit make a clip, how each
frame's camera is described to the model, and the caption as bytes.

A clip is `num_frames` views of one orbit record going around the orbit in order from a
random start view, wrapping around: every (V // F)-th view by default (evenly spaced: the
whole orbit when F divides V), or every `stride`-th view when the config sets `clip_stride`
(1 = consecutive views, a short arc). "In order" means by increasing azimuth of the camera
positions, not by place in the record: the data contract does not ask other writers to store
an orbit's views in order. `data.pipeline.make_clip_example` decodes, resizes and batches
the frames; the batch keys are in `data.pipeline`'s docstring.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class ClipOptions:
    """How a clip is cut from an orbit (see `configs/common.py` for each field)."""

    num_frames: int = 16
    resolution: int = 128
    stride: int | None = None  # views between frames; None = num_views // num_frames
    caption_length: int = 48
    canonicalize_cameras: bool = True
    random_hue: bool = False

    def __post_init__(self):
        if self.num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {self.num_frames}")
        if self.resolution < 1:
            raise ValueError(f"clip_resolution must be >= 1, got {self.resolution}")
        if self.stride is not None and self.stride < 1:
            raise ValueError(f"clip_stride must be >= 1 or None, got {self.stride}")
        if self.caption_length < 0:
            raise ValueError(f"caption_length must be >= 0, got {self.caption_length}")


def camera_angles(cam2world: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(azimuth, elevation) in degrees of camera positions (..., 4, 4) seen from the origin, world +z up;
    azimuth from +x towards +y in [0, 360), as `views/azimuth_deg`."""
    x, y, z = np.moveaxis(np.asarray(cam2world, np.float64)[..., :3, 3], -1, 0)
    azimuth = np.mod(np.degrees(np.arctan2(y, x)), 360.0)
    return azimuth, np.degrees(np.arctan2(z, np.hypot(x, y)))


def select_clip_views(rng: np.random.Generator, cam2world: np.ndarray, num_frames: int,
                      stride: int | None = None) -> np.ndarray:
    """The views (F,) of a clip from an orbit's cameras (V, 4, 4): from a random start view, every
    `stride`-th (default V // F) in order of increasing azimuth, wrapping around."""
    num_views = len(cam2world)
    step = num_views // num_frames if stride is None else stride
    # No frame may come back to a view already in the clip: the clip goes around at most once.
    if step < 1 or num_frames * step > num_views:
        spacing = "" if stride is None else f" {stride} views apart (clip_stride)"
        raise ValueError(f"an orbit of {num_views} views cannot give {num_frames} frames{spacing} "
                         "without repeating a view")
    azimuth, _ = camera_angles(cam2world)
    orbit_order = np.argsort(azimuth, kind="stable")
    start = int(rng.integers(num_views))
    return orbit_order[(start + step * np.arange(num_frames)) % num_views]


def relative_pose(cam2world: np.ndarray) -> np.ndarray:
    """Each frame's camera relative to frame 0, float32 (F, 3): (azimuth offset from frame 0 in
    [0, 360), elevation, elevation of frame 0), in degrees, from camera positions (F, 4, 4).

    The offset is what turns from frame to frame; the elevations say how the object is seen
    from above, which the canonicalised cameras (frame 0 always level) no longer show.
    """
    azimuth, elevation = camera_angles(cam2world)
    offset = np.mod(azimuth - azimuth[0], 360.0)
    return np.stack([offset, elevation, np.full_like(elevation, elevation[0])], axis=-1).astype(np.float32)


def encode_caption(caption: str, length: int) -> tuple[np.ndarray, np.int32]:
    """The caption's UTF-8 bytes, zero-padded to uint8 (length,), and how many there are.

    A longer caption is cut after its last whole word that fits (captions list the largest
    part of an object first, so the cut drops the least visible parts); a single word longer
    than `length` is cut at a character boundary.
    """
    data = caption.encode("utf-8")
    if len(data) > length:
        cut = data[:length + 1].rfind(b" ")
        data = data[:cut].rstrip(b" ,") if cut > 0 else data[:length].decode("utf-8", "ignore").encode("utf-8")
    encoded = np.zeros(length, np.uint8)
    encoded[:len(data)] = np.frombuffer(data, np.uint8)
    return encoded, np.int32(len(data))
