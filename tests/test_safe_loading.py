"""The restricted unpickler and checkpoint loading refuse anything that could run code."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from cifarbench.data.safe_pickle import safe_load_pickle
from cifarbench.errors import CifarbenchError, DataError
from cifarbench.training.checkpoint import load_checkpoint, save_checkpoint
from conftest import checkpoint_payload


class _Call:
    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_numpy_arrays_load_under_every_protocol(protocol: int) -> None:
    arr = np.arange(12, dtype=np.uint8).reshape(3, 4)
    out = safe_load_pickle(pickle.dumps({b"data": arr, "labels": [1, 2, 3]}, protocol=protocol), "x")
    assert np.array_equal(out[b"data"], arr) and out["labels"] == [1, 2, 3]


@pytest.mark.parametrize("fn", [os.system, eval])
def test_pickle_naming_a_callable_is_refused(tmp_path: Path, fn) -> None:
    marker = tmp_path / "marker"
    arg = f"touch {marker}" if fn is os.system else f"open({str(marker)!r}, 'w')"
    with pytest.raises(DataError, match="not allowed"):
        safe_load_pickle(pickle.dumps({"data": _Call(fn, arg)}), "evil_batch")
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, 5])
def test_object_arrays_are_refused(protocol: int) -> None:
    with pytest.raises(DataError, match="object arrays"):
        safe_load_pickle(pickle.dumps(np.array([1, "a"], dtype=object), protocol=protocol), "obj")


def test_non_latin1_codec_is_refused() -> None:
    import codecs
    with pytest.raises(DataError, match="codec"):
        safe_load_pickle(pickle.dumps(_Call(codecs.encode, "x", "rot13"), protocol=2), "codec")


def test_checkpoint_round_trip_and_atomic_write(tmp_path: Path) -> None:
    path = tmp_path / "ck.pt"
    save_checkpoint(checkpoint_payload(epoch=2), path)
    assert load_checkpoint(path)["epoch"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]  # no temp file left behind


def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path: Path) -> None:
    path = tmp_path / "ck.pt"
    save_checkpoint(checkpoint_payload(epoch=1), path)

    class Unsaveable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle this")

    with pytest.raises(RuntimeError):
        save_checkpoint(checkpoint_payload(epoch=2, bad=Unsaveable()), path)
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]


def test_checkpoint_that_would_run_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    torch.save({"format": "cifarbench-checkpoint-v1", "x": _Call(os.system, f"touch {marker}")}, path)
    with pytest.raises(CifarbenchError, match="not a loadable cifarbench checkpoint"):
        load_checkpoint(path)
    assert not marker.exists()


def test_truncated_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "ck.pt"
    save_checkpoint(checkpoint_payload(state_dict={"w": torch.ones(1000)}), path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CifarbenchError, match="ck.pt"):
        load_checkpoint(path)
