"""Writers of the inference outputs: turntable MP4 and GIF, PNGs (pictures are laid out by
`vfusion3d_jax.visualize`).

Frames and images are float in [0, 1] (what the renderer gives; clipped and rounded to
8 bits) or uint8, channels last. Every writer creates the parent folders and writes
atomically (a temporary file in the same folder, then `os.replace`; for a `gs://` URL a local
file, then one upload), so a path that exists holds a complete file even if the job is killed
mid-write, and returns the path.

MP4s are H.264 in yuv420p, the profile every browser and player decodes, encoded by the
FFmpeg libraries inside the PyAV wheel (nothing to install or download). Colours are
converted with the BT.709 matrix (limited range) and the stream is tagged so, which is
also what players assume for untagged HD video.
"""

from __future__ import annotations

import fractions
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import av
import numpy as np
from etils import epath
from PIL import Image

from vfusion3d_jax.data import remote
from vfusion3d_jax.visualize import to_uint8

# H.264 colour tags (ISO/IEC 23091-2 code points): BT.709 matrix, primaries and transfer; limited range.
_BT709 = 1
_LIMITED_RANGE = 1


def write_atomically(path: str | os.PathLike, write: Callable[[str], None]) -> Path | epath.Path:
    """Calls write(temporary path) in path's folder, then renames it to path; no temporary is left behind.

    A URL (`gs://...`) is written locally first and uploaded whole: an object in a bucket
    appears complete or not at all, so the upload is atomic by itself.
    """
    if remote.is_url(path):
        with tempfile.TemporaryDirectory() as folder:
            local = os.path.join(folder, os.path.basename(os.fspath(path)))
            write(local)
            destination = epath.Path(path)
            destination.parent.mkdir(parents=True, exist_ok=True)
            destination.write_bytes(Path(local).read_bytes())
        return destination
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
    return path


def _video_frames(frames) -> np.ndarray:
    frames = to_uint8(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or not frames.shape[0]:
        raise ValueError(f"frames must be (T, H, W, 3) with T >= 1, got shape {frames.shape}")
    return frames


def write_mp4(frames, path: str | os.PathLike, fps: float = 30.0, *, crf: int = 18) -> Path | epath.Path:
    """(T, H, W, 3) float [0, 1] or uint8 frames -> H.264 MP4 (yuv420p) of exactly T frames at `fps`.

    yuv420p stores colour at half resolution, so H.264 needs even sides: an odd height or
    width is padded by repeating the last row or column (a 33x31 input gives a 34x32 video).
    `crf` is x264's constant quality (0 lossless, 18 visually lossless, 23 its default,
    +6 about halves the size). The moov atom goes first (`faststart`) so browsers can play
    the file while it downloads.
    """
    frames = _video_frames(frames)
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    _, height, width, _ = frames.shape
    frames = np.pad(frames, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)), mode="edge")

    def write(temporary: str) -> None:
        with av.open(temporary, mode="w", format="mp4", options={"movflags": "+faststart"}) as container:
            stream = container.add_stream("libx264", rate=fractions.Fraction(fps).limit_denominator(1001))
            stream.width, stream.height = frames.shape[2], frames.shape[1]
            stream.pix_fmt = "yuv420p"
            stream.options = {"crf": str(crf)}
            context = stream.codec_context
            context.colorspace = context.color_primaries = context.color_trc = _BT709
            context.color_range = _LIMITED_RANGE
            for index, frame in enumerate(frames):
                video_frame = av.VideoFrame.from_ndarray(frame, format="rgb24")
                video_frame = video_frame.reformat(format="yuv420p", dst_colorspace="ITU709")
                video_frame.pts = index
                container.mux(stream.encode(video_frame))
            container.mux(stream.encode())  # flush the frames the encoder still holds

    return write_atomically(path, write)


def write_gif(frames, path: str | os.PathLike, fps: float = 30.0) -> Path | epath.Path:
    """(T, H, W, 3) float [0, 1] or uint8 frames -> a GIF that loops forever, for quick viewing.

    Each frame gets its own 256-colour palette (Pillow's adaptive quantisation). GIF delays
    are whole centiseconds, so the frame time round(1000 / fps) ms is further rounded down
    to 10 ms steps (30 fps plays at ~33 fps), and many viewers slow delays under 20 ms to
    100 ms: keep fps <= 50. Pillow merges identical consecutive frames into one longer
    frame (same total time), so the file has T frames unless some are repeats.
    """
    frames = _video_frames(frames)
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    images = [Image.fromarray(frame) for frame in frames]

    def write(temporary: str) -> None:
        images[0].save(temporary, format="GIF", save_all=True, append_images=images[1:],
                       duration=round(1000 / fps), loop=0)

    return write_atomically(path, write)


def write_png(image, path: str | os.PathLike) -> Path | epath.Path:
    """(H, W, 3) RGB or (H, W, 4) RGBA, float [0, 1] or uint8 -> 8-bit PNG."""
    image = to_uint8(image)
    if image.ndim != 3 or image.shape[-1] not in (3, 4):
        raise ValueError(f"image must be (H, W, 3) or (H, W, 4), got shape {image.shape}")
    return write_atomically(path, lambda temporary: Image.fromarray(image).save(temporary, format="PNG"))


def count_video_frames(path: str | os.PathLike) -> int:
    """Frames of the first video stream of an MP4, GIF or any file FFmpeg reads, by decoding them all.

    Decoded rather than read from the header: the header's count can be missing or wrong,
    and a reader gets what decoding gives.
    """
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))
