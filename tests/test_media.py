"""Inference output writers and the pictures they write: MP4 and GIF decode to the frames
written, sheets lay out as documented, and writes are atomic."""

import os

import av
import numpy as np
import pytest
from PIL import Image

from vfusion3d_jax import visualize
from vfusion3d_jax.inference import media

# Flat colours (uint8 RGB), one per frame: saturated ones catch a colour-matrix slip.
COLOURS = np.array([[200, 30, 40], [20, 180, 60], [30, 50, 220], [240, 240, 240], [10, 10, 10]], np.uint8)


def _flat_frames(height: int, width: int) -> np.ndarray:
    return np.broadcast_to(COLOURS[:, None, None, :], (len(COLOURS), height, width, 3)).copy()


def _decode(path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def test_to_uint8_rounds_and_clips():
    values = np.array([-0.5, 0.0, 0.6 / 255, 0.499, 1.0, 7.0], np.float32)
    np.testing.assert_array_equal(visualize.to_uint8(values), [0, 0, 1, 127, 255, 255])
    data = np.arange(6, dtype=np.uint8)
    assert visualize.to_uint8(data) is data
    with pytest.raises(TypeError, match="float in"):
        visualize.to_uint8(np.arange(3))


@pytest.mark.parametrize("height, width", [(32, 48), (33, 31)])
def test_mp4_round_trip(tmp_path, height, width):
    frames = _flat_frames(height, width) / 255.0  # float input
    path = media.write_mp4(frames, tmp_path / "deep" / "turntable.mp4", fps=20.0)
    assert path == tmp_path / "deep" / "turntable.mp4"
    assert media.count_video_frames(path) == len(COLOURS)
    decoded = _decode(path)
    assert decoded.shape == (len(COLOURS), height + height % 2, width + width % 2, 3)  # padded to even sides
    error = np.abs(decoded.astype(int) - _flat_frames(*decoded.shape[1:3]).astype(int))
    assert error.max() <= 6, error.max(axis=(1, 2, 3))
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264" and stream.codec_context.pix_fmt == "yuv420p"
        assert stream.average_rate == 20
    assert os.listdir(path.parent) == ["turntable.mp4"]  # no temporary file left


def test_gif_has_every_frame_and_loops(tmp_path):
    frames = _flat_frames(20, 24)
    path = media.write_gif(frames, tmp_path / "turntable.gif", fps=25.0)
    assert media.count_video_frames(path) == len(COLOURS)
    with Image.open(path) as gif:
        assert gif.n_frames == len(COLOURS) and gif.info["loop"] == 0 and gif.info["duration"] == 40
        gif.seek(2)
        np.testing.assert_allclose(np.asarray(gif.convert("RGB"))[10, 12], COLOURS[2], atol=2)
    assert os.listdir(tmp_path) == ["turntable.gif"]


def test_image_grid_layout():
    images = np.stack([np.full((3, 4, 3), value, np.float32) for value in (0.1, 0.2, 0.3, 0.4, 0.5)])
    sheet = visualize.image_grid(images, columns=3, pad=2)
    assert sheet.shape == (2 * 3 + 2, 3 * 4 + 2 * 2, 3) and sheet.dtype == np.float32
    for index, value in enumerate((0.1, 0.2, 0.3, 0.4, 0.5)):
        top, left = (index // 3) * 5, (index % 3) * 6
        assert (sheet[top:top + 3, left:left + 4] == value).all(), index
    assert (sheet[3:5] == 1.0).all() and (sheet[:, 4:6] == 1.0).all()  # padding between tiles
    assert (sheet[5:, 12:] == 1.0).all()  # the sixth cell is empty
    uint8_sheet = visualize.image_grid(visualize.to_uint8(images), columns=5, pad=1)
    assert uint8_sheet.shape == (3, 5 * 4 + 4, 3) and uint8_sheet[0, 4, 0] == 255 and uint8_sheet[0, 5, 0] == 51


def test_png_is_atomic_and_clips(tmp_path):
    image = np.linspace(-0.5, 1.5, 4 * 6 * 4, dtype=np.float32).reshape(4, 6, 4)
    path = media.write_png(image, tmp_path / "a" / "b" / "input.png")
    with Image.open(path) as png:
        assert png.mode == "RGBA"
        np.testing.assert_array_equal(np.asarray(png), visualize.to_uint8(image))

    def failing_write(temporary):
        with open(temporary, "wb") as file:
            file.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        media.write_atomically(tmp_path / "a" / "b" / "input.png", failing_write)
    assert os.listdir(tmp_path / "a" / "b") == ["input.png"]  # the old file kept, no temporary left
    with Image.open(path) as png:
        np.testing.assert_array_equal(np.asarray(png), visualize.to_uint8(image))


def test_comparison_row_and_labelled_rows():
    source = np.full((20, 20, 3), 0.5, np.float32)
    targets = np.zeros((2, 8, 8, 3), np.float32)
    renders = np.ones((2, 8, 8, 3), np.float32)
    row = visualize.comparison_row(source, targets, renders)
    assert row.shape == (8, 5 * 8, 3) and row.dtype == np.float32
    np.testing.assert_allclose(row[:, :8], 128 / 255)  # the source, resized to the views' size
    assert (row[:, 8:24] == 0).all() and (row[:, 24:] == 1).all()
    sheet = visualize.labelled_rows([("first", row), ("second", row[:, :16])], pad=2)
    assert sheet.dtype == np.uint8
    assert sheet.shape == (2 * (visualize.LABEL_HEIGHT + 8) + 2, 40, 3)
    assert (sheet[visualize.LABEL_HEIGHT * 2 + 8 + 2:, 16:] == 255).all()  # the narrower row padded with white
