"""Opening image files from users safely: PNG and JPEG only, bounded size, complete files only."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from PIL import Image, ImageFile, UnidentifiedImageError

from cifarbench.errors import CifarbenchError

FORMATS = ("PNG", "JPEG")
MAX_PIXELS = 89_478_485
"""Pillow's own default warning threshold (a 0.25 GiB RGBA bitmap): far beyond any photo worth classifying
at 32×32, and small enough that a hostile header cannot make us allocate gigabytes."""


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
    if not path.is_file():
        raise ImageFileError(f"image {path} does not exist or is not a file")
    try:
        with _strict_pillow(), Image.open(path, formats=list(FORMATS)) as img:
            width, height = img.size
            if width * height > MAX_PIXELS:  # the header alone tells; refuse before decoding anything
                raise ImageFileError(f"{path}: {width}×{height} pixels is over the limit of {MAX_PIXELS:,} "
                                     "(refused as a possible decompression bomb)")
            img.load()  # decode now, inside the guard: a truncated file fails here, not later
            return img.convert(mode)
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
    except (SyntaxError, ValueError, EOFError, MemoryError) as exc:  # Pillow's parsers raise these on bad chunks
        raise ImageFileError(f"{path}: cannot decode the image ({_one_line(exc)})") from None
