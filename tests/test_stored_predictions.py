"""Each run keeps its final evaluation's per-image predictions, and the paired statistics of `compare`, `runs
compare` and the report reuse exactly those: nothing is evaluated again, and what they pair on is what the
reported accuracy was computed from."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from cifarbench.cli import main
from cifarbench.errors import CifarbenchError
from cifarbench.runs.folders import PREDICTIONS
from cifarbench.runs.predictions import read_predictions, write_predictions
from conftest import write_python_layout


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """fnn and cnn, 1 seed each, 1 epoch on the tiny data, trained by `train` (not `compare`)."""
    root = tmp_path_factory.mktemp("stored")
    data = write_python_layout(root / "data")
    runs = str(root / "runs")
    ids = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CIFARBENCH_CACHE", str(root / "cache"))
        mp.delenv("CIFARBENCH_DATA", raising=False)
        for model in ("fnn", "cnn"):
            out = io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
                assert main(["train", model, "--recipe", "seed", "--epochs", "1", "--batch-size", "20", "--tta", "1",
                             "--data-dir", str(data), "--no-verify", "--device", "cpu", "--runs-dir", runs,
                             "--json"]) == 0
            ids.append(json.loads(out.getvalue())["run_id"])
    return {"root": root, "data": str(data), "runs": runs, "ids": ids}


def _json(capsys: pytest.CaptureFixture, *argv: str) -> dict:
    capsys.readouterr()
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture
def no_evaluation(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any evaluation of a stored run's checkpoint on the test set fails the test."""
    from cifarbench.inference import TrainedModel

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a stored run was evaluated again")

    monkeypatch.setattr(TrainedModel, "evaluate_split", refuse)


@pytest.mark.slow
def test_stored_predictions_are_the_ones_behind_the_reported_accuracy(trained: dict) -> None:
    from cifarbench.config import DataConfig
    from cifarbench.data import load_dataset

    test = load_dataset(DataConfig(data_dir=trained["data"], verify=False), progress=False).test
    for run_id in trained["ids"]:
        folder = Path(trained["runs"]) / run_id
        record = json.loads((folder / "metrics.json").read_text())
        stored = read_predictions(folder, images=len(test.labels))
        assert stored is not None and (stored.tta, stored.dataset_sha256) == (1, record["dataset"]["sha256"])
        assert np.array_equal(stored.correct, stored.predicted == test.labels)
        assert stored.accuracy == record["test_accuracy"]  # the same predictions, counted the same way
        confusion = np.zeros((10, 10), dtype=int)
        np.add.at(confusion, (test.labels, stored.predicted), 1)
        assert confusion.tolist() == record["confusion"]


@pytest.mark.slow
def test_paired_tests_evaluate_nothing_again(trained: dict, tmp_path: Path, no_evaluation: None,
                                             capsys: pytest.CaptureFixture) -> None:
    """`runs compare --mcnemar`, `report` and a `compare` that reuses the trained runs all get McNemar's test from
    the stored predictions while any evaluation of a checkpoint would fail."""
    where = ["--runs-dir", trained["runs"], "--data-dir", trained["data"], "--no-verify", "--device", "cpu"]
    compared = _json(capsys, "runs", "compare", *trained["ids"], "--mcnemar", *where)
    (pair,) = compared["pairs"]
    assert set(pair["mcnemar"]) == {"0"}
    assert not any("evaluated" in w for w in compared["warnings"])

    reported = _json(capsys, "report", *trained["ids"], "--out", str(tmp_path / "r.html"), *where)
    assert reported["pairs"][0]["mcnemar"] == pair["mcnemar"] and (tmp_path / "r.html").is_file()

    again = _json(capsys, "compare", "fnn", "cnn", "--recipe", "seed", "--epochs", "1", "--batch-size", "20",
                  "--tta", "1", "--plot", str(tmp_path / "c.png"), *where)
    assert sorted(i for r in again["results"] for i in r["run_ids"]) == sorted(trained["ids"])  # reused
    assert again["pairs"][0]["mcnemar"] == pair["mcnemar"]


@pytest.mark.slow
def test_an_old_run_without_predictions_is_evaluated_with_its_own_settings(trained: dict, tmp_path: Path,
                                                                            capsys: pytest.CaptureFixture) -> None:
    runs = tmp_path / "runs"
    shutil.copytree(trained["runs"], runs)
    kept = read_predictions(runs / trained["ids"][0])
    (runs / trained["ids"][0] / PREDICTIONS).unlink()
    (runs / trained["ids"][1] / PREDICTIONS).write_bytes(b"damaged")  # said, and evaluated too
    where = ["--runs-dir", str(runs), "--data-dir", trained["data"], "--no-verify", "--device", "cpu"]
    compared = _json(capsys, "runs", "compare", *trained["ids"], "--mcnemar", *where)
    notes = [w for w in compared["warnings"] if "no usable stored predictions" in w]
    assert len(notes) == 2 and trained["ids"][0] in notes[0] and "TTA level 1" in notes[0]
    assert any("not a loadable stored predictions file" in w for w in compared["warnings"])
    reference = _json(capsys, "runs", "compare", *trained["ids"], "--mcnemar", "--runs-dir", trained["runs"])
    assert compared["pairs"][0]["mcnemar"] == reference["pairs"][0]["mcnemar"]  # the same predictions again
    from cifarbench.runs.catalog import stored_runs
    from cifarbench.scoring import score_runs

    scores = score_runs(stored_runs(trained["ids"], runs_dir=runs), runs_dir=runs, device="cpu",
                        data_dir=trained["data"], verify=False)
    again = scores.runs[trained["ids"][0]]
    assert not again.stored and np.array_equal(again.predicted, kept.predicted)  # the run's own TTA: same answers


def test_predictions_file_round_trips_and_malformed_ones_are_refused(tmp_path: Path) -> None:
    labels = np.array([0, 1, 2, 3, 9])
    write_predictions(tmp_path, np.array([0, 1, 5, 3, 9]), labels, np.full(5, 0.5), dataset_sha256="ab" * 32,
                      tta=2, tta_threshold=0.9, classes=10)
    stored = read_predictions(tmp_path, images=5)
    assert stored is not None and stored.correct.tolist() == [True, True, False, True, True]
    assert (stored.tta, stored.tta_threshold, stored.dataset_sha256) == (2, 0.9, "ab" * 32)
    assert stored.rescored(np.array([0, 1, 5, 0, 0])).correct.tolist() == [True, True, True, False, False]
    with pytest.raises(CifarbenchError, match="predictions for 5 images, the test set has 6"):
        read_predictions(tmp_path, images=6)
    assert read_predictions(tmp_path / "none") is None

    def write(**arrays: object) -> Path:
        folder = tmp_path / str(len(list(tmp_path.iterdir())))
        folder.mkdir()
        base = {"predicted": np.array([0, 1]), "correct": np.array([True, False]),
                "confidence": np.array([0.5, 0.5], dtype=np.float32), "dataset_sha256": np.array("x"),
                "tta": np.array(0), "tta_threshold": np.array(0.0), "classes": np.array(10)}
        with open(folder / PREDICTIONS, "wb") as f:
            np.savez(f, **{**base, **arrays})
        return folder

    with pytest.raises(CifarbenchError, match="outside 0..9"):
        read_predictions(write(predicted=np.array([0, 10])))
    with pytest.raises(CifarbenchError, match="not a usable"):  # an object array would need pickle
        read_predictions(write(predicted=np.array([object(), 1], dtype=object)))
    with pytest.raises(CifarbenchError, match="one integer class"):
        read_predictions(write(correct=np.array([1, 0])))
    with pytest.raises(CifarbenchError, match="holds"):
        read_predictions(write(extra=np.array(1)))
    # A header that declares a trillion classes over 16 bytes: refused before numpy allocates 8 TB for it.
    import io
    import zipfile

    huge = write()
    with zipfile.ZipFile(huge / PREDICTIONS) as z:
        members = {n: z.read(n) for n in z.namelist()}
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<i8", "fortran_order": False, "shape": (10**12,)})
    members["predicted.npy"] = header.getvalue() + bytes(16)  # the header starts with the .npy magic
    with zipfile.ZipFile(huge / PREDICTIONS, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    with pytest.raises(CifarbenchError, match="predicted declares more data than it holds"):
        read_predictions(huge)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / PREDICTIONS).write_bytes(b"not a zip")
    with pytest.raises(CifarbenchError, match="not a"):
        read_predictions(tmp_path / "junk")


@pytest.mark.slow
def test_a_foreign_runs_predictions_for_another_test_set_are_not_used(trained: dict, tmp_path: Path) -> None:
    """Predictions from elsewhere that do not match the local test set's fingerprint: evaluated here instead."""
    from cifarbench.runs.catalog import stored_runs
    from cifarbench.scoring import score_runs

    runs = tmp_path / "runs"
    shutil.copytree(trained["runs"], runs)
    run_id = trained["ids"][0]
    record = stored_runs([run_id], runs_dir=runs)[0]
    record.origin = "elsewhere.tar.gz"
    stored = read_predictions(runs / run_id)
    write_predictions(runs / run_id, 9 - stored.predicted, np.zeros_like(stored.predicted), stored.confidence,
                      dataset_sha256="0" * 64, tta=stored.tta, tta_threshold=0.0, classes=10)
    scores = score_runs([record], runs_dir=runs, device="cpu", data_dir=trained["data"], verify=False)
    assert not scores.runs[run_id].stored and np.array_equal(scores.runs[run_id].predicted, stored.predicted)


@pytest.mark.slow
def test_imported_runs_are_evaluated_here_whatever_predictions_they_bring(trained: dict, tmp_path: Path) -> None:
    """Exported and imported elsewhere, a run's predictions travel with it, but they are its sender's word: there
    the runs are evaluated from their checkpoints, so predictions forged with the right fingerprint change no
    paired test."""
    from cifarbench.comparing import compare_runs
    from cifarbench.runs.bundle import export_runs, import_runs
    from cifarbench.runs.catalog import stored_runs
    from cifarbench.scoring import score_runs

    archive = export_runs(trained["ids"], tmp_path / "runs.tar.gz", runs_dir=trained["runs"])
    elsewhere = tmp_path / "elsewhere"
    import_runs(archive, runs_dir=elsewhere)
    runs = stored_runs(trained["ids"], runs_dir=elsewhere)
    assert all(r.origin is not None and (Path(r.run_dir) / PREDICTIONS).is_file() for r in runs)
    honest = read_predictions(Path(runs[0].run_dir))
    labels = np.where(honest.correct, honest.predicted, -1)
    write_predictions(Path(runs[0].run_dir), (honest.predicted + 1) % 10, labels, honest.confidence,
                      dataset_sha256=honest.dataset_sha256, tta=honest.tta, tta_threshold=honest.tta_threshold,
                      classes=honest.classes)  # every prediction wrong, the fingerprint right
    scores = score_runs(runs, runs_dir=elsewhere, device="cpu", data_dir=trained["data"], verify=False)
    assert not any(s.stored for s in scores.runs.values())
    assert np.array_equal(scores.runs[runs[0].run_id].predicted, honest.predicted)
    here = compare_runs(trained["ids"], runs_dir=elsewhere, mcnemar=True, data_dir=trained["data"], verify=False,
                        device="cpu")
    there = compare_runs(trained["ids"], runs_dir=trained["runs"], mcnemar=True, device="cpu")
    assert [p.to_dict() for p in here.pairs] == [p.to_dict() for p in there.pairs] and here.pairs[0].mcnemar


@pytest.mark.distributed
@pytest.mark.slow
def test_two_ranks_store_the_whole_test_sets_predictions_in_order(tmp_path: Path) -> None:
    """Under torchrun each rank evaluates its contiguous share; the stored predictions are gathered in test-set
    order: the same as the checkpoint's in one process, and their accuracy is the reported one."""
    import os
    import subprocess
    import sys

    from cifarbench.inference import load_trained_model

    data = write_python_layout(tmp_path / "data", n=41)  # odd: the ranks' shares differ in size
    runs = tmp_path / "runs"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "cifarbench",
           "train", "fnn", "--data-dir", str(data), "--no-verify", "--epochs", "1", "--batch-size", "20",
           "--device", "cpu", "--json", "--runs-dir", str(runs)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    stored = read_predictions(runs / out["run_id"])
    loaded = load_trained_model(out["run_id"], runs_dir=runs, device="cpu")
    test = loaded.test_dataset(data_dir=str(data), verify=False, progress=False).test
    single = loaded.evaluate_split(test, keep_predictions=True)
    assert stored is not None and len(stored.predicted) == len(test.labels)
    assert np.array_equal(stored.predicted, single.predictions) and stored.accuracy == out["test_accuracy"]
