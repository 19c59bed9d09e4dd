"""Tests for cifarbench.data.download: https downloads against a local server, and tar extraction."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from cifarbench.data.download import download, safe_extract_tar
from cifarbench.errors import DataError, DownloadError
from https_server import cert, serve  # noqa: F401  (cert is a fixture)

GOOD = os.urandom(3 * 2**20 + 123)  # spans several 1 MiB chunks
GOOD_MD5 = hashlib.md5(GOOD).hexdigest()
EXTRA: dict[str, bytes] = {}  # more paths a test can serve (e.g. a synthetic CIFAR archive)


class _Handler(http.server.BaseHTTPRequestHandler):
    timeout = 5
    requests: list[str]
    release: threading.Event

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _send(self, body: bytes, length: int) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self.requests.append(self.path)
        self.close_connection = True
        if self.path in EXTRA:
            self._send(EXTRA[self.path], len(EXTRA[self.path]))
        elif self.path == "/good":
            self._send(GOOD, len(GOOD))
        elif self.path == "/wrong":
            self._send(b"x" * 1000, 1000)
        elif self.path == "/truncated":
            self._send(GOOD[: len(GOOD) // 2], len(GOOD))
        elif self.path == "/hang":
            self._send(GOOD[:100], len(GOOD))
            self.wfile.flush()
            self.release.wait(5)
        else:
            self.send_error(500, "boom")


@pytest.fixture
def server(cert: tuple[Path, Path]) -> Iterator[tuple[str, list[str]]]:
    requests: list[str] = []
    release = threading.Event()
    handler = type("Handler", (_Handler,), {"requests": requests, "release": release})
    with serve(handler, cert) as url:
        try:
            yield url, requests
        finally:
            release.set()


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Transient failures are retried with backoff; keep the waits tiny here."""
    monkeypatch.setattr("cifarbench.data.download.BACKOFF_S", 0.01)


def fetch(server: tuple[str, list[str]], cert: tuple[Path, Path], path: str, dest: Path,
          md5: str = GOOD_MD5, **kwargs: object) -> Path:
    return download(f"{server[0]}{path}", dest, md5, cafile=str(cert[0]), progress=False,
                    timeout=5, **kwargs)  # type: ignore[arg-type]


def assert_clean(dest: Path) -> None:
    assert not dest.exists()
    assert not dest.with_name(dest.name + ".part").exists()


def test_good_download(server, cert, tmp_path, capsys):
    dest = tmp_path / "sub" / "data.tar.gz"
    assert download(f"{server[0]}/good", dest, GOOD_MD5, cafile=str(cert[0]), progress=True, timeout=5) == dest
    assert dest.read_bytes() == GOOD
    assert sorted(p.name for p in dest.parent.iterdir()) == ["data.tar.gz"]
    assert "B" in capsys.readouterr().err


def test_wrong_bytes(server, cert, tmp_path):
    dest = tmp_path / "data.tar.gz"
    with pytest.raises(DownloadError) as info:
        fetch(server, cert, "/wrong", dest)
    message = str(info.value)
    assert GOOD_MD5 in message
    assert hashlib.md5(b"x" * 1000).hexdigest() in message
    assert "/wrong" in message and "\n" not in message
    assert_clean(dest)


def test_truncated_body(server, cert, tmp_path):
    dest = tmp_path / "data.tar.gz"
    with pytest.raises(DownloadError, match="/truncated"):
        fetch(server, cert, "/truncated", dest)
    assert_clean(dest)


def test_server_error(server, cert, tmp_path):
    dest = tmp_path / "data.tar.gz"
    with pytest.raises(DownloadError, match="500") as info:
        fetch(server, cert, "/error", dest)
    assert "/error" in str(info.value) and "\n" not in str(info.value)
    assert_clean(dest)


def test_timeout(server, cert, tmp_path):
    dest = tmp_path / "data.tar.gz"
    with pytest.raises(DownloadError, match="/hang"):
        download(f"{server[0]}/hang", dest, GOOD_MD5, cafile=str(cert[0]), progress=False, timeout=0.5)
    assert_clean(dest)


def test_untrusted_certificate_is_refused(server, tmp_path):
    dest = tmp_path / "data.tar.gz"
    with pytest.raises(DownloadError, match="CERTIFICATE_VERIFY_FAILED"):
        download(f"{server[0]}/good", dest, GOOD_MD5, progress=False, timeout=5)
    assert_clean(dest)


def test_http_is_refused_without_connecting(server, tmp_path, monkeypatch):
    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("a connection was attempted")

    monkeypatch.setattr("socket.create_connection", no_network)
    dest = tmp_path / "data.tar.gz"
    url = server[0].replace("https://", "http://") + "/good"
    with pytest.raises(DownloadError, match="only https"):
        download(url, dest, GOOD_MD5, progress=False, timeout=5)
    assert server[1] == []
    assert_clean(dest)


def test_failed_redownload_keeps_existing_file(server, cert, tmp_path):
    dest = tmp_path / "data.tar.gz"
    dest.write_bytes(b"old content")
    for path in ("/wrong", "/truncated", "/error"):
        with pytest.raises(DownloadError):
            fetch(server, cert, path, dest)
        assert dest.read_bytes() == b"old content"
        assert not dest.with_name(dest.name + ".part").exists()


# --- tar extraction ---------------------------------------------------------------------------

ALLOWED = {"cifar/a.bin", "cifar/b.bin"}


def file_member(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def special_member(name: str, type_: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = type_
    info.linkname = linkname
    return info, None


def make_tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def test_extract_good_archive(tmp_path):
    archive = make_tar(tmp_path / "good.tar.gz", [
        special_member("./cifar", tarfile.DIRTYPE),
        file_member("./cifar/a.bin", b"alpha"),
        file_member("cifar/b.bin", b"beta"),
    ])
    out = tmp_path / "out"
    written = safe_extract_tar(archive, out, ALLOWED)
    assert sorted(written) == [out / "cifar/a.bin", out / "cifar/b.bin"]
    assert (out / "cifar/a.bin").read_bytes() == b"alpha"
    assert (out / "cifar/b.bin").read_bytes() == b"beta"
    assert sorted(p.name for p in (out / "cifar").iterdir()) == ["a.bin", "b.bin"]


@pytest.mark.parametrize("bad, allowed_extra, reason", [
    (file_member("../x", b"evil"), "../x", "'..'"),
    (file_member("cifar/../../x", b"evil"), "cifar/../../x", "'..'"),
    (special_member("cifar/a.bin", tarfile.SYMTYPE, "/etc/passwd"), "", "symbolic link"),
    (special_member("cifar/a.bin", tarfile.LNKTYPE, "cifar/b.bin"), "", "hard link"),
    (special_member("cifar/a.bin", tarfile.FIFOTYPE), "", "fifo"),
    (special_member("cifar/a.bin", tarfile.CHRTYPE), "", "device"),
    (file_member("cifar/evil.py", b"import os"), "", "unexpected member"),
    (special_member("elsewhere", tarfile.DIRTYPE), "", "unexpected directory"),
])
def test_bad_member_is_refused_and_nothing_written(tmp_path, bad, allowed_extra, reason):
    archive = make_tar(tmp_path / "bad.tar.gz", [file_member("cifar/b.bin", b"beta"), bad])
    out = tmp_path / "out"
    allowed = ALLOWED | ({allowed_extra} if allowed_extra else set())
    with pytest.raises(DataError, match=reason) as info:
        safe_extract_tar(archive, out, allowed)
    assert str(archive) in str(info.value) and bad[0].name in str(info.value)
    assert "\n" not in str(info.value)
    assert not out.exists()
    assert not (tmp_path / "x").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.tar.gz"]


def test_absolute_member_is_refused(tmp_path):
    victim = tmp_path / "abs" / "x"
    archive = make_tar(tmp_path / "abs.tar.gz", [file_member(str(victim), b"evil")])
    out = tmp_path / "out"
    with pytest.raises(DataError, match="absolute"):
        safe_extract_tar(archive, out, ALLOWED | {str(victim), str(victim).lstrip("/")})
    assert not victim.exists()
    assert not out.exists()


def test_oversized_member_is_refused(tmp_path):
    archive = make_tar(tmp_path / "big.tar.gz", [file_member("cifar/a.bin", b"0123456789A")])
    out = tmp_path / "out"
    with pytest.raises(DataError, match="larger than 10"):
        safe_extract_tar(archive, out, ALLOWED, max_member_bytes=10)
    assert not out.exists()


def test_existing_symlink_in_destination_is_not_followed(tmp_path):
    archive = make_tar(tmp_path / "good.tar.gz", [file_member("cifar/a.bin", b"alpha")])
    outside = tmp_path / "outside"
    outside.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / "cifar").symlink_to(outside)
    with pytest.raises(DataError, match="symbolic link"):
        safe_extract_tar(archive, out, ALLOWED)
    assert list(outside.iterdir()) == []


def test_truncated_archive_is_refused(tmp_path):
    good = make_tar(tmp_path / "good.tar.gz", [file_member("cifar/a.bin", os.urandom(64 * 1024))])
    data = good.read_bytes()
    archive = tmp_path / "cut.tar.gz"
    archive.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    with pytest.raises(DataError, match="cannot extract") as info:
        safe_extract_tar(archive, out, ALLOWED)
    assert "\n" not in str(info.value)
    assert not (out / "cifar" / "a.bin").exists()


def test_cli_download_then_train_offline(server, cert, tmp_path, monkeypatch, capsys):
    """`cifarbench download --url MIRROR` fetches, verifies against the (patched) official md5, extracts safely,
    and the data then trains; a mirror serving other bytes is refused."""
    from cifarbench.cli import main
    from cifarbench.data import cifar10
    from conftest import make_archive, write_python_layout

    archive = make_archive(write_python_layout(tmp_path / "src"), tmp_path / "cifar.tar.gz")
    EXTRA["/cifar.tar.gz"] = archive.read_bytes()
    monkeypatch.setattr(cifar10, "ARCHIVE_MD5", hashlib.md5(EXTRA["/cifar.tar.gz"]).hexdigest())
    monkeypatch.setenv("SSL_CERT_FILE", str(cert[0]))  # how a user trusts a private mirror's certificate
    data = tmp_path / "data"
    assert main(["download", "--data-dir", str(data), "--url", f"{server[0]}/wrong"]) == 1
    assert "md5" in capsys.readouterr().err and not (data / cifar10.ARCHIVE).exists()
    assert main(["download", "--data-dir", str(data), "--url", f"{server[0]}/cifar.tar.gz"]) == 0
    assert (data / cifar10.ARCHIVE).is_file() and (data / cifar10.PY_DIR / "test_batch").is_file()
    capsys.readouterr()
    assert main(["train", "fnn", "--data-dir", str(data), "--no-verify", "--epochs", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["epochs"] == 1
