"""The exercise: a model the student wrote, from a file or from Python, trained, evaluated, compared and shared;
its code travels with the run, and code from elsewhere runs only with consent."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cifarbench as cb
from cifarbench.cli import main
from cifarbench.errors import CifarbenchError

NOTEBOOK_MODELS = Path(__file__).resolve().parents[1] / "examples" / "notebook_models.py"

MY_CNN = '''
import torch
from torch import nn


class MyCNN(nn.Module):
    """No arguments, and `.view` on a feature map, as the notebook's CNN."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8 * 15 * 15, 10)

    def forward(self, x):
        x = torch.max_pool2d(torch.relu(self.conv(x)), 2)
        return self.fc(x.view(x.size(0), -1))


def make_wide(num_classes: int = 10, in_shape=(3, 32, 32), width: int = 16):
    """A factory that takes the classes, the input shape and an argument of its own."""
    return nn.Sequential(nn.Flatten(), nn.Linear(in_shape[0] * in_shape[1] * in_shape[2], width), nn.ReLU(),
                         nn.Linear(width, num_classes))
'''


def cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out = capsys.readouterr()
    return status, out.out, out.err


def train_args(data: Path, runs: Path, *extra: str) -> list[str]:
    return ["--data-dir", str(data), "--no-verify", "--no-download", "--device", "cpu", "--runs-dir", str(runs),
            "--epochs", "2", "--batch-size", "20", *extra]


@pytest.fixture
def student(tmp_path: Path) -> Path:
    path = tmp_path / "work" / "mycnn.py"
    path.parent.mkdir()
    path.write_text(MY_CNN)
    return path


def stored_ids(runs: Path) -> list[str]:
    if not (runs / "cifarbench.db").exists():
        return []
    db = sqlite3.connect(runs / "cifarbench.db")
    try:
        return [r[0] for r in db.execute("SELECT id FROM runs")]
    finally:
        db.close()


def test_a_file_model_trains_and_its_stored_copy_is_what_runs_after_the_file_changes(
        student: Path, tiny_py: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    runs = tmp_path / "runs"
    status, out, err = cli(capsys, "train", f"{student}:MyCNN", *train_args(tiny_py, runs), "--json")
    assert status == 0, err
    run = json.loads(out)
    folder = Path(run["run_dir"])
    assert (folder / "model.py").read_text() == MY_CNN
    sha = run["config"]["model_sha256"]
    assert len(sha) == 64 and run["config"]["model"] == f"{student}:MyCNN"
    # `.view` on a channels-last feature map fails: the run falls back to the standard layout, says so, records it.
    assert run["config"]["channels_last"] is False and "channels-last" in err
    trained_params = run["params"]
    assert trained_params == 8 * 3 * 9 + 8 + 8 * 15 * 15 * 10 + 10

    # Edit the file (a wider conv), then delete it: everything still uses the run's own copy.
    student.write_text(MY_CNN.replace("nn.Conv2d(3, 8, 3)", "nn.Conv2d(3, 16, 3)"))
    status, out, err = cli(capsys, "eval", run["run_id"], "--runs-dir", str(runs), "--json")
    assert status == 0, err
    assert json.loads(out)["test_accuracy"] == run["test_accuracy"]
    student.unlink()
    status, out, err = cli(capsys, "eval", run["run_id"], "--runs-dir", str(runs), "--json")
    assert status == 0, err
    assert json.loads(out)["test_accuracy"] == run["test_accuracy"]
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(image)
    status, out, err = cli(capsys, "predict", run["run_id"], str(image), "--runs-dir", str(runs))
    assert status == 0, err
    status, out, err = cli(capsys, "runs", "compare", run["run_id"], "--runs-dir", str(runs), "--json")
    (row,) = json.loads(out)["results"]
    assert row["params"] == trained_params and row["flops_per_image"] == run["flops_per_image"]
    with sqlite3.connect(runs / "cifarbench.db") as db:
        assert db.execute("SELECT model_sha256 FROM runs").fetchone()[0] == sha


@pytest.mark.slow
def test_the_report_of_an_own_model_is_built_from_the_runs_copy(student: Path, tiny_py: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    runs = tmp_path / "runs"
    status, out, err = cli(capsys, "train", f"{student}:MyCNN", *train_args(tiny_py, runs), "--json")
    run_id = json.loads(out)["run_id"]
    student.unlink()
    status, out, err = cli(capsys, "report", run_id, "--out", str(tmp_path / "r.html"), "--runs-dir", str(runs),
                           "--data-dir", str(tiny_py), "--no-verify")
    assert status == 0, err
    assert "Confusion matrices" in (tmp_path / "r.html").read_text()


@pytest.mark.slow
def test_an_interrupted_own_model_run_resumes_from_its_copy(student: Path, tiny_py: Path, tmp_path: Path) -> None:
    """Killed after its first epoch, the file then deleted: --resume rebuilds the model from the run's model.py."""
    runs = tmp_path / "runs"
    cmd = [sys.executable, "-m", "cifarbench", "train", f"{student}:MyCNN", *train_args(tiny_py, runs)]
    cmd[cmd.index("--epochs") + 1] = "40"
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = 120
        import time
        start = time.monotonic()
        while not list(runs.glob("*/checkpoint.pt")):
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() - start < deadline, "no checkpoint appeared"
            time.sleep(0.02)
    finally:
        proc.kill()
        proc.wait()
    student.unlink()
    (run_id,) = stored_ids(runs)
    done = subprocess.run([sys.executable, "-m", "cifarbench", "train", "--resume", run_id, "--runs-dir", str(runs),
                           "--data-dir", str(tiny_py), "--no-verify", "--json"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    resumed = json.loads(done.stdout)
    assert resumed["run_id"] == run_id and len(resumed["history"]) == 40 and resumed["status"] == "completed"


def test_constructor_arguments_follow_the_signature(student: Path, tiny_py: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    runs = tmp_path / "runs"
    status, out, err = cli(capsys, "train", f"{student}:make_wide", *train_args(tiny_py, runs),
                           "--set", "model_kwargs.width=5", "--json")
    assert status == 0, err
    run = json.loads(out)
    assert run["params"] == 3072 * 5 + 5 + 5 * 10 + 10 and run["config"]["model_kwargs"] == {"width": 5}
    status, _, err = cli(capsys, "train", f"{student}:make_wide", *train_args(tiny_py, runs),
                         "--set", "model_kwargs.depth=3")
    assert status == 1 and "has no argument 'depth'" in err


BAD_MODELS = {
    "missing file": ("nowhere.py:Net", "does not exist"),
    "name not in the file": ("{file}:Nope", "defines no Nope"),
    "not a module": ("{file}:NUMBER", "not an nn.Module"),
    "constructor raises": ("{file}:Broken", "building it raised ValueError: no such layer"),
    "wrong output": ("{file}:Flat", "it must give (batch, 10)"),
    "returns no module": ("{file}:make_nothing", "returned int, not an nn.Module"),
    "syntax error": ("{bad}:Net", "failed to run (SyntaxError"),
}
ERRORS = '''
import torch
from torch import nn
NUMBER = 3

class Broken(nn.Module):
    def __init__(self):
        super().__init__()
        raise ValueError("no such layer")

class Flat(nn.Module):
    def forward(self, x):
        return x.flatten(1)

def make_nothing():
    return 3
'''


@pytest.mark.parametrize("case", sorted(BAD_MODELS))
def test_bad_models_end_in_one_line_and_leave_nothing_behind(case: str, tiny_py: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "models.py").write_text(ERRORS)
    (tmp_path / "bad.py").write_text("def broken(:\n")
    ref, message = BAD_MODELS[case]
    runs = tmp_path / "runs"
    ref = ref.format(file=tmp_path / "models.py", bad=tmp_path / "bad.py")
    status, _, err = cli(capsys, "train", ref, *train_args(tiny_py, runs))
    assert status == 1 and err.count("\n") == 1 and err.startswith("cifarbench: error: ") and message in err, err
    assert "Traceback" not in err
    assert stored_ids(runs) == [] and not any(p.is_dir() for p in runs.glob("*"))


def run_cell(code: str, name: str) -> dict:
    """What a notebook cell does: run code in __main__, its source kept by linecache (as IPython does)."""
    import linecache

    linecache.cache[name] = (len(code), None, code.splitlines(True), name)
    namespace = sys.modules["__main__"].__dict__
    exec(compile(code, name, "exec"), namespace)
    return namespace


def test_a_class_passed_from_python_trains_and_a_redefined_cell_trains_again(tiny_py: Path, tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import types

    monkeypatch.setitem(sys.modules, "__main__", types.ModuleType("__main__"))
    namespace = run_cell(MY_CNN, "<cell 1>")
    first = cb.train(namespace["make_wide"], data_dir=str(tiny_py), verify=False, epochs=1, batch_size=20,
                     runs_dir=tmp_path / "runs", device="cpu", set={"model_kwargs.width": 4})
    assert first.params == 3072 * 4 + 4 + 4 * 10 + 10
    namespace = run_cell(MY_CNN.replace("width: int = 16", "width: int = 6"), "<cell 2>")
    second = cb.train(namespace["make_wide"], data_dir=str(tiny_py), verify=False, epochs=1, batch_size=20,
                      runs_dir=tmp_path / "runs", device="cpu")
    assert second.params == 3072 * 6 + 6 + 6 * 10 + 10
    assert first.config["model_sha256"] != second.config["model_sha256"]
    assert cb.evaluate(first.run_id, runs_dir=tmp_path / "runs").test_accuracy == first.test_accuracy


def test_the_notebooks_own_classes_train_as_written(tiny_py: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    """examples/notebook_models.py holds the notebook's FNNModel and CNNModel verbatim (CNNModel calls .view)."""
    runs = tmp_path / "runs"
    status, out, err = cli(capsys, "compare", f"{NOTEBOOK_MODELS}:FNNModel", f"{NOTEBOOK_MODELS}:CNNModel",
                           "--recipe", "seed", "--data-dir", str(tiny_py), "--no-verify", "--device", "cpu",
                           "--runs-dir", str(runs), "--batch-size", "20", "--json")
    assert status == 0, err
    fnn, cnn = json.loads(out)["results"]
    assert (fnn["params"], cnn["params"]) == (3072 * 128 + 128 + 1290, 896 + 18496 + 2304 * 128 + 128 + 1290)
    with sqlite3.connect(runs / "cifarbench.db") as db:  # the seed recipe: 5 epochs for the FNN, 10 for the CNN
        assert sorted(r[0] for r in db.execute("SELECT epochs FROM runs")) == [5, 10]


def test_adam_and_adamw_train_with_their_recorded_rates(tiny_py: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    for name, decay in (("adam", 0.0), ("adamw", 0.05)):
        status, out, err = cli(capsys, "train", "cnn", *train_args(tiny_py, tmp_path / "runs"), "--optimizer", name,
                               "--json")
        assert status == 0, err
        optimizer = json.loads(out)["config"]["optimizer"]
        assert (optimizer["name"], optimizer["lr"], optimizer["weight_decay"]) == (name, 1e-3, decay)
    status, out, _ = cli(capsys, "train", "cnn", *train_args(tiny_py, tmp_path / "runs"), "--optimizer", "adam",
                         "--lr", "0.003", "--json")
    assert json.loads(out)["config"]["optimizer"]["lr"] == 0.003


MARKER_CODE = '''
from pathlib import Path
Path({marker!r}).write_text("ran")
''' + MY_CNN


def foreign_run(student: Path, tiny_py: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> tuple[Path, Path]:
    """A run folder that arrives from elsewhere, whose model.py (recorded as such) would create a marker."""
    marker = tmp_path / "MARKER"
    student.write_text(MARKER_CODE.format(marker=str(marker)))
    elsewhere = tmp_path / "elsewhere"
    done = subprocess.run([sys.executable, "-m", "cifarbench", "train", f"{student}:MyCNN",
                           *train_args(tiny_py, elsewhere), "--json"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    marker.unlink()  # training there ran it, as its author chose; from here on nothing may
    student.unlink()
    run = json.loads(done.stdout)
    copied = tmp_path / "inbox" / run["run_id"]
    shutil.copytree(Path(run["run_dir"]), copied)
    return copied, marker


@pytest.mark.slow
def test_code_from_elsewhere_runs_only_with_trust_code(student: Path, tiny_py: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    copied, marker = foreign_run(student, tiny_py, tmp_path, capsys)
    mine = tmp_path / "mine"
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(image)
    data = ["--data-dir", str(tiny_py), "--no-verify"]
    for argv in (["eval", str(copied), *data], ["predict", str(copied), str(image)],
                 ["eval", str(copied / "checkpoint.pt"), *data]):
        status, _, err = cli(capsys, *argv, "--runs-dir", str(mine))
        assert status == 1 and "refusing to run" in err and str(copied / "model.py") in err and "--trust-code" in err
        assert not marker.exists()
    status, out, err = cli(capsys, "eval", str(copied), *data, "--runs-dir", str(mine), "--trust-code", "--json")
    assert status == 0, err
    assert marker.exists()  # with consent, the code ran


@pytest.mark.slow
def test_imported_runs_list_compare_and_report_but_run_their_code_only_with_consent(
        student: Path, tiny_py: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    copied, marker = foreign_run(student, tiny_py, tmp_path, capsys)
    elsewhere, archive, mine = tmp_path / "elsewhere", tmp_path / "runs.tar.gz", tmp_path / "mine"
    assert cli(capsys, "train", "fnn", *train_args(tiny_py, elsewhere))[0] == 0
    exported = stored_ids(elsewhere)
    status, _, err = cli(capsys, "runs", "export", *exported, "--out", str(archive), "--runs-dir", str(elsewhere))
    assert status == 0, err
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
    assert {f"{i}/checkpoint.pt" for i in exported} <= names and "manifest.json" in names
    assert cli(capsys, "train", "cnn", *train_args(tiny_py, mine))[0] == 0
    status, out, err = cli(capsys, "runs", "import", str(archive), "--runs-dir", str(mine), "--json")
    assert status == 0, err
    assert sorted(json.loads(out)["imported"]) == sorted(exported)
    every = stored_ids(mine)  # both origins in one store
    assert set(exported) < set(every) and len(every) == 3
    status, out, _ = cli(capsys, "runs", "compare", *every, "--runs-dir", str(mine), "--json")
    assert {r["model"] for r in json.loads(out)["results"]} == {"fnn", "cnn", f"{student}:MyCNN"}
    # Importing again changes nothing; the ids are kept.
    status, out, _ = cli(capsys, "runs", "import", str(archive), "--runs-dir", str(mine), "--json")
    assert json.loads(out)["imported"] == [] and len(json.loads(out)["skipped"]) == 2
    own = next(i for i in exported if "MyCNN" in i)
    report = ["report", *every, "--out", str(tmp_path / "r.html"), "--runs-dir", str(mine), "--data-dir", str(tiny_py),
              "--no-verify"]
    status, _, err = cli(capsys, *report)
    assert status == 1 and "refusing to run" in err and not marker.exists()
    status, _, err = cli(capsys, "train", "--resume", own, "--runs-dir", str(mine))
    assert status == 1 and ("refusing to run" in err or "already finished" in err) and not marker.exists()
    status, _, err = cli(capsys, *report, "--trust-code")
    assert status == 0, err
    assert marker.exists()


def test_a_tampered_archive_is_refused_and_changes_nothing(tiny_py: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    runs, mine = tmp_path / "runs", tmp_path / "mine"
    assert cli(capsys, "train", "fnn", *train_args(tiny_py, runs))[0] == 0
    (run_id,) = stored_ids(runs)
    archive = tmp_path / "a.tar.gz"
    assert cli(capsys, "runs", "export", run_id, "--out", str(archive), "--runs-dir", str(runs))[0] == 0
    evil = tmp_path / "evil.tar.gz"
    with tarfile.open(archive) as src, tarfile.open(evil, "w:gz") as dst:
        for member in src.getmembers():
            data = src.extractfile(member).read()
            if member.name.endswith("config.json"):
                data = data.replace(b"fnn", b"cnn")
            member.size = len(data)
            import io
            dst.addfile(member, io.BytesIO(data))
        link = tarfile.TarInfo(f"{run_id}/model.py")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        dst.addfile(link)
    status, out, err = cli(capsys, "runs", "import", str(evil), "--runs-dir", str(mine), "--json")
    assert status == 1 and "refusing to extract" in err
    assert stored_ids(mine) == [] and not any(p.is_dir() and not p.name.startswith(".") for p in mine.glob("*"))
    assert not list(mine.glob(".import-*"))  # its staging folder is gone too


def test_a_missing_reference_from_python_says_so_in_one_line() -> None:
    with pytest.raises(CifarbenchError, match="is not an nn.Module subclass"):
        cb.run_config(int)
    with pytest.raises(CifarbenchError, match="defined inside a function"):
        class Local(torch.nn.Module):
            pass
        cb.run_config(Local)


def test_every_top_level_name_reaches_the_api_and_no_module_shadows_one() -> None:
    """`cb.NAME` must stay the API's function: a submodule of the same name would replace it once imported."""
    import pkgutil

    import cifarbench
    import cifarbench.api

    names = set(cifarbench.api.__all__)
    assert not {m.name for m in pkgutil.iter_modules(cifarbench.__path__)} & names
    assert all(getattr(cb, name) is getattr(cifarbench.api, name) for name in names)
    assert names <= set(dir(cb))
