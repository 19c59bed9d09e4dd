"""Downloads survive flaky servers: retries with backoff, Range resumption, mirrors, and rank-0-only downloads.

Every server here is scripted: request k gets step k of the test's script, and a request past the end of
the script is answered 503 and recorded, so each test asserts exactly how many requests were made.
"""

from __future__ import annotations

import hashlib
import http.server
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cifarbench.data import cifar10
from cifarbench.data import download as dl
from cifarbench.data.download import download, is_download_rank, wait_for_files
from cifarbench.errors import DataError, DownloadError
from conftest import N_PER_BATCH, make_archive, write_python_layout
from https_server import cert, serve  # noqa: F401  (cert is a fixture)

BODY = os.urandom(2 * 2**20 + 777)  # spans several 1 MiB chunks
BODY_MD5 = hashlib.md5(BODY).hexdigest()
CUT = 1_000_000  # where truncated responses stop

Step = Callable[["Scripted"], None]


class Scripted(http.server.BaseHTTPRequestHandler):
    timeout = 5  # a stuck client cannot hold a handler thread for longer
    script: list[Step]
    log: list[tuple[str, str | None]]  # (path, Range header) of every request
    release: threading.Event

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.close_connection = True
        self.log.append((self.path, self.headers.get("Range")))
        n = len(self.log) - 1
        if n < len(self.script):
            self.script[n](self)
        else:
            self.send_error(503, "script exhausted")

    def head(self, status: int, length: int, extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()


def ok(body: bytes = BODY) -> Step:
    """200 with the whole body, whatever Range was asked for (a server that ignores Range)."""
    def step(h: Scripted) -> None:
        h.head(200, len(body))
        h.wfile.write(body)
    return step


def cut(body: bytes = BODY, at: int = CUT) -> Step:
    """200 announcing the whole body, then the connection closes after `at` bytes."""
    def step(h: Scripted) -> None:
        h.head(200, len(body))
        h.wfile.write(body[:at])
    return step


def ranged(body: bytes = BODY) -> Step:
    """Honours `Range: bytes=N-` with 206 and the rest; 200 and everything without one."""
    def step(h: Scripted) -> None:
        spec = h.headers.get("Range")
        if not spec:
            return ok(body)(h)
        start = int(spec.removeprefix("bytes=").split("-")[0])
        h.head(206, len(body) - start, {"Content-Range": f"bytes {start}-{len(body) - 1}/{len(body)}"})
        h.wfile.write(body[start:])
    return step


def error(code: int) -> Step:
    def step(h: Scripted) -> None:
        h.send_error(code)
    return step


def drop(h: Scripted) -> None:
    """Close the connection without any response."""


def stall(h: Scripted) -> None:
    """Headers and a few bytes, then nothing until the test ends (the client's timeout must fire)."""
    h.head(200, len(BODY))
    h.wfile.write(BODY[:100])
    h.wfile.flush()
    h.release.wait(5)


@pytest.fixture
def scripted(cert) -> Iterator[Callable[..., tuple[str, list[tuple[str, str | None]]]]]:
    """scripted(*steps) -> (base URL, request log) of a fresh server running that script."""
    servers: list = []
    release = threading.Event()

    def start(*steps: Step) -> tuple[str, list[tuple[str, str | None]]]:
        log: list[tuple[str, str | None]] = []
        handler = type("H", (Scripted,), {"script": list(steps), "log": log, "release": release})
        ctx = serve(handler, cert)
        url = ctx.__enter__()
        servers.append(ctx)
        return url, log

    yield start
    release.set()
    for ctx in servers:
        ctx.__exit__(None, None, None)


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Backoff base 0.01 s; the sleeps the downloader asked for are recorded (and really slept)."""
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        time.sleep(seconds)

    monkeypatch.setattr(dl, "BACKOFF_S", 0.01)
    monkeypatch.setattr(dl, "_sleep", sleep)
    monkeypatch.delenv("CIFARBENCH_MIRROR", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    return sleeps


def get(url: str, dest: Path, cert, md5: str = BODY_MD5, **kw: object) -> Path:
    return download(url, dest, md5, cafile=str(cert[0]), progress=False, timeout=5, **kw)  # type: ignore[arg-type]


def only(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --- retries -----------------------------------------------------------------------------------------


def test_server_error_then_success_is_retried(scripted, cert, tmp_path, fast_backoff):
    url, log = scripted(error(500), error(503), ok())
    dest = get(f"{url}/f", tmp_path / "f.tgz", cert)
    assert dest.read_bytes() == BODY and only(tmp_path) == ["f.tgz"]
    assert len(log) == 3
    assert fast_backoff == [0.01, 0.02]  # exponential


def test_dropped_connection_then_success_is_retried(scripted, cert, tmp_path):
    url, log = scripted(drop, ok())
    assert get(f"{url}/f", tmp_path / "f.tgz", cert).read_bytes() == BODY
    assert len(log) == 2


def test_timeout_then_success_is_retried(scripted, cert, tmp_path):
    url, log = scripted(stall, ranged())
    dest = download(f"{url}/f", tmp_path / "f.tgz", BODY_MD5, cafile=str(cert[0]), progress=False, timeout=0.3)
    assert dest.read_bytes() == BODY and len(log) == 2
    assert log[1][1] == "bytes=100-"  # the 100 bytes that did arrive were kept


def test_persistent_server_error_gives_up_after_the_attempts(scripted, cert, tmp_path, fast_backoff):
    url, log = scripted(error(500), error(500), error(500), ok())
    dest = tmp_path / "f.tgz"
    with pytest.raises(DownloadError) as info:
        get(f"{url}/f", dest, cert)
    message = str(info.value)
    assert "after 3 attempts" in message and "HTTP 500" in message and "\n" not in message
    assert len(log) == 3 and fast_backoff == [0.01, 0.02]
    assert only(tmp_path) == []  # neither the final name nor a .part


def test_attempts_can_be_set_per_call(scripted, cert, tmp_path):
    url, log = scripted(error(502), ok())
    with pytest.raises(DownloadError, match="HTTP 502"):
        get(f"{url}/f", tmp_path / "f.tgz", cert, attempts=1)
    assert len(log) == 1


@pytest.mark.parametrize("code", [404, 403, 410])
def test_client_errors_are_final(scripted, cert, tmp_path, code):
    url, log = scripted(error(code), ok())
    with pytest.raises(DownloadError, match=f"HTTP {code}") as info:
        get(f"{url}/f", tmp_path / "f.tgz", cert)
    assert "attempts" not in str(info.value)
    assert len(log) == 1 and only(tmp_path) == []


def test_wrong_bytes_are_refused_without_retrying(scripted, cert, tmp_path, fast_backoff):
    wrong = os.urandom(len(BODY))
    url, log = scripted(ok(wrong), ok())
    with pytest.raises(DownloadError, match="md5 mismatch") as info:
        get(f"{url}/f", tmp_path / "f.tgz", cert)
    assert BODY_MD5 in str(info.value) and hashlib.md5(wrong).hexdigest() in str(info.value)
    assert len(log) == 1 and fast_backoff == [] and only(tmp_path) == []


# --- resumption ----------------------------------------------------------------------------------------


def test_truncated_response_is_resumed_with_range(scripted, cert, tmp_path):
    url, log = scripted(cut(), ranged())
    dest = get(f"{url}/f", tmp_path / "f.tgz", cert)
    assert dest.read_bytes() == BODY  # md5 of the whole file, not of the second piece
    assert log == [("/f", None), ("/f", f"bytes={CUT}-")]
    assert only(tmp_path) == ["f.tgz"]


def test_several_truncations_resume_from_where_each_stopped(scripted, cert, tmp_path):
    def cut_ranged(at: int) -> Step:
        def step(h: Scripted) -> None:
            start = int((h.headers.get("Range") or "bytes=0-").removeprefix("bytes=").split("-")[0])
            h.head(206 if start else 200, len(BODY) - start,
                   {"Content-Range": f"bytes {start}-{len(BODY) - 1}/{len(BODY)}"} if start else None)
            h.wfile.write(BODY[start:at])
        return step

    url, log = scripted(cut_ranged(500_000), cut_ranged(1_500_000), ranged())
    assert get(f"{url}/f", tmp_path / "f.tgz", cert).read_bytes() == BODY
    assert [r for _, r in log] == [None, "bytes=500000-", "bytes=1500000-"]


def test_server_ignoring_range_still_gives_the_right_file(scripted, cert, tmp_path):
    url, log = scripted(cut(), ok())  # answers the Range request with 200 and everything
    dest = get(f"{url}/f", tmp_path / "f.tgz", cert)
    assert dest.read_bytes() == BODY  # started over from zero instead of appending
    assert log[1][1] == f"bytes={CUT}-"


def test_resume_answered_with_another_range_starts_over(scripted, cert, tmp_path):
    def wrong_range(h: Scripted) -> None:
        h.head(206, len(BODY) - 5, {"Content-Range": f"bytes 5-{len(BODY) - 1}/{len(BODY)}"})
        h.wfile.write(BODY[5:])

    url, log = scripted(cut(), wrong_range, ok())
    assert get(f"{url}/f", tmp_path / "f.tgz", cert).read_bytes() == BODY
    assert [r for _, r in log] == [None, f"bytes={CUT}-", None]


def test_truncated_every_time_fails_cleanly(scripted, cert, tmp_path):
    url, log = scripted(cut(), cut(), cut(), ok())  # a server that ignores Range and always stops early
    with pytest.raises(DownloadError, match="short read") as info:
        get(f"{url}/f", tmp_path / "f.tgz", cert)
    assert "after 3 attempts" in str(info.value)
    assert len(log) == 3 and only(tmp_path) == []


def test_part_left_by_a_killed_process_is_resumed(scripted, cert, tmp_path):
    dest = tmp_path / "f.tgz"
    dest.with_name("f.tgz.part").write_bytes(BODY[:CUT])
    url, log = scripted(ranged())
    assert get(f"{url}/f", dest, cert).read_bytes() == BODY
    assert log == [("/f", f"bytes={CUT}-")] and only(tmp_path) == ["f.tgz"]


def test_stale_part_of_another_file_is_discarded_and_fetched_again(scripted, cert, tmp_path):
    dest = tmp_path / "f.tgz"
    dest.with_name("f.tgz.part").write_bytes(os.urandom(CUT))  # not a prefix of BODY
    url, log = scripted(ranged(), ranged())
    assert get(f"{url}/f", dest, cert).read_bytes() == BODY
    assert [r for _, r in log] == [f"bytes={CUT}-", None]


def test_stale_part_longer_than_the_file_is_discarded(scripted, cert, tmp_path):
    dest = tmp_path / "f.tgz"
    dest.with_name("f.tgz.part").write_bytes(os.urandom(len(BODY) + 10))
    url, log = scripted(error(416), ok())
    assert get(f"{url}/f", dest, cert).read_bytes() == BODY
    assert [r for _, r in log] == [f"bytes={len(BODY) + 10}-", None]


def test_full_disk_is_final_and_named(scripted, cert, tmp_path, monkeypatch):
    import errno
    import io

    real_open = open

    class Full(io.FileIO):
        def write(self, b):  # type: ignore[no-untyped-def]
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def fake_open(file, mode="r", *args, **kwargs):  # type: ignore[no-untyped-def]
        if str(file).endswith(".part") and "b" in mode and ("w" in mode or "a" in mode):
            return Full(file, mode.replace("b", ""))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", fake_open)
    url, log = scripted(ok(), ok())
    with pytest.raises(DataError, match="No space left on device") as info:
        get(f"{url}/f", tmp_path / "f.tgz", cert)
    assert "f.tgz.part" in str(info.value) and "\n" not in str(info.value)
    monkeypatch.undo()
    assert len(log) == 1 and only(tmp_path) == []


# --- mirrors and the ensure path -----------------------------------------------------------------------


@pytest.fixture
def tiny_archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> bytes:
    """A tiny CIFAR archive whose md5 stands in for the official one."""
    archive = make_archive(write_python_layout(tmp_path / "src"), tmp_path / "a.tar.gz").read_bytes()
    monkeypatch.setattr(cifar10, "ARCHIVE_MD5", hashlib.md5(archive).hexdigest())
    return archive


def test_mirror_from_the_environment_is_used_and_verified(scripted, cert, tmp_path, monkeypatch, tiny_archive):
    url, log = scripted(error(500), ok(tiny_archive))
    monkeypatch.setenv("CIFARBENCH_MIRROR", f"{url}/mirror/cifar.tar.gz")
    assert cifar10.default_url() == f"{url}/mirror/cifar.tar.gz"
    data = tmp_path / "data"
    assert cifar10.ensure_cifar10(data, cafile=str(cert[0]), progress=False) == data
    assert [p for p, _ in log] == ["/mirror/cifar.tar.gz"] * 2
    assert (data / cifar10.ARCHIVE).read_bytes() == tiny_archive
    assert (data / cifar10.PY_DIR / "test_batch").is_file()
    assert len(cifar10.load_cifar10(data, verify=False, download=False).test) == N_PER_BATCH


def test_mirror_serving_other_bytes_is_refused(scripted, cert, tmp_path, monkeypatch, tiny_archive):
    evil = bytearray(tiny_archive)
    evil[-10] ^= 0xFF
    url, log = scripted(ok(bytes(evil)), ok(tiny_archive))
    monkeypatch.setenv("CIFARBENCH_MIRROR", f"{url}/mirror.tgz")
    data = tmp_path / "data"
    with pytest.raises(DataError) as info:
        cifar10.ensure_cifar10(data, cafile=str(cert[0]), progress=False)
    message = str(info.value)
    assert cifar10.ARCHIVE_MD5 in message and "md5 mismatch" in message and "\n" not in message
    assert len(log) == 1
    assert not data.exists() or only(data) == []  # no archive, no .part, nothing extracted


def test_http_mirror_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("CIFARBENCH_MIRROR", "http://127.0.0.1:9/cifar.tar.gz")
    with pytest.raises(DownloadError, match="only https") as info:
        cifar10.ensure_cifar10(tmp_path / "data", progress=False)
    assert "$CIFARBENCH_MIRROR" in str(info.value) and "\n" not in str(info.value)


def test_explicit_url_beats_the_environment(scripted, cert, tmp_path, monkeypatch, tiny_archive):
    url, log = scripted(ok(tiny_archive))
    monkeypatch.setenv("CIFARBENCH_MIRROR", "https://127.0.0.1:9/never-used")
    cifar10.ensure_cifar10(tmp_path / "data", url=f"{url}/flag.tgz", cafile=str(cert[0]), progress=False)
    assert [p for p, _ in log] == ["/flag.tgz"]


def test_cli_download_uses_the_mirror_from_the_environment(scripted, cert, tmp_path, monkeypatch, capsys,
                                                          tiny_archive):
    from cifarbench.cli import main

    url, log = scripted(ok(tiny_archive))
    monkeypatch.setenv("CIFARBENCH_MIRROR", f"{url}/env.tgz")
    monkeypatch.setenv("SSL_CERT_FILE", str(cert[0]))
    assert main(["download", "--data-dir", str(tmp_path / "data")]) == 0
    assert [p for p, _ in log] == ["/env.tgz"]
    assert "CIFAR-10 is in" in capsys.readouterr().out


# --- torchrun: only rank 0 downloads ----------------------------------------------------------------


@pytest.mark.parametrize("env, expected", [
    ({}, True), ({"RANK": "1"}, True), ({"WORLD_SIZE": "1", "RANK": "0"}, True),
    ({"WORLD_SIZE": "2", "RANK": "0"}, True), ({"WORLD_SIZE": "2", "RANK": "1"}, False),
    ({"WORLD_SIZE": "8", "RANK": "7"}, False), ({"WORLD_SIZE": "2"}, True), ({"WORLD_SIZE": "x", "RANK": "1"}, True),
])
def test_is_download_rank(monkeypatch, env, expected):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert is_download_rank() is expected


def test_other_ranks_wait_for_rank_0(tmp_path, monkeypatch, fast_backoff):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")

    def no_download(*args: object, **kwargs: object) -> None:
        raise AssertionError("rank 1 must not download")

    monkeypatch.setattr(dl, "download", no_download)
    monkeypatch.setattr(dl, "safe_extract_tar", no_download)
    data = tmp_path / "data"
    data.mkdir()

    def rank0() -> None:  # writes the files elsewhere, then moves them in, like extraction's renames
        time.sleep(0.3)
        staged = write_python_layout(tmp_path / "staged")
        os.rename(staged / cifar10.PY_DIR, data / cifar10.PY_DIR)

    slept = fast_backoff  # the pauses the wait asked for (and slept)
    thread = threading.Thread(target=rank0)
    thread.start()
    try:
        assert cifar10.ensure_cifar10(data, progress=False) == data
        present = (data / cifar10.PY_DIR / cifar10.TEST_BATCH).is_file()  # before rank 0's thread is joined
    finally:
        thread.join(10)
    assert slept and present  # it polled until rank 0's files were there, then returned
    assert len(cifar10.load_cifar10(data, verify=False).train) == 5 * N_PER_BATCH


def test_other_ranks_wait_for_a_half_extracted_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    data = write_python_layout(tmp_path / "data")
    last = data / cifar10.PY_DIR / "data_batch_5"
    content = last.read_bytes()
    last.unlink()  # rank 0 is still extracting: test_batch is there, data_batch_5 not yet
    timer = threading.Timer(0.3, last.write_bytes, args=(content,))
    timer.start()
    try:
        assert cifar10.ensure_cifar10(data) == data
    finally:
        timer.join(10)
    assert last.read_bytes() == content


def test_waiting_rank_gives_up_after_its_timeout(tmp_path, monkeypatch, fast_backoff):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(dl, "RANK_WAIT_S", 0.3)
    slept = fast_backoff  # the pauses the wait asked for (and slept)
    with pytest.raises(DataError, match="rank 1 waited 0.3 s for rank 0") as info:
        cifar10.ensure_cifar10(tmp_path / "data")
    assert "\n" not in str(info.value)
    assert slept and sum(slept) <= 0.3 + 1e-9  # the pauses it asked for fit inside its timeout
    assert not (tmp_path / "data").exists()


def test_waiting_rank_without_download_fails_at_once(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(DataError, match="not found"):
        cifar10.ensure_cifar10(tmp_path / "data", download=False)


def test_wait_for_files_returns_when_they_exist(tmp_path):
    files = [tmp_path / "a", tmp_path / "b"]
    files[0].write_text("a")
    timer = threading.Timer(0.1, files[1].write_text, args=("b",))
    timer.start()
    wait_for_files(files, timeout=5, poll=0.02)
    timer.join(5)
    assert files[1].read_text() == "b"
