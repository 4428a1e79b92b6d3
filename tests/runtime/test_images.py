"""open_rgb: conversions to 8-bit RGB with notes, and one clear error per kind of bad file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from leukodetect.errors import BadImageError
from leukodetect.runtime.images import IMAGE_SUFFIXES, open_rgb, pixel_hash


def _truncate(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def test_rgb_image_opens_unchanged_without_notes(write_image, tmp_path):
    path = write_image(tmp_path / "cell.png")
    notes: list[str] = []
    image = open_rgb(path, notes=notes)
    assert image.mode == "RGB" and image.size == (16, 12)
    assert np.array_equal(np.asarray(image), np.asarray(Image.open(path)))
    assert notes == []
    assert image.info["original_mode"] == "RGB"


@pytest.mark.parametrize(
    ("mode", "keyword"), [("L", "grayscale"), ("1", "grayscale"), ("P", "palette"), ("CMYK", "CMYK")]
)
def test_odd_modes_become_rgb_with_a_note(write_image, tmp_path, mode, keyword):
    suffix = ".jpg" if mode == "CMYK" else ".png"
    path = write_image(tmp_path / f"cell{suffix}", mode=mode)
    notes: list[str] = []
    image = open_rgb(path, notes=notes)
    assert image.mode == "RGB" and np.asarray(image).dtype == np.uint8
    assert len(notes) == 1 and keyword in notes[0] and path.name in notes[0]
    assert image.info["original_mode"] == mode


def test_grayscale_repeats_the_channel(write_image, tmp_path):
    path = write_image(tmp_path / "gray.png", mode="L")
    pixels = np.asarray(open_rgb(path))
    assert np.array_equal(pixels[..., 0], pixels[..., 1]) and np.array_equal(pixels[..., 0], pixels[..., 2])
    assert np.array_equal(pixels[..., 0], np.asarray(Image.open(path)))


def test_transparency_is_composited_on_white(tmp_path):
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 200  # red everywhere, opaque only in the top row
    rgba[0, :, 3] = 255
    path = tmp_path / "alpha.png"
    Image.fromarray(rgba).save(path)
    notes: list[str] = []
    pixels = np.asarray(open_rgb(path, notes=notes))
    assert pixels[0, 0].tolist() == [200, 0, 0]
    assert pixels[3, 3].tolist() == [255, 255, 255]
    assert "white" in notes[0]


def test_palette_with_transparency_is_composited(tmp_path):
    path = tmp_path / "pal.png"
    image = Image.new("P", (4, 4), 0)
    image.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    image.putpixel((0, 0), 1)
    image.save(path, transparency=0)
    notes: list[str] = []
    pixels = np.asarray(open_rgb(path, notes=notes))
    assert pixels[0, 0].tolist() == [10, 20, 30] and pixels[1, 1].tolist() == [255, 255, 255]
    assert "white" in notes[0]


def test_16bit_grayscale_tiff_is_divided_by_257(tmp_path):
    path = tmp_path / "gray16.tif"
    tifffile.imwrite(path, np.array([[0, 257, 65535, 25700]], dtype=np.uint16))
    notes: list[str] = []
    pixels = np.asarray(open_rgb(path, notes=notes))
    assert pixels.dtype == np.uint8 and pixels.shape == (1, 4, 3)
    assert pixels[0, :, 0].tolist() == [0, 1, 255, 100]
    assert "16-bit" in notes[0]


def test_16bit_rgb_tiff_is_read_with_full_precision(tmp_path):
    path = tmp_path / "rgb16.tif"
    values = np.array([[[0, 32896, 65535], [257, 514, 771]]], dtype=np.uint16)  # 32896 = 128 * 257
    tifffile.imwrite(path, values, photometric="rgb")
    notes: list[str] = []
    image = open_rgb(path, notes=notes)
    assert image.mode == "RGB"
    assert np.asarray(image).tolist() == [[[0, 128, 255], [1, 2, 3]]]
    assert "16-bit" in notes[0] and path.name in notes[0]


def test_16bit_png_is_rescaled(tmp_path):
    path = tmp_path / "gray16.png"
    Image.fromarray(np.array([[0, 65535]], dtype=np.uint16)).save(path)
    notes: list[str] = []
    assert np.asarray(open_rgb(path, notes=notes))[0, :, 0].tolist() == [0, 255]
    assert "16-bit" in notes[0]


def test_exif_orientation_is_applied(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.new("RGB", (20, 10)).save(path, exif=exif)
    assert open_rgb(path).size == (10, 20)


def test_missing_file(tmp_path):
    with pytest.raises(BadImageError, match=r"nowhere\.png does not exist"):
        open_rgb(tmp_path / "nowhere.png")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.png"
    path.touch()
    with pytest.raises(BadImageError, match=r"empty\.png is empty \(0 bytes\)"):
        open_rgb(path)


@pytest.mark.parametrize("name", ["notes.jpg", "notes.tif"])
def test_text_named_like_an_image(tmp_path, name):
    path = tmp_path / name
    path.write_text("this is not a picture\n")
    with pytest.raises(BadImageError, match=rf"{name} is not an image"):
        open_rgb(path)


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("name", ["cell.jpg", "cell.png", "cell.tif"])
def test_truncated_files_raise(write_image, tmp_path, name, keep):
    path = _truncate(write_image(tmp_path / name, size=(32, 32)), keep)
    with pytest.raises(BadImageError, match=rf"{name} is truncated"):
        open_rgb(path)


def test_too_many_pixels_is_refused_before_decoding(write_image, tmp_path):
    path = write_image(tmp_path / "huge.png", size=(32, 32))
    with pytest.raises(BadImageError, match=r"huge\.png has 32x32 = 1,024 pixels, more than .* 1,000 pixels"):
        open_rgb(path, max_pixels=1000)
    _truncate(path)  # the size comes from the header: a broken body still reports the size
    with pytest.raises(BadImageError, match="pixels"):
        open_rgb(path, max_pixels=1000)
    assert open_rgb(write_image(tmp_path / "ok.png", size=(32, 32)), max_pixels=1024).size == (32, 32)


def test_too_many_pixels_in_a_16bit_tiff(tmp_path):
    path = tmp_path / "big16.tif"
    tifffile.imwrite(path, np.zeros((40, 40, 3), dtype=np.uint16), photometric="rgb")
    with pytest.raises(BadImageError, match=r"big16\.tif .* pixels"):
        open_rgb(path, max_pixels=100)


def test_pixel_hash_ignores_format_and_name(write_image, tmp_path):
    png = write_image(tmp_path / "a.png", seed=3)
    bmp = write_image(tmp_path / "b.bmp", seed=3)
    other = write_image(tmp_path / "c.png", seed=4)
    assert pixel_hash(open_rgb(png)) == pixel_hash(open_rgb(bmp))
    assert pixel_hash(open_rgb(png)) != pixel_hash(open_rgb(other))
    flat = Image.new("RGB", (4, 2))
    assert pixel_hash(flat) != pixel_hash(Image.new("RGB", (2, 4)))  # size is part of the hash


def test_image_suffixes_are_lower_case():
    assert {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp"} == set(IMAGE_SUFFIXES)


def test_open_rgb_decodes_bytes_and_names_the_upload(tmp_path):
    """An upload is decoded from memory; errors and notes name it as the service shows it."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (5, 4), 200).save(buffer, format="PNG")
    notes: list[str] = []
    image = open_rgb(buffer.getvalue(), name="cell.png", notes=notes)
    assert image.mode == "RGB" and image.size == (5, 4) and notes == ["cell.png: grayscale (L) image converted to RGB."]
    tiff = io.BytesIO()
    Image.new("RGB", (3, 3), (10, 20, 30)).save(tiff, format="TIFF")
    assert open_rgb(tiff.getvalue(), name="x").getpixel((1, 1)) == (10, 20, 30)
    with pytest.raises(BadImageError, match=r"^Image 'notes\.txt' is not an image"):
        open_rgb(b"hello, not an image", name="notes.txt")
    with pytest.raises(BadImageError, match=r"^Image 'empty\.png' is empty"):
        open_rgb(b"", name="empty.png")


def test_a_gif_is_refused_in_one_sentence_whatever_its_name(tmp_path):
    """GIF is not a microscope format: a named GIF is refused, not classified from its first frame."""
    import io

    frames = [Image.new("RGB", (8, 8), colour) for colour in ((200, 100, 150), (90, 40, 140))]
    frames[0].save(tmp_path / "cell.gif", save_all=True, append_images=frames[1:])
    (tmp_path / "renamed.png").write_bytes((tmp_path / "cell.gif").read_bytes())
    for path in (tmp_path / "cell.gif", tmp_path / "renamed.png"):
        with pytest.raises(BadImageError, match=rf"^Image .*{path.name} is a GIF, not a microscope format .* PNG or TIFF\.$"):
            open_rgb(path)
    upload = io.BytesIO()
    frames[0].save(upload, format="GIF")
    with pytest.raises(BadImageError, match=r"^Image 'up\.gif' is a GIF"):
        open_rgb(upload.getvalue(), name="up.gif")


def test_folder_walks_list_gifs_so_that_each_is_reported(tmp_path, write_image):
    from leukodetect.runtime.images import image_paths

    write_image(tmp_path / "a.png")
    (tmp_path / "sub").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "sub" / "b.gif")
    assert image_paths(tmp_path) == [tmp_path / "a.png", tmp_path / "sub" / "b.gif"]
