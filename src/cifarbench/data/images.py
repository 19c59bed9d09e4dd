"""Opening image files from users safely (PNG and JPEG only, bounded size, complete files only), decoded as
an image viewer would show them: EXIF orientation applied, 16-bit samples scaled to 8, transparency over white."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from cifarbench.errors import CifarbenchError
from cifarbench.fsutil import MiB, open_regular_file

FORMATS = ("PNG", "JPEG")
MAX_PIXELS = 89_478_485
"""Pillow's own default warning threshold (a 0.25 GiB RGBA bitmap): far beyond any photo worth classifying
at 32×32, and small enough that a hostile header cannot make us allocate gigabytes."""
MAX_FILE_BYTES = 64 * MiB
"""The largest image file read (a 24-megapixel JPEG is ~10 MiB, an uncompressed-ish PNG of one ~70)."""
_WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


class ImageFileError(CifarbenchError):
    """An image file that cannot be used: missing, not PNG/JPEG, too large, truncated or corrupt."""


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


@contextmanager
def _strict_pillow() -> Iterator[None]:
    # Both settings are Pillow globals; force them for the duration of the open and put them back.
    truncated, limit = ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # over the limit is an error, not a hint
            yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS = truncated, limit


def open_image(path: str | os.PathLike, mode: str = "RGB") -> Image.Image:
    """Decode a whole PNG or JPEG file into an in-memory image in `mode` ("RGB" or "L").

    Every failure is an `ImageFileError` whose message is one line naming the file.
    """
    path = Path(path)
    try:
        with (open_regular_file(path, MAX_FILE_BYTES, "image", error=ImageFileError) as f, _strict_pillow(),
              Image.open(f, formats=list(FORMATS)) as img):
            width, height = img.size
            if width * height > MAX_PIXELS:  # the header alone tells; refuse before decoding anything
                raise ImageFileError(f"{path}: {width}×{height} pixels is over the limit of {MAX_PIXELS:,} "
                                     "(refused as a possible decompression bomb)")
            img.load()  # decode now, inside the guard: a truncated file fails here, not later
            return as_viewed(img, mode)
    except ImageFileError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageFileError(f"{path}: refused as a possible decompression bomb ({_one_line(exc)})") from None
    except UnidentifiedImageError:
        raise ImageFileError(f"{path}: not a PNG or JPEG image") from None
    except OSError as exc:
        if "truncated" in str(exc):
            raise ImageFileError(f"{path}: the image file is truncated (incomplete download or copy?)") from None
        raise ImageFileError(f"{path}: cannot decode the image ({_one_line(exc)})") from None
    except Exception as exc:  # Pillow's parsers raise SyntaxError, ValueError, struct.error, MemoryError, ...
        raise ImageFileError(f"{path}: cannot decode the image ({_one_line(exc)})") from None


def as_viewed(img: Image.Image, mode: str = "RGB") -> Image.Image:
    """`img` in `mode` ("RGB" or "L") as a viewer shows it: rotated by its EXIF orientation, 16-bit samples
    scaled to 8 bits (not clipped at 255), and any transparency composited over a white background."""
    img = ImageOps.exif_transpose(img)
    if img.mode in _WIDE_MODES:
        # A PNG's 16-bit grey (Pillow calls it I;16, or I): keep the top 8 bits, as viewers do.
        wide = np.clip(np.asarray(img, dtype=np.int64), 0, 65535)
        img = Image.fromarray((wide >> 8).astype(np.uint8))
    elif img.mode == "F":
        img = Image.fromarray(np.clip(np.nan_to_num(np.asarray(img)), 0, 255).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode in ("P", "L", "RGB") and "transparency" in img.info):
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return img.convert(mode)
