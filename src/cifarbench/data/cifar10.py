"""CIFAR-10: find it, download it, verify it, parse it (python or binary layout) and cache the result.

Resolution order for the folder: the `data_dir` argument (`--data-dir`), then `$CIFARBENCH_DATA`, then
`./data`. The folder may hold `cifar-10-batches-py/`, `cifar-10-batches-bin/` or the official
`cifar-10-python.tar.gz`, or be one of those batch folders itself.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from cifarbench.data.dataset import ImageDataset, Split, fingerprint
from cifarbench.data.safe_pickle import safe_load_pickle
from cifarbench.errors import DataError
from cifarbench.fsutil import MiB, atomic_write, check_zip_archive, file_digest, open_regular_file, read_regular_file
from cifarbench.reporting.progress import say

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
ARCHIVE = "cifar-10-python.tar.gz"
ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
PY_DIR = "cifar-10-batches-py"
BIN_DIR = "cifar-10-batches-bin"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
# The official per-file md5s of the python layout (the authors publish only the archive's; these are the
# ones every major loader checks). No such list exists for the binary layout's files.
OFFICIAL_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
    "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
}
ARCHIVE_MEMBERS = tuple(f"{PY_DIR}/{n}" for n in (*TRAIN_BATCHES, TEST_BATCH, "batches.meta", "readme.html"))
# A full copy has exactly these class counts; a smaller one (a test fixture, a subset) is not checked.
FULL_COUNTS = {"train": (50_000, 5_000), "test": (10_000, 1_000)}
PIXELS = 3 * 32 * 32
RECORD = 1 + PIXELS  # binary layout: label byte, then R, G, B planes
CACHE_VERSION = 2  # 2: keyed by the files' content, not their size and mtime
# Caps on what is read from a data folder before parsing: an official batch is 30 MiB, the archive 163 MiB.
BATCH_MAX_BYTES = 64 * MiB
META_MAX_BYTES = MiB
ARCHIVE_MAX_BYTES = 1024 * MiB
# Decoding this much (a real copy, not a test fixture) takes long enough to say so first.
LONG_LOAD_BYTES = 16 * MiB


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The folder to use: the argument, else $CIFARBENCH_DATA, else ./data."""
    if data_dir:
        return Path(data_dir).expanduser()
    env = os.environ.get("CIFARBENCH_DATA")
    return Path(env).expanduser() if env else Path("data")


def default_cache_dir() -> Path:
    """Where decoded arrays are cached: $CIFARBENCH_CACHE, else ~/.cache/cifarbench."""
    env = os.environ.get("CIFARBENCH_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cifarbench"


@dataclass(frozen=True)
class _Layout:
    kind: str  # "python" or "binary"
    folder: Path
    files: dict[str, Path]  # batch name -> file


def _find_layout(root: Path) -> _Layout | None:
    candidates = [("python", root / PY_DIR, ""), ("binary", root / BIN_DIR, ".bin")]
    if root.name in (PY_DIR, BIN_DIR):
        python = root.name == PY_DIR
        candidates.insert(0, ("python" if python else "binary", root, "" if python else ".bin"))
    for kind, folder, suffix in candidates:
        # Present at all (not only "is a regular file"): a FIFO or device in its place is refused when read.
        if _present(folder / (TEST_BATCH + suffix)):
            files = {name: folder / (name + suffix) for name in (*TRAIN_BATCHES, TEST_BATCH)}
            return _Layout(kind, folder, files)
    return None


def _present(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def default_url() -> str:
    """$CIFARBENCH_MIRROR when set (an https mirror; still verified against the official md5), else the official URL."""
    return os.environ.get("CIFARBENCH_MIRROR", "").strip() or URL


def ensure_cifar10(data_dir: str | os.PathLike | None = None, *, download: bool = True, verify: bool = True,
                   url: str | None = None, cafile: str | None = None, progress: bool | None = None) -> Path:
    """Make sure the batches exist under the resolved folder (extracting or downloading the archive).

    `url` defaults to `default_url()`. Under torchrun only rank 0 downloads and extracts; the other ranks
    wait (bounded) for the extracted files to appear.
    """
    from cifarbench.data import download as dl

    root = resolve_data_dir(data_dir)
    layout = _find_layout(root)
    if layout and (dl.is_download_rank() or all(p.is_file() for p in layout.files.values())):
        return root
    archive = root / ARCHIVE
    if not archive.is_file() and not download:
        raise DataError(_missing_message(root))
    if not dl.is_download_rank():
        # Extraction renames each file into place, so a file that exists is complete.
        wanted = [root / m for m in ARCHIVE_MEMBERS if not m.endswith("readme.html")]
        dl.wait_for_files(wanted, timeout=dl.RANK_WAIT_S, what=f"CIFAR-10 in {root}")
        return root
    if not archive.is_file():
        source = "" if url or not os.environ.get("CIFARBENCH_MIRROR", "").strip() else " (from $CIFARBENCH_MIRROR)"
        try:
            dl.download(url or default_url(), archive, ARCHIVE_MD5, cafile=cafile, progress=progress)
        except DataError as exc:  # keeps its class: a DownloadError stays one
            raise type(exc)(f"{exc}{source}. {_missing_message(root)}") from None
    elif verify:
        actual = file_digest(archive, max_bytes=ARCHIVE_MAX_BYTES, what="CIFAR-10 archive")
        if actual != ARCHIVE_MD5:
            raise DataError(f"{archive}: md5 {actual} is not the official {ARCHIVE_MD5} "
                            "(pass --no-verify to use this copy anyway)")
    wanted = [m for m in ARCHIVE_MEMBERS if not m.endswith("readme.html")]
    written = dl.safe_extract_tar(archive, root, ARCHIVE_MEMBERS)
    missing = sorted(set(wanted) - {p.relative_to(root).as_posix() for p in written})
    if missing:
        raise DataError(f"{archive}: archive lacks {', '.join(missing)}")
    return root


def _missing_message(root: Path) -> str:
    return (f"CIFAR-10 not found in {root.resolve()} (looked for {PY_DIR}/, {BIN_DIR}/ or {ARCHIVE}); "
            "run `cifarbench download --data-dir DIR` where the internet is reachable, or point "
            "--data-dir / $CIFARBENCH_DATA at a folder holding a copy")


def load_cifar10(data_dir: str | os.PathLike | None = None, *, verify: bool = True, download: bool = True,
                 cache_dir: str | os.PathLike | None = None, progress: bool | None = None) -> ImageDataset:
    """Load CIFAR-10 as uint8 arrays, verifying every batch file against the official md5 unless told not to."""
    root = ensure_cifar10(data_dir, download=download, verify=verify, progress=progress)
    layout = _find_layout(root)
    assert layout is not None
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    payloads = _read_files(layout)
    # Only the python layout has official md5s to compare with.
    md5s = {name: hashlib.md5(payload, usedforsecurity=False).hexdigest()
            for name, payload in payloads.items()} if layout.kind == "python" else {}
    # Keyed by the bytes just read, so any change to a file (whatever its size and mtime say) is a miss. A hit
    # still reads and hashes every file, and re-checks the arrays' fingerprint: it saves the decoding only.
    official = _check_md5(layout, md5s, strict=verify)  # before the decoding: a refusal costs no time
    key = _cache_key(layout.kind, payloads)
    cached = _read_cache(cache, key)
    if cached is None:
        if sum(len(p) for p in payloads.values()) >= LONG_LOAD_BYTES:
            say(f"loading CIFAR-10 from {layout.folder} (decoded once, then cached)...", enabled=progress)
        cached = _decode(layout, payloads)
        _write_cache(cache, key, cached)
    del payloads
    train, test, sha256 = cached
    return ImageDataset(name="cifar10", classes=CLASSES, train=train, test=test, sha256=sha256, verified=official,
                        source=str(layout.folder.resolve()), layout=layout.kind)


def _check_md5(layout: _Layout, md5s: dict[str, str], *, strict: bool) -> bool:
    """True when every file matches the official md5; with `strict`, a mismatch is an error."""
    if layout.kind == "binary":
        if strict:
            raise DataError(f"{layout.folder}: no official per-file md5s exist for the binary layout, so it "
                            "cannot be verified (use the python layout, or pass --no-verify to accept it)")
        return False
    for name, actual in md5s.items():
        expected = OFFICIAL_MD5[name]
        if actual != expected:
            if strict:
                raise DataError(f"{layout.folder / name}: md5 {actual} does not match the official {expected}; "
                                "not the official CIFAR-10 file (pass --no-verify to use this copy anyway)")
            return False
    return True


def _read_files(layout: _Layout) -> dict[str, bytes]:
    """Every batch file's bytes (and batches.meta's, for the python layout), each a bounded regular file."""
    payloads = {name: read_regular_file(path, BATCH_MAX_BYTES, "CIFAR-10 batch file")
                for name, path in layout.files.items()}
    meta_file = layout.folder / "batches.meta"
    if layout.kind == "python" and _present(meta_file):
        payloads["batches.meta"] = read_regular_file(meta_file, META_MAX_BYTES, "CIFAR-10 batches.meta file")
    return payloads


def _decode(layout: _Layout, payloads: dict[str, bytes]) -> tuple[Split, Split, str]:
    parts: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, path in layout.files.items():
        parse = _parse_python if layout.kind == "python" else _parse_binary
        parts[name] = parse(payloads[name], str(path))
    train = Split(np.concatenate([parts[n][0] for n in TRAIN_BATCHES]),
                  np.concatenate([parts[n][1] for n in TRAIN_BATCHES]))
    test = Split(*parts[TEST_BATCH])
    _check_counts("train", train, layout.folder)
    _check_counts("test", test, layout.folder / TEST_BATCH)
    return train, test, fingerprint(train, test)


def _parse_python(payload: bytes, source: str) -> tuple[np.ndarray, np.ndarray]:
    batch = safe_load_pickle(payload, source)
    if not isinstance(batch, dict):
        raise DataError(f"{source}: not a CIFAR batch (a pickle of {type(batch).__name__}, expected a dict)")
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise DataError(f"{source}: not a CIFAR batch (keys {sorted(map(str, batch))}, expected data and labels)")
    data = batch["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != PIXELS:
        desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{source}: data is {desc}, expected N x {PIXELS} uint8")
    return _checked(data, _integer_labels(batch["labels"], source), source)


def _integer_labels(raw: object, source: str) -> np.ndarray:
    """Labels as int64, refusing floats, bools and anything else a cast would silently turn into a class."""
    if isinstance(raw, np.ndarray):
        bad = None if raw.dtype.kind in "iu" else f"a {raw.dtype} array"
    elif isinstance(raw, (list, tuple)):
        odd = [v for v in raw if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer))][:1]
        bad = f"a list holding {type(odd[0]).__name__} {odd[0]!r}"[:120] if odd else None
    else:
        bad = f"a {type(raw).__name__}"
    if bad:
        raise DataError(f"{source}: labels must be integers, not {bad}")
    try:
        return np.asarray(raw, dtype=np.int64)
    except (TypeError, ValueError, OverflowError):
        raise DataError(f"{source}: labels are not 64-bit integers") from None


def _parse_binary(payload: bytes, source: str) -> tuple[np.ndarray, np.ndarray]:
    if not payload or len(payload) % RECORD:
        raise DataError(f"{source}: {len(payload)} bytes is not a whole number of {RECORD}-byte records "
                        "(truncated or not a CIFAR-10 binary batch)")
    records = np.frombuffer(payload, dtype=np.uint8).reshape(-1, RECORD)
    return _checked(records[:, 1:], records[:, 0].astype(np.int64), source)


def _checked(data: np.ndarray, labels: np.ndarray, source: str) -> tuple[np.ndarray, np.ndarray]:
    if labels.ndim != 1 or len(labels) != len(data):
        raise DataError(f"{source}: {labels.size} labels for {len(data)} images")
    if len(labels) and (labels.min() < 0 or labels.max() >= len(CLASSES)):
        bad = int(labels[(labels < 0) | (labels >= len(CLASSES))][0])
        raise DataError(f"{source}: label {bad} is out of range 0-{len(CLASSES) - 1}")
    return np.ascontiguousarray(data).reshape(-1, 3, 32, 32), labels


def _check_counts(split: str, data: Split, source: Path) -> None:
    total, per_class = FULL_COUNTS[split]
    if len(data) == total:
        counts = data.class_counts(len(CLASSES))
        if any(c != per_class for c in counts):
            raise DataError(f"{source}: {split} split has class counts {counts}, expected {per_class} of each")


def _cache_key(kind: str, payloads: dict[str, bytes]) -> str:
    files = sorted((name, hashlib.sha256(payload).hexdigest()) for name, payload in payloads.items())
    return hashlib.sha256(json.dumps([CACHE_VERSION, kind, files]).encode()).hexdigest()[:32]


_CACHE_ARRAYS = {"train_x", "train_y", "test_x", "test_y", "meta"}


def _read_cache(cache: Path, key: str) -> tuple[Split, Split, str] | None:
    """The cached arrays for `key`, or None when absent or anything about the file is off (a damaged cache is
    just a miss): wrong members, shapes or dtypes, labels out of range, or pixels that no longer match the
    fingerprint stored beside them."""
    path = cache / f"cifar10-{key}.npz"
    if not path.is_file():
        return None
    cap = 2 * BATCH_MAX_BYTES * (len(TRAIN_BATCHES) + 1)
    try:
        with open_regular_file(path, cap, "cache file") as f:
            check_zip_archive(f, path, max_inflated=cap, max_members=len(_CACHE_ARRAYS), what="cache file")
            with np.load(f, allow_pickle=False) as z:
                if set(z.files) != _CACHE_ARRAYS:
                    return None
                train, test = Split(z["train_x"], z["train_y"]), Split(z["test_x"], z["test_y"])
                sha256 = json.loads(bytes(z["meta"]).decode())["sha256"]
    except Exception:  # zipfile.BadZipFile, truncation, bad JSON, a refused file, ...: all just a miss
        return None
    if not all(_valid_split(split) for split in (train, test)) or not isinstance(sha256, str):
        return None
    if fingerprint(train, test) != sha256:
        return None
    return train, test, sha256


def _valid_split(split: Split) -> bool:
    images, labels = split.images, split.labels
    return (images.dtype == np.uint8 and images.ndim == 4 and images.shape[1:] == (3, 32, 32)
            and labels.dtype == np.int64 and labels.shape == (len(images),)
            and (not len(labels) or (int(labels.min()) >= 0 and int(labels.max()) < len(CLASSES))))


def _write_cache(cache: Path, key: str, decoded: tuple[Split, Split, str]) -> None:
    train, test, sha256 = decoded
    meta = np.frombuffer(json.dumps({"sha256": sha256}).encode(), dtype=np.uint8)

    def write(f: BinaryIO) -> None:
        np.savez(f, train_x=train.images, train_y=train.labels, test_x=test.images, test_y=test.labels, meta=meta)

    try:
        # Not durable: a cache file lost or damaged by a crash is verified on load and read as a miss.
        atomic_write(cache / f"cifar10-{key}.npz", write, durable=False)
    except OSError:
        pass  # caching is an optimisation; an unwritable cache must not stop a run
