"""A user's image file to the model input, as the official VFusion3D inferrer prepares it.

Official pipeline (lrm/inferrer.py), reproduced here:
1. read the image as uint8;
2. background removal (rembg, "isnet-general-use") gives RGBA with the foreground as alpha;
3. `kiui.op.recenter(image, mask, border_ratio=0.2)`: on a transparent square canvas of side
   max(H, W), the object's bounding box (alpha > 0) is area-resized so that its longer side is
   int(side * (1 - border_ratio)) and placed in the middle;
4. composite over white: rgb * a + (1 - a), in [0, 1];
5. resize to the model's source size with `torch.nn.functional.interpolate(mode="bicubic",
   align_corners=True)` (PyTorch's cubic kernel, a = -0.75, no antialiasing) and clamp to [0, 1].

Differences from the official code, on purpose:
* A file's own alpha channel is used when it has one (the official reader composites it over white
  and runs rembg on the result); a file without one goes through `remove_background`, a colour key
  on the border colour, instead of rembg: no learned model, nothing to download.
* The bounding box is the true one (last row/column included); kiui's slice drops the last row and
  column of the object, a one-pixel difference at the input resolution.
* The recentring resize premultiplies alpha (Pillow), so no colour of transparent pixels bleeds
  into the edges; the official cv2 INTER_AREA resize does not.

Limits of `remove_background`: it needs a roughly uniform background that touches the image border
and differs in colour from the object (a studio shot, a product photo, a render on a plain colour).
A cluttered or strongly graded background, shadows, or an object of the background's colour give a
poor mask; give such images an alpha channel (cut them out elsewhere) instead.

Files are read defensively: odd modes (grayscale, palette, CMYK, 16-bit, float), EXIF orientation
and animations (first frame) are handled, and unusable inputs raise `ImageSkipped` with a one-line
reason instead of an arbitrary exception, so a batch can report them and go on.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from scipy import ndimage

from vfusion3d_jax import errors

# Larger images are refused (Pillow's decompression-bomb guard would otherwise decide).
MAX_PIXELS = 100_000_000
# The official inferrer's recentring margin.
DEFAULT_BORDER_RATIO = 0.2

# PyTorch's bicubic coefficient (Pillow and OpenCV-area differ); the model saw this resize.
_CUBIC_A = -0.75

# Background removal. Colour distances are Euclidean in RGB scaled to [0, 1].
_MIN_COLOUR_DISTANCE = 0.1  # floor of the threshold: about 15 levels in each channel
_NOISE_FACTOR = 3.0  # threshold = this many times the median border distance to the background
_MIN_OBJECT_FRACTION = 5e-4  # smaller foreground (of the image area) is noise, not an object
_MIN_PART_OF_LARGEST = 0.05  # parts below this fraction of the largest part are specks
_MAX_COVERAGE = 0.97  # a "foreground" this large means the background was not found
_EDGE_SIGMA = 0.6  # px: a 3x3 Gaussian, about one pixel of anti-aliased edge


class ImageSkipped(ValueError):
    """An input that cannot be used, with a one-line human reason (e.g. 'not an image', 'empty file',
    'no foreground found', 'image is 20000x20000, over the 100 MP limit')."""


@dataclasses.dataclass(frozen=True, eq=False)
class PreparedImage:
    """One image ready for the model (eq=False: arrays do not compare as booleans)."""

    image: np.ndarray  # float32 (size, size, 3) in [0, 1], composited over white: the model input
    rgba: np.ndarray  # uint8 (S, S, 4) the recentred RGBA before compositing/resizing (previews)
    had_alpha: bool  # foreground came from the file's alpha channel (else from remove_background)
    original_size: tuple[int, int]  # (height, width) of the file, as displayed (EXIF-oriented)


def find_images(inputs: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """The files named by `inputs`: a file -> [file]; a folder -> its non-hidden regular files
    (non-recursive, every file, so that a non-image gets reported as skipped rather than silently
    ignored), sorted by name; a glob pattern (`**` recurses) -> its matching files, sorted; a
    sequence of these -> their files in order, without duplicates.

    Raises FileNotFoundError when a path does not exist or a folder or pattern yields no file.
    """
    if not isinstance(inputs, (str, os.PathLike)):
        found: dict[Path, None] = {}  # ordered and without duplicates
        for item in inputs:
            found.update(dict.fromkeys(find_images(item)))
        return list(found)
    path = Path(inputs).expanduser()
    if path.is_dir():
        files = sorted((p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")), key=lambda p: p.name)
        if not files:
            raise errors.MissingInputError(f"no files in folder {path}")
        return files
    if path.exists():
        return [path]
    if glob.has_magic(str(inputs)):
        matches = sorted(Path(m) for m in glob.glob(os.path.expanduser(str(inputs)), recursive=True))
        files = [p for p in matches if p.is_file()]
        if not files:
            raise errors.MissingInputError(f"no files match {inputs}")
        return files
    raise errors.MissingInputError(f"no such file or folder: {inputs}")


def output_names(paths: Sequence[Path]) -> list[str]:
    """A distinct output folder name per input file: its stem, or its whole name when stems collide."""
    stems = [path.stem for path in paths]
    return [path.name.replace(".", "_") if stems.count(path.stem) > 1 else path.stem for path in paths]


def load_rgba(path: str | os.PathLike) -> tuple[np.ndarray, bool]:
    """uint8 RGBA (H, W, 4) of an image file, and whether it has a real alpha channel (any alpha < 255).

    EXIF orientation is applied; animated files give their first frame. Grayscale (1, L, LA),
    palette (P, with transparency), CMYK and 8-bit colour modes go through Pillow's conversion;
    16-bit and 32-bit integer images are scaled to 8 bits (v / 257 for 16-bit), float images are
    taken as [0, 1] (or [0, 255] when their maximum exceeds 1). Raises ImageSkipped for an empty
    file, a file Pillow cannot identify, truncated or corrupt data, more than MAX_PIXELS pixels
    (checked from the header, before decoding) and sides under 2 px.
    """
    path = Path(path)
    try:
        if not path.is_file():
            raise ImageSkipped("not a file" if path.exists() else "file not found")
        if path.stat().st_size == 0:
            raise ImageSkipped("empty file")
        # Our own limit below replaces Pillow's warning; its hard error is caught as the same skip.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                _check_size(*im.size)
                im.load()
                try:
                    im = ImageOps.exif_transpose(im)
                except Exception:  # noqa: BLE001 -- malformed EXIF must not lose usable pixels
                    pass
                rgba = _to_rgba(im)
    except Image.DecompressionBombError:
        raise ImageSkipped(f"image is over the {MAX_PIXELS // 1_000_000} MP limit") from None
    except UnidentifiedImageError:
        raise ImageSkipped("not an image (unrecognised format)") from None
    except PermissionError as err:
        raise ImageSkipped(f"cannot read the file ({err.strerror})") from None
    except (OSError, SyntaxError, EOFError) as err:  # Pillow's errors for damaged data
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ImageSkipped(f"truncated or corrupt image data ({reason})") from None
    return rgba, bool((rgba[..., 3] < 255).any())


def remove_background(rgb: np.ndarray) -> np.ndarray:
    """uint8 alpha (H, W) of the object in an RGB uint8 image, by a colour key (no learned model).

    The background colour is the median of a border strip of a few pixels (robust while the object
    covers under half of the border). Foreground is every pixel farther from it in RGB than
    max(0.1, 3 x the median border distance), which adapts to noise and JPEG artefacts. An opening
    removes specks and ringing, parts smaller than 5% of the largest part are dropped, holes are
    filled (object pixels of the background's colour), and the edge is softened by about a pixel.

    Limits: needs a roughly uniform background that touches the image border and differs in colour
    from the object. Cluttered or graded backgrounds, cast shadows and thin (1-2 px) structures give
    a poor mask; real holes through the object (a ring) are filled. Raises ImageSkipped when no
    foreground is found or it covers nearly the whole image.
    """
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise ValueError(f"expected uint8 RGB (H, W, 3), got {rgb.dtype} {rgb.shape}")
    height, width = rgb.shape[:2]
    strip = int(np.clip(min(height, width) // 50, 1, 8))
    border = np.concatenate(
        [rgb[:strip].reshape(-1, 3), rgb[-strip:].reshape(-1, 3),
         rgb[:, :strip].reshape(-1, 3), rgb[:, -strip:].reshape(-1, 3)]
    ).astype(np.float32) / 255.0
    background = np.median(border, axis=0)
    noise = float(np.median(np.linalg.norm(border - background, axis=-1)))
    threshold = max(_MIN_COLOUR_DISTANCE, _NOISE_FACTOR * noise)
    # Channel by channel: no full-size float copy of the image (inputs go up to 100 MP).
    distance2 = np.zeros((height, width), np.float32)
    for channel in range(3):
        distance2 += (rgb[..., channel].astype(np.float32) / 255.0 - background[channel]) ** 2
    mask = distance2 > threshold**2
    mask = ndimage.binary_opening(mask, structure=ndimage.generate_binary_structure(2, 1))

    labels, count = ndimage.label(mask)
    areas = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    min_area = max(16, int(_MIN_OBJECT_FRACTION * height * width))
    if count == 0 or areas.max() < min_area:
        raise ImageSkipped("no foreground found (nothing differs from the border colour)")
    keep = np.concatenate([[False], areas >= max(min_area, _MIN_PART_OF_LARGEST * areas.max())])
    mask = ndimage.binary_fill_holes(keep[labels])
    if mask.mean() > _MAX_COVERAGE:
        raise ImageSkipped("no foreground found (the whole image differs from its border; cluttered background?)")
    # truncate=2 keeps the kernel 3x3, so the soft edge grows the object by one pixel at most.
    alpha = ndimage.gaussian_filter(mask.astype(np.float32), sigma=_EDGE_SIGMA, truncate=2.0)
    return np.rint(alpha * 255.0).astype(np.uint8)


def recenter(rgba: np.ndarray, border_ratio: float = DEFAULT_BORDER_RATIO) -> np.ndarray:
    """The official recentring (kiui.op.recenter) of uint8 RGBA with alpha > 0 as the mask.

    Returns a transparent square uint8 RGBA of side max(H, W) with the object's bounding box
    resized (Pillow BOX on premultiplied alpha, like cv2 INTER_AREA) to a longer side of
    int(side * (1 - border_ratio)) and centred: top-left at ((side - h2) // 2, (side - w2) // 2).
    Raises ValueError unless 0 <= border_ratio < 1, ImageSkipped when nothing is opaque.
    """
    _check_border_ratio(border_ratio)
    rgba = _check_rgba(rgba)
    side = max(rgba.shape[:2])
    opaque = rgba[..., 3] > 0
    rows, cols = np.flatnonzero(opaque.any(axis=1)), np.flatnonzero(opaque.any(axis=0))
    if rows.size == 0:
        raise ImageSkipped("no foreground found (the alpha channel is fully transparent)")
    crop = rgba[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    height, width = crop.shape[:2]
    scale = int(side * (1 - border_ratio)) / max(height, width)
    # At least one pixel: a line one pixel thin must not vanish.
    height2, width2 = max(1, int(height * scale)), max(1, int(width * scale))
    resized = np.asarray(Image.fromarray(crop, "RGBA").resize((width2, height2), Image.Resampling.BOX))
    result = np.zeros((side, side, 4), np.uint8)
    top, left = (side - height2) // 2, (side - width2) // 2
    result[top : top + height2, left : left + width2] = resized
    return result


def prepare_image(
    source: str | os.PathLike | np.ndarray,
    size: int,
    *,
    border_ratio: float = DEFAULT_BORDER_RATIO,
    recenter_object: bool = True,
) -> PreparedImage:
    """The model input for an image file or a uint8 array (H, W, 3|4).

    Foreground from the alpha channel when there is one (any alpha < 255), else from
    `remove_background`; then `recenter` (or, with recenter_object=False, only a transparent
    padding to a centred square, keeping the framing), composite over white and PyTorch-style
    bicubic resize (align_corners=True) to size x size, clamped to [0, 1].
    Raises ImageSkipped (with the reason) for unusable inputs, ValueError for bad arguments.
    """
    _check_border_ratio(border_ratio)
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    if isinstance(source, np.ndarray):
        rgba = _array_to_rgba(source)
        had_alpha = bool((rgba[..., 3] < 255).any())
    else:
        rgba, had_alpha = load_rgba(source)
    if not had_alpha:
        rgba[..., 3] = remove_background(rgba[..., :3])
    elif not rgba[..., 3].any():
        raise ImageSkipped("no foreground found (the alpha channel is fully transparent)")
    framed = recenter(rgba, border_ratio) if recenter_object else _pad_to_square(rgba)
    return PreparedImage(
        image=_composite_resize(framed, size),
        rgba=framed,
        had_alpha=had_alpha,
        original_size=(int(rgba.shape[0]), int(rgba.shape[1])),
    )


def prepare_framed(source: str | os.PathLike | np.ndarray, size: int) -> PreparedImage:
    """The model input for an image already framed as the training views, over white (a frame that
    a model trained on those views generated): resized only, no background removal or recentring,
    so an empty frame is kept, not skipped."""
    rgba = _array_to_rgba(source) if isinstance(source, np.ndarray) else load_rgba(source)[0]
    rgba[..., 3] = 255
    return PreparedImage(image=_composite_resize(rgba, size), rgba=rgba, had_alpha=False,
                         original_size=(int(rgba.shape[0]), int(rgba.shape[1])))


def _check_size(width: int, height: int) -> None:
    if width * height > MAX_PIXELS:
        raise ImageSkipped(f"image is {width}x{height}, over the {MAX_PIXELS // 1_000_000} MP limit")
    if min(width, height) < 2:
        raise ImageSkipped(f"image is {width}x{height}, too small")


def _check_border_ratio(border_ratio: float) -> None:
    if not 0.0 <= border_ratio < 1.0:
        raise ValueError(f"border_ratio must be in [0, 1), got {border_ratio}")


def _check_rgba(rgba: np.ndarray) -> np.ndarray:
    rgba = np.asarray(rgba)
    if rgba.dtype != np.uint8 or rgba.ndim != 3 or rgba.shape[-1] != 4:
        raise ValueError(f"expected uint8 RGBA (H, W, 4), got {rgba.dtype} {rgba.shape}")
    return rgba


def _array_to_rgba(array: np.ndarray) -> np.ndarray:
    """A writable uint8 RGBA copy of a uint8 (H, W, 3|4) array (opaque when it has 3 channels)."""
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] not in (3, 4):
        raise ValueError(f"expected a uint8 image (H, W, 3|4), got {array.dtype} {array.shape}")
    _check_size(array.shape[1], array.shape[0])
    if array.shape[-1] == 4:
        return array.copy()
    return np.concatenate([array, np.full(array.shape[:2] + (1,), 255, np.uint8)], axis=-1)


def _to_rgba(im: Image.Image) -> np.ndarray:
    """uint8 RGBA (H, W, 4), writable, of a loaded Pillow image of any mode."""
    mode = im.mode
    if mode == "F" or mode == "I" or mode.startswith("I;16"):
        # Pillow's own conversion of these clips to 0..255 instead of scaling.
        values = np.asarray(im)
        gray = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        if mode == "F":
            gray = gray * 255.0 if gray.max() <= 1.0 else gray
        elif mode == "I" and gray.max() > 65535:
            gray = gray * (255.0 / (2**31 - 1))
        else:
            gray = gray / 257.0
        gray8 = np.clip(np.rint(gray), 0, 255).astype(np.uint8)
        alpha = np.full(gray8.shape, 255, np.uint8)
        transparent = im.info.get("transparency")  # a PNG grayscale colour key
        if isinstance(transparent, int) and mode != "F":
            alpha[values == transparent] = 0
        return np.stack([gray8, gray8, gray8, alpha], axis=-1)
    try:
        return np.array(im.convert("RGBA"))
    except ValueError:
        raise ImageSkipped(f"unsupported image mode {mode}") from None


def _pad_to_square(rgba: np.ndarray) -> np.ndarray:
    """Transparent padding of RGBA to a centred square, the framing unchanged."""
    height, width = rgba.shape[:2]
    side = max(height, width)
    result = np.zeros((side, side, 4), np.uint8)
    top, left = (side - height) // 2, (side - width) // 2
    result[top : top + height, left : left + width] = rgba
    return result


def _cubic_taps(in_len: int, out_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Source indices (4, out) and weights (4, out) of PyTorch's bicubic, align_corners=True.

    Output i samples source position i * (in - 1) / (out - 1); taps outside are clamped to the edge.
    """
    scale = (in_len - 1) / (out_len - 1) if out_len > 1 else 0.0
    position = np.arange(out_len) * scale
    base = np.floor(position).astype(np.int64)
    t = position - base
    a = _CUBIC_A

    def near(x: np.ndarray) -> np.ndarray:  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x: np.ndarray) -> np.ndarray:  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    weights = np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)]).astype(np.float32)
    indices = np.clip(base[None] + np.arange(-1, 3)[:, None], 0, in_len - 1)
    return indices, weights


def _composite_resize(rgba: np.ndarray, size: int) -> np.ndarray:
    """float32 (size, size, 3): RGBA over white, bicubic-resized (align_corners=True), in [0, 1].

    Compositing is per pixel, so the rows the first pass reads are composited after gathering:
    the same result as compositing first, without a full-resolution float copy of the image.
    """
    row_idx, row_w = _cubic_taps(rgba.shape[0], size)
    col_idx, col_w = _cubic_taps(rgba.shape[1], size)
    rows = np.zeros((size, rgba.shape[1], 3), np.float32)
    for idx, w in zip(row_idx, row_w):
        taps = rgba[idx].astype(np.float32) / 255.0
        alpha = taps[..., 3:]
        rows += w[:, None, None] * (taps[..., :3] * alpha + (1.0 - alpha))
    out = np.zeros((size, size, 3), np.float32)
    for idx, w in zip(col_idx, col_w):
        out += w[None, :, None] * rows[:, idx]
    return np.clip(out, 0.0, 1.0)
