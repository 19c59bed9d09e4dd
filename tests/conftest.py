"""Fixtures: tiny CIFAR-format data sets written in the official layouts, and an isolated environment."""

from __future__ import annotations

import hashlib
import multiprocessing.util
import os
import pickle
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from cifarbench.data import cifar10

N_PER_BATCH = 20  # 2 of each class per batch: small enough to train in milliseconds


def make_batch(rng: np.random.Generator, n: int = N_PER_BATCH) -> tuple[np.ndarray, np.ndarray]:
    """Noisy images in which class k has a bright band at rows 3k..3k+2, so a model can learn them."""
    labels = np.arange(n) % 10
    rng.shuffle(labels)
    images = rng.integers(60, 140, size=(n, 3, 32, 32))
    for i, k in enumerate(labels):
        images[i, :, 3 * k:3 * k + 3, :] += 110
    return images.astype(np.uint8).reshape(n, 3072), labels


def write_python_layout(root: Path, *, key_type: type = bytes, seed: int = 0, n: int = N_PER_BATCH) -> Path:
    """cifar-10-batches-py/ with py2-style bytes keys (like the official files) or str keys."""
    folder = root / cifar10.PY_DIR
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    k = (lambda s: s.encode()) if key_type is bytes else (lambda s: s)
    for name in (*cifar10.TRAIN_BATCHES, cifar10.TEST_BATCH):
        data, labels = make_batch(rng, n)
        batch = {k("batch_label"): k(name), k("labels"): labels.tolist(), k("data"): data,
                 k("filenames"): [k(f"{name}_{i}.png") for i in range(n)]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2 if key_type is bytes else 4))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": list(cifar10.CLASSES)}, protocol=2))
    return root


def write_binary_layout(root: Path, *, seed: int = 0, n: int = N_PER_BATCH) -> Path:
    folder = root / cifar10.BIN_DIR
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for name in (*cifar10.TRAIN_BATCHES, cifar10.TEST_BATCH):
        data, labels = make_batch(rng, n)
        np.concatenate([labels[:, None].astype(np.uint8), data], axis=1).tofile(folder / f"{name}.bin")
    (folder / "batches.meta.txt").write_text("".join(c + "\n" for c in cifar10.CLASSES))
    return root


def checkpoint_payload(**fields: object) -> dict:
    """The smallest payload `load_checkpoint` accepts (what evaluation reads), updated with `fields`."""
    import torch

    return {"run_id": "r1", "model": "fnn", "classes": list(cifar10.CLASSES), "in_shape": [3, 32, 32],
            "config": {}, "dataset": {"sha256": "0" * 64}, "state_dict": {"w": torch.ones(3)}, **fields}


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def make_archive(data_root: Path, archive: Path) -> Path:
    """A cifar-10-python.tar.gz laid out like the official one, from a python-layout folder."""
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(data_root / cifar10.PY_DIR, arcname=cifar10.PY_DIR)
    return archive


def pytest_configure(config: pytest.Config) -> None:
    """The settings the entry points apply, before any test does work (MKL reads them at its first call)."""
    from cifarbench import runtime

    runtime.configure()
    # A run's provenance asks git and uname, and the allocator's tuning ldconfig, once per process: done here,
    # before the watch, so the first test that trains is not counted as starting processes.
    from cifarbench.device import keep_cpu_memory
    from cifarbench.provenance import environment

    environment()
    keep_cpu_memory()
    _watch_processes()


# --- the `slow` marker checks itself ------------------------------------------------------------------------------
# A test that starts a process (a CLI subprocess, a worker pool, a kernel, torchrun) is slow whatever its machine:
# unmarked, it fails, so `make test-fast` stays the quick tier it says it is. Counted, not timed (CI is shared).
TIERS = ("slow", "distributed")
STARTED: list[str] = []


def _watch_processes() -> None:
    def audit(event: str, args: tuple) -> None:
        if event in ("subprocess.Popen", "os.posix_spawn", "os.fork", "os.exec"):
            STARTED.append(event)
    sys.addaudithook(audit)
    spawn = multiprocessing.util.spawnv_passfds  # multiprocessing's spawn/forkserver raise no audit event

    def spawnv_passfds(*args, **kwargs):
        STARTED.append("multiprocessing spawn")
        return spawn(*args, **kwargs)
    multiprocessing.util.spawnv_passfds = spawnv_passfds


@pytest.fixture(autouse=True)
def _processes_only_in_slow_tests(request: pytest.FixtureRequest):
    STARTED.clear()
    yield
    if STARTED and not any(request.node.get_closest_marker(m) for m in TIERS):
        started, _ = sorted(set(STARTED)), STARTED.clear()
        pytest.fail(f"{request.node.nodeid} starts processes ({', '.join(started)}) but is not marked slow",
                    pytrace=False)


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    """The unmarked tests that took longer than a fast test should: candidates for `slow` (a list, never a
    failure: the machine may be shared)."""
    quick = [r for r in terminalreporter.stats.get("passed", []) if r.when == "call" and r.duration > 2.0
             and not any(m in r.keywords for m in TIERS)]
    if quick and os.environ.get("CI"):
        terminalreporter.write_sep("-", "unmarked tests over 2 s (consider `slow`)")
        for r in sorted(quick, key=lambda r: -r.duration)[:15]:
            terminalreporter.write_line(f"{r.duration:6.1f} s  {r.nodeid}")


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test gets its own cache and run store, and never sees the developer's data folder."""
    monkeypatch.setenv("CIFARBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CIFARBENCH_HOME", str(tmp_path / "runs"))
    monkeypatch.delenv("CIFARBENCH_DATA", raising=False)


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    """The real CIFAR-10 copy named by $CIFARBENCH_DATA (read before `isolated` hides it)."""
    import os

    value = os.environ.get("CIFARBENCH_DATA")
    if not value:
        pytest.skip("CIFARBENCH_DATA is not set: real-data tests are skipped")
    return Path(value)


@pytest.fixture
def tiny_py(tmp_path: Path) -> Path:
    return write_python_layout(tmp_path / "tiny-py")


@pytest.fixture
def tiny_bin(tmp_path: Path) -> Path:
    return write_binary_layout(tmp_path / "tiny-bin")


@pytest.fixture
def official_tiny(tiny_py: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The tiny python layout, with the 'official' md5 table pointed at its files."""
    folder = tiny_py / cifar10.PY_DIR
    table = {name: md5_of(folder / name) for name in (*cifar10.TRAIN_BATCHES, cifar10.TEST_BATCH, "batches.meta")}
    monkeypatch.setattr(cifar10, "OFFICIAL_MD5", table)
    return tiny_py
