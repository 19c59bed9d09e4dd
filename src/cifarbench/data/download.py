"""Verified https downloads (retried, resumable), the download-rank helper, and a restrictive tar extractor."""

from __future__ import annotations

import errno
import gzip
import hashlib
import http.client
import lzma
import os
import shutil
import ssl
import sys
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Collection
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from cifarbench.errors import CifarbenchError, DataError, DownloadError
from cifarbench.fsutil import atomic_write, file_hash, fsync_dir

_CHUNK = 2**20
_NETWORK_ERRORS = (urllib.error.URLError, http.client.HTTPException, OSError, ValueError)
_ARCHIVE_ERRORS = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, lzma.LZMAError, OSError)

# Retries: ATTEMPTS tries in all, sleeping BACKOFF_S, 2*BACKOFF_S, ... between them. Read at call time, so
# tests can shrink the backoff (monkeypatch) without threading a parameter through every caller.
ATTEMPTS = 3
BACKOFF_S = 1.0
# How long a non-zero rank of a torchrun job waits for rank 0 to download and extract the data.
RANK_WAIT_S = 1800.0
_sleep = time.sleep  # a seam for tests that record the backoff


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


class _Transient(Exception):
    """A failure worth another attempt that the network stack does not report itself (a short read, a
    resume the server answered with the wrong range)."""


def _content_length(resp: http.client.HTTPResponse) -> int | None:
    try:
        return int(resp.headers["Content-Length"])
    except (TypeError, ValueError):
        return None


def _range_start(resp: http.client.HTTPResponse) -> int | None:
    # "Content-Range: bytes START-END/TOTAL"
    value = (resp.headers.get("Content-Range") or "").strip()
    unit, _, spec = value.partition(" ")
    if unit.lower() != "bytes":
        return None
    try:
        return int(spec.split("-", 1)[0])
    except ValueError:
        return None


def _is_transient(exc: BaseException) -> bool:
    """Worth retrying: connection errors, timeouts, HTTP 5xx, short reads. Final: 4xx, an untrusted
    certificate, a refused redirect, a bad URL, a local disk error (those are DataError, not network)."""
    if isinstance(exc, _Transient):
        return True
    if isinstance(exc, urllib.error.HTTPError):
        return exc.code >= 500
    if isinstance(exc, urllib.error.URLError):
        reason = exc.reason
        return isinstance(reason, OSError) and not isinstance(reason, ssl.SSLCertVerificationError)
    if isinstance(exc, ssl.SSLCertVerificationError | http.client.InvalidURL):
        return False
    return isinstance(exc, http.client.HTTPException | OSError)


def _local(action: str, path: Path, exc: OSError) -> DataError:
    hint = "; free some space there" if exc.errno == errno.ENOSPC else ""
    return DataError(f"cannot {action} {path}: {exc.strerror or exc}{hint}")


def _attempt(opener: urllib.request.OpenerDirector, url: str, part: Path, progress: bool,
             timeout: float) -> tuple[str, bool]:
    """One request into `part`, resuming what it already holds when the server allows; return the md5 of
    the whole file and whether it was resumed. Raises network errors, _Transient or DataError."""
    offset = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url)
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    with opener.open(request, timeout=timeout) as resp:
        if offset and resp.status == 206:
            if _range_start(resp) != offset:
                part.unlink(missing_ok=True)
                answer = resp.headers.get("Content-Range")
                raise _Transient(f"server answered a resume from byte {offset} with {answer!r}")
        elif resp.status != 200:
            raise _Transient(f"unexpected HTTP status {resp.status}")
        else:
            offset = 0  # no Range asked, or the server ignored it (200): start over from zero
        length = _content_length(resp)
        try:
            digest = file_hash(part, "md5") if offset else hashlib.md5(usedforsecurity=False)
            out = open(part, "ab" if offset else "wb")
        except OSError as exc:
            raise _local("write", part, exc) from exc
        received = 0
        with out, tqdm(total=None if length is None else offset + length, initial=offset, unit="B",
                       unit_scale=True, desc=part.name[: -len(".part")], file=sys.stderr,
                       disable=not progress) as bar:
            # read1: whatever has arrived, so bytes received before a stall are kept for the resume.
            while chunk := resp.read1(_CHUNK):
                try:
                    out.write(chunk)
                except OSError as exc:
                    raise _local("write", part, exc) from exc
                digest.update(chunk)
                received += len(chunk)
                bar.update(len(chunk))
            try:
                out.flush()
                os.fsync(out.fileno())
            except OSError as exc:
                raise _local("write", part, exc) from exc
        # http.client returns EOF quietly when the peer closes early, so count bytes ourselves. What did
        # arrive stays in `part`, and the next attempt asks only for the rest.
        if length is not None and received < length:
            raise _Transient(f"short read ({offset + received} of {offset + length} bytes)")
    return digest.hexdigest(), offset > 0


def download(url: str, dest: Path, md5: str, *, cafile: str | None = None, progress: bool | None = None,
             timeout: float = 60.0, attempts: int | None = None, backoff: float | None = None) -> Path:
    """Fetch an https URL into dest atomically, verifying the md5 of the whole file; return dest.

    Connection errors, timeouts, HTTP 5xx and short reads are retried (`attempts` tries in all, with
    exponential backoff from `backoff` seconds); what arrived stays in `<dest>.part` and the next try asks
    for the rest with `Range: bytes=N-` (a server answering 200 instead of 206 sends it all again). An md5
    mismatch of a complete fresh download and HTTP 4xx are final. dest appears only once verified.

    The `.part` is removed whenever this call fails, so a failure leaves nothing behind; only a process
    killed mid-download leaves one, and the next call resumes from it (and, if the resumed whole does not
    match the md5, starts over from zero once, because the prefix may have been another file's).
    """
    dest = Path(dest)
    if urllib.parse.urlsplit(url).scheme.lower() != "https":
        raise DownloadError(f"refusing to download {url}: only https URLs are allowed")
    attempts = max(1, ATTEMPTS if attempts is None else attempts)
    backoff = BACKOFF_S if backoff is None else backoff
    if progress is None:
        progress = sys.stderr.isatty()
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    opener = urllib.request.build_opener(
        urllib.request.HTTPSHandler(context=ssl.create_default_context(cafile=cafile)),
        _HttpsOnlyRedirects(),
    )
    tries = 0
    try:
        while True:  # bounded: every pass increments `tries`, and tries == attempts ends the loop
            tries += 1
            try:
                actual, resumed = _attempt(opener, url, part, progress, timeout)
            except Exception as exc:
                if isinstance(exc, urllib.error.HTTPError) and exc.code == 416 and part.exists():
                    part.unlink()  # the kept prefix is longer than the file: not this file's
                    exc = _Transient("HTTP 416 for a resume")
                    if tries >= attempts:
                        raise exc from None
                elif tries >= attempts or not _is_transient(exc):
                    raise
                _sleep(backoff * 2 ** (tries - 1))
                continue
            if actual == md5.lower():
                os.replace(part, dest)
                fsync_dir(dest.parent)
                return dest
            if resumed and tries < attempts:
                part.unlink()
                _sleep(backoff * 2 ** (tries - 1))
                continue
            raise DownloadError(f"download of {url} failed: md5 mismatch (expected {md5}, got {actual})")
    except BaseException as exc:
        part.unlink(missing_ok=True)
        if isinstance(exc, (_Transient, *_NETWORK_ERRORS)) and not isinstance(exc, DataError):
            after = f" after {tries} attempts" if tries > 1 else ""
            raise DownloadError(f"download of {url} failed{after}: {_reason(exc)}") from exc
        raise


def is_download_rank() -> bool:
    """False only for a non-zero rank of a multi-process job (torchrun sets WORLD_SIZE > 1 and RANK):
    rank 0 downloads, the other ranks wait for its files instead of racing it for the same paths."""
    from cifarbench.world import env_world  # the one reader of torchrun's environment

    try:
        world = env_world()
    except CifarbenchError:  # malformed rank variables: not a torchrun rank, so this process downloads
        return True
    return not world.enabled or world.is_main


def wait_for_files(paths: Collection[Path], *, timeout: float, poll: float = 0.25, what: str = "the files") -> None:
    """Poll until every path is a file (each appears by an atomic rename, so present means complete).

    Bounded by `timeout`; if rank 0 fails, torchrun stops the other ranks long before that.
    """
    deadline = time.monotonic() + timeout
    while True:
        missing = [p for p in paths if not Path(p).is_file()]
        if not missing:
            return
        left = deadline - time.monotonic()
        if left <= 0:
            raise DataError(f"rank {os.environ.get('RANK')} waited {timeout:g} s for rank 0 to provide {what}, "
                            f"but {missing[0]} is still missing (see rank 0's error)")
        _sleep(min(poll, left))


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
    with source:
        atomic_write(target, lambda out: shutil.copyfileobj(source, out, _CHUNK), mode=0o644)


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
