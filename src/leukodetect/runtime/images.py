"""Open any blood-smear image as a fully loaded 8-bit RGB picture, or fail with one clear sentence.

Every image enters the project through :func:`open_rgb`, so odd files (16-bit TIFFs, palettes,
transparency, CMYK, rotated phone photos, truncated downloads) are handled once, here, and the
rest of the code can assume 8-bit RGB.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image, ImageOps, UnidentifiedImageError

from leukodetect.errors import BadImageError, LeukoError

#: Largest image (width x height) opened by default: whole smears reach 50 megapixels.
DEFAULT_MAX_PIXELS = 60_000_000

#: File name suffixes (lower case) treated as images by the indexers.
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp"})
#: Suffixes of a format refused by rule: GIF. Folder walks list these files too, so that each is reported by
#: name (:func:`open_rgb` refuses it) instead of passed over; data set indexers leave them out and
#: ``data check`` lists them.
REFUSED_SUFFIXES = frozenset({".gif"})
#: Why a GIF is refused, whatever its name: a palette of 256 colours loses a stained cell's shades, and a
#: GIF may hold several frames, of which a model would see one.
GIF_RULE = "not a microscope format (256 colours at most, maybe several frames); save the original image as PNG or TIFF"

_TIFF_SUFFIXES = {".tif", ".tiff"}
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*")
_GRAY_MODES = {"L", "1"}
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_HIGH_DEPTH_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I", "F"}
#: Exceptions Pillow raises while decoding damaged data (truncated streams, bad chunks, bad tiles).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError)


def open_rgb(
    source: str | Path | bytes,
    *,
    name: str | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    notes: list[str] | None = None,
) -> Image.Image:
    """Open an image file (or its bytes) as a fully decoded 8-bit RGB image with EXIF orientation applied.

    Odd modes are converted and one sentence per conversion is appended to ``notes``: grayscale
    and palettes become RGB, transparency is composited on white (the colour of an empty slide),
    CMYK becomes RGB, and 16/32-bit or float data is rescaled to 8 bit by its bit range (see
    :func:`_rescale_to_uint8`). The source mode is kept in ``image.info["original_mode"]``.

    Args:
        source: the image file, or its content (an upload) decoded from memory with no file written.
        name: what errors and notes call an in-memory image (e.g. the uploaded file's name); a
            file is called by its path.
        max_pixels: refuse images with more pixels than this; checked from the header, before
            decoding, so a decompression bomb costs nothing.
        notes: a list that receives a sentence for every conversion made.

    Raises:
        BadImageError: the file is missing, empty, not an image, truncated, too large or in a
            mode that cannot be converted.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        src = _Source(where=f"'{name or 'upload'}'", short=name or "upload", tiff=data[:4] in _TIFF_MAGIC, read=lambda: io.BytesIO(data))
        if not data:
            raise BadImageError(f"Image {src.where} is empty (0 bytes); send the file again.")
    else:
        path = Path(source)
        src = _Source(where=str(path), short=path.name, tiff=path.suffix.lower() in _TIFF_SUFFIXES, read=lambda: path)
        if not path.is_file():
            raise BadImageError(f"Image {path} does not exist; check the path or re-index the data set.")
        if path.stat().st_size == 0:
            raise BadImageError(f"Image {path} is empty (0 bytes); download or copy it again, or delete it.")

    try:
        with warnings.catch_warnings():
            # Our own max_pixels guard below replaces Pillow's global decompression-bomb warning.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            warnings.simplefilter("ignore", UserWarning)  # e.g. "Corrupt EXIF data"
            image = Image.open(src.read())
    except Image.DecompressionBombError as error:
        # Pillow refuses these at open, before our own guard can read the size.
        raise BadImageError(
            f"Image {src.where} has more pixels than Pillow will ever open "
            f"({2 * Image.MAX_IMAGE_PIXELS:,}); downscale or tile it first."
        ) from error
    except UnidentifiedImageError as error:
        if src.tiff:
            return _open_with_tifffile(src, max_pixels=max_pixels, notes=notes, cause=error)
        raise _not_an_image(src.where) from error
    except _DECODE_ERRORS as error:
        raise _decode_error(src.where, error) from error

    with image:
        if image.format == "GIF":
            raise BadImageError(f"Image {src.where} is a GIF, {GIF_RULE}.")
        _check_pixels(src.where, image.size, max_pixels)
        if image.format == "TIFF" and image.mode not in _HIGH_DEPTH_MODES and _tiff_bits(image) > 8:
            # Pillow reads 16-bit RGB TIFFs by silently dropping the low byte; tifffile reads the
            # real samples so that the rescale (and its note) are ours.
            return _open_with_tifffile(src, max_pixels=max_pixels, notes=notes, cause=None)
        try:
            image.load()
            transposed = ImageOps.exif_transpose(image, in_place=True)  # no copy of a large image
            image = transposed if transposed is not None else image
        except _DECODE_ERRORS as error:
            if src.tiff and "truncated" not in str(error).lower():
                return _open_with_tifffile(src, max_pixels=max_pixels, notes=notes, cause=error)
            raise _decode_error(src.where, error) from error
        original_mode = image.mode
        rgb = _to_rgb(image, src, notes)
    rgb.info["original_mode"] = original_mode
    return rgb


@dataclass(frozen=True)
class _Source:
    """Where an image comes from: how messages name it, and how to read it again."""

    where: str  # in error sentences: the path, or the quoted upload name
    short: str  # in conversion notes: the file name
    tiff: bool  # a TIFF by suffix (files) or by its first bytes (uploads): Pillow's failures go to tifffile
    read: Callable[[], Path | io.BytesIO]


def pixel_hash(image: Image.Image) -> str:
    """Return the sha256 (hex) of an image's RGB pixels and size.

    Two files with the same pixels hash alike whatever their names, formats or metadata, which is
    what finds exact duplicates that must not straddle a train/test split.
    """
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    digest = hashlib.sha256(f"{rgb.width}x{rgb.height}:".encode())
    digest.update(rgb.tobytes())
    return digest.hexdigest()


def _tiff_bits(image: Image.Image) -> int:
    """The largest BitsPerSample of an open Pillow TIFF (8 when the tag is absent)."""
    bits = image.tag_v2.get(258, 8)
    return max(bits) if isinstance(bits, tuple) else int(bits)


def _check_pixels(where: str, size: tuple[int, int], max_pixels: int) -> None:
    """Refuse an image whose header declares more than ``max_pixels`` pixels."""
    width, height = size
    if width * height > max_pixels:
        raise BadImageError(
            f"Image {where} has {width}x{height} = {width * height:,} pixels, more than the limit "
            f"of {max_pixels:,} pixels; downscale or tile it, or raise max_pixels."
        )


def _not_an_image(where: str) -> BadImageError:
    """The error for a file whose header no reader recognises."""
    return BadImageError(
        f"Image {where} is not an image Pillow can read (or its header is damaged or truncated); "
        "replace it or remove it from the data set."
    )


def _decode_error(where: str, error: Exception) -> BadImageError:
    """Turn a Pillow/tifffile decoding failure into one sentence naming the file."""
    text = str(error)
    if any(word in text.lower() for word in ("truncated", "broken data stream")) or isinstance(
        error, EOFError
    ):
        return BadImageError(
            f"Image {where} is truncated (incomplete file: {text}); download or copy it again."
        )
    return BadImageError(
        f"Image {where} could not be decoded ({text}); replace it or remove it from the data set."
    )


def _to_rgb(image: Image.Image, src: _Source, notes: list[str] | None) -> Image.Image:
    """Convert a loaded Pillow image of any supported mode to RGB, noting what was done."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "P with transparency"
    if image.mode in _ALPHA_MODES:
        _note(notes, f"{src.short}: {mode} image composited on white to drop transparency.")
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode in _GRAY_MODES or mode == "P":
        kind = "palette" if mode == "P" else "grayscale"
        _note(notes, f"{src.short}: {kind} ({mode}) image converted to RGB.")
        return image.convert("RGB")
    if mode in _HIGH_DEPTH_MODES:
        array, source = _rescale_to_uint8(np.asarray(image))
        _note(notes, f"{src.short}: {mode} image rescaled to 8 bit by {source} and converted to RGB.")
        return Image.fromarray(array).convert("RGB")
    try:
        rgb = image.convert("RGB")
    except ValueError as error:
        raise BadImageError(
            f"Image {src.where} has unsupported mode {mode}; convert it to 8-bit RGB first."
        ) from error
    _note(notes, f"{src.short}: {mode} image converted to RGB.")
    return rgb


def _open_with_tifffile(
    src: _Source, *, max_pixels: int, notes: list[str] | None, cause: Exception | None
) -> Image.Image:
    """Read a TIFF Pillow cannot read faithfully (16-bit RGB, odd compressions) with tifffile."""
    try:
        with tifffile.TiffFile(src.read()) as tif:
            page = tif.pages[0]
            _check_pixels(src.where, (page.imagewidth, page.imagelength), max_pixels)
            array = page.asarray()
            planar = page.planarconfig == tifffile.PLANARCONFIG.SEPARATE
    except BadImageError:
        raise
    except Exception as error:  # tifffile raises many types; any of them means "unreadable"
        if isinstance(cause, UnidentifiedImageError):
            raise _not_an_image(src.where) from error
        raise _decode_error(src.where, cause or error) from error
    if planar and array.ndim == 3:
        array = np.moveaxis(array, 0, -1)  # (samples, height, width) -> (height, width, samples)
    channels = 1 if array.ndim == 2 else array.shape[-1]
    original_mode = f"TIFF {array.dtype.name} x{channels}"
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] not in (3, 4):
        raise BadImageError(
            f"Image {src.where} has an unsupported TIFF layout {array.shape}; convert it to 8-bit RGB first."
        )
    if array.dtype != np.uint8:
        array, source = _rescale_to_uint8(array)
        _note(notes, f"{src.short}: {original_mode} image rescaled to 8 bit by {source}.")
    rgb = _to_rgb(Image.fromarray(np.ascontiguousarray(array)), src, notes)
    rgb.info["original_mode"] = original_mode
    return rgb


def _rescale_to_uint8(array: np.ndarray) -> tuple[np.ndarray, str]:
    """Rescale high-depth samples to 8 bit by their bit range; return them and the range used.

    The range is that of the storage, not the image's own min/max, so every image of a data set
    is scaled alike and exposure differences survive: unsigned 16-bit is divided by 257
    (65535 -> 255). Pillow's signed 32-bit ``I`` mode (how 16-bit PNGs may open) counts as 16 bit
    when its values fit; float data in [0, 1] is multiplied by 255; anything else uses the
    smallest of 16/32 bits that holds its maximum.
    """
    values = array.astype(np.float64)
    top = float(values.max()) if values.size else 0.0
    if array.dtype.kind == "f" and top <= 1.0:
        full_scale, source = 1.0, "the float range [0, 1]"
    else:
        bits = array.dtype.itemsize * 8 if array.dtype.kind == "u" else (16 if top <= 65535 else 32)
        full_scale, source = float(2**bits - 1), f"its {bits}-bit range"
    scaled = np.clip(np.rint(values * (255.0 / full_scale)), 0, 255).astype(np.uint8)
    return scaled, source


def _note(notes: list[str] | None, sentence: str) -> None:
    """Append a conversion note when the caller asked for notes."""
    if notes is not None:
        notes.append(sentence)


def image_paths_of(inputs: Sequence[Path]) -> list[Path]:
    """:func:`image_paths` of each input in turn (images or folders, as given on the command line), in order."""
    return [path for image_or_dir in inputs for path in image_paths(Path(image_or_dir))]


def image_paths(image_or_dir: Path) -> list[Path]:
    """The image itself, or the image files under a folder, searched recursively (sorted); one clear sentence otherwise.

    This is how ``detect`` and ``predict`` (for each of its arguments) read a path given on the
    command line. A file is returned whatever its suffix, so that an unreadable one is
    reported by name when it is opened, not passed over; so are the GIFs in a folder.
    """
    image_or_dir = Path(image_or_dir)
    if not image_or_dir.exists():
        raise LeukoError(f"{image_or_dir} does not exist: pass an image file or a folder of images.")
    if image_or_dir.is_file():
        return [image_or_dir]
    paths = sorted(p for p in image_or_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES | REFUSED_SUFFIXES)
    if not paths:
        raise LeukoError(f"{image_or_dir} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))}).")
    return paths


