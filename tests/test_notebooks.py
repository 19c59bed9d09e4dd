"""cifarbench where its users live: the example notebooks executed in a real Jupyter kernel, results that display
themselves (HTML with a table and an inline image), progress lines in notebooks and plain scripts, and errors
that speak the Python caller's language."""

from __future__ import annotations

import base64
import contextlib
import copy
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

import cifarbench as cb
from cifarbench.data import cifar10
from cifarbench.errors import CifarbenchError
from conftest import write_python_layout

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
EPOCH_LINE = re.compile(r"^(?P<model>\S+) seed \d+ epoch +(?P<epoch>\d+)(/\d+)?  train loss \d", re.M)
PNG_URI = '<img src="data:image/png;base64,'

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")


# --- running a notebook in a real kernel -------------------------------------------------------------------------

@contextlib.contextmanager
def kernel_manager(folder: Path):
    """A kernel manager whose kernel is this interpreter (so a fresh .venv needs no `ipykernel install`); its
    kernel is shut down on leaving (nbclient leaves alone a kernel whose manager it was given)."""
    from jupyter_client import KernelManager
    from jupyter_client.kernelspec import KernelSpecManager

    spec = folder / "kernels" / "cifarbench-test"
    spec.mkdir(parents=True, exist_ok=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "cifarbench tests", "language": "python"}))
    km = KernelManager(kernel_name="cifarbench-test",
                       kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(folder / "kernels")]))
    try:
        yield km
    finally:
        if km.has_kernel:
            km.shutdown_kernel(now=True)


def run_notebook(path: Path, workdir: Path, env: dict[str, str], rerun: str | None = None) -> tuple[Any, Any]:
    """Execute every cell of the notebook at `path` in a fresh kernel (stopping at the first error cell), then
    execute once more the first code cell whose source contains `rerun`, if given. Returns the executed notebook
    and the re-run cell (None without `rerun`)."""
    nb = nbformat.read(path, as_version=4)
    with kernel_manager(workdir / "jupyter") as km:
        return _execute(nb, km, workdir, env, rerun)


def _execute(nb: Any, km: Any, workdir: Path, env: dict[str, str], rerun: str | None) -> tuple[Any, Any]:
    client = nbclient.NotebookClient(nb, km=km, timeout=600, resources={"metadata": {"path": str(workdir)}})
    with client.setup_kernel(env=env, cwd=str(workdir)):
        for i, cell in enumerate(nb.cells):
            client.execute_cell(cell, i)
        if rerun is None:
            return nb, None
        index = next(i for i, c in enumerate(nb.cells) if c.cell_type == "code" and rerun in c.source)
        first, again = nb.cells[index], copy.deepcopy(nb.cells[index])
        client.execute_cell(again, index)
    nb.cells[index] = first  # the notebook keeps its first pass (nbclient stores the re-run in its place)
    return nb, again


def error_outputs(*cells) -> list:
    return [o for c in cells if c is not None and c.cell_type == "code" for o in c.outputs
            if o.output_type == "error"]


def kernel_env(tmp: Path, **settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CIFARBENCH_")}
    return {**env, "CIFARBENCH_HOME": str(tmp / "runs"), "CIFARBENCH_CACHE": str(tmp / "cache"),
            "CIFARBENCH_VERIFY": "0", "CIFARBENCH_OFFLINE": "1", **settings}


def texts(cell) -> str:
    """Everything a cell printed or displayed, as text (streams, plain and HTML representations)."""
    parts = []
    for out in cell.get("outputs", []):
        if out.output_type == "stream":
            parts.append(out.text)
        for kind in ("text/plain", "text/html"):
            parts.append(out.get("data", {}).get(kind, ""))
    return "".join(parts)


def has_image(cell) -> bool:
    return any("image/png" in out.get("data", {}) or PNG_URI in out.get("data", {}).get("text/html", "")
               for out in cell.get("outputs", []))


def cell_with(nb, needle: str):
    return next(c for c in nb.cells if c.cell_type == "code" and needle in c.source)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory):
    """Notebook 01 executed in a kernel on tiny CIFAR-10 and MNIST files, one epoch per model."""
    from test_mnist import write_idx_set

    tmp = tmp_path_factory.mktemp("nb01")
    data = write_python_layout(tmp / "data")
    write_idx_set(data / "mnist")
    env = kernel_env(tmp, CIFARBENCH_DATA=str(data), CIFARBENCH_EXAMPLE_QUICK="1")
    return run_notebook(EXAMPLES / "01_notebook_reproduced.ipynb", tmp, env, rerun="narrow = cb.train(")


@pytest.mark.slow
def test_notebook_01_runs_in_a_kernel_without_an_error_cell(tiny_run) -> None:
    nb, _ = tiny_run
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code) and not error_outputs(*code)
    # Every step happened: the data, both comparisons (MNIST included, from its tiny files), the exercise.
    assert "images per class" in texts(cell_with(nb, "cb.explore(")) and has_image(cell_with(nb, "cb.explore("))
    assert "not available" not in texts(cell_with(nb, 'dataset="mnist"'))
    for needle in ('cb.compare(["fnn", "cnn"], recipe', 'dataset="mnist"', 'cb.compare(["cnn", ImprovedCNN]'):
        assert "test accuracy (mean ± std)" in texts(cell_with(nb, needle)) and has_image(cell_with(nb, needle))
    assert "ImprovedCNN" in texts(cell_with(nb, 'cb.compare(["cnn", ImprovedCNN]'))
    assert has_image(cell_with(nb, 'plot(kind="loss")')) and has_image(cell_with(nb, 'plot(kind="confusion")'))
    assert "The accuracy is" in texts(cell_with(nb, "cb.report("))


@pytest.mark.slow
def test_notebook_training_cells_show_epoch_lines_and_no_tqdm_warning(tiny_run) -> None:
    nb, _ = tiny_run
    cell = cell_with(nb, 'cb.compare(["fnn", "cnn"], recipe')
    # In a kernel the lines are the cell's output (stdout), not stderr's pink error background.
    streams = {name: "".join(o.text for o in cell.outputs if o.output_type == "stream" and o.name == name)
               for name in ("stdout", "stderr")}
    assert [m["model"] for m in EPOCH_LINE.finditer(streams["stdout"])] == ["fnn", "cnn"]
    assert not EPOCH_LINE.search(streams["stderr"])
    everything = "".join(texts(c) for c in nb.cells if c.cell_type == "code")
    assert "TqdmWarning" not in everything and "IProgress" not in everything


@pytest.mark.slow
def test_rerunning_the_cell_that_redefines_and_retrains_a_class_succeeds(tiny_run) -> None:
    nb, again = tiny_run
    first = cell_with(nb, "narrow = cb.train(")
    assert not [o for o in again.outputs if o.output_type == "error"]
    assert again.execution_count > first.execution_count
    run_ids = [re.search(r"RunRecord\('([^']+)'", texts(c)).group(1) for c in (first, again)]
    assert run_ids[0] != run_ids[1] and "ImprovedCNN" in run_ids[1]


@pytest.mark.realdata
@pytest.mark.slow
def test_notebook_01_runs_on_the_real_data(real_data_dir: Path, tmp_path: Path) -> None:
    # A few seconds per model: the point is that every cell runs on the real files, not the accuracies.
    env = kernel_env(tmp_path, CIFARBENCH_DATA=str(real_data_dir), CIFARBENCH_EXAMPLE_BUDGET="3")
    nb, again = run_notebook(EXAMPLES / "01_notebook_reproduced.ipynb", tmp_path, env, rerun="narrow = cb.train(")
    assert not error_outputs(*nb.cells, again)
    assert "test accuracy (mean ± std)" in texts(cell_with(nb, 'cb.compare(["cnn", ImprovedCNN]'))


@pytest.fixture(scope="module")
def why_cnn_run(tmp_path_factory: pytest.TempPathFactory):
    """Notebook 02 executed in a kernel on tiny CIFAR-10 files, one epoch per model, three seeds."""
    tmp = tmp_path_factory.mktemp("nb02")
    data = write_python_layout(tmp / "data")
    env = kernel_env(tmp, CIFARBENCH_DATA=str(data), CIFARBENCH_EXAMPLE_QUICK="1")
    nb, _ = run_notebook(EXAMPLES / "02_why_cnn.ipynb", tmp, env)
    return nb, tmp


@pytest.mark.slow
def test_notebook_02_shows_each_step_of_why_a_cnn_wins(why_cnn_run) -> None:
    nb, tmp = why_cnn_run
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code) and not error_outputs(*code)
    compared = texts(cell_with(nb, 'cb.compare(["fnn", "cnn"]'))
    assert "test accuracy (mean ± std)" in compared and "cnn vs fnn" in compared and "(95%, 3 seeds)" in compared
    assert re.search(r"seed 2: only fnn right on \d+ test images, only cnn right on \d+; McNemar p = ",
                     texts(cell_with(nb, "pair = nn_vs_cnn.pairs[0]")))
    learnt = cell_with(nb, "cb.explain(")
    for figure in ("templates", "filters", "feature-maps", "saliency", "capacity"):
        assert figure in texts(learnt)
    assert texts(learnt).count(PNG_URI) == 6  # fnn: templates, saliency; cnn: filters, maps, saliency; capacity
    assert sorted(p.name for p in (tmp / "why-cnn").glob("*/*.png")) == sorted(
        ["templates.png", "saliency.png", "filters.png", "feature-maps.png", "saliency.png"])
    shifted, corrupted = cell_with(nb, 'cb.experiment("translation"'), cell_with(nb, 'cb.experiment("corruption"')
    assert "shift 4 px" in texts(shifted) and "mirrored" in texts(shifted) and has_image(shifted)
    assert "gaussian blur 5" in texts(corrupted) and "jpeg 1" in texts(corrupted) and has_image(corrupted)
    scrambled = texts(cell_with(nb, "cb.permutation("))
    assert "permuted - plain (95% interval)" in scrambled and "cnn (permuted) vs fnn (permuted)" in scrambled
    assert "6 reused from the store" in scrambled and has_image(cell_with(nb, "cb.permutation("))
    handout = re.search(r"The report is in (\S+)", texts(cell_with(nb, "cb.report(")))
    html = Path(tmp, handout.group(1)).read_text()
    assert "Experiment: translation" in html and "fnn (permuted)" in html


@pytest.mark.realdata
@pytest.mark.slow
def test_notebook_02_runs_on_the_real_data(real_data_dir: Path, tmp_path: Path) -> None:
    # Two seeds: the fewest an interval needs; the tiny-data test above runs the notebook's own three.
    env = kernel_env(tmp_path, CIFARBENCH_DATA=str(real_data_dir), CIFARBENCH_EXAMPLE_BUDGET="3",
                     CIFARBENCH_EXAMPLE_SEEDS="2")
    nb, _ = run_notebook(EXAMPLES / "02_why_cnn.ipynb", tmp_path, env)
    assert not error_outputs(*nb.cells)
    assert "permuted - plain (95% interval)" in texts(cell_with(nb, "cb.permutation("))


# --- the stored notebooks ----------------------------------------------------------------------------------------

def test_stored_notebooks_are_what_the_builder_writes_and_hold_no_outputs(tmp_path: Path) -> None:
    sys.path.insert(0, str(EXAMPLES))
    try:
        import build_notebooks
    finally:
        sys.path.remove(str(EXAMPLES))
    for path in build_notebooks.write_all(tmp_path):
        stored = EXAMPLES / path.name
        assert stored.read_text() == path.read_text(), f"{stored.name}: run python examples/build_notebooks.py"
        nb = nbformat.read(stored, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert code and all(c.outputs == [] and c.execution_count is None for c in code)


# --- results that display themselves ------------------------------------------------------------------------------

def _png_of(html: str) -> bytes:
    start = html.index(PNG_URI) + len(PNG_URI)
    return base64.b64decode(html[start:html.index('"', start)])


def test_a_run_displays_its_accuracy_table_and_learning_curve_inline(tiny_py: Path) -> None:
    run = cb.train("fnn", epochs=2, data_dir=str(tiny_py), verify=False)
    html = run._repr_html_()
    table = html[html.index("<table"):html.index("</table>")]
    assert "test accuracy" in table and f"{100 * run.test_accuracy:.2f}%" in table and "fnn" in table
    assert _png_of(html).startswith(b"\x89PNG\r\n\x1a\n")
    assert "confusion" not in html.lower() and len(html) < 200_000  # compact: no confusion-matrix dump
    text = repr(run)
    assert len(text) < 200 and run.run_id in text and f"{100 * run.test_accuracy:.2f}%" in text
    assert json.loads(run.to_json())["run_id"] == run.run_id
    assert type(run.plot()).__name__ == "Figure" and type(run.plot(kind="loss")).__name__ == "Figure"
    with pytest.raises(CifarbenchError, match="unknown plot kind 'bars'"):
        run.plot(kind="bars")


def test_a_comparison_and_an_evaluation_display_their_tables_and_figures(tiny_py: Path) -> None:
    comparison = cb.compare(["fnn", "cnn"], epochs=1, data_dir=str(tiny_py), verify=False)
    html = comparison._repr_html_()
    assert "test accuracy (mean ± std)" in html and "fnn" in html and "cnn" in html
    assert _png_of(html).startswith(b"\x89PNG") and len(repr(comparison)) < 200

    evaluation = cb.evaluate(comparison.runs[0].run_id, data_dir=str(tiny_py), verify=False)
    html = evaluation._repr_html_()
    assert f"{100 * evaluation.test_accuracy:.2f}%" in html and _png_of(html).startswith(b"\x89PNG")
    text = repr(evaluation)
    assert len(text) < 200 and evaluation.run_id in text and "airplane" not in text
    assert json.loads(evaluation.to_json())["test_accuracy"] == evaluation.test_accuracy
    assert type(evaluation.plot(kind="confusion")).__name__ == "Figure"


def test_explore_counts_the_classes_and_shows_a_grid(tiny_py: Path, tmp_path: Path) -> None:
    overview = cb.explore(data_dir=str(tiny_py), verify=False, per_class=3, out=tmp_path / "grid.png")
    assert overview.counts["train"] == [10] * 10 and overview.counts["test"] == [2] * 10
    html = overview._repr_html_()
    assert "airplane" in html and ">100<" in html and _png_of(html).startswith(b"\x89PNG")
    assert (tmp_path / "grid.png").read_bytes().startswith(b"\x89PNG") and len(repr(overview)) < 200
    with pytest.raises(CifarbenchError, match="split must be 'train' or 'test'"):
        overview.plot(split="validation")


def test_a_returned_figure_displays_as_an_image_in_ipython() -> None:
    shell = pytest.importorskip("IPython.core.interactiveshell").InteractiveShell.instance()
    try:
        from matplotlib.figure import Figure

        from cifarbench.reporting.display import inline

        fig = inline(Figure(figsize=(1, 1)))
        fig.subplots().plot([0, 1])
        png = shell.display_formatter.format(fig)[0]["image/png"]
        assert (png if isinstance(png, bytes) else base64.b64decode(png)).startswith(b"\x89PNG")
    finally:
        type(shell).clear_instance()


def test_a_class_defined_in_a_cell_keeps_its_source_and_its_runs_survive_a_redefinition(
        tiny_py: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Jupyter cell: code compiled under a cell name whose text IPython keeps in linecache, run in a `__main__`
    without a file (where `inspect.getsource` cannot find a class before Python 3.13)."""
    import linecache
    import types

    main = types.ModuleType("__main__")
    monkeypatch.setitem(sys.modules, "__main__", main)
    cell = textwrap.dedent("""\
        from torch import nn

        class CellNet(nn.Module):
            def __init__(self, num_classes=10, in_shape=(3, 32, 32), width=4):
                super().__init__()
                self.net = nn.Sequential(nn.Flatten(), nn.Linear(3072, width), nn.ReLU(), nn.Linear(width, num_classes))

            def forward(self, x):
                return self.net(x)
    """)
    runs = []
    for i, width in enumerate((4, 6)):
        code = cell.replace("width=4", f"width={width}")
        name = f"/tmp/ipykernel_0/cell{i}.py"
        linecache.cache[name] = (len(code), None, code.splitlines(True), name)
        exec(compile(code, name, "exec"), main.__dict__)
        runs.append(cb.train(main.CellNet, epochs=1, data_dir=str(tiny_py), verify=False, progress=False))
    assert [r.params for r in runs] == [3072 * w + w + w * 10 + 10 for w in (4, 6)]
    code = Path(runs[0].run_dir, "model.py").read_text()
    assert "class CellNet" in code and "width=4" in code
    assert cb.evaluate(runs[0].run_id, data_dir=str(tiny_py), verify=False).test_accuracy == runs[0].test_accuracy


# --- progress and errors for Python callers -----------------------------------------------------------------------

@pytest.mark.slow
def test_a_plain_script_that_trains_prints_epoch_lines_to_stderr(tiny_py: Path, tmp_path: Path) -> None:
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(f"""\
        import cifarbench as cb

        run = cb.train("fnn", epochs=2, data_dir={str(tiny_py)!r}, verify=False)
        print(run.test_accuracy)
    """))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "CIFARBENCH_HOME": str(tmp_path / "runs")})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [(m["model"], m["epoch"]) for m in EPOCH_LINE.finditer(proc.stderr)] == [("fnn", "1"), ("fnn", "2")]
    assert "test acc" in proc.stderr and "TqdmWarning" not in proc.stderr
    assert float(proc.stdout.strip()) >= 0 and not EPOCH_LINE.search(proc.stdout)  # stdout stays the script's


def test_long_phases_say_what_they_do_unless_progress_is_off(tiny_py: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(cifar10, "LONG_LOAD_BYTES", 0)  # the tiny files count as a long load
    run = cb.train("fnn", epochs=1, tta=2, data_dir=str(tiny_py), verify=False)
    err = capsys.readouterr().err
    assert "loading CIFAR-10 from" in err and "evaluating the test set (6 TTA views)..." in err
    report = cb.report([run.run_id], tiny_py.parent / "r.html", data_dir=str(tiny_py), verify=False)
    assert "building the report" in capsys.readouterr().err and Path(report.report).is_file()

    monkeypatch.setenv("CIFARBENCH_CACHE", str(tiny_py.parent / "other-cache"))  # decode again
    cb.train("fnn", epochs=1, tta=2, data_dir=str(tiny_py), verify=False, progress=False)
    err = capsys.readouterr().err
    assert "loading" not in err and "TTA views" not in err and EPOCH_LINE.search(err)  # epoch lines stay


@pytest.mark.parametrize(("keywords", "hint"), [
    ({"no_verify": True}, "train() has no keyword 'no_verify'; pass verify=False"),
    ({"epoch": 2}, "did you mean epochs?"),
    ({"colour": "red"}, "it takes: recipe, seed, epochs"),
])
def test_a_wrong_keyword_is_a_one_line_error_that_names_the_right_one(keywords: dict, hint: str) -> None:
    with pytest.raises(CifarbenchError) as caught:
        cb.train("fnn", **keywords)
    assert hint in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(CifarbenchError, match="compare\\(\\) has no keyword 'no_download'; pass download=False"):
        cb.compare(["fnn"], no_download=True)


def test_a_data_error_tells_a_python_caller_the_keyword_not_the_flag(tiny_py: Path) -> None:
    with pytest.raises(cb.DataError) as caught:
        cb.train("fnn", epochs=1, data_dir=str(tiny_py))  # not the official md5s
    assert "verify=False" in str(caught.value) and "--no-verify" not in str(caught.value)
