"""MNIST and Fashion-MNIST: find, download, verify and parse the official IDX files (gzipped or raw).

The data folder is resolved as for CIFAR-10 (`--data-dir`, then `$CIFARBENCH_DATA`, then `./data`). Inside it
the four files may sit in `mnist/` (or `fashion-mnist/`), in torchvision's `MNIST/raw/` (`FashionMNIST/raw/`),
or in the folder itself. A missing copy is downloaded into `mnist/` (`fashion-mnist/`), over https, md5-checked.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cifarbench.data.cifar10 import resolve_data_dir
from cifarbench.data.dataset import ImageDataset, Split, fingerprint
from cifarbench.errors import DataError
from cifarbench.fsutil import MiB, read_regular_file

TRAIN_IMAGES, TRAIN_LABELS = "train-images-idx3-ubyte", "train-labels-idx1-ubyte"
TEST_IMAGES, TEST_LABELS = "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"
FILES = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)
IMAGE_MAGIC, LABEL_MAGIC = 0x00000803, 0x00000801  # 0x08 = unsigned byte; then the number of dimensions
ROWS = COLS = 28
MAX_EXAMPLES = 1_000_000  # a header claiming more is corrupt
MAX_BYTES = 64 * MiB
"""The most an IDX file may hold, on disk and once gunzipped (the largest official one is 47 MiB unpacked)."""


@dataclass(frozen=True, kw_only=True)
class IdxDataset:
    name: str
    title: str
    classes: tuple[str, ...]
    folder: str
    """Sub-folder of the data folder that downloads go to."""
    torchvision_folder: str
    mirror: str
    md5: dict[str, str]
    """The official md5 of each .gz file (the ones torchvision checks)."""


MNIST = IdxDataset(
    name="mnist", title="MNIST", classes=tuple(str(d) for d in range(10)), folder="mnist", torchvision_folder="MNIST",
    mirror="https://ossci-datasets.s3.amazonaws.com/mnist/",
    md5={TRAIN_IMAGES: "f68b3c2dcbeaaa9fbdd348bbdeb94873", TRAIN_LABELS: "d53e105ee54ea40749a09fcbcd1e9432",
     TEST_IMAGES: "9fb629c4189551a2d022fa330f9573f3", TEST_LABELS: "ec29112dd5afa0611ce80d1b7f02629c"})
FASHION_MNIST = IdxDataset(
    name="fashion-mnist", title="Fashion-MNIST",
    classes=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
    folder="fashion-mnist", torchvision_folder="FashionMNIST",
    # The authors' own S3 site is http-only; their GitHub repository holds the same files over https.
    mirror="https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
    md5={TRAIN_IMAGES: "8d4fb7e6c68d591d4c3dfef9ec88bf0d", TRAIN_LABELS: "25c81989df183df01b3e8a0aad5dffbe",
     TEST_IMAGES: "bef4ecab320f06d8554ea6380940ec79", TEST_LABELS: "bb300cfdad3c16e7a12a480ee83cd310"})
SPECS = {spec.name: spec for spec in (MNIST, FASHION_MNIST)}


def _spec(name: str) -> IdxDataset:
    try:
        return SPECS[name]
    except KeyError:
        raise DataError(f"unknown IDX data set {name!r}; choose one of: {', '.join(SPECS)}") from None


def _file_in(folder: Path, name: str) -> Path | None:
    """The gzipped file if present (it is what the md5s cover), else the uncompressed one."""
    for candidate in (folder / f"{name}.gz", folder / name):
        # Present at all: a FIFO or device in its place is refused when read, not skipped.
        if candidate.exists() or candidate.is_symlink():
            return candidate
    return None


def find_files(spec: IdxDataset, root: Path) -> dict[str, Path] | None:
    """The four files from the first folder that holds them all, or None."""
    for folder in (root / spec.folder, root / spec.torchvision_folder / "raw", root):
        files = {name: _file_in(folder, name) for name in FILES}
        if all(files.values()):
            return files  # type: ignore[return-value]
    return None


def ensure_idx(name: str, data_dir: str | os.PathLike | None = None, *, download: bool = True,
               mirror: str | None = None, cafile: str | None = None, progress: bool | None = None) -> dict[str, Path]:
    """The four files of data set `name`, downloading (and md5-checking) the missing ones when allowed."""
    from cifarbench.data.download import download as fetch

    spec = _spec(name)
    root = resolve_data_dir(data_dir)
    files = find_files(spec, root)
    if files:
        return files
    if not download:
        raise DataError(_missing_message(spec, root))
    dest = root / spec.folder
    for file in FILES:
        target = dest / f"{file}.gz"
        if not target.is_file():
            try:
                fetch(f"{mirror or spec.mirror}{file}.gz", target, spec.md5[file], cafile=cafile, progress=progress)
            except DataError as exc:
                raise DataError(f"{exc}. {_missing_message(spec, root)}") from None
    return {file: dest / f"{file}.gz" for file in FILES}


def _missing_message(spec: IdxDataset, root: Path) -> str:
    return (f"{spec.title} not found in {root.resolve()} (looked in {spec.folder}/, {spec.torchvision_folder}/raw/ "
            f"and the folder itself for {', '.join(f + '[.gz]' for f in FILES)}); download it where the internet is "
            "reachable, or point --data-dir / $CIFARBENCH_DATA at a folder holding a copy")


def load_idx_dataset(name: str, data_dir: str | os.PathLike | None = None, *, verify: bool = True,
                     download: bool = True, progress: bool | None = None) -> ImageDataset:
    """MNIST or Fashion-MNIST as uint8 arrays (N, 1, 28, 28), verified against the official md5s unless told not to."""
    spec = _spec(name)
    files = ensure_idx(name, data_dir, download=download, progress=progress)
    payloads: dict[str, bytes] = {}
    for file, path in files.items():
        payloads[file] = read_regular_file(path, MAX_BYTES, f"{spec.title} file")
    verified = _check_md5(spec, files, payloads, strict=verify)
    arrays = {file: read_idx(payloads[file], files[file]) for file in FILES}
    train = _split(arrays, files, TRAIN_IMAGES, TRAIN_LABELS, len(spec.classes))
    test = _split(arrays, files, TEST_IMAGES, TEST_LABELS, len(spec.classes))
    folder = files[TEST_IMAGES].parent
    layout = "idx-gz" if all(p.suffix == ".gz" for p in files.values()) else "idx"
    return ImageDataset(name=spec.name, classes=spec.classes, train=train, test=test, sha256=fingerprint(train, test),
                        verified=verified, source=str(folder.resolve()), layout=layout)


def _check_md5(spec: IdxDataset, files: dict[str, Path], payloads: dict[str, bytes], *, strict: bool) -> bool:
    """True when every file is the official .gz; with `strict`, anything else is an error."""
    others = {md5: other for other in SPECS.values() if other is not spec for md5 in other.md5.values()}
    official = True
    for file, path in files.items():
        actual = hashlib.md5(payloads[file]).hexdigest()
        if actual in others:  # same file names, different data set: never right, verified or not
            raise DataError(f"{path} is the official {others[actual].title} file, not {spec.title}'s; "
                            f"choose --dataset {others[actual].name} or point --data-dir elsewhere")
        if path.suffix != ".gz":
            if strict:
                raise DataError(f"{path}: only the official .gz files have published md5s, so an uncompressed "
                                "file cannot be verified (keep the .gz beside it, or pass --no-verify)")
            official = False
        elif actual != spec.md5[file]:
            if strict:
                raise DataError(f"{path}: md5 {actual} does not match the official {spec.md5[file]}; not the "
                                f"official {spec.title} file (pass --no-verify to use this copy anyway)")
            official = False
    return official


def read_idx(payload: bytes, source: str | os.PathLike) -> np.ndarray:
    """Parse one IDX file of unsigned bytes (gzipped or not): images (N, 28, 28) or labels (N,)."""
    if payload[:2] == b"\x1f\x8b":
        try:
            with gzip.GzipFile(fileobj=io.BytesIO(payload)) as f:
                header = f.read(8)
                ndim = header[3] if len(header) >= 4 else 0
                header += f.read(4 * max(ndim - 1, 0))
                shape = _parse_header(header, source)
                body = f.read(int(np.prod(shape)))
                extra = f.read(1)
        except (EOFError, OSError, zlib.error) as exc:
            reason = "truncated" if isinstance(exc, EOFError) else " ".join(str(exc).split())
            raise DataError(f"{source}: not a readable gzip file ({reason})") from None
    else:
        ndim = payload[3] if len(payload) >= 4 else 0
        shape = _parse_header(payload[:4 + 4 * ndim], source)
        start = 4 + 4 * len(shape)
        body = payload[start:start + int(np.prod(shape))]
        extra = payload[start + len(body):start + len(body) + 1]
    if len(body) < int(np.prod(shape)):
        raise DataError(f"{source}: truncated (the header promises {int(np.prod(shape))} bytes of data for shape "
                        f"{shape}, the file holds {len(body)})")
    if extra:
        raise DataError(f"{source}: trailing bytes after the {shape} data the header describes")
    return np.frombuffer(body, dtype=np.uint8).reshape(shape)


def _parse_header(header: bytes, source: str | os.PathLike) -> tuple[int, ...]:
    if len(header) < 8:
        raise DataError(f"{source}: too short to be an IDX file ({len(header)} header bytes)")
    magic = int.from_bytes(header[:4], "big")
    if magic not in (IMAGE_MAGIC, LABEL_MAGIC):
        raise DataError(f"{source}: magic number 0x{magic:08x} is not an IDX file of unsigned bytes with 1 or 3 "
                        f"dimensions (expected 0x{IMAGE_MAGIC:08x} for images or 0x{LABEL_MAGIC:08x} for labels)")
    ndim = magic & 0xFF
    if len(header) < 4 + 4 * ndim:
        raise DataError(f"{source}: truncated IDX header")
    shape = tuple(int.from_bytes(header[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    if shape[0] > MAX_EXAMPLES:
        raise DataError(f"{source}: header claims {shape[0]} examples (more than {MAX_EXAMPLES}); corrupt file")
    if ndim == 3 and shape[1:] != (ROWS, COLS):
        raise DataError(f"{source}: images are {shape[1]}×{shape[2]}, expected {ROWS}×{COLS}")
    if math.prod(shape) > MAX_BYTES:  # bounds what a gzip bomb could inflate to, too
        raise DataError(f"{source}: header claims {math.prod(shape):,} bytes of data, over the limit of "
                        f"{MAX_BYTES:,}; corrupt file")
    return shape


def _split(arrays: dict[str, np.ndarray], files: dict[str, Path], images_file: str, labels_file: str,
           num_classes: int) -> Split:
    images, labels = arrays[images_file], arrays[labels_file]
    if images.ndim != 3:
        raise DataError(f"{files[images_file]}: holds labels, not images (magic 0x{LABEL_MAGIC:08x})")
    if labels.ndim != 1:
        raise DataError(f"{files[labels_file]}: holds images, not labels (magic 0x{IMAGE_MAGIC:08x})")
    if len(images) != len(labels):
        raise DataError(f"{files[labels_file]}: {len(labels)} labels for the {len(images)} images of "
                        f"{files[images_file].name}")
    if len(labels) and labels.max() >= num_classes:
        raise DataError(f"{files[labels_file]}: label {int(labels.max())} is out of range 0-{num_classes - 1}")
    # A copy: frombuffer's arrays are read-only, and torch warns about (and cannot own) those.
    return Split(np.array(images, dtype=np.uint8).reshape(-1, 1, ROWS, COLS), labels.astype(np.int64))
