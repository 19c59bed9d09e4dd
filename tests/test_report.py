"""`compare --target --report` and `report`: the table's new columns, and a self-contained, escaped HTML file
that a real headless browser renders with its table and images."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from cifarbench.cli import main
from cifarbench.reporting.html import render_report
from cifarbench.reporting.tables import comparison_table
from cifarbench.runs.records import ModelSummary
from conftest import write_python_layout

PNG = b"\x89PNG\r\n\x1a\n"


class Dom(HTMLParser):
    """The bits of a report the tests look at: tags, img sources, table rows by table class, all text."""

    def __init__(self, text: str):
        super().__init__()
        self.tags: list[str] = []
        self.imgs: list[str] = []
        self.rows: dict[str, int] = {}
        self.links: list[str] = []
        self._table: list[str] = []
        self._in_body = False
        self.text: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if tag == "img":
            self.imgs.append(a.get("src", ""))
        if tag == "table":
            self._table.append(a.get("class") or "")
        if tag == "tbody":
            self._in_body = True
        if tag == "tr" and self._in_body:
            self.rows[self._table[-1]] = self.rows.get(self._table[-1], 0) + 1
        self.links += [v for k, v in attrs if k in ("href", "src", "action") and v and not v.startswith("data:")]

    def handle_endtag(self, tag):
        if tag == "tbody":
            self._in_body = False

    def handle_data(self, data):
        self.text.append(data)


def run_cli(*argv: str) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        assert main([*argv, "--json"]) == 0
    return json.loads(out.getvalue())


@pytest.fixture(scope="module")
def compared(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One small comparison (fnn vs cnn, 2 seeds, 2 epochs) with a target and a report, shared by this module."""
    root = tmp_path_factory.mktemp("compare")
    data = write_python_layout(root / "data")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CIFARBENCH_CACHE", str(root / "cache"))
        mp.delenv("CIFARBENCH_DATA", raising=False)
        out = run_cli("compare", "fnn", "cnn", "--data-dir", str(data), "--no-verify", "--epochs", "2", "--seeds", "2",
                      "--batch-size", "25", "--device", "cpu", "--target", "0.3", "--runs-dir", str(root / "runs"),
                      "--plot", str(root / "curves.png"), "--report", str(root / "report.html"))
    return {"out": out, "root": root, "data": data, "runs": str(root / "runs"), "html": root / "report.html"}


@pytest.mark.slow
def test_compare_json_keeps_its_keys_and_adds_cost_and_time_to_target(compared: dict) -> None:
    out = compared["out"]
    assert {"results", "plot", "target", "report", "dataset"} <= out.keys() and out["target"] == 0.3
    assert out["report"] == str(compared["html"]) and Path(out["plot"]).read_bytes()[:8] == PNG
    fnn, cnn = out["results"]
    for r in (fnn, cnn):
        assert {"model", "recipe", "seeds", "test_accuracy_mean", "test_accuracy_std", "train_seconds_mean", "params",
                "macs_per_image", "flops_per_image", "train_seconds_std", "time_to_target", "run_ids"} <= r.keys()
        assert r["flops_per_image"] == 2 * r["macs_per_image"] and r["seeds"] == [0, 1]
        ttt = r["time_to_target"]
        assert ttt["target"] == 0.3 and ttt["seeds"] == 2 and [s["seed"] for s in ttt["per_seed"]] == [0, 1]
        assert ttt["reached"] == sum(s["reached"] for s in ttt["per_seed"])
    assert (fnn["model"], fnn["macs_per_image"], cnn["macs_per_image"]) == ("fnn", 394_496, 4_188_800)
    table = comparison_table([ModelSummary.from_dict(r) for r in out["results"]])
    assert "time to 30% (mean)" in table and "788.99 k" in table and "8.38 M" in table
    (pair,) = out["pairs"]
    assert (pair["a"], pair["b"], pair["seeds"]) == ("fnn", "cnn", [0, 1])
    acc = {(r["model"], r["seed"]): r["test_accuracy"] for r in out["runs"]}
    diffs = [acc["cnn", s] - acc["fnn", s] for s in (0, 1)]
    assert pair["difference"]["mean_difference"] == pytest.approx(sum(diffs) / 2)
    low, high = pair["difference"]["low"], pair["difference"]["high"]
    assert low <= min(diffs) and high >= max(diffs)
    n = out["dataset"]["test_size"]
    for seed, diff in zip(("0", "1"), diffs, strict=True):  # McNemar's discordant counts explain the difference
        test = pair["mcnemar"][seed]
        assert test["c"] - test["b"] == round(diff * n) and 0 < test["p_value"] <= 1


@pytest.mark.slow
def test_report_is_self_contained_with_table_figures_configs_and_fingerprint(compared: dict) -> None:
    text = compared["html"].read_text()
    dom = Dom(text)
    assert dom.rows["summary"] == 2 and dom.rows["runs"] == 4 and dom.rows["datasets"] == 1
    # 6 figures for the comparison, the capacity figure, and the gallery: fnn templates and saliency, cnn
    # filters, feature maps and saliency
    assert len(dom.imgs) == 12 and all(src.startswith("data:image/png;base64,") for src in dom.imgs)
    for src in dom.imgs:
        assert base64.b64decode(src.split(",", 1)[1])[:8] == PNG
    assert dom.links == [] and "script" not in dom.tags and "link" not in dom.tags  # nothing to fetch, nothing to run
    assert '<meta http-equiv="Content-Security-Policy" content="default-src &#x27;none&#x27;; img-src data:;' in text
    body = " ".join(dom.text)
    for run_id in compared["out"]["results"][0]["run_ids"] + compared["out"]["results"][1]["run_ids"]:
        assert run_id in body
    assert compared["out"]["dataset"]["sha256"] in body and '"batch_size": 25' in body
    for heading in ("Learning curves", "Loss curves", "Per-class accuracy", "Confusion matrices",
                    "Most confident mistakes", "Test images by class", "time to 30%", "Differences between models",
                    "fnn seed 0: what the weights look for", "cnn seed 0: first-layer filters",
                    "cnn seed 0: feature maps", "cnn seed 0: saliency", "Capacity"):
        assert heading in body
    assert dom.rows["extra"] == 1  # the pairwise table: one pair


@pytest.mark.slow
def test_report_command_from_stored_runs(compared: dict, tmp_path: Path) -> None:
    ids = compared["out"]["results"][1]["run_ids"]  # the two cnn runs
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CIFARBENCH_CACHE", str(compared["root"] / "cache"))
        out = run_cli("report", *ids, "--out", str(tmp_path / "r.html"), "--runs-dir", compared["runs"],
                      "--data-dir", str(compared["data"]), "--device", "cpu")
    assert out["report"] == str(tmp_path / "r.html") and [r["model"] for r in out["results"]] == ["cnn"]
    assert out["results"][0]["test_accuracy_mean"] == compared["out"]["results"][1]["test_accuracy_mean"]
    dom = Dom((tmp_path / "r.html").read_text())
    assert dom.rows["summary"] == 1 and dom.rows["runs"] == 2 and len(dom.imgs) == 10


def test_every_string_from_runs_is_escaped(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    evil = "<img src=x onerror=alert(1)>"
    data = write_python_layout(tmp_path / evil)  # a real folder name; it lands in the config and the data table
    runs = str(tmp_path / "runs")
    assert main(["train", "fnn", "--data-dir", str(data), "--no-verify", "--epochs", "1", "--batch-size", "20",
                 "--device", "cpu", "--runs-dir", runs, "--json"]) == 0
    run_id = json.loads(capsys.readouterr().out)["run_id"]
    assert main(["report", run_id, "--out", str(tmp_path / "r.html"), "--runs-dir", runs]) == 0
    text = (tmp_path / "r.html").read_text()
    assert evil not in text and "&lt;img src=x onerror=alert(1)&gt;" in text
    assert Dom(text).imgs and all(src.startswith("data:") for src in Dom(text).imgs)

    html = render_report(title="</title><script>alert(1)</script>",
                         summary=(["model"], [["<b>fnn</b>"]]), runs=(["run"], [['"><script>x</script>']]),
                         figures=[('"heading"<', "<caption>", PNG)],
                         configs={"<id>": {"k": "</pre><script>1</script>"}},
                         datasets=[{"source": "<src>"}], environment={"<e>": "<v>"}, notes=["<note>"])
    assert "<script>" not in html and "<b>" not in html and "<note>" not in html and "<caption>" not in html
    assert "&lt;/pre&gt;&lt;script&gt;1&lt;/script&gt;" in html and 'alt="&quot;heading&quot;&lt;"' in html


def test_report_refuses_runs_of_different_data_sets(tmp_path: Path) -> None:
    from cifarbench.api import build_report
    from cifarbench.errors import CifarbenchError
    from cifarbench.runs.records import RunRecord

    runs = [RunRecord(run_id=f"r{i}", model="fnn", recipe="seed", seed=0, epochs=1, dataset={"name": n})
            for i, n in enumerate(("cifar10", "mnist"))]
    with pytest.raises(CifarbenchError, match="different data sets"):
        build_report(runs, [], tmp_path / "r.html")


CHROMIUM = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-extensions", "--hide-scrollbars"]


def require_chromium() -> None:
    """Skip without a browser, except under CI, which installs one (.ci/run): there a skip would hide the test."""
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("no chromium binary on PATH, but $CI is set: .ci/run should have installed it")
        pytest.skip("no chromium binary on PATH")


def chromium(*args: str, home: Path) -> str:
    proc = subprocess.run([CHROMIUM, *FLAGS, *args], capture_output=True, text=True, timeout=90,
                          env={"HOME": str(home), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@pytest.mark.slow
def test_chromium_renders_the_table_and_decodes_every_image(compared: dict, tmp_path: Path) -> None:
    require_chromium()
    report = compared["html"]
    dom = Dom(chromium("--dump-dom", report.as_uri(), home=tmp_path))
    assert dom.rows["summary"] == 2 and dom.rows["runs"] == 4
    # 6 figures for the comparison, the capacity figure, and the gallery: fnn templates and saliency, cnn
    # filters, feature maps and saliency
    assert len(dom.imgs) == 12 and all(src.startswith("data:image/png;base64,") for src in dom.imgs)

    # The report itself runs no script (its CSP forbids it); a test copy without the CSP adds one that
    # records what the browser decoded: every image's natural size.
    text = re.sub(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", report.read_text())
    probe = ('<pre id="probe"></pre><script>window.addEventListener("load", () => {'
             'document.getElementById("probe").textContent = JSON.stringify([...document.images].map('
             'i => [i.complete, i.naturalWidth, i.naturalHeight]))})</script></body>')
    variant = tmp_path / "probe.html"
    variant.write_text(text.replace("</body>", probe))
    out = chromium("--dump-dom", variant.as_uri(), home=tmp_path)
    sizes = json.loads(re.search(r'<pre id="probe">(.*?)</pre>', out).group(1))
    assert len(sizes) == len(dom.imgs) and all(done and w > 100 and h > 100 for done, w, h in sizes), sizes

    shot = tmp_path / "shot.png"
    chromium(f"--screenshot={shot}", "--window-size=1280,2000", report.as_uri(), home=tmp_path)
    assert shot.read_bytes()[:8] == PNG and shot.stat().st_size > 20_000


def test_seed_whiskers_of_equal_accuracies_draw_although_the_mean_rounds_outside_them() -> None:
    # 0.1% three times: the float mean lies 1e-17 above the maximum, which matplotlib refuses as a negative bar.
    from cifarbench.evaluation.stats import mean_spread
    from cifarbench.explaining import PermutationRow
    from cifarbench.reporting import plots

    same = [0.001] * 3
    assert plots.per_class_figure({"fnn": [[0.001] * 10] * 3}, [f"c{i}" for i in range(10)]).axes[0].patches
    row = PermutationRow(model="fnn", plain=mean_spread(same), permuted=mean_spread(same), change=None, plain_runs=[],
                         permuted_runs=[])
    assert [round(b.get_height(), 9) for b in plots.permutation_figure([row]).axes[0].patches] == [0.1, 0.1]
    band = plots.learning_curves_figure({"fnn": [[{"epoch": 1, "seconds": 1.0, "test_accuracy": 0.001}]] * 3})
    assert band.axes[0].lines
