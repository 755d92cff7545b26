"""Pictures of data and results: 8-bit conversion, image grids, labelled rows, comparison rows.

Below training and inference (it imports neither), so training's evaluation grid and
`evaluate`'s best/worst sheet share one row builder while training never imports the
inference layer. Writing files (PNG, MP4, GIF) is `inference.media`'s job.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw


def to_uint8(images: np.ndarray) -> np.ndarray:
    """float [0, 1] -> uint8 (rounded, clipped to [0, 255]); uint8 passes through unchanged."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images
    if not np.issubdtype(images.dtype, np.floating):
        raise TypeError(f"images must be float in [0, 1] or uint8, got {images.dtype}")
    return np.clip(np.round(images * 255.0), 0, 255).astype(np.uint8)


def image_grid(images, columns: int, *, pad: int = 2, background: float = 1.0) -> np.ndarray:
    """(N, H, W, C) images -> one (rows*H + (rows-1)*pad, columns*W + (columns-1)*pad, C) sheet.

    Row-major, `pad` pixels of `background` (white by default; scaled to 255 for uint8
    images) between tiles and none around the sheet; cells after the N-th stay background.
    The sheet has the dtype of `images`.
    """
    images = np.asarray(images)
    if images.ndim != 4 or not images.shape[0]:
        raise ValueError(f"images must be (N, H, W, C) with N >= 1, got shape {images.shape}")
    if columns < 1 or pad < 0:
        raise ValueError(f"need columns >= 1 and pad >= 0, got columns={columns}, pad={pad}")
    count, height, width, channels = images.shape
    rows = math.ceil(count / columns)
    fill = round(background * 255) if images.dtype == np.uint8 else background
    sheet = np.full((rows * height + (rows - 1) * pad, columns * width + (columns - 1) * pad, channels), fill,
                    images.dtype)
    for index, image in enumerate(images):
        top, left = (index // columns) * (height + pad), (index % columns) * (width + pad)
        sheet[top:top + height, left:left + width] = image
    return sheet


LABEL_HEIGHT = 14  # pixels of the text strip above each row of `labelled_rows`


def labelled_rows(rows: list[tuple[str, np.ndarray]], *, pad: int = 2) -> np.ndarray:
    """Images (H_i, W_i, 3) stacked top to bottom, each under a strip with its label (black on
    white, Pillow's built-in font); narrower rows are padded with white on the right. uint8."""
    if not rows:
        raise ValueError("no rows")
    images = [to_uint8(image) for _, image in rows]
    width = max(image.shape[1] for image in images)
    height = sum(LABEL_HEIGHT + image.shape[0] + pad for image in images) - pad
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    top = 0
    for (label, _), image in zip(rows, images):
        draw.text((2, top + 1), label, fill=(0, 0, 0))
        sheet.paste(Image.fromarray(image[..., :3]), (0, top + LABEL_HEIGHT))
        top += LABEL_HEIGHT + image.shape[0] + pad
    return np.asarray(sheet)


def comparison_row(source, targets, renders) -> np.ndarray:
    """One object's row, float32 in [0, 1]: source | target views | rendered views, the source
    resized (bicubic) to the views' square size. source (S, S, 3); targets, renders (K, H, H, 3)."""
    size = np.shape(targets)[1]
    source = Image.fromarray(to_uint8(source)).resize((size, size), Image.Resampling.BICUBIC)
    return np.concatenate([np.asarray(source, np.float32) / 255.0, *targets, *renders], axis=1)
