"""Hostile files and stores: nothing hangs, nothing inflates without bound, nothing is silently wrong.

One section per family: bounded reads of regular files only, bounded checkpoint loading and validation,
the content-keyed data cache, integer labels, images decoded as viewed, the run store's lookups and errors,
the one atomic writer, and printable table cells.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import pickle
import signal
import sqlite3
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from cifarbench import fsutil
from cifarbench.data import cifar10, mnist
from cifarbench.data.cifar10 import load_cifar10
from cifarbench.data.images import ImageFileError, as_viewed, open_image
from cifarbench.errors import CifarbenchError, DataError
from cifarbench.fsutil import atomic_write, atomic_write_json, file_digest, read_regular_file
from cifarbench.reporting.tables import format_table, printable
from cifarbench.runs.records import RunRecord
from cifarbench.runs.store import RunStore
from cifarbench.training import checkpoint as ckpt_mod
from cifarbench.training.checkpoint import load_checkpoint, save_checkpoint
from conftest import checkpoint_payload

# --- helpers ---------------------------------------------------------------------------------------------


@contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """Fail (instead of hanging the suite) if the body blocks for longer than `seconds`."""
    def expire(signum: int, frame: Any) -> None:
        raise TimeoutError(f"blocked for more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def one_line(exc: BaseException, *needles: str) -> str:
    message = str(exc)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, (needle, message)
    return message


def replace_with_fifo(path: Path) -> Path:
    path.unlink(missing_ok=True)
    os.mkfifo(path)
    return path


def replace_with_dev_zero(path: Path) -> Path:
    path.unlink(missing_ok=True)
    path.symlink_to("/dev/zero")
    return path


def write_batch(folder: Path, name: str, labels: Any, n: int = 20) -> None:
    data = np.zeros((n, cifar10.PIXELS), dtype=np.uint8)
    (folder / name).write_bytes(pickle.dumps({b"data": data, b"labels": labels}, protocol=2))


# --- 1. files: regular files only, size capped before reading --------------------------------------------


@pytest.mark.parametrize("batch", ["data_batch_1", "test_batch"])
def test_fifo_batch_file_is_refused_without_blocking(tiny_py: Path, batch: str) -> None:
    fifo = replace_with_fifo(tiny_py / cifar10.PY_DIR / batch)
    with deadline(20), pytest.raises(DataError) as info:
        load_cifar10(tiny_py, verify=False, download=False)
    one_line(info.value, str(fifo), "FIFO", "not a regular file")


def test_dev_zero_symlink_is_refused(tiny_py: Path, tmp_path: Path) -> None:
    link = replace_with_dev_zero(tiny_py / cifar10.PY_DIR / "data_batch_2")
    with deadline(20), pytest.raises(DataError) as info:
        load_cifar10(tiny_py, verify=False, download=False)
    one_line(info.value, str(link), "character device")


@pytest.mark.parametrize("kind", ["fifo", "/dev/zero"])
def test_every_reader_of_user_files_refuses_fifos_and_devices(tmp_path: Path, kind: str) -> None:
    make = replace_with_fifo if kind == "fifo" else replace_with_dev_zero
    mnist_dir = tmp_path / "mnist-data" / "mnist"
    mnist_dir.mkdir(parents=True)
    for name in mnist.FILES:
        (mnist_dir / name).write_bytes(b"")
    make(mnist_dir / mnist.TRAIN_LABELS)
    cases = [
        (lambda: mnist.load_idx_dataset("mnist", tmp_path / "mnist-data", verify=False, download=False), DataError),
        (lambda: open_image(make(tmp_path / "photo.png")), ImageFileError),
        (lambda: load_checkpoint(make(tmp_path / "checkpoint.pt")), CifarbenchError),
        (lambda: RunStore(make(tmp_path / "runs" / "cifarbench.db").parent), CifarbenchError),
        (lambda: RunStore(tmp_path / "runs", read_only=True), CifarbenchError),
    ]
    (tmp_path / "runs").mkdir()
    for _i, (call, error) in enumerate(cases):
        with deadline(20), pytest.raises(error) as info:
            call()
        one_line(info.value, "not a regular file")


def test_oversized_files_are_refused_before_reading(tiny_py: Path, tmp_path: Path) -> None:
    batch = tiny_py / cifar10.PY_DIR / "data_batch_3"
    os.truncate(batch, cifar10.BATCH_MAX_BYTES + 1)  # sparse: nothing is written, and nothing may be read
    with pytest.raises(DataError) as info:
        load_cifar10(tiny_py, verify=False, download=False)
    one_line(info.value, str(batch), "over the limit")
    big = tmp_path / "big.pt"
    big.touch()
    os.truncate(big, ckpt_mod.MAX_BYTES + 1)
    with pytest.raises(CifarbenchError) as info:
        load_checkpoint(big)
    one_line(info.value, str(big), "over the limit")


def test_idx_header_claiming_too_much_data_is_refused() -> None:
    header = (mnist.IMAGE_MAGIC).to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in (900_000, 28, 28))
    with pytest.raises(DataError) as info:
        mnist.read_idx(header, "bomb-idx")
    one_line(info.value, "bomb-idx", "over the limit")


def test_bounded_read_returns_the_bytes_and_refuses_directories(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"abc")
    assert read_regular_file(tmp_path / "f", 3) == b"abc"
    with pytest.raises(DataError, match="over the limit"):
        read_regular_file(tmp_path / "f", 2)
    with pytest.raises(DataError, match="a directory"):
        read_regular_file(tmp_path, 10)
    with pytest.raises(DataError, match="does not exist"):
        read_regular_file(tmp_path / "nope", 10)


# --- 2. checkpoints: bounded decompression, validated content --------------------------------------------


def _no_torch_load(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("torch.load was reached")

    monkeypatch.setattr(ckpt_mod.torch, "load", refuse)


def test_zip_bomb_checkpoint_is_refused_before_inflating(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as z:
        with z.open("archive/data/0", "w") as member:
            for _ in range(16):
                member.write(bytes(2**20))  # 16 MiB of zeros deflate to ~16 KiB
    assert bomb.stat().st_size < 100_000
    _no_torch_load(monkeypatch)
    with pytest.raises(CifarbenchError) as info:
        load_checkpoint(bomb)
    one_line(info.value, str(bomb), "zip bomb")
    # The total declared size is capped too, whatever the ratio (stored members, many of them).
    stored = tmp_path / "stored.pt"
    with zipfile.ZipFile(stored, "w") as z:
        for i in range(3):
            z.writestr(f"archive/data/{i}", bytes(2**20))
    monkeypatch.setattr(ckpt_mod, "MAX_INFLATED", 2 * 2**20)
    with pytest.raises(CifarbenchError) as info:
        load_checkpoint(stored)
    one_line(info.value, "uncompressed", "zip bomb")
    monkeypatch.setattr(ckpt_mod, "MAX_MEMBERS", 2)
    with pytest.raises(CifarbenchError) as info:
        load_checkpoint(stored)
    one_line(info.value, "3 zip members")


def test_non_zip_checkpoint_is_one_line_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "random.pt"
    path.write_bytes(os.urandom(5000))
    _no_torch_load(monkeypatch)
    with pytest.raises(CifarbenchError) as info:
        load_checkpoint(path)
    one_line(info.value, str(path), "not a loadable cifarbench checkpoint", "not a zip archive")


RESUMABLE = {"position": {"step": 1, "total_steps": 4, "in_epoch": False, "epoch": 1},
             "optimizer": {"state": {}, "param_groups": []}, "history": [],
             "rng": {"python": [3, [0] * 625, None], "numpy": ["MT19937", [0] * 624, 0, 0, 0.0],
                     "torch": torch.get_rng_state(), "cuda": []},
             "lookahead": None}


@pytest.mark.parametrize("change, complaint", [
    ({"run_id": None}, "run_id is not a string"),
    ({"classes": "airplane"}, "classes is not a list of 1 to 1000 names"),
    ({"in_shape": [3, 32]}, "in_shape is not [channels, height, width]"),
    ({"dataset": {"name": "cifar10"}}, "dataset is not a dict with a string sha256"),
    ({"state_dict": {"w": 1.0}}, "state_dict is not a dict of tensors"),
    ({"config": None, "model": 3}, "model is not a string"),
    ({**RESUMABLE, "position": {"step": 1}}, "position is not the loop's position record"),
    ({**RESUMABLE, "history": [{"epoch": 1}]}, "history is not a list of epoch metrics"),
    ({**RESUMABLE, "rng": {"python": 1}}, "rng is not"),
])
def test_checkpoint_with_mistyped_values_is_one_line_error(tmp_path: Path, change: dict, complaint: str) -> None:
    path = save_checkpoint(checkpoint_payload(**change), tmp_path / "ck.pt")
    with pytest.raises(CifarbenchError) as info:
        load_checkpoint(path)
    one_line(info.value, str(path), complaint)


def test_checkpoint_with_missing_keys_is_one_line_error(tmp_path: Path) -> None:
    path = save_checkpoint({"state_dict": {"w": torch.ones(2)}}, tmp_path / "ck.pt")
    with pytest.raises(CifarbenchError) as info:
        load_checkpoint(path)
    one_line(info.value, "lacks run_id, model, classes, in_shape, config, dataset")
    partial = {k: v for k, v in RESUMABLE.items() if k != "rng"}
    path = save_checkpoint(checkpoint_payload(**partial), tmp_path / "resumable.pt")
    with pytest.raises(CifarbenchError) as info:
        load_checkpoint(path)
    one_line(info.value, "lacks rng")


def test_complete_checkpoints_load(tmp_path: Path) -> None:
    assert load_checkpoint(save_checkpoint(checkpoint_payload(), tmp_path / "a.pt"))["run_id"] == "r1"
    resumable = load_checkpoint(save_checkpoint(checkpoint_payload(**RESUMABLE), tmp_path / "b.pt"))
    assert resumable["position"]["total_steps"] == 4


# --- 3. the decoded-data cache: keyed by content, verified on load ---------------------------------------


def test_cache_notices_rewritten_labels_with_restored_mtime(tiny_py: Path, tmp_path: Path) -> None:
    first = load_cifar10(tiny_py, verify=False, download=False)
    batch = tiny_py / cifar10.PY_DIR / "data_batch_1"
    stat = batch.stat()
    content = pickle.loads(batch.read_bytes(), encoding="latin1")
    labels = content[b"labels"]
    labels[0], labels[1] = (labels[0] + 1) % 10, (labels[1] + 1) % 10
    rewritten = pickle.dumps(content, protocol=2)
    assert len(rewritten) == stat.st_size
    batch.write_bytes(rewritten)
    os.utime(batch, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert batch.stat().st_size == stat.st_size and batch.stat().st_mtime_ns == stat.st_mtime_ns
    second = load_cifar10(tiny_py, verify=False, download=False)
    assert second.sha256 != first.sha256
    assert second.train.labels[:2].tolist() == labels[:2]


def _cache_file(tmp_path: Path) -> Path:
    (path,) = (tmp_path / "cache").glob("cifar10-*.npz")
    return path


def _damage(path: Path, how: str) -> None:
    if how == "random bytes":
        path.write_bytes(os.urandom(4096))
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "not a zip":
        path.write_text("hello")
    else:
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
        if how == "wrong shapes":
            arrays["train_x"] = arrays["train_x"].reshape(len(arrays["train_x"]), -1)
        elif how == "wrong dtype":
            arrays["train_y"] = arrays["train_y"].astype(np.float64)
        elif how == "labels out of range":
            arrays["test_y"] = arrays["test_y"] + 100
        elif how == "pixels changed":
            arrays["train_x"] = arrays["train_x"].copy()
            arrays["train_x"][0] ^= 0xFF
        elif how == "members missing":
            del arrays["meta"]
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        path.write_bytes(buf.getvalue())


@pytest.mark.parametrize("how", ["random bytes", "truncated", "not a zip", "wrong shapes", "wrong dtype",
                                 "labels out of range", "pixels changed", "members missing"])
def test_damaged_cache_file_is_a_miss(tiny_py: Path, tmp_path: Path, how: str) -> None:
    first = load_cifar10(tiny_py, verify=False, download=False)
    _damage(_cache_file(tmp_path), how)
    again = load_cifar10(tiny_py, verify=False, download=False)
    assert again.sha256 == first.sha256
    assert np.array_equal(again.train.images, first.train.images)
    assert np.array_equal(again.test.labels, first.test.labels)
    with np.load(_cache_file(tmp_path)) as z:  # and the miss rewrote a whole cache file
        assert np.array_equal(z["train_x"], first.train.images)


def test_cache_hit_still_checks_the_md5s(official_tiny: Path, tmp_path: Path) -> None:
    assert load_cifar10(official_tiny, download=False).verified
    # Same decoded data, different bytes: a pickle with another protocol gives the same arrays.
    batch = official_tiny / cifar10.PY_DIR / "data_batch_1"
    batch.write_bytes(pickle.dumps(pickle.loads(batch.read_bytes(), encoding="bytes"), protocol=4))
    with pytest.raises(DataError, match="md5"):
        load_cifar10(official_tiny, download=False)
    assert not load_cifar10(official_tiny, download=False, verify=False).verified


# --- 4. labels: integers only ---------------------------------------------------------------------------


@pytest.mark.parametrize("labels", [
    [0.0, 1.5] * 10,
    [True, False] * 10,
    np.zeros(20, dtype=np.float32),
    np.zeros(20, dtype=bool),
    [1] * 19 + [2.0],
    ["1"] * 20,
    [None] * 20,
], ids=["floats", "bools", "float32 array", "bool array", "one float", "strings", "None"])
def test_float_and_bool_labels_are_refused(tiny_py: Path, labels: Any) -> None:
    folder = tiny_py / cifar10.PY_DIR
    write_batch(folder, "data_batch_4", labels)
    with pytest.raises(DataError) as info:
        load_cifar10(tiny_py, verify=False, download=False)
    one_line(info.value, str(folder / "data_batch_4"), "labels must be integers")


@pytest.mark.parametrize("labels", [list(range(10)) * 2, np.arange(20, dtype=np.uint8) % 10,
                                    np.arange(20, dtype=np.int32) % 10])
def test_integer_labels_of_any_integer_type_load(tiny_py: Path, labels: Any) -> None:
    write_batch(tiny_py / cifar10.PY_DIR, "data_batch_4", labels)
    data = load_cifar10(tiny_py, verify=False, download=False)
    assert data.train.labels.dtype == np.int64 and data.train.labels[60:80].tolist() == [i % 10 for i in range(20)]


# --- 5. images: decoded as a viewer shows them -----------------------------------------------------------


def test_16_bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    path = tmp_path / "deep.png"
    Image.fromarray(np.array([[0, 256, 32768, 65535]], dtype=np.uint16)).save(path)
    assert Image.open(path).mode.startswith("I")
    assert np.asarray(open_image(path, mode="L")).tolist() == [[0, 1, 128, 255]]
    assert np.asarray(open_image(path))[0, 2].tolist() == [128, 128, 128]


@pytest.mark.parametrize("mode, dtype", [("I;16", "<u2"), ("I;16L", "<u2"), ("I;16B", ">u2"), ("I", "<i4")])
def test_every_16_bit_mode_is_scaled(mode: str, dtype: str) -> None:
    values = np.array([[0, 512, 40000, 65535]], dtype=dtype)
    img = Image.frombytes(mode, (4, 1), values.tobytes())
    assert np.asarray(as_viewed(img, "L")).tolist() == [[0, 2, 156, 255]]


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    stored = np.zeros((8, 16, 3), dtype=np.uint8)  # 16 wide, 8 high; the left half is red
    stored[:, :8] = (255, 0, 0)
    img = Image.fromarray(stored)
    exif = img.getexif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display, so the red half ends up on top
    for name in ("rotated.png", "rotated.jpg"):
        img.save(tmp_path / name, exif=exif.tobytes())
        shown = np.asarray(open_image(tmp_path / name))
        assert shown.shape == (16, 8, 3), name
        assert shown[2, 4, 0] > 200 and shown[13, 4, 0] < 60, name


def test_transparency_is_composited_on_white(tmp_path: Path) -> None:
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)
    Image.fromarray(rgba).save(tmp_path / "clear.png")
    pixels = np.asarray(open_image(tmp_path / "clear.png"))
    assert pixels[0, 0].tolist() == [255, 0, 0] and pixels[1, 1].tolist() == [255, 255, 255]
    la = Image.fromarray(np.stack([np.zeros((2, 2), np.uint8), rgba[..., 3]], axis=-1), mode="LA")
    la.save(tmp_path / "la.png")
    assert np.asarray(open_image(tmp_path / "la.png", mode="L")).tolist() == [[0, 255], [255, 255]]
    palette = Image.fromarray(np.array([[0, 1], [1, 1]], dtype=np.uint8), mode="P")
    palette.putpalette([0, 0, 0, 0, 0, 255])
    palette.save(tmp_path / "palette.png", transparency=0)
    assert np.asarray(open_image(tmp_path / "palette.png")).tolist() == [[[255, 255, 255], [0, 0, 255]],
                                                                         [[0, 0, 255], [0, 0, 255]]]


def test_cmyk_jpeg_converts_to_rgb(tmp_path: Path) -> None:
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=100)
    red = np.asarray(open_image(tmp_path / "cmyk.jpg"))[1, 1]
    assert red[0] > 200 and red[1] < 60 and red[2] < 60


# --- 6. the run store ------------------------------------------------------------------------------------

CONFIG = {"model": "fnn", "recipe": "seed", "seed": 0, "epochs": 2}
IDS = ("20240101-120000-fnn-s0-ab12", "20240101-120000-fnn-s1-cd34", "20240202-090000-cnn-s0-ef56")


def _start(store: RunStore, run_id: str, **config: Any) -> None:
    c = {**CONFIG, **config}
    store.start_run(RunRecord(run_id=run_id, model=c["model"], recipe=c["recipe"], seed=c["seed"], epochs=c["epochs"],
                              config=c, dataset={"sha256": "ab"}, device="cpu", params=10))


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    with RunStore(tmp_path / "store") as store:
        for run_id in IDS:
            _start(store, run_id)
            store.finish_run(run_id, "completed")
    return tmp_path / "store"


@pytest.mark.parametrize("ref", ["", "   ", "\t\n"])
def test_empty_reference_asks_for_a_run_id(store_dir: Path, ref: str) -> None:
    with RunStore(store_dir) as store, pytest.raises(CifarbenchError) as info:
        store.get_run(ref)
    one_line(info.value, "name a run id")


@pytest.mark.parametrize("ref", ["%", "_", "%%%%%%%%", "________", "2024010_", "20240101%", "2024%", "*", "2024*",
                                 "20240101-120000-FNN", "[2]0240101"])
def test_empty_percent_and_underscore_ids_match_nothing(store_dir: Path, ref: str) -> None:
    with RunStore(store_dir) as store:
        with pytest.raises(CifarbenchError) as info:
            store.get_run(ref)
        one_line(info.value, "is not in")
        assert store.delete_run(ref) is False
        assert len(store.list_runs()) == 3


def test_short_prefix_is_refused(store_dir: Path) -> None:
    with RunStore(store_dir) as store:
        with pytest.raises(CifarbenchError) as info:
            store.get_run("20240")
        one_line(info.value, "at least 6 characters")
        assert store.get_run("202402")["id"] == IDS[2]  # 6 characters, unique
        with pytest.raises(CifarbenchError) as info:
            store.get_run("20240101-120000")
        one_line(info.value, "matches several runs", IDS[0], IDS[1])
        assert store.get_run(IDS[1])["id"] == IDS[1]


def test_exact_short_ids_still_match(tmp_path: Path) -> None:
    with RunStore(tmp_path) as store:
        _start(store, "old")
        assert store.get_run("old")["id"] == "old"


def _corrupt_pages(path: Path) -> None:
    data = bytearray(path.read_bytes())
    page = 4096
    assert len(data) >= 3 * page
    for start in range(page, len(data), page):  # every page but the header's
        data[start:start + page] = os.urandom(page)
    path.write_bytes(bytes(data))


def test_corrupt_db_is_one_line_error(store_dir: Path) -> None:
    db = store_dir / "cifarbench.db"
    _corrupt_pages(db)
    for read_only in (False, True):
        with pytest.raises(CifarbenchError) as info:
            with RunStore(store_dir, read_only=read_only) as store:
                store.list_runs()
                store.get_run(IDS[0])
        one_line(info.value, str(db))
    db.write_bytes(os.urandom(20_000))
    with pytest.raises(CifarbenchError) as info:
        RunStore(store_dir)
    one_line(info.value, str(db), "not a database")


@pytest.mark.parametrize("version", [0, 1])
def test_foreign_sqlite_file_is_one_line_error(tmp_path: Path, version: int) -> None:
    db = tmp_path / "cifarbench.db"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE customers (id INTEGER, name TEXT)")
    con.execute(f"PRAGMA user_version = {version}")
    con.commit()
    con.close()
    before = db.read_bytes()
    for read_only in (False, True):
        with pytest.raises(CifarbenchError) as info:
            RunStore(tmp_path, read_only=read_only)
        one_line(info.value, str(db), "not a cifarbench run store", "customers")
    assert db.read_bytes() == before  # no tables added, no journal mode switched


@pytest.mark.parametrize("column, value", [("config_json", "{not json"), ("config_json", "[1, 2]"),
                                           ("dataset_json", "\"just a string\""), ("config_json", "nul")])
def test_bad_json_row_is_one_line_error(store_dir: Path, column: str, value: str) -> None:
    con = sqlite3.connect(store_dir / "cifarbench.db")
    con.execute(f"UPDATE runs SET {column} = ? WHERE id = ?", (value, IDS[0]))
    con.commit()
    con.close()
    with RunStore(store_dir) as store:
        for call in (lambda: store.get_run(IDS[0]), store.list_runs):
            with pytest.raises(CifarbenchError) as info:
                call()
            one_line(info.value, column, IDS[0])
        assert store.get_run(IDS[2])["id"] == IDS[2]  # the other rows still read


class _FailingConnection:
    """A connection whose COMMIT (and ROLLBACK) fail as on a full disk."""

    def __init__(self, db: sqlite3.Connection):
        self._db = db

    def execute(self, sql: str, *args: Any) -> Any:
        if sql.strip().upper() in ("COMMIT", "ROLLBACK"):
            raise sqlite3.OperationalError("database or disk is full")
        return self._db.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._db, name)


def test_disk_full_commit_is_one_line_error(store_dir: Path) -> None:
    with RunStore(store_dir) as store:
        real = store._db
        store._db = _FailingConnection(real)  # type: ignore[assignment]
        with pytest.raises(CifarbenchError) as info:
            store.finish_run(IDS[0], "failed", error="x")
        one_line(info.value, "database or disk is full", "free space")
        assert info.value.__suppress_context__
        store._db = real
        real.execute("ROLLBACK")
        # A real full database: SQLite reports it on the insert, and the transaction is rolled back.
        pages = real.execute("PRAGMA page_count").fetchone()[0]
        real.execute(f"PRAGMA max_page_count = {pages}")
        with pytest.raises(CifarbenchError) as info:
            _start(store, "20250101-big-run", notes="x" * 200_000)
        one_line(info.value, "database or disk is full")
        assert not real.in_transaction
        assert [r["id"] for r in store.list_runs()] and "20250101-big-run" not in {r["id"] for r in store.list_runs()}


def test_seed_beyond_64_bits_is_one_line_error(tmp_path: Path) -> None:
    with RunStore(tmp_path) as store:
        with pytest.raises(CifarbenchError) as info:
            _start(store, "20250101-huge-seed", seed=2**70)
        one_line(info.value, "too large")
        assert store.list_runs() == []


def test_read_only_store_creates_nothing(tmp_path: Path, store_dir: Path) -> None:
    fresh = tmp_path / "fresh" / "runs"
    with RunStore(fresh, read_only=True) as store:
        assert store.list_runs() == []
        with pytest.raises(CifarbenchError, match="is not in"):
            store.get_run("20240101-anything")
        with pytest.raises(CifarbenchError, match="read-only"):
            _start(store, "20250101-new")
    assert not (tmp_path / "fresh").exists()
    # An existing store: a dead writer's run reads as crashed (what a writer would mark it), and no byte or file
    # changes.
    con = sqlite3.connect(store_dir / "cifarbench.db")
    con.execute("UPDATE runs SET status = 'running', pid = 999999999, host = ? WHERE id = ?",
                (os.uname().nodename, IDS[0]))
    con.commit()
    con.close()
    before = {p.name: p.read_bytes() for p in store_dir.iterdir()}
    with RunStore(store_dir, read_only=True) as store:
        assert store.get_run(IDS[0])["status"] == "crashed"
        assert len(store.list_runs()) == 3
        with pytest.raises(CifarbenchError, match="read-only"):
            store.delete_run(IDS[0])
    assert {p.name: p.read_bytes() for p in store_dir.iterdir()} == before


# --- 7. one atomic writer, one digest --------------------------------------------------------------------


def test_atomic_write_leaves_no_temp_on_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "out" / "result.json"
    atomic_write_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1} and target.stat().st_mode & 0o777 == 0o644

    def half_then_fail(f: Any) -> None:
        f.write(b"{\"half\":")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError):
        atomic_write(target, half_then_fail)
    assert json.loads(target.read_text()) == {"a": 1}
    assert sorted(p.name for p in target.parent.iterdir()) == ["result.json"]

    def no_fsync(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(fsutil.os, "fsync", no_fsync)
    with pytest.raises(OSError):
        atomic_write_json(target, {"a": 2})
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"a": 1}
    assert sorted(p.name for p in target.parent.iterdir()) == ["result.json"]


def test_every_writer_goes_through_the_atomic_writer(tmp_path: Path, tiny_py: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from cifarbench.reporting import html, plots

    written: list[str] = []
    real = fsutil.atomic_write

    def spy(path: Any, write: Any, **kwargs: Any) -> Path:
        written.append(Path(path).name)
        return real(path, write, **kwargs)

    for module in (fsutil, ckpt_mod, cifar10, plots):
        monkeypatch.setattr(module, "atomic_write", spy)
    html.write_report("<html></html>", tmp_path / "report.html")
    fig = plots._figure(1, 1)
    plots.save_figure(fig, tmp_path / "figure.png")
    save_checkpoint(checkpoint_payload(), tmp_path / "ck.pt")
    load_cifar10(tiny_py, verify=False, download=False)
    assert written[:3] == ["report.html", "figure.png", "ck.pt"] and written[3].startswith("cifar10-")
    assert (tmp_path / "report.html").stat().st_mode & 0o777 == 0o644
    assert not list(tmp_path.glob(".*.tmp")) and not list((tmp_path / "cache").glob("*.tmp"))


def test_failed_figure_save_leaves_no_temp(tmp_path: Path) -> None:
    from cifarbench.reporting import plots

    class Broken:
        def savefig(self, f: Any, format: str) -> None:
            f.write(b"\x89PNG partial")
            raise RuntimeError("renderer failed")

    (tmp_path / "fig.png").write_bytes(b"old")
    with pytest.raises(RuntimeError):
        plots.save_figure(Broken(), tmp_path / "fig.png")
    assert [p.name for p in tmp_path.iterdir() if p.name != "cache"] == ["fig.png"]
    assert (tmp_path / "fig.png").read_bytes() == b"old"


def test_file_digest_matches_hashlib(tmp_path: Path) -> None:
    payload = os.urandom(3 * 2**20 + 17)
    (tmp_path / "f").write_bytes(payload)
    assert file_digest(tmp_path / "f") == hashlib.md5(payload).hexdigest()
    assert file_digest(tmp_path / "f", "sha256") == hashlib.sha256(payload).hexdigest()
    with deadline(20), pytest.raises(DataError, match="FIFO"):
        file_digest(replace_with_fifo(tmp_path / "fifo"))


# --- 8. output spoofing ----------------------------------------------------------------------------------


def test_printable_escapes_newlines_and_controls() -> None:
    assert printable("cat.png") == "cat.png"
    assert printable("chat é 猫.png") == "chat é 猫.png"
    assert printable("a.png\nb.png: airplane 99%") == "a.png\\nb.png: airplane 99%"
    assert printable("x\r\t\x1b[2J\x00\x7f\x85") == "x\\r\\t\\x1b[2J\\x00\\x7f\\x85"
    assert printable("evil\u202egnp.exe\u2028\u2066") == "evil\\u202egnp.exe\\u2028\\u2066"
    assert printable(3) == "3"


def test_table_cells_cannot_forge_rows() -> None:
    table = format_table(["image", "class"], [["a.png\n| forged.png | truck |", "cat"], ["b\x1b[1A.png", "dog"]])
    lines = table.splitlines()
    assert len(lines) == 4 and "\x1b" not in table
    assert lines[2].startswith("| a.png\\n| forged.png | truck | | cat")
