"""Files nobody vouches for: each is refused with one clear line, nothing is written outside the target
folder, and no payload ever runs (its marker file never appears).

The unpickler and extractor have unit tests in test_safe_loading.py / test_download.py / test_data.py; these
go through the real entry points: `load_cifar10` / `ensure_cifar10` with a patched archive md5, the CLI in
process, and `cifarbench eval FILE` as a subprocess. The end of the file covers checkpoints that a full disk
or a killed writer would damage.
"""

from __future__ import annotations

import errno
import hashlib
import io
import multiprocessing as mp
import os
import pickle
import random
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cifarbench.cli import main
from cifarbench.data import cifar10
from cifarbench.data.cifar10 import load_cifar10
from cifarbench.errors import CifarbenchError, DataError
from cifarbench.training import checkpoint as ckpt_mod
from cifarbench.training.checkpoint import load_checkpoint, save_checkpoint
from conftest import checkpoint_payload, write_binary_layout, write_python_layout


class _Call:
    """Pickles as a call of fn(*args): what a malicious file would contain."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)


def snapshot(folder: Path, skip: tuple[str, ...] = ("runs", "cache")) -> dict[str, str]:
    """Every path under folder (not following links) with a hash of its content, or its link target."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if rel.split("/")[0] in skip:
            continue  # the isolated run store and cache: bookkeeping, not payload
        if p.is_symlink():
            out[rel] = "-> " + os.readlink(p)
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[rel] = "dir"
    return out


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    err = capsys.readouterr().err
    return code, err


def assert_one_line_error(err: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("cifarbench: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, err)


# --- batch files, through the CLI ---------------------------------------------------------------------


def _evil_batches(marker: Path) -> dict[str, tuple[str, str, object]]:
    """case -> (layout, batch file to replace, its new content or a function of the old bytes)."""
    return {
        "pickle calling os.system": ("python", "data_batch_2", pickle.dumps(
            {"data": _Call(os.system, f"touch {marker}"), "labels": []}, protocol=2)),
        "pickle calling builtins.eval": ("python", "data_batch_3",
                                         pickle.dumps({b"data": _Call(eval, f"open({str(marker)!r}, 'w').close()"),
                                                       b"labels": [0]}, protocol=2)),
        "object-dtype array": ("python", "test_batch",
                               pickle.dumps({"data": np.array([_Call(os.system, f"touch {marker}"), 1], dtype=object),
                                             "labels": [0, 1]}, protocol=4)),
        "truncated batch": ("python", "data_batch_1", lambda old: old[: len(old) // 3]),
        "label 10": ("python", "data_batch_4",
                     pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [3, 10]}, protocol=2)),
        "binary batch one byte short": ("binary", "data_batch_5.bin", lambda old: old[:-1]),
        "binary label 10": ("binary", "test_batch.bin", lambda old: b"\x0a" + old[1:]),
    }


EXPECT = {  # what the one line says, beyond the file's name
    "pickle calling os.system": "system' is not allowed",
    "pickle calling builtins.eval": "eval' is not allowed",
    "object-dtype array": "object arrays are not allowed",
    "truncated batch": "truncated",
    "label 10": "label 10 is out of range",
    "binary batch one byte short": "truncated",
    "binary label 10": "label 10 is out of range",
}


@pytest.mark.parametrize("case", list(_evil_batches(Path("m"))))
def test_bad_batch_is_refused_by_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str) -> None:
    marker = tmp_path / "marker"
    layout, name, content = _evil_batches(marker)[case]
    root = (write_python_layout if layout == "python" else write_binary_layout)(tmp_path / "data")
    batch = root / (cifar10.PY_DIR if layout == "python" else cifar10.BIN_DIR) / name
    batch.write_bytes(content(batch.read_bytes()) if callable(content) else content)  # type: ignore[arg-type]
    before = snapshot(tmp_path)

    with pytest.raises(DataError, match=name):
        load_cifar10(root, verify=False, download=False)
    code, err = run_cli(capsys, "train", "fnn", "--data-dir", str(root), "--no-verify", "--no-download",
                        "--epochs", "1", "--device", "cpu")
    assert code == 1
    assert_one_line_error(err, name, EXPECT[case])
    assert not marker.exists()
    assert snapshot(tmp_path) == before  # nothing written, not even a cache entry


# --- archives, through ensure_cifar10 / load_cifar10 --------------------------------------------------


def _member(name: str, data: bytes | None = None, type_: bytes = tarfile.REGTYPE, link: str = "") -> tuple:
    info = tarfile.TarInfo(name)
    info.type = type_
    info.linkname = link
    if data is not None:
        info.size = len(data)
    return info, data


def _archive_cases(outside: Path) -> dict[str, tuple]:
    payload = b"#!/bin/sh\ntouch pwned\n"
    return {
        "../ member": _member("../x", payload),
        "nested .. member": _member(f"{cifar10.PY_DIR}/../../x", payload),
        "absolute path": _member(str(outside / "abs"), payload),
        "symlink out of the folder": _member(f"{cifar10.PY_DIR}/readme.html", type_=tarfile.SYMTYPE,
                                             link=str(outside / "victim")),
        "relative symlink out": _member(f"{cifar10.PY_DIR}/readme.html", type_=tarfile.SYMTYPE,
                                        link="../../outside/victim"),
        "hardlink out of the folder": _member(f"{cifar10.PY_DIR}/readme.html", type_=tarfile.LNKTYPE,
                                              link=str(outside / "victim")),
        "relative hardlink out": _member(f"{cifar10.PY_DIR}/readme.html", type_=tarfile.LNKTYPE,
                                         link="../outside/victim"),
    }


def _evil_archive(path: Path, good: Path, bad: tuple) -> Path:
    """A complete, valid CIFAR archive with one bad member added after the good ones."""
    with tarfile.open(path, "w:gz") as tar:
        tar.add(good / cifar10.PY_DIR, arcname=cifar10.PY_DIR)
        info, data = bad
        tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


@pytest.mark.parametrize("case", list(_archive_cases(Path("/o"))))
def test_bad_archive_is_refused_on_the_real_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str], case: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_text("untouched")
    good = write_python_layout(tmp_path / "good")
    root = tmp_path / "data" / "root"
    root.mkdir(parents=True)
    bad = _archive_cases(outside)[case]
    archive = _evil_archive(root / cifar10.ARCHIVE, good, bad)
    monkeypatch.setattr(cifar10, "ARCHIVE_MD5", hashlib.md5(archive.read_bytes()).hexdigest())
    before = snapshot(tmp_path)

    with pytest.raises(DataError) as info:
        load_cifar10(root, download=False)  # verify=True: the archive's md5 is the (patched) official one
    message = str(info.value)
    assert "refusing to extract" in message and bad[0].name in message and "\n" not in message
    with pytest.raises(DataError, match="refusing to extract"):
        cifar10.ensure_cifar10(root, download=False)
    code, err = run_cli(capsys, "train", "fnn", "--data-dir", str(root), "--no-download", "--epochs", "1",
                        "--device", "cpu")
    assert code == 1
    assert_one_line_error(err, "refusing to extract", repr(bad[0].name))

    assert snapshot(tmp_path) == before  # not one file extracted, inside the folder or out of it
    assert sorted(p.name for p in root.iterdir()) == [cifar10.ARCHIVE]
    assert (outside / "victim").read_text() == "untouched"
    assert not (tmp_path / "data" / "x").exists() and not (tmp_path / "x").exists()
    assert not (outside / "abs").exists()


# --- checkpoints whose unpickling would run code -------------------------------------------------------


def _evil_checkpoint(path: Path, marker: Path, kind: str) -> Path:
    if kind == "zip, os.system":
        torch.save({"format": ckpt_mod.FORMAT, "state_dict": _Call(os.system, f"touch {marker}")}, path)
    elif kind == "legacy format, builtins.eval":
        torch.save({"format": ckpt_mod.FORMAT, "x": _Call(eval, f"open({str(marker)!r}, 'w').close()")}, path,
                   _use_new_zipfile_serialization=False)
    else:  # a bare pickle with a .pt name
        path.write_bytes(pickle.dumps(_Call(os.system, f"touch {marker}")))
    return path


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("kind", ["legacy format, builtins.eval", "bare pickle"])
def test_checkpoint_payloads_never_run(tmp_path: Path, kind: str) -> None:
    # (zip format with os.system: test_safe_loading.py)
    marker = tmp_path / "marker"
    path = _evil_checkpoint(tmp_path / "evil.pt", marker, kind)
    with pytest.raises(CifarbenchError, match="not a loadable cifarbench checkpoint") as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value) and "evil.pt" in str(info.value)
    assert not marker.exists()


@pytest.mark.slow
def test_cli_eval_of_a_malicious_checkpoint(tmp_path: Path) -> None:
    """`cifarbench eval FILE` in a fresh process: exit 1, one line on stderr, no traceback, no payload."""
    marker = tmp_path / "marker"
    path = _evil_checkpoint(tmp_path / "evil.pt", marker, "zip, os.system")
    env = {**os.environ, "CIFARBENCH_HOME": str(tmp_path / "runs"), "CIFARBENCH_CACHE": str(tmp_path / "cache"),
           "PYTHONWARNINGS": "ignore"}
    env.pop("CIFARBENCH_DATA", None)
    before = snapshot(tmp_path, skip=())
    proc = subprocess.run([sys.executable, "-m", "cifarbench", "eval", str(path), "--device", "cpu"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert_one_line_error(proc.stderr, "evil.pt", "not a loadable cifarbench checkpoint")
    assert proc.stdout == ""
    assert not marker.exists()
    assert snapshot(tmp_path, skip=()) == before  # no run store, no cache, nothing


# --- checkpoints: a full disk, a killed writer ------------------------------------------------------------


def _state(epoch: int, n: int = 1000) -> dict:
    return checkpoint_payload(epoch=epoch, state_dict={"w": torch.full((n,), float(epoch))})


def _temps(folder: Path, name: str = "ck.pt") -> list[str]:
    return sorted(p.name for p in folder.glob(f".{name}.*.tmp"))


class _FullDisk(io.FileIO):
    """A file on a disk with `room` bytes left."""

    room = 0

    def write(self, b):  # type: ignore[no-untyped-def]
        if len(b) > _FullDisk.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        _FullDisk.room -= len(b)
        return super().write(b)


@pytest.mark.parametrize("where", ["write", "fsync"])
def test_full_disk_while_saving(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    path = tmp_path / "ck.pt"
    save_checkpoint(_state(1, 200_000), path)
    if where == "write":  # fails part-way: some bytes of the new checkpoint reached the temp file
        _FullDisk.room = 100_000
        monkeypatch.setattr(ckpt_mod.os, "fdopen", lambda fd, mode="r", *a, **k: _FullDisk(fd, mode.replace("b", "")))
    else:  # some filesystems only report it when the data is flushed
        def fsync(fd: int) -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        monkeypatch.setattr(ckpt_mod.os, "fsync", fsync)
    with pytest.raises(CifarbenchError) as info:
        save_checkpoint(_state(2, 200_000), path)
    monkeypatch.undo()
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    assert "disk is full" in message and "ENOSPC" in message  # the cause
    assert "free space" in message and "runs_dir=" in message  # what to do, in the Python caller's words
    assert "previous checkpoint" in message
    assert load_checkpoint(path)["epoch"] == 1  # intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pt"]  # no temp file left


def test_other_write_errors_name_the_cause(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "ck.pt"

    def fsync(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(ckpt_mod.os, "fsync", fsync)
    with pytest.raises(CifarbenchError, match=r"Input/output error \(EIO\)"):
        save_checkpoint(_state(1), path)
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.slow
def test_next_save_removes_only_the_temps_of_dead_writers(tmp_path: Path) -> None:
    path = tmp_path / "ck.pt"
    save_checkpoint(_state(1), path)
    dead, alive = _dead_pid(), os.getppid()
    stale = tmp_path / f".ck.pt.{dead}.abc123.tmp"
    names = [stale.name, f".ck.pt.{alive}.live99.tmp", f".other.pt.{dead}.abc.tmp", ".ck.pt.oldstyle.tmp"]
    for name in names:
        (tmp_path / name).write_bytes(b"half a checkpoint")
    load_checkpoint(path)
    assert all((tmp_path / n).exists() for n in names)  # loading never deletes: a writer may be live
    save_checkpoint(_state(2), path)
    assert not stale.exists()
    assert all((tmp_path / n).exists() for n in names[1:])  # a live writer's, another file's, an unknown one
    assert load_checkpoint(path)["epoch"] == 2


def _save_forever(path: str, first_epoch: int, weights: torch.Tensor, conn) -> None:  # in a forked child
    # No tensor arithmetic here: intra-op thread pools do not survive fork; saving needs none.
    epoch = first_epoch
    while True:
        save_checkpoint(checkpoint_payload(epoch=epoch, state_dict={"w": weights}), path)
        conn.send(epoch)
        epoch += 1


@pytest.mark.slow
def test_sigkill_during_saves_leaves_a_loadable_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "ck.pt"
    ctx = mp.get_context("fork")
    rng = random.Random(7)
    left_behind = 0
    weights = torch.arange(4_000_000, dtype=torch.float32)  # 16 MB: a save takes a while
    for round_ in range(6):
        recv, send = ctx.Pipe(duplex=False)
        child = ctx.Process(target=_save_forever, args=(str(path), 1000 * round_, weights, send), daemon=True)
        child.start()
        send.close()
        assert recv.poll(30), "the writer never finished a save"
        time.sleep(rng.uniform(0, 0.25))
        os.kill(child.pid, signal.SIGKILL)  # type: ignore[arg-type]
        child.join(10)
        assert child.exitcode == -signal.SIGKILL
        saved = []
        while True:
            try:
                saved.append(recv.recv())
            except (EOFError, OSError):
                break
        recv.close()
        loaded = load_checkpoint(path)  # whatever the moment of the kill: a whole checkpoint
        assert loaded["epoch"] in (saved[-1], saved[-1] + 1)  # the last reported, or one saved but not reported
        assert torch.equal(loaded["state_dict"]["w"], weights)
        temps = _temps(tmp_path)
        # Only the writer just killed has a temp here: each new writer's first save swept the previous one's.
        assert all(t.startswith(f".ck.pt.{child.pid}.") for t in temps), temps
        left_behind += len(temps)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".tmp")] == ["ck.pt"]
    save_checkpoint(_state(1), path)  # the next save sweeps the killed writers' temp files
    assert _temps(tmp_path) == []
    assert load_checkpoint(path)["epoch"] == 1
    print(f"temp files left by the kills before the sweep: {left_behind}")
