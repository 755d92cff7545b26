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


# Line colours of `line_chart`, in series order.
SERIES_COLOURS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14))


def line_chart(series: dict[str, list[tuple[float, float]]], *, title: str, x_label: str, log2_x: bool = False,
               size: tuple[int, int] = (360, 240)) -> np.ndarray:
    """A small line chart, uint8 (H, W, 3): one line with dots per named series of (x, y) points,
    the x values of the points as ticks, the y range with its ends labelled, and a legend. Pillow
    only (no plotting library for a few lines); NaN points are left out."""
    width, height = size
    left, right, top, bottom = 44, 10, 18, 30
    points = {name: [(x, y) for x, y in values if not math.isnan(y)] for name, values in series.items()}
    xs = sorted({x for values in points.values() for x, _ in values})
    ys = [y for values in points.values() for _, y in values]
    chart = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(chart)
    draw.text((left, 2), title, fill=(0, 0, 0))
    draw.rectangle((left, top, width - right, height - bottom), outline=(160, 160, 160))
    if not xs:
        return np.asarray(chart)
    scale_x = (lambda x: math.log2(x)) if log2_x else (lambda x: x)
    x_low, x_high = scale_x(xs[0]), scale_x(xs[-1])
    y_low, y_high = min(ys), max(ys)
    margin = 0.05 * (y_high - y_low) or 0.5
    y_low, y_high = y_low - margin, y_high + margin

    def to_pixel(x: float, y: float) -> tuple[float, float]:
        fraction = 0.5 if x_high == x_low else (scale_x(x) - x_low) / (x_high - x_low)
        return (left + 8 + fraction * (width - right - left - 16),
                height - bottom - (y - y_low) / (y_high - y_low) * (height - bottom - top))

    for x in xs:
        px = to_pixel(x, y_low)[0]
        draw.line((px, height - bottom, px, height - bottom + 3), fill=(0, 0, 0))
        draw.text((px - 4, height - bottom + 4), f"{x:g}", fill=(0, 0, 0))
    draw.text(((left + width - right) / 2 - 3 * len(x_label), height - 12), x_label, fill=(0, 0, 0))
    for y in (y_low + margin, y_high - margin):
        draw.text((2, to_pixel(xs[0], y)[1] - 5), f"{y:.2f}", fill=(0, 0, 0))
    for index, (name, values) in enumerate(points.items()):
        colour = SERIES_COLOURS[index % len(SERIES_COLOURS)]
        pixels = [to_pixel(x, y) for x, y in sorted(values)]
        if len(pixels) > 1:
            draw.line(pixels, fill=colour, width=2)
        for px, py in pixels:
            draw.ellipse((px - 3, py - 3, px + 3, py + 3), fill=colour)
        draw.text((left + 6, top + 4 + 11 * index), name, fill=colour)
    return np.asarray(chart)
