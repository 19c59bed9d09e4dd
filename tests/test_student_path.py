"""The student's path from a fresh clone to an improved model (issue #30): the README's commands and flags exist,
options cannot be misread, notebook results display well, and the edges a student meets end in a result or in
one line."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cifarbench as cb
from cifarbench.cli import build_parser, main
from cifarbench.config import TrainConfig
from cifarbench.errors import CifarbenchError
from cifarbench.models import get_model_spec
from cifarbench.running import train_run
from cifarbench.training.recipes import make_config

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _commands(parser=None, prefix: str = "") -> dict[str, object]:
    """Every (sub)command's parser by its words: {"": top, "train": ..., "runs show": ...}."""
    import argparse

    parser = parser or build_parser()
    found = {prefix: parser}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.update(_commands(sub, f"{prefix} {name}".strip()))
    return found


def _flags(parser) -> dict[str, object]:
    return {o: a for a in parser._actions for o in a.option_strings}


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# --- A. Install to first command --------------------------------------------------------------------------

def test_readme_first_screen_says_how_to_get_the_cifarbench_command() -> None:
    first_screen = "\n".join(README.splitlines()[:40])
    assert "make venv && . .venv/bin/activate" in first_screen and "pip install -e ." in first_screen
    assert first_screen.index(". .venv/bin/activate") < README.index("cifarbench train mycnn.py:MyCNN")
    makefile = (ROOT / "Makefile").read_text()
    demo = makefile[makefile.index("\ndemo:"):]
    demo = demo[:demo.index("\n\n")]
    assert ". .venv/bin/activate" in demo  # `make demo` ends by saying how to get the command


def test_notebook_extra_is_an_extra_and_the_readme_names_its_install_line() -> None:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    notebook = project["optional-dependencies"]["notebook"]
    assert any(d.startswith(("notebook", "jupyterlab")) for d in notebook)
    assert any(d.startswith("ipywidgets") for d in notebook)
    runtime = " ".join(project["dependencies"])
    assert "notebook" not in runtime and "ipywidgets" not in runtime and "jupyter" not in runtime
    assert "pip install -e '.[notebook]'" in README


def test_every_flag_the_readme_gives_a_command_exists_with_its_choices() -> None:
    commands = _commands()
    checked = 0
    # Each command line in the README's code blocks: its flags belong to that command.
    blocks = "\n".join(re.findall(r"^```bash\n(.*?)^```", README, re.M | re.S))
    for line in re.findall(r"^cifarbench ([^#\n]+)", blocks, re.M):
        words = line.split()
        name = next(n for n in sorted(commands, key=len, reverse=True) if n and words[:len(n.split())] == n.split())
        flags = _flags(commands[name])
        for flag in re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", line):
            assert flag in flags, f"README: `cifarbench {line.strip()}` uses {flag}, which `{name}` lacks"
            checked += 1
    # The flag list shared by train and compare, with the choices it spells out (`--optimizer sgd|muon|...`).
    shared = README[README.index("Flags shared by `train` and `compare`"):]
    shared = shared[:shared.index("`cifarbench COMMAND --help`")]
    for flag, choices in re.findall(r"`(--[a-z][a-z-]*)(?: ([\w|-]+))?", shared):
        for command in ("train", "compare"):
            action = _flags(commands[command]).get(flag)
            assert action is not None, f"README lists {flag} for {command}, which lacks it"
            if choices and "|" in choices and action.choices is not None:
                assert choices.split("|") == [str(c) for c in action.choices], flag
            checked += 1
    assert checked > 40


# --- B. Options that cannot be misread --------------------------------------------------------------------

def test_no_parser_accepts_an_abbreviated_flag() -> None:
    assert all(not p.allow_abbrev for p in _commands().values())


def test_compare_seed_is_refused_in_one_line_naming_seeds(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["compare", "cnn", "--seed", "2"])
    assert exit_.value.code == 1
    line = _one_line(capsys.readouterr().err)
    assert "--seed 2" in line and "did you mean --seeds?" in line and "cifarbench compare --help" in line


def test_an_unknown_set_field_suggests_the_closest_dotted_name() -> None:
    config = make_config("fnn", "seed")
    with pytest.raises(CifarbenchError, match=r"'optimizer\.lrr'; did you mean optimizer\.lr\?"):
        config.with_changes({"optimizer.lrr": 0.1})
    with pytest.raises(CifarbenchError, match="did you mean epochs"):
        config.with_changes({"epoch": 2})
    assert "model_kwargs.act" in TrainConfig.field_names(config.with_changes({"model_kwargs.act": "gelu"}))


def test_an_unknown_python_keyword_suggests_the_closest(tmp_path: Path) -> None:
    with pytest.raises(CifarbenchError, match=r"predict\(\) has no keyword 'devise'; did you mean device\?"):
        cb.predict("some-run", [tmp_path], labels=tmp_path / "labels.csv", devise="cpu")
    with pytest.raises(CifarbenchError, match="did you mean epochs"):
        cb.permutation(["fnn"], epoch=1)


def test_a_py_file_without_a_class_name_suggests_file_colon_name_without_running_it(tmp_path: Path) -> None:
    ran = tmp_path / "ran"
    student = tmp_path / "mycnn.py"
    student.write_text(f"from torch import nn\nopen({str(ran)!r}, 'w')\n\n"
                       "class Block(nn.Module):\n    pass\n\nclass MyCNN(Block):\n    pass\n\n"
                       "class Helper:\n    pass\n")
    with pytest.raises(CifarbenchError) as refused:
        get_model_spec(str(student))
    message = str(refused.value)
    assert f"{student}:MyCNN" in message and "Block, MyCNN" in message and "Helper" not in message
    assert not ran.exists()
    with pytest.raises(CifarbenchError, match=r"did you mean cnn-bn\?"):
        get_model_spec("cnnbn")


# --- C. Notebook results ----------------------------------------------------------------------------------

def _labelled_images(folder: Path, classes: list[str], separator: str) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(6):
        name = f"img {i}.png"  # a space: the separator is what splits a row
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / name)
        rows.append(f"{name}{separator}{classes[i % 3]}")
    labels = folder.parent / f"labels-{len(separator)}.txt"
    labels.write_text(f"filename{separator}label\n" + "\n".join(rows) + "\n")
    return labels


@pytest.fixture
def fnn_run(tiny_py: Path, tmp_path: Path) -> dict:
    config = make_config("fnn", "seed", epochs=1, batch_size=10, device="cpu", data_dir=str(tiny_py), verify=False)
    return train_run(config, runs_dir=tmp_path / "runs", progress=False).to_dict()


@pytest.mark.slow
def test_scored_and_predicted_images_display_like_the_cli(fnn_run: dict, tmp_path: Path) -> None:
    from cifarbench.data import cifar10

    labels = _labelled_images(tmp_path / "photos", list(cifar10.CLASSES), ",")
    score = cb.predict(fnn_run["run_id"], [tmp_path / "photos"], labels=labels, runs_dir=tmp_path / "runs")
    text = repr(score)
    assert len(text) < 200 and "accuracy" in text and "6 images" in text
    page = score._repr_html_()
    assert "per class" in page and "true \\ predicted" in page and "airplane" in page
    wrong = score.wrong()
    assert len(wrong) == round(6 * (1 - score.accuracy))
    assert sum(f"img {i}.png" in page for i in range(6)) == len(wrong)  # the wrong images, and only those

    predicted = cb.predict(fnn_run["run_id"], [tmp_path / "photos"], runs_dir=tmp_path / "runs")
    assert repr(predicted) == f"Predictions({fnn_run['run_id']!r}, fnn, 6 images)"
    page = predicted._repr_html_()
    assert all(f"img {i}.png" in page for i in range(6)) and page.count("<tr>") == 7
    assert json.loads(json.dumps(predicted))["predictions"][0]["top"][0]["class"] in cifar10.CLASSES


@pytest.mark.slow
def test_a_plot_shows_when_assigned_and_once_when_returned(tmp_path: Path) -> None:
    nbformat = pytest.importorskip("nbformat")
    from test_notebooks import kernel_manager, nbclient

    history = '[[{"epoch": 1, "test_accuracy": 0.5, "seconds": 1.0, "train_loss": 1.0, "test_loss": 1.1}]]'
    make = f"curves_figure({{'MyCNN': {history}}})"
    cells = ["from cifarbench.reporting.display import curves_figure\nimport cifarbench as cb",
             f"fig = {make}", make, "x = 1", f"fig = {make}\nfig"]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    with kernel_manager(tmp_path) as km:
        nbclient.NotebookClient(nb, km=km, timeout=120).execute(cwd=str(tmp_path))
    images = [sum("image/png" in o.get("data", {}) for o in cell.outputs) for cell in nb.cells]
    assert images == [0, 1, 1, 0, 1]


def test_progress_lines_go_to_stdout_in_a_kernel_and_stderr_in_a_script(monkeypatch: pytest.MonkeyPatch,
                                                                          capsys: pytest.CaptureFixture) -> None:
    from cifarbench import progress

    progress.say("building")
    assert capsys.readouterr().err == "building\n"
    monkeypatch.setattr(progress, "in_kernel", lambda: True)
    progress.say("building")
    assert capsys.readouterr().out == "building\n"


def test_a_one_epoch_curve_is_a_visible_point_on_a_whole_epoch_axis() -> None:
    from cifarbench.reporting.plots import learning_curves_figure, loss_curves_figure

    one = [[{"epoch": 1, "test_accuracy": 0.4, "seconds": 2.0, "train_loss": 1.5, "test_loss": 1.6}]]
    for fig in (learning_curves_figure({"cnn": one}), loss_curves_figure({"cnn": one})):
        ax = fig.axes[0]
        assert all(line.get_markersize() >= 6 for line in ax.get_lines())
        lo, hi = ax.get_xlim()
        assert [t for t in ax.get_xticks() if lo <= t <= hi] == [1]
    two = [[*one[0], {"epoch": 2, "test_accuracy": 0.5, "seconds": 4.0, "train_loss": 1.2, "test_loss": 1.4}]]
    ax = learning_curves_figure({"cnn": two}).axes[0]
    assert all(float(t).is_integer() for t in ax.get_xticks())


def test_headings_use_the_short_label_the_tables_use() -> None:
    from cifarbench.runs.records import short_labels

    assert short_labels(["__main__:StudentCNN", "cnn"]) == {"__main__:StudentCNN": "StudentCNN", "cnn": "cnn"}
    assert short_labels(["a.py:Net", "b.py:Net"]) == {"a.py:Net": "a.py:Net", "b.py:Net": "b.py:Net"}


# --- D. Edges that crash or mislead -----------------------------------------------------------------------

LINEAR_MODELS = '''
import torch
from torch import nn


class Linear(nn.Module):
    """CS231n's linear classifier."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3072, 10)

    def forward(self, x):
        return self.fc(x.flatten(1))


class Raw(nn.Module):
    """No layer at all: a bare Parameter."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(10, 3072))

    def forward(self, x):
        return x.flatten(1) @ self.w.T
'''


@pytest.mark.slow
def test_explain_and_report_a_linear_classifier_and_a_model_without_layers(tiny_py: Path, tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("captum")
    (tmp_path / "linear.py").write_text(LINEAR_MODELS)
    runs = str(tmp_path / "runs")
    data = ["--data-dir", str(tiny_py), "--no-verify", "--runs-dir", runs]
    ids = {}
    for name in ("Linear", "Raw"):
        assert main(["train", f"{tmp_path / 'linear.py'}:{name}", "--epochs", "1", "--device", "cpu", "--json",
                     *data]) == 0
        ids[name] = json.loads(capsys.readouterr().out)["run_id"]
    assert main(["explain", *ids.values(), "--out", str(tmp_path / "ex"), "--examples", "1", "--json", *data]) == 0
    explained = {r["run_id"]: r for r in json.loads(capsys.readouterr().out)["runs"]}
    assert sorted(Path(f).name for f in explained[ids["Linear"]]["files"]) == ["saliency.png", "templates.png"]
    assert [Path(f).name for f in explained[ids["Raw"]]["files"]] == ["saliency.png"]
    assert any("no weight templates or filters" in n for n in explained[ids["Raw"]]["notes"])
    assert main(["report", *ids.values(), "--out", str(tmp_path / "r.html"), *data]) == 0
    assert (tmp_path / "r.html").stat().st_size > 0


def test_explore_refuses_more_images_per_class_than_the_smallest_class(tiny_py: Path, tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture) -> None:
    base = ["explore", "--data-dir", str(tiny_py), "--no-verify", "--out", str(tmp_path / "g.png")]
    assert main([*base, "--per-class", "10000000000"]) == 1  # refused before a MemoryError, or any loading
    line = _one_line(capsys.readouterr().err)
    assert "--per-class 10000000000 is too many" in line and "at most 100" in line
    assert main([*base, "--per-class", "11"]) == 1  # the tiny train split has 10 per class
    line = _one_line(capsys.readouterr().err)
    assert "--per-class 11" in line and "smallest class has 10 images" in line and "at most 10" in line
    assert main([*base, "--per-class", "3", "--split", "test"]) == 1  # the tiny test split has 2 per class
    assert "at most 2" in capsys.readouterr().err
    assert main([*base, "--per-class", "2", "--split", "test"]) == 0 and (tmp_path / "g.png").exists()
    with pytest.raises(CifarbenchError, match="per_class 11 is too many"):
        cb.explore(data_dir=str(tiny_py), verify=False, per_class=11)


@pytest.mark.parametrize("separator", [",", "\t"])
def test_a_labels_file_may_be_comma_or_tab_separated(tmp_path: Path, separator: str) -> None:
    from cifarbench.data import cifar10
    from cifarbench.image_files import read_labels

    labels = _labelled_images(tmp_path / "photos", list(cifar10.CLASSES), separator)
    read = read_labels(labels, cifar10.CLASSES)
    assert read == {f"img {i}.png": i % 3 for i in range(6)}


def test_a_tab_separated_row_with_three_fields_names_the_shape(tmp_path: Path) -> None:
    from cifarbench.image_files import read_labels

    labels = tmp_path / "labels.tsv"
    labels.write_text("a.png\tcat\nb.png\tdog\textra\n")
    with pytest.raises(CifarbenchError, match=r"line 2: expected `filename<TAB>label`.*got 3 fields"):
        read_labels(labels, ["cat", "dog"])


@pytest.mark.slow
def test_read_only_commands_list_a_store_in_a_folder_that_cannot_be_written(
        fnn_run: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    runs = tmp_path / "runs"
    before = sorted(p.name for p in runs.iterdir())
    mode = runs.stat().st_mode
    runs.chmod(0o555)  # a read-only folder; as root that stops nothing, so os.access says so as well
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, how, **kw: False if Path(path) == runs and how & os.W_OK
                        else real_access(path, how, **kw))
    import sqlite3

    from cifarbench.runs import store

    opened: list[str] = []
    real_connect = sqlite3.connect
    monkeypatch.setattr(store.sqlite3, "connect", lambda database, *a, **kw: opened.append(str(database)) or
                        real_connect(database, *a, **kw))
    try:
        assert main(["runs", "--runs-dir", str(runs), "--json"]) == 0
        assert [r["run_id"] for r in json.loads(capsys.readouterr().out)["runs"]] == [fnn_run["run_id"]]
        assert main(["runs", "show", fnn_run["run_id"], "--runs-dir", str(runs)]) == 0
        assert f"run {fnn_run['run_id']}: completed" in capsys.readouterr().out
        assert main(["runs", "compare", fnn_run["run_id"], "--runs-dir", str(runs), "--json"]) == 0
        capsys.readouterr()
        assert sorted(p.name for p in runs.iterdir()) == before  # no -wal, -shm or -journal appeared
        assert opened and all(u.endswith("?mode=ro&immutable=1") for u in opened)  # SQLite never asked to write
    finally:
        runs.chmod(mode)


def test_a_reader_reports_a_dead_running_run_as_crashed_without_writing(fnn_run: dict, tmp_path: Path) -> None:
    import sqlite3

    from cifarbench.runs.store import RunStore

    db = tmp_path / "runs" / "cifarbench.db"
    with sqlite3.connect(db) as con:
        con.execute("UPDATE runs SET status = 'running', pid = 2147483646")
    with RunStore(tmp_path / "runs", read_only=True) as store:
        assert store.get_run(fnn_run["run_id"])["status"] == "crashed"
    with sqlite3.connect(db) as con:
        assert con.execute("SELECT status FROM runs").fetchone()[0] == "running"


@pytest.mark.slow
def test_a_broken_pipe_on_stdout_ends_quietly(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "cifarbench", "models"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "CIFARBENCH_HOME": str(tmp_path)})
    proc.stdout.close()  # the reader leaves before a line is written (`| head -0`)
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 1
    assert err == "", err


@pytest.mark.slow
def test_predict_warns_when_the_run_stopped_before_its_planned_epochs(tiny_py: Path, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    config = make_config("fnn", "seed", epochs=3, batch_size=10, device="cpu", data_dir=str(tiny_py), verify=False)

    def stop(metrics) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_run(config, runs_dir=tmp_path / "runs", progress=False, on_epoch=stop)
    (run_dir,) = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(image)
    argv = ["predict", run_dir.name, str(image), "--runs-dir", str(tmp_path / "runs")]
    assert main(argv) == 0
    out = capsys.readouterr()
    assert re.fullmatch(rf"warning: run {run_dir.name} stopped after 1 of its 3 epochs: .*--resume.*\n", out.err)
    assert "warning" not in out.out
    assert main([*argv, "--json"]) == 0
    assert "stopped after 1 of its 3 epochs" in json.loads(capsys.readouterr().out)["warnings"][0]


@pytest.mark.slow
def test_predict_of_a_finished_run_has_no_warning(fnn_run: dict, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(image)
    assert main(["predict", fnn_run["run_id"], str(image), "--runs-dir", str(tmp_path / "runs"), "--json"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["warnings"] == [] and "warning" not in out.err


def test_the_channels_last_note_is_whole_sentences_naming_flatten() -> None:
    from cifarbench.running import channels_last_note

    try:
        torch.rand(2, 3, 4, 4).contiguous(memory_format=torch.channels_last).view(2, -1)
    except RuntimeError as exc:
        note = channels_last_note("mycnn.py:MyCNN", exc)
    assert ".flatten(1)" in note and note.endswith(".") and "channels_last=false" in note
    assert note.count("(") == note.count(")")
    long = RuntimeError("a very long message " * 20 + "(with a bracket that the cut would leave open " * 3 + ")")
    other = channels_last_note("m", long)
    assert other.count("(") == other.count(")") and "messa ..." not in other and len(other) < 400
