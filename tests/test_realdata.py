"""On the real CIFAR-10 copy named by $CIFARBENCH_DATA (skipped without it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cifarbench.data.cifar10 import load_cifar10
from cifarbench.running import train_run
from cifarbench.training.recipes import make_config

pytestmark = pytest.mark.realdata


def test_real_copy_loads_with_official_structure(real_data_dir: Path) -> None:
    ds = load_cifar10(real_data_dir, verify=False, download=False)
    assert ds.train.images.shape == (50_000, 3, 32, 32) and ds.test.images.shape == (10_000, 3, 32, 32)
    assert ds.train.class_counts(10) == [5000] * 10 and ds.test.class_counts(10) == [1000] * 10


def test_one_epoch_of_fnn_beats_35_percent(real_data_dir: Path, tmp_path: Path) -> None:
    config = make_config("fnn", "seed", epochs=1, data_dir=str(real_data_dir), verify=False, download=False,
                         device="cpu")
    result = train_run(config, runs_dir=tmp_path, progress=False).to_dict()
    assert result["test_accuracy"] > 0.35
    assert result["dataset"]["train_size"] == 50_000 and len(result["history"]) == 1
