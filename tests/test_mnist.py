"""MNIST / Fashion-MNIST: IDX parsing (gz and raw), verification, validation, download, training on 1 channel."""

from __future__ import annotations

import gzip
import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest

from cifarbench.cli import main
from cifarbench.config import DataConfig
from cifarbench.data import load_dataset, mnist
from cifarbench.errors import DataError

N_TRAIN, N_TEST = 30, 10


def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    """An IDX file of unsigned bytes: magic (0x08, ndim), big-endian dims, data."""
    magic = (0x0800 | array.ndim) if magic is None else magic
    dims = b"".join(struct.pack(">I", d) for d in array.shape)
    return struct.pack(">I", magic) + dims + array.astype(np.uint8).tobytes()


def write_idx_set(folder: Path, *, gz: bool = True, seed: int = 0, n_train: int = N_TRAIN,
                  n_test: int = N_TEST) -> Path:
    """Four IDX files where digit k has a bright row band at 2k..2k+2, so a model can learn them."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for images_name, labels_name, n in ((mnist.TRAIN_IMAGES, mnist.TRAIN_LABELS, n_train),
                                        (mnist.TEST_IMAGES, mnist.TEST_LABELS, n_test)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 80, size=(n, 28, 28))
        for i, k in enumerate(labels):
            images[i, 2 * k:2 * k + 3] += 170
        for name, array in ((images_name, images), (labels_name, labels)):
            payload = idx_bytes(array)
            if gz:
                (folder / f"{name}.gz").write_bytes(gzip.compress(payload, mtime=0))
            else:
                (folder / name).write_bytes(payload)
    return folder


def official(monkeypatch: pytest.MonkeyPatch, folder: Path, spec: mnist.IdxDataset = mnist.MNIST) -> None:
    """Point the data set's official md5 table at the files in `folder`."""
    table = {name: hashlib.md5((folder / f"{name}.gz").read_bytes()).hexdigest() for name in mnist.FILES}
    patched = mnist.IdxDataset(**{**spec.__dict__, "md5": table})
    monkeypatch.setitem(mnist.SPECS, spec.name, patched)


def load(root: Path, name: str = "mnist", verify: bool = False):
    return load_dataset(DataConfig(dataset=name, data_dir=str(root), verify=verify, download=False))


@pytest.mark.parametrize("gz", [True, False])
def test_idx_files_load_as_one_channel_images(tmp_path: Path, gz: bool) -> None:
    write_idx_set(tmp_path / "mnist", gz=gz)
    ds = load(tmp_path)
    assert ds.name == "mnist" and ds.image_shape == (1, 28, 28) and ds.train.images.dtype == np.uint8
    assert (len(ds.train), len(ds.test)) == (N_TRAIN, N_TEST) and ds.test.labels.tolist() == list(range(10))
    assert ds.verified is False and ds.layout == ("idx-gz" if gz else "idx") and len(ds.sha256) == 64
    assert ds.train.images[3, 0, 6:9].min() >= 170  # digit 3's band: rows 6..8, pixels in the right place


def test_gz_and_raw_copies_have_the_same_fingerprint(tmp_path: Path) -> None:
    write_idx_set(tmp_path / "a" / "mnist", gz=True)
    write_idx_set(tmp_path / "b" / "MNIST" / "raw", gz=False)  # torchvision's layout
    assert load(tmp_path / "a").sha256 == load(tmp_path / "b").sha256


def test_official_md5s_verify_and_a_changed_file_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = write_idx_set(tmp_path / "mnist")
    official(monkeypatch, folder)
    assert load(tmp_path, verify=True).verified is True
    changed = folder / f"{mnist.TEST_LABELS}.gz"
    changed.write_bytes(gzip.compress(idx_bytes(np.arange(N_TEST)[::-1] % 10), mtime=0))
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte.gz: md5 .* does not match the official .*verify=Fa"):
        load(tmp_path, verify=True)
    assert load(tmp_path, verify=False).verified is False


def test_raw_files_cannot_be_verified(tmp_path: Path) -> None:
    write_idx_set(tmp_path / "mnist", gz=False)
    with pytest.raises(DataError, match="uncompressed file cannot be verified"):
        load(tmp_path, verify=True)


def test_the_other_data_sets_files_are_recognised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = write_idx_set(tmp_path / "fashion-mnist")
    official(monkeypatch, folder, mnist.MNIST)  # these files are "MNIST's" ...
    with pytest.raises(DataError, match="is the official MNIST file, not Fashion-MNIST's"):  # ... asked as Fashion
        load(tmp_path, "fashion-mnist", verify=False)


def corrupt(folder: Path, name: str, payload: bytes, gz: bool = True) -> None:
    target = folder / (f"{name}.gz" if gz else name)
    target.write_bytes(gzip.compress(payload, mtime=0) if gz else payload)


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("case, match", [
    ("magic", r"magic number 0x00000902 is not an IDX file"),
    ("dims", r"images are 32×32, expected 28×28"),
    ("short", r"truncated \(the header promises"),
    ("trailing", r"trailing bytes"),
    ("labels", r"label 12 is out of range 0-9"),
    ("count", r"9 labels for the 10 images"),
    ("swapped", r"holds labels, not images"),
])
def test_malformed_idx_files_are_refused_with_the_file_named(tmp_path: Path, gz: bool, case: str, match: str) -> None:
    folder = write_idx_set(tmp_path / "mnist", gz=gz)
    images = np.zeros((N_TEST, 28, 28))
    payload = {
        "magic": idx_bytes(images, magic=0x0902),
        "dims": idx_bytes(np.zeros((N_TEST, 32, 32))),
        "short": idx_bytes(images)[:-100],
        "trailing": idx_bytes(images) + b"\0",
        "labels": idx_bytes(np.full(N_TEST, 12)),
        "count": idx_bytes(np.zeros(N_TEST - 1)),
        "swapped": idx_bytes(np.zeros(N_TEST)),
    }[case]
    name = mnist.TEST_LABELS if case in ("labels", "count") else mnist.TEST_IMAGES
    corrupt(folder, name, payload, gz)
    with pytest.raises(DataError, match=match) as err:
        load(tmp_path)
    assert "t10k-" in str(err.value) and "\n" not in str(err.value)


def test_truncated_gzip_is_refused(tmp_path: Path) -> None:
    folder = write_idx_set(tmp_path / "mnist")
    path = folder / f"{mnist.TRAIN_IMAGES}.gz"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.gz: not a readable gzip file \(truncated\)"):
        load(tmp_path)


def test_a_header_claiming_billions_of_images_is_refused_before_reading(tmp_path: Path) -> None:
    folder = write_idx_set(tmp_path / "mnist", gz=False)
    (folder / mnist.TRAIN_IMAGES).write_bytes(struct.pack(">IIII", 0x803, 2**31, 28, 28))
    with pytest.raises(DataError, match="claims 2147483648 examples"):
        load(tmp_path)


def test_missing_data_without_download_names_the_places_looked(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"Fashion-MNIST not found in .*fashion-mnist/, FashionMNIST/raw/"):
        load(tmp_path, "fashion-mnist")


def test_download_fetches_the_four_official_files_over_https(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = write_idx_set(tmp_path / "source")
    calls = []

    def fake_download(url: str, dest: Path, md5: str, **kwargs) -> Path:
        calls.append((url, md5))
        payload = (source / url.rsplit("/", 1)[1]).read_bytes()
        Path(dest).parent.mkdir(parents=True, exist_ok=True)
        Path(dest).write_bytes(payload)
        return Path(dest)

    monkeypatch.setattr("cifarbench.data.download.download", fake_download)
    ds = load_dataset(DataConfig(dataset="fashion-mnist", data_dir=str(tmp_path / "data"), verify=False))
    assert ds.name == "fashion-mnist" and ds.classes[0] == "T-shirt/top"
    assert [u for u, _ in calls] == [mnist.FASHION_MNIST.mirror + f + ".gz" for f in mnist.FILES]
    assert all(u.startswith("https://") for u, _ in calls) and calls[0][1] == "8d4fb7e6c68d591d4c3dfef9ec88bf0d"
    written = sorted(p.name for p in (tmp_path / "data" / "fashion-mnist").iterdir())
    assert written == sorted(f + ".gz" for f in mnist.FILES)


def test_train_on_mnist_with_the_notebook_recipe(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_idx_set(tmp_path / "data" / "mnist")
    assert main(["train", "cnn", "--dataset", "mnist", "--data-dir", str(tmp_path / "data"), "--no-verify",
                 "--epochs", "1", "--batch-size", "10", "--device", "cpu", "--runs-dir", str(tmp_path / "runs"),
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["dataset"]["name"] == "mnist"
    assert out["params"] == 1600 * 128 + 128 * 10 + 32 * 9 + 32 + 64 * 288 + 64 + 128 + 10
    # The recipe's 0.5/0.5 over three channels became one channel's, and that is what the run recorded.
    assert out["config"]["data"]["mean"] == [0.5] and out["config"]["data"]["std"] == [0.5]
    assert main(["eval", out["run_id"], "--runs-dir", str(tmp_path / "runs"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["test_accuracy"] == out["test_accuracy"]
