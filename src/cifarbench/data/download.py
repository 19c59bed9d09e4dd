"""Verified https downloads and a restrictive tar extractor."""

from __future__ import annotations

import gzip
import hashlib
import http.client
import lzma
import os
import shutil
import ssl
import sys
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Collection
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from cifarbench.errors import DataError, DownloadError

_CHUNK = 2**20
_NETWORK_ERRORS = (urllib.error.URLError, http.client.HTTPException, OSError, ValueError)
_ARCHIVE_ERRORS = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, lzma.LZMAError, OSError)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        return _one_line(str(exc.reason))
    return _one_line(str(exc)) or type(exc).__name__


class _HttpsOnlyRedirects(urllib.request.HTTPRedirectHandler):
    # A redirect must not downgrade the transport, whatever the server says.
    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        if urllib.parse.urlsplit(newurl).scheme.lower() != "https":
            raise DownloadError(f"download of {req.full_url} failed: redirected to non-https URL {newurl}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _content_length(resp: http.client.HTTPResponse) -> int | None:
    try:
        return int(resp.headers["Content-Length"])
    except (TypeError, ValueError):
        return None


def _fetch(url: str, part: Path, cafile: str | None, progress: bool, timeout: float) -> str:
    opener = urllib.request.build_opener(
        urllib.request.HTTPSHandler(context=ssl.create_default_context(cafile=cafile)),
        _HttpsOnlyRedirects(),
    )
    digest = hashlib.md5(usedforsecurity=False)
    received = 0
    with opener.open(url, timeout=timeout) as resp, open(part, "wb") as out:
        length = _content_length(resp)
        with tqdm(total=length, unit="B", unit_scale=True, desc=part.name[: -len(".part")],
                  file=sys.stderr, disable=not progress) as bar:
            while chunk := resp.read(_CHUNK):
                out.write(chunk)
                digest.update(chunk)
                received += len(chunk)
                bar.update(len(chunk))
        # http.client returns EOF quietly when the peer closes early, so count bytes ourselves.
        if length is not None and received < length:
            raise DownloadError(f"download of {url} failed: short read ({received} of {length} bytes)")
        out.flush()
        os.fsync(out.fileno())
    return digest.hexdigest()


def download(url: str, dest: Path, md5: str, *, cafile: str | None = None,
             progress: bool | None = None, timeout: float = 60.0) -> Path:
    """Fetch an https URL into dest atomically, verifying its md5; return dest."""
    dest = Path(dest)
    if urllib.parse.urlsplit(url).scheme.lower() != "https":
        raise DownloadError(f"refusing to download {url}: only https URLs are allowed")
    if progress is None:
        progress = sys.stderr.isatty()
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    try:
        actual = _fetch(url, part, cafile, progress, timeout)
        if actual != md5.lower():
            raise DownloadError(f"download of {url} failed: md5 mismatch (expected {md5}, got {actual})")
        os.replace(part, dest)
    except BaseException as exc:
        part.unlink(missing_ok=True)
        if isinstance(exc, _NETWORK_ERRORS):
            raise DownloadError(f"download of {url} failed: {_reason(exc)}") from exc
        raise
    return dest


def _member_name(member: tarfile.TarInfo) -> str:
    name = member.name
    while name.startswith("./"):
        name = name[2:]
    return name.rstrip("/") if member.isdir() else name


def _refusal(member: tarfile.TarInfo, name: str, allowed: Collection[str], folders: set[str],
             max_member_bytes: int) -> str | None:
    path = PurePosixPath(name)
    if name.startswith("/") or path.is_absolute():
        return "absolute path"
    if ".." in path.parts:
        return "contains a '..' component"
    if member.issym():
        return "symbolic link"
    if member.islnk():
        return "hard link"
    if member.isdev():
        return "device or fifo"
    if member.isdir():
        return None if name in folders else "unexpected directory"
    if not member.isreg():
        return "not a regular file"
    if name not in allowed:
        return "unexpected member"
    if member.size > max_member_bytes:
        return f"larger than {max_member_bytes} bytes ({member.size})"
    return None


def _check_no_links(dest_dir: Path, target: Path) -> None:
    # Refuse to write through a link that already sits inside dest_dir.
    for parent in reversed(target.relative_to(dest_dir).parents[:-1]):
        if (dest_dir / parent).is_symlink():
            raise DataError(f"refusing to extract {target}: {dest_dir / parent} is a symbolic link")


def _write_member(tar: tarfile.TarFile, member: tarfile.TarInfo, target: Path) -> None:
    source = tar.extractfile(member)
    if source is None:
        raise tarfile.ReadError(f"cannot read member {member.name!r}")
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with source, os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(source, out, _CHUNK)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def safe_extract_tar(archive: Path, dest_dir: Path, allowed: Collection[str], *,
                     max_member_bytes: int = 256 * 2**20) -> list[Path]:
    """Extract only the allowed regular files of a tar archive into dest_dir; return their paths."""
    archive, dest_dir = Path(archive), Path(dest_dir)
    folders = {str(p) for name in allowed for p in PurePosixPath(name).parents if str(p) != "."}
    written: list[Path] = []
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for member in members:
                name = _member_name(member)
                if member.isdir() and name in ("", "."):
                    continue
                why = _refusal(member, name, allowed, folders, max_member_bytes)
                if why:
                    raise DataError(f"refusing to extract {archive}: member {member.name!r}: {why}")
            dest_dir.mkdir(parents=True, exist_ok=True)
            for member in members:
                name = _member_name(member)
                if name in ("", "."):
                    continue
                target = dest_dir / name
                _check_no_links(dest_dir, target)
                if member.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                _write_member(tar, member, target)
                written.append(target)
    except _ARCHIVE_ERRORS as exc:
        raise DataError(f"cannot extract {archive}: {type(exc).__name__}: {_reason(exc)}") from exc
    return written
