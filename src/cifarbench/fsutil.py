"""Small file-system and process helpers: the one atomic writer, the one bounded reader of user files, digests."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import struct
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from cifarbench.errors import CifarbenchError, DataError

MiB = 2**20
_CHUNK = MiB


def fsync_dir(folder: Path) -> None:
    """Make a rename inside `folder` durable; not every file system lets a directory be opened or synced."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this host (one we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def _check_stat(st: os.stat_result, path: Path, max_bytes: int | None, what: str,
                error: type[CifarbenchError]) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{what} {path} is {_kind(st.st_mode)}, not a regular file")
    if max_bytes is not None and st.st_size > max_bytes:
        raise error(f"{what} {path} is {st.st_size:,} bytes, over the limit of {max_bytes:,} for {what}s")


def check_regular_file(path: str | os.PathLike, max_bytes: int | None = None, what: str = "file", *,
                       error: type[CifarbenchError] = DataError) -> None:
    """Raise `error` unless `path` (followed through links) is a regular file of at most `max_bytes`; for files
    opened by a library (SQLite) rather than by us. Prefer `open_regular_file`, which also checks the open fd."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise error(f"{what} {path}: cannot open ({exc.strerror or exc})") from None
    _check_stat(st, path, max_bytes, what, error)


def open_regular_file(path: str | os.PathLike, max_bytes: int | None, what: str = "file", *,
                      error: type[CifarbenchError] = DataError) -> BinaryIO:
    """Open `path` for reading only if it is a regular file of at most `max_bytes`; else raise `error`.

    The path is stat'ed before opening (so a device is never opened) and the opened descriptor is fstat'ed
    (so a swap between the two cannot slip one in); O_NONBLOCK means even a FIFO swapped in never blocks.
    """
    path = Path(path)
    try:
        _check_stat(os.stat(path), path, max_bytes, what, error)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise error(f"{what} {path}: cannot open ({exc.strerror or exc})") from None
    try:
        _check_stat(os.fstat(fd), path, max_bytes, what, error)
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)  # a regular file: plain blocking reads from here on
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular_file(path: str | os.PathLike, max_bytes: int, what: str = "file", *,
                      error: type[CifarbenchError] = DataError) -> bytes:
    """The whole content of a regular file of at most `max_bytes` (checked before and while reading)."""
    with open_regular_file(path, max_bytes, what, error=error) as f:
        try:
            payload = f.read(max_bytes + 1)  # a file growing under us still cannot exceed the cap
        except OSError as exc:
            raise error(f"{what} {path}: cannot read ({exc.strerror or exc})") from None
    if len(payload) > max_bytes:
        raise error(f"{what} {path} grew past the limit of {max_bytes:,} bytes while being read")
    return payload


def file_hash(path: str | os.PathLike, algorithm: str = "md5", *, max_bytes: int | None = None,
              what: str = "file", error: type[CifarbenchError] = DataError) -> hashlib._Hash:
    """The hash object of a regular file's bytes, read in chunks (callers may keep updating it)."""
    digest = hashlib.new(algorithm, usedforsecurity=algorithm != "md5")
    with open_regular_file(path, max_bytes, what, error=error) as f:
        try:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
        except OSError as exc:
            raise error(f"{what} {path}: cannot read ({exc.strerror or exc})") from None
    return digest


def file_digest(path: str | os.PathLike, algorithm: str = "md5", *, max_bytes: int | None = None,
                what: str = "file", error: type[CifarbenchError] = DataError) -> str:
    """The hex digest of a regular file's bytes (md5 by default: what published checksums use)."""
    return file_hash(path, algorithm, max_bytes=max_bytes, what=what, error=error).hexdigest()


def _declared_entries(f: BinaryIO) -> int | None:
    """The member count a zip's end-of-central-directory record declares (zip64 too), read before zipfile
    builds an object per member; None when there is no such record (zipfile then says what is wrong)."""
    size = f.seek(0, os.SEEK_END)
    tail_len = min(size, 22 + 0xFFFF)  # the record, then at most a 64 KiB comment
    f.seek(size - tail_len)
    tail = f.read(tail_len)
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or at + 22 > len(tail):
        return None
    entries = struct.unpack_from("<H", tail, at + 10)[0]
    if entries == 0xFFFF and at >= 20 and tail[at - 20:at - 16] == b"PK\x06\x07":
        f.seek(struct.unpack_from("<Q", tail, at - 20 + 8)[0])
        record = f.read(56)
        if len(record) == 56 and record[:4] == b"PK\x06\x06":
            entries = struct.unpack_from("<Q", record, 32)[0]
    return entries


def check_zip_archive(f: BinaryIO, path: str | os.PathLike, *, max_inflated: int, max_members: int = 100_000,
                      max_ratio: float = 100.0, what: str = "zip archive",
                      error: type[CifarbenchError] = DataError) -> None:
    """Refuse, before anything is inflated, a zip whose members declare more than `max_inflated` bytes in all,
    are more than `max_members`, or compress a member over 1 MiB more than `max_ratio`:1 (a zip bomb).

    zipfile (and torch's reader) never inflate a member past its declared size, so bounding the declared
    sizes bounds the memory a load can take. Errors read "PATH: not a loadable WHAT (why)"; `f` is left at 0.
    """
    def refuse(why: str) -> CifarbenchError:
        return error(f"{path}: not a loadable {what} ({why})")

    try:
        entries = _declared_entries(f)
        if entries is not None and entries > max_members:
            raise refuse(f"it declares {entries:,} zip members, more than the {max_members:,} allowed")
        f.seek(0)
        with zipfile.ZipFile(f) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, OSError, struct.error) as exc:
        raise refuse(f"not a zip archive: {' '.join(str(exc).split()) or type(exc).__name__}") from None
    total = 0
    for info in infos:
        total += info.file_size
        if total > max_inflated:
            raise refuse(f"its zip members declare over {max_inflated:,} bytes uncompressed; refused as a possible "
                         "zip bomb")
        if info.file_size > MiB and info.file_size > max_ratio * max(info.compress_size, 1):
            raise refuse(f"zip member {info.filename!r} inflates {info.compress_size:,} bytes to "
                         f"{info.file_size:,}, over {max_ratio:g}:1; refused as a possible zip bomb")
    f.seek(0)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None], *, mode: int = 0o644,
                 durable: bool = True, prefix: str | None = None) -> Path:
    """Write `path` all at once: `write` fills a uniquely named temp file in the same folder, which is
    fsynced (when `durable`) and renamed over `path`; on any failure the temp is removed and `path` is untouched.

    `prefix` names the temp (default `.NAME.`; it always ends in `.tmp`). OSErrors propagate for the caller
    to phrase.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix or f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.chmod(tmp, mode)  # mkstemp makes files private; results are meant to be read by others
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str, *, mode: int = 0o644, durable: bool = True) -> Path:
    """`atomic_write` of a UTF-8 string."""
    data = text.encode("utf-8")
    return atomic_write(path, lambda f: f.write(data), mode=mode, durable=durable)


def atomic_write_json(path: str | os.PathLike, obj: Any, *, mode: int = 0o644, durable: bool = True) -> Path:
    """`atomic_write` of `obj` as indented JSON with a final newline."""
    return atomic_write_text(path, json.dumps(obj, indent=2) + "\n", mode=mode, durable=durable)
