"""Image files to the model input: recentring, background removal, damaged and odd files."""

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from vfusion3d_jax.inference import preprocess
from vfusion3d_jax.inference.preprocess import ImageSkipped


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return rows[0], rows[-1] + 1, cols[0], cols[-1] + 1


def _disc(height: int, width: int, centre: tuple[int, int], radius: float) -> np.ndarray:
    yy, xx = np.mgrid[:height, :width]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _raw_png(width: int, height: int, bit_depth: int, colour_type: int, rows: bytes) -> bytes:
    """A PNG written by hand: header fields exactly as given, image rows unfiltered."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(rows))
            + _png_chunk(b"IEND", b""))


# ---------------------------------------------------------------------------------------------
# Recentring.


@pytest.mark.parametrize("border_ratio", [0.2, 0.0, 0.55])
def test_recenter_scales_the_bounding_box_and_centres_it(border_ratio):
    rgba = np.zeros((120, 200, 4), np.uint8)
    rgba[10:41, 130:187] = (200, 30, 60, 255)  # 31 x 57, off-centre towards the top right
    out = preprocess.recenter(rgba, border_ratio)
    assert out.shape == (200, 200, 4) and out.dtype == np.uint8
    top, bottom, left, right = _bbox(out[..., 3] > 0)
    desired = int(200 * (1 - border_ratio))
    assert abs(max(bottom - top, right - left) - desired) <= 1
    assert abs((top + bottom) / 2 - 100) <= 1 and abs((left + right) / 2 - 100) <= 1
    assert abs((bottom - top) / (right - left) - 31 / 57) < 0.03  # aspect kept
    np.testing.assert_array_equal(out[100, 100], (200, 30, 60, 255))


def test_recenter_exact_placement_matches_the_official_formula():
    rgba = np.zeros((100, 100, 4), np.uint8)
    rgba[5:25, 50:90] = 255  # 20 x 40 box
    out = preprocess.recenter(rgba, 0.2)
    # desired 80, scale 2: h2 = 40, w2 = 80 at ((100 - 40) // 2, (100 - 80) // 2).
    assert _bbox(out[..., 3] > 0) == (30, 70, 10, 90)
    assert (out[30:70, 10:90, 3] == 255).all()


@pytest.mark.parametrize("border_ratio", [-0.1, 1.0, 1.5])
def test_recenter_rejects_border_ratio_out_of_range(border_ratio):
    with pytest.raises(ValueError, match="border_ratio"):
        preprocess.recenter(np.full((8, 8, 4), 255, np.uint8), border_ratio)


def test_recenter_of_a_fully_transparent_image_is_skipped():
    with pytest.raises(ImageSkipped, match="no foreground"):
        preprocess.recenter(np.zeros((8, 8, 4), np.uint8))


# ---------------------------------------------------------------------------------------------
# prepare_image.


def test_prepare_image_of_a_transparent_png(tmp_path):
    rgba = np.zeros((90, 150, 4), np.uint8)
    rgba[20:60, 10:50] = (30, 160, 220, 255)
    path = tmp_path / "object.png"
    Image.fromarray(rgba, "RGBA").save(path)
    prepared = preprocess.prepare_image(path, 64)
    assert prepared.had_alpha and prepared.original_size == (90, 150)
    assert prepared.image.shape == (64, 64, 3) and prepared.image.dtype == np.float32
    assert prepared.rgba.shape == (150, 150, 4)
    for corner in [(0, 0), (0, -1), (-1, 0), (-1, -1)]:
        np.testing.assert_array_equal(prepared.image[corner], 1.0)
    np.testing.assert_allclose(prepared.image[32, 32], np.array([30, 160, 220]) / 255, atol=1e-5)
    assert 0.0 <= prepared.image.min() and prepared.image.max() <= 1.0
    # The square object fills 80% of the side, centred.
    top, bottom, left, right = _bbox((prepared.image < 0.99).any(-1))
    assert abs((bottom - top) - 0.8 * 64) <= 2 and abs((top + bottom) / 2 - 32) <= 1.5


def test_prepare_image_without_recentring_keeps_the_framing():
    rgba = np.zeros((40, 80, 4), np.uint8)
    rgba[0:10, 0:10] = (255, 0, 0, 255)  # top-left corner of a wide image
    prepared = preprocess.prepare_image(rgba, 80, recenter_object=False)
    assert prepared.rgba.shape == (80, 80, 4)
    # Padded by 20 transparent rows above: the object stays at the left, rows 20..30.
    assert _bbox(prepared.rgba[..., 3] > 0) == (20, 30, 0, 10)
    np.testing.assert_allclose(prepared.image[25, 5], (1.0, 0.0, 0.0), atol=1e-5)
    np.testing.assert_array_equal(prepared.image[5, 40], 1.0)


def test_resize_is_torch_bicubic_with_aligned_corners():
    # A one-pixel vertical line (column 2 of 5) on grey 0.4, resized to 9 columns: output column j
    # samples source x = j / 2. At x = 1.5 the line is the third tap, weighted by PyTorch's cubic
    # at 0.5 (a = -0.75): 0.59375 (Pillow's a = -0.5 would give 0.5625); at x = 0.5 and 3.5 it is
    # an outer tap (negative lobe, -0.09375); at integer x the source pixel is returned exactly.
    rgba = np.full((5, 5, 4), 255, np.uint8)
    rgba[:, :, :3] = 102
    rgba[:, 2, :3] = 255
    image = preprocess._composite_resize(rgba, 9)
    line_weight = np.array([0, -0.09375, 0, 0.59375, 1, 0.59375, 0, -0.09375, 0])
    np.testing.assert_allclose(image[4, :, 0], 0.4 + 0.6 * line_weight, atol=1e-6)
    np.testing.assert_allclose(preprocess._composite_resize(rgba, 5)[..., 0], rgba[..., 0] / 255, atol=1e-6)
    # Overshoot past white or black is clamped.
    rgba[:, :, :3] = 0
    rgba[:, 2, :3] = 255
    assert preprocess._composite_resize(rgba, 9).min() == 0.0


def test_prepare_image_rejects_bad_arguments():
    rgba = np.full((8, 8, 4), 255, np.uint8)
    with pytest.raises(ValueError, match="border_ratio"):
        preprocess.prepare_image(rgba, 8, border_ratio=1.0)
    with pytest.raises(ValueError, match="uint8"):
        preprocess.prepare_image(rgba.astype(np.float32), 8)


# ---------------------------------------------------------------------------------------------
# Background removal.


@pytest.mark.parametrize(("background", "suffix"), [((128, 128, 128), ".jpg"), ((255, 255, 255), ".png"),
                                                    ((255, 255, 255), ".jpg")])
def test_remove_background_finds_a_disc(tmp_path, background, suffix):
    disc = _disc(96, 128, (40, 75), 25)
    rgb = np.empty((96, 128, 3), np.uint8)
    rgb[:] = background
    rgb[disc] = (200, 40, 40)
    rgb[5, 5] = rgb[90, 10] = (0, 0, 0)  # specks far from the object
    path = tmp_path / f"disc{suffix}"
    Image.fromarray(rgb).save(path, **({"quality": 85} if suffix == ".jpg" else {}))
    loaded, had_alpha = preprocess.load_rgba(path)
    assert not had_alpha
    alpha = preprocess.remove_background(loaded[..., :3])
    assert alpha.shape == disc.shape and alpha.dtype == np.uint8
    found = alpha > 127
    assert (found & disc).sum() / (found | disc).sum() > 0.9
    assert alpha[5, 5] == 0 and alpha[90, 10] == 0
    assert (alpha[_disc(96, 128, (40, 75), 23)] == 255).all()


def test_remove_background_fills_holes_of_the_background_colour():
    rgb = np.full((80, 80, 3), 255, np.uint8)
    ring = _disc(80, 80, (40, 40), 25) & ~_disc(80, 80, (40, 40), 8)
    rgb[ring] = (20, 90, 30)
    alpha = preprocess.remove_background(rgb)
    assert (alpha[_disc(80, 80, (40, 40), 22)] == 255).all()


def test_remove_background_of_a_uniform_image_is_skipped():
    with pytest.raises(ImageSkipped, match="no foreground"):
        preprocess.remove_background(np.full((64, 64, 3), 180, np.uint8))


def test_remove_background_of_noise_is_skipped():
    rgb = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    with pytest.raises(ImageSkipped, match="no foreground"):
        preprocess.remove_background(rgb)


def test_prepare_image_of_an_rgb_jpeg_removes_the_background(tmp_path):
    rgb = np.full((100, 100, 3), 235, np.uint8)
    rgb[_disc(100, 100, (30, 30), 15)] = (20, 20, 200)
    path = tmp_path / "photo.jpg"
    Image.fromarray(rgb).save(path, quality=90)
    prepared = preprocess.prepare_image(path, 32)
    assert not prepared.had_alpha
    np.testing.assert_array_equal(prepared.image[0, 0], 1.0)  # grey background became white
    assert prepared.image[16, 16, 2] > 0.6 and prepared.image[16, 16, 0] < 0.25  # blue disc, centred


# ---------------------------------------------------------------------------------------------
# Unusable files.


def _truncated_png(path):
    noise = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _huge_header_png(width, height):
    def write(path):
        data = bytearray(_raw_png(2, 2, 8, 0, b"\x00\x00\x00" * 2))
        data[16:24] = struct.pack(">II", width, height)  # IHDR width and height
        data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # IHDR CRC over type + data
        path.write_bytes(bytes(data))

    return write


@pytest.mark.parametrize(
    ("name", "write", "reason"),
    [
        ("empty.png", lambda p: p.write_bytes(b""), "empty file"),
        ("notes.png", lambda p: p.write_text("not a picture\n"), "not an image"),
        ("cut.png", _truncated_png, "truncated or corrupt"),
        ("huge.png", _huge_header_png(20000, 20000), "over the 100 MP limit"),
        ("large.png", _huge_header_png(11000, 10000), "11000x10000, over the 100 MP limit"),
        ("dot.png", lambda p: Image.new("RGB", (1, 1)).save(p), "1x1, too small"),
    ],
)
def test_unusable_files_are_skipped_with_a_reason(tmp_path, name, write, reason):
    path = tmp_path / name
    write(path)
    with pytest.raises(ImageSkipped, match=reason):
        preprocess.load_rgba(path)
    with pytest.raises(ImageSkipped, match=reason):
        preprocess.prepare_image(path, 16)


def test_a_missing_file_or_a_folder_is_skipped(tmp_path):
    with pytest.raises(ImageSkipped, match="file not found"):
        preprocess.load_rgba(tmp_path / "gone.png")
    with pytest.raises(ImageSkipped, match="not a file"):
        preprocess.load_rgba(tmp_path)


@pytest.mark.parametrize("recenter_object", [True, False])
def test_a_fully_transparent_png_is_skipped(tmp_path, recenter_object):
    path = tmp_path / "blank.png"
    Image.new("RGBA", (16, 16), (255, 0, 0, 0)).save(path)
    with pytest.raises(ImageSkipped, match="no foreground"):
        preprocess.prepare_image(path, 8, recenter_object=recenter_object)


# ---------------------------------------------------------------------------------------------
# Odd but usable files.


def test_grayscale_png(tmp_path):
    path = tmp_path / "gray.png"
    Image.fromarray(np.full((6, 8), 77, np.uint8), "L").save(path)
    rgba, had_alpha = preprocess.load_rgba(path)
    assert rgba.shape == (6, 8, 4) and not had_alpha
    np.testing.assert_array_equal(rgba[2, 3], (77, 77, 77, 255))


def test_grayscale_alpha_png(tmp_path):
    path = tmp_path / "la.png"
    la = np.zeros((6, 8, 2), np.uint8)
    la[..., 0], la[:, 4:, 1] = 90, 255
    Image.fromarray(la, "LA").save(path)
    rgba, had_alpha = preprocess.load_rgba(path)
    assert had_alpha
    np.testing.assert_array_equal(rgba[0, 6], (90, 90, 90, 255))
    assert rgba[0, 1, 3] == 0


def test_palette_png_with_transparency(tmp_path):
    path = tmp_path / "palette.png"
    image = Image.new("P", (8, 6), 0)
    image.putpalette([0, 0, 0, 250, 10, 10] + [0] * 762)
    image.paste(1, (2, 2, 6, 5))
    image.save(path, transparency=0)
    rgba, had_alpha = preprocess.load_rgba(path)
    assert had_alpha
    np.testing.assert_array_equal(rgba[3, 3], (250, 10, 10, 255))
    assert rgba[0, 0, 3] == 0


def test_sixteen_bit_grayscale_png_is_scaled_not_clipped(tmp_path):
    values = np.linspace(0, 65535, 48).astype(np.uint16).reshape(6, 8)
    path = tmp_path / "gray16.png"
    Image.fromarray(values).save(path)
    with Image.open(path) as im:
        assert im.mode.startswith("I")  # the file really is 16-bit
    rgba, had_alpha = preprocess.load_rgba(path)
    assert not had_alpha
    np.testing.assert_allclose(rgba[..., 0], np.rint(values / 257), atol=1)
    assert rgba[..., 0].max() == 255 and len(np.unique(rgba[..., 0])) > 40


def test_sixteen_bit_rgb_png(tmp_path):
    path = tmp_path / "rgb16.png"
    pixel = struct.pack(">HHH", 0x8000, 0x1234, 0xFFFF)
    path.write_bytes(_raw_png(2, 2, 16, 2, (b"\x00" + pixel * 2) * 2))
    rgba, _ = preprocess.load_rgba(path)
    np.testing.assert_allclose(rgba[1, 1, :3], np.array([0x8000, 0x1234, 0xFFFF]) / 257, atol=1)


def test_float_tiff(tmp_path):
    path = tmp_path / "float.tif"
    Image.fromarray(np.full((4, 5), 0.5, np.float32), "F").save(path)
    rgba, _ = preprocess.load_rgba(path)
    np.testing.assert_allclose(rgba[..., :3], 128, atol=1)


def test_cmyk_jpeg(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(path, quality=95)
    rgba, had_alpha = preprocess.load_rgba(path)
    assert not had_alpha
    np.testing.assert_allclose(rgba[8, 8, :3], (255, 0, 0), atol=12)


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:5, :5] = 255  # marker in the stored top-left corner
    pixels[:, :, 1] = np.arange(40, dtype=np.uint8)[None] * 6
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    path = tmp_path / "rotated.png"
    Image.fromarray(pixels).save(path, exif=exif)
    rgba, _ = preprocess.load_rgba(path)
    assert rgba.shape == (40, 20, 4)
    np.testing.assert_array_equal(rgba[..., :3], np.rot90(pixels, k=-1))


def test_animated_gif_gives_its_first_frame(tmp_path):
    path = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (8, 8), colour) for colour in [(255, 0, 0), (0, 0, 255)]]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100)
    rgba, _ = preprocess.load_rgba(path)
    np.testing.assert_array_equal(rgba[4, 4], (255, 0, 0, 255))


# ---------------------------------------------------------------------------------------------
# find_images.


def test_find_images_lists_a_folder_globs_and_files(tmp_path):
    for name in ["b.png", "a.jpg", ".hidden.png", "notes.txt"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.png").write_bytes(b"x")
    assert preprocess.find_images(tmp_path) == [tmp_path / n for n in ["a.jpg", "b.png", "notes.txt"]]
    assert preprocess.find_images(str(tmp_path / "*.png")) == [tmp_path / "b.png"]
    assert preprocess.find_images(str(tmp_path / "**" / "*.png")) == [tmp_path / "b.png", tmp_path / "sub" / "c.png"]
    assert preprocess.find_images(tmp_path / "a.jpg") == [tmp_path / "a.jpg"]
    assert preprocess.find_images([tmp_path / "b.png", str(tmp_path / "*.png"), tmp_path / "a.jpg"]) == [
        tmp_path / "b.png", tmp_path / "a.jpg"]


def test_find_images_raises_when_nothing_is_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        preprocess.find_images(tmp_path / "missing.png")
    with pytest.raises(FileNotFoundError):
        preprocess.find_images(str(tmp_path / "*.webp"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError):
        preprocess.find_images(tmp_path / "empty")
