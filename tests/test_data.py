"""CIFAR-10 loading: both layouts, both key types, verification, validation, archive, cache."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from cifarbench.data import cifar10
from cifarbench.data.cifar10 import load_cifar10, resolve_data_dir
from cifarbench.errors import DataError
from conftest import N_PER_BATCH, make_archive, md5_of, write_binary_layout, write_python_layout


@pytest.mark.parametrize("key_type", [bytes, str])
def test_python_layout_loads_with_either_key_type(tmp_path: Path, key_type: type) -> None:
    root = write_python_layout(tmp_path / "d", key_type=key_type)
    ds = load_cifar10(root, verify=False, download=False)
    assert ds.train.images.shape == (5 * N_PER_BATCH, 3, 32, 32) and ds.train.images.dtype == np.uint8
    assert ds.test.images.shape == (N_PER_BATCH, 3, 32, 32)
    assert ds.layout == "python" and not ds.verified
    raw = pickle.loads((root / cifar10.PY_DIR / "data_batch_1").read_bytes())
    raw = {k.decode() if isinstance(k, bytes) else k: v for k, v in raw.items()}
    # Row layout is R plane, G plane, B plane: pixel (c, y, x) is data[c*1024 + y*32 + x].
    assert ds.train.images[3, 1, 4, 7] == raw["data"][3, 1024 + 4 * 32 + 7]
    assert ds.train.labels[:N_PER_BATCH].tolist() == list(raw["labels"])


def test_binary_and_python_layouts_give_the_same_data_and_fingerprint(tmp_path: Path) -> None:
    py = load_cifar10(write_python_layout(tmp_path / "p", seed=3), verify=False, download=False)
    bn = load_cifar10(write_binary_layout(tmp_path / "b", seed=3), verify=False, download=False)
    assert np.array_equal(py.train.images, bn.train.images) and np.array_equal(py.test.labels, bn.test.labels)
    assert py.sha256 == bn.sha256 and bn.layout == "binary"


def test_batch_folder_itself_is_accepted(tiny_py: Path) -> None:
    ds = load_cifar10(tiny_py / cifar10.PY_DIR, verify=False, download=False)
    assert len(ds.train) == 5 * N_PER_BATCH


def test_official_md5s_verify(official_tiny: Path) -> None:
    assert load_cifar10(official_tiny, download=False).verified


def test_wrong_md5_is_refused_naming_file_and_both_md5s(official_tiny: Path) -> None:
    batch = official_tiny / cifar10.PY_DIR / "data_batch_3"
    expected = md5_of(batch)
    blob = bytearray(batch.read_bytes())
    blob[-200] ^= 1  # one flipped pixel bit: still a valid pickle
    batch.write_bytes(bytes(blob))
    with pytest.raises(DataError) as err:
        load_cifar10(official_tiny, download=False)
    message = str(err.value)
    assert "data_batch_3" in message and expected in message and md5_of(batch) in message
    assert "verify=False" in message and "\n" not in message  # the Python caller's spelling of --no-verify
    ds = load_cifar10(official_tiny, verify=False, download=False)
    assert not ds.verified


def test_binary_layout_cannot_be_verified_without_no_verify(tiny_bin: Path) -> None:
    with pytest.raises(DataError, match="verify=False"):
        load_cifar10(tiny_bin, download=False)


def test_truncated_python_batch_is_refused(tiny_py: Path) -> None:
    batch = tiny_py / cifar10.PY_DIR / "test_batch"
    batch.write_bytes(batch.read_bytes()[:500])
    with pytest.raises(DataError, match="test_batch"):
        load_cifar10(tiny_py, verify=False, download=False)


def test_binary_batch_one_byte_short_is_refused(tiny_bin: Path) -> None:
    batch = tiny_bin / cifar10.BIN_DIR / "data_batch_2.bin"
    batch.write_bytes(batch.read_bytes()[:-1])
    with pytest.raises(DataError, match=r"data_batch_2\.bin.*truncated"):
        load_cifar10(tiny_bin, verify=False, download=False)


def test_label_out_of_range_is_refused(tmp_path: Path) -> None:
    root = write_binary_layout(tmp_path / "b")
    batch = root / cifar10.BIN_DIR / "data_batch_4.bin"
    blob = bytearray(batch.read_bytes())
    blob[cifar10.RECORD * 5] = 10
    batch.write_bytes(bytes(blob))
    with pytest.raises(DataError, match=r"data_batch_4\.bin: label 10 is out of range"):
        load_cifar10(root, verify=False, download=False)


@pytest.mark.parametrize("change", ["shape", "dtype", "keys", "labels"])
def test_malformed_python_batches_are_refused(tiny_py: Path, change: str) -> None:
    batch = {"data": np.zeros((4, 3072), np.uint8), "labels": [0, 1, 2, 3]}
    if change == "shape":
        batch["data"] = np.zeros((4, 3000), np.uint8)
    elif change == "dtype":
        batch["data"] = np.zeros((4, 3072), np.float32)
    elif change == "keys":
        del batch["labels"]
    else:
        batch["labels"] = [0, 1]
    (tiny_py / cifar10.PY_DIR / "data_batch_5").write_bytes(pickle.dumps(batch))
    with pytest.raises(DataError, match="data_batch_5"):
        load_cifar10(tiny_py, verify=False, download=False)


def test_malicious_batch_pickle_never_runs(tiny_py: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            import os
            return (os.system, (f"touch {marker}",))

    (tiny_py / cifar10.PY_DIR / "data_batch_1").write_bytes(pickle.dumps({"data": Payload(), "labels": []}))
    with pytest.raises(DataError, match="not allowed"):
        load_cifar10(tiny_py, verify=False, download=False)
    assert not marker.exists()


def test_full_size_split_with_wrong_class_counts_is_refused(tmp_path: Path) -> None:
    root = write_binary_layout(tmp_path / "b")
    labels = np.zeros(10_000, np.uint8)  # a full-size test batch, all airplanes
    records = np.zeros((10_000, cifar10.RECORD), np.uint8)
    records[:, 0] = labels
    records.tofile(root / cifar10.BIN_DIR / "test_batch.bin")
    with pytest.raises(DataError, match="class counts"):
        load_cifar10(root, verify=False, download=False)


def test_missing_data_without_download_says_where_it_looked(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        load_cifar10(tmp_path / "nothing", download=False)
    assert str(tmp_path / "nothing") in str(err.value) and "data_dir=" in str(err.value)


def test_resolution_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_data_dir() == Path("data")
    monkeypatch.setenv("CIFARBENCH_DATA", str(tmp_path / "env"))
    assert resolve_data_dir() == tmp_path / "env"
    assert resolve_data_dir(tmp_path / "flag") == tmp_path / "flag"


def test_archive_is_verified_and_extracted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = write_python_layout(tmp_path / "src")
    root = tmp_path / "root"
    root.mkdir()
    archive = make_archive(source, root / cifar10.ARCHIVE)
    with pytest.raises(DataError, match="md5"):
        load_cifar10(root, download=False)  # its md5 is not the official archive's
    assert not (root / cifar10.PY_DIR).exists()
    monkeypatch.setattr(cifar10, "ARCHIVE_MD5", md5_of(archive))
    ds = load_cifar10(root, verify=False, download=False)
    assert len(ds.train) == 5 * N_PER_BATCH and (root / cifar10.PY_DIR / "test_batch").is_file()


def test_second_load_comes_from_cache_and_notices_changes(tiny_py: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    decoded: list[object] = []
    decode = cifar10._decode

    def counting_decode(*args: object) -> object:
        decoded.append(args)
        return decode(*args)

    monkeypatch.setattr(cifar10, "_decode", counting_decode)
    first = load_cifar10(tiny_py, verify=False, download=False)
    cached = list((tmp_path / "cache").glob("cifar10-*.npz"))
    assert len(cached) == 1 and len(decoded) == 1
    second = load_cifar10(tiny_py, verify=False, download=False)
    assert len(decoded) == 1  # served from the cache: the batch files were not parsed again
    assert second.sha256 == first.sha256
    assert all(np.array_equal(a, b) for a, b in ((first.train.images, second.train.images),
                                                 (first.test.labels, second.test.labels)))
    write_python_layout(tmp_path / "other", seed=9)
    batch = tiny_py / cifar10.PY_DIR / "test_batch"
    batch.write_bytes((tmp_path / "other" / cifar10.PY_DIR / "test_batch").read_bytes())
    third = load_cifar10(tiny_py, verify=False, download=False)
    assert third.sha256 != first.sha256 and len(decoded) == 2  # a changed file is a cache miss, never stale data
