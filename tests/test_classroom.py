"""The classroom: `submit` bundles a student's run, `grade` re-scores every bundle of an inbox honestly (student
code only with --trust-code), flags claims that do not hold, ranks with ties, and `predict --labels` scores a
folder of images against a labels file."""

from __future__ import annotations

import csv
import io
import json
import os
import shlex
import subprocess
import sys
import tarfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cifarbench.classroom import (
    Flag,
    GradedRun,
    LeaderboardEntry,
    check_student,
    claim_flags,
    grade,
    leaderboard,
    rank_entries,
    selection_flags,
    submit,
)
from cifarbench.cli import main
from cifarbench.config import TrainConfig
from cifarbench.data import cifar10
from cifarbench.errors import CifarbenchError
from cifarbench.evaluation.stats import mean_spread
from cifarbench.inference import predict_images
from cifarbench.running import train_run
from cifarbench.runs.records import RunRecord
from cifarbench.training.recipes import make_config
from cifarbench.training.state import EpochMetrics
from conftest import md5_of, write_python_layout

MARKER = "cifarbench-marker"
EVIL_MODEL = f'''
import pathlib

# What a hostile submission could do when its code runs: here, only leave a file in the home folder.
(pathlib.Path.home() / "{MARKER}").write_text("student code ran")

from torch import nn


class Net(nn.Module):
    def __init__(self, num_classes=10, in_shape=(3, 32, 32)):
        super().__init__()
        c, h, w = in_shape
        self.fc = nn.Linear(c * h * w, num_classes)

    def forward(self, x):
        return self.fc(x.flatten(1))
'''


def student_run(data: Path, runs: Path, model: str, **choices) -> RunRecord:
    """A student's short run on the tiny data set, in the student's own runs folder."""
    choices = {"batch_size": 50, **choices}
    config = make_config(model, "seed", device="cpu", data_dir=str(data), verify=False, **choices)
    return train_run(config, runs_dir=runs, progress=False)


def edit_manifest(archive: Path, edit) -> None:
    """Rewrite an archive with its manifest changed by `edit` (what a student with a text editor could do)."""
    with tarfile.open(archive, "r:gz") as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(archive, "w:gz") as tar:
        for member, payload in members:
            if member.name == "manifest.json":
                manifest = json.loads(payload)
                edit(manifest)
                payload = json.dumps(manifest).encode()
                member.size = len(payload)
            tar.addfile(member, io.BytesIO(payload))


def grade_cli(inbox: Path, data: Path, *extra: str, home: Path, cwd: Path) -> dict:
    """`cifarbench grade` in a fresh process whose home folder is `home`: the way docs/classroom.md runs it."""
    env = {"HOME": str(home), "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
           "CIFARBENCH_CACHE": os.environ["CIFARBENCH_CACHE"]}
    proc = subprocess.run([sys.executable, "-m", "cifarbench", "grade", str(inbox), "--data-dir", str(data),
                           "--no-verify", "--device", "cpu", "--json", *extra], capture_output=True, text=True,
                          timeout=300, env=env, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def by_student(result: dict) -> dict[str, dict]:
    return {r["student"]: r for r in result["runs"]}


@pytest.fixture
def class_data(tmp_path: Path) -> Path:
    return write_python_layout(tmp_path / "data", n=100)  # 100 test images: claims are checked to 3 images


@pytest.mark.slow
def test_grading_ranks_the_honest_flags_the_edited_claim_and_runs_student_code_only_with_trust(
        class_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    inbox = tmp_path / "inbox"
    # Three students, each with their own runs folder and home.
    honest = student_run(class_data, tmp_path / "ann", "fnn", epochs=2, val_split=100)
    edited = student_run(class_data, tmp_path / "ben", "fnn", epochs=1, seed=1)
    (tmp_path / "cat-home").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "cat-home"))
    (tmp_path / "evil.py").write_text(EVIL_MODEL)
    evil = student_run(class_data, tmp_path / "cat", f"{tmp_path / 'evil.py'}:Net", epochs=1)
    (tmp_path / "cat-home" / MARKER).unlink()  # the student's own machine ran it while training; not our concern

    submit(honest.run_id, student="Ann", out=inbox, runs_dir=tmp_path / "ann")
    ben = submit(edited.run_id, student="Ben", out=inbox, runs_dir=tmp_path / "ben")
    submit(evil.run_id, student="Cat", out=inbox, runs_dir=tmp_path / "cat")
    assert edited.test_accuracy < 0.9
    claimed = edited.test_accuracy + 0.1
    edit_manifest(Path(ben.archive), lambda m: m["runs"][0]["record"].update(test_accuracy=claimed))

    # The teacher grades without --trust-code.
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    result = grade_cli(inbox, class_data, home=teacher, cwd=teacher)
    runs = by_student(result)
    ann = runs["Ann"]
    assert ann["graded"] and ann["rescored_accuracy"] == pytest.approx(honest.test_accuracy) and ann["flags"] == []
    assert any(e["student"] == "Ann" and e["rank"] >= 1 and e["rescored_accuracy"]["mean"] == ann["rescored_accuracy"]
               for e in result["leaderboard"])
    ben = runs["Ben"]
    assert ben["rescored_accuracy"] == pytest.approx(edited.test_accuracy)
    assert [f["kind"] for f in ben["flags"] if f["severity"] == "error"] == ["claim-mismatch"]
    cat = runs["Cat"]
    assert not cat["graded"] and "--trust-code" in cat["error"] and "refusing to run" in cat["error"]
    assert "Cat" not in [e["student"] for e in result["leaderboard"]]
    assert not list(tmp_path.rglob(MARKER)), "student code ran without --trust-code"
    page = Path(result["html"]).read_text()
    assert "claim-mismatch" in page and "refusing to run" in page

    # With --trust-code, run as docs/classroom.md says: as a separate grading user, in that user's home.
    grader = tmp_path / "grader-home"
    grader.mkdir()
    trusted = grade_cli(inbox, class_data, "--trust-code", "--out", str(grader / "results"), "--work-dir",
                        str(grader / "grading"), home=grader, cwd=grader)
    runs = by_student(trusted)
    assert runs["Cat"]["graded"] and runs["Cat"]["rescored_accuracy"] == pytest.approx(evil.test_accuracy)
    assert runs["Ann"]["rescored_accuracy"] == ann["rescored_accuracy"] and runs["Ann"]["flags"] == []
    assert [f["kind"] for f in runs["Ben"]["flags"] if f["severity"] == "error"] == ["claim-mismatch"]
    # The code ran in its box: its home was the box's scratch space, gone with it.
    assert not list(tmp_path.rglob(MARKER)) and not (Path.home() / MARKER).exists()
    assert runs["Cat"]["isolation"] in ("bubblewrap", "process")
    assert runs["Ann"]["isolation"] == runs["Cat"]["isolation"]
    assert (grader / "results" / "leaderboard.html").is_file() and not (teacher / MARKER).exists()
    assert not list((grader / "grading").glob("0*")), "the work folder keeps no submission once it is graded"


@pytest.mark.slow
def test_a_bad_submission_is_one_row_with_its_reason_and_the_others_are_graded(class_data: Path,
                                                                              tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    run = student_run(class_data, tmp_path / "ann", "fnn", epochs=1)
    good = Path(submit(run.run_id, student="Ann", out=inbox, runs_dir=tmp_path / "ann").archive)
    (inbox / "garbage.tar.gz").write_bytes(b"not an archive")
    tampered = inbox / "Dan-copy.tar.gz"
    tampered.write_bytes(good.read_bytes())
    edit_manifest(tampered, lambda m: (m.update(student="Dan"),
                                       m["runs"][0]["files"].update({"checkpoint.pt": "0" * 64})))
    unnamed = inbox / "no-name.tar.gz"
    unnamed.write_bytes(good.read_bytes())
    edit_manifest(unnamed, lambda m: m.update(student=None))

    # What a student with a text editor can put in a manifest: no well-typed figures, a config that is no dict.
    mangled = inbox / "Fay.tar.gz"
    mangled.write_bytes(good.read_bytes())
    edit_manifest(mangled, lambda m: (m.update(student="Fay"), m["runs"][0]["record"].update(
        test_accuracy="99%", train_seconds="fast", train_flops="many")))
    crafted = inbox / "Gus.tar.gz"
    crafted.write_bytes(good.read_bytes())
    edit_manifest(crafted, lambda m: (m.update(student="Gus"), m["runs"][0]["record"].update(config="junk")))

    result = grade(inbox, data_dir=str(class_data), verify=False, device="cpu")
    rows = {r.archive: r for r in result.runs}
    assert rows[good.name].graded
    fay = rows[mangled.name]
    assert fay.graded and fay.claimed_accuracy is None and fay.train_seconds is None
    assert "no-claim" in [f.kind for f in fay.flags]
    assert not rows[crafted.name].graded and rows[crafted.name].error
    assert "not a readable runs archive" in rows["garbage.tar.gz"].error
    assert rows[tampered.name].error == f"not imported: {'checkpoint.pt'} does not match the manifest"
    assert "not a submission" in rows[unnamed.name].error
    assert sorted(e.student for e in result.leaderboard) == ["Ann", "Fay"]
    table = list(csv.DictReader(io.StringIO(Path(result.csv).read_text())))
    assert sorted((t["student"], t["rank"], t["tied"]) for t in table if t["rank"]) == [("Ann", "1", "True"),
                                                                                  ("Fay", "1", "True")]
    assert sorted(t["error"][:12] for t in table if not t["rank"]) == sorted(
        r.error[:12] for r in result.not_graded)
    # in a notebook the grading shows itself: the leaderboard, the flags and every submission not graded
    shown = result._repr_html_()
    assert shown.count("<table") == 3 and ">Ann<" in shown and ">no-claim<" in shown
    assert "garbage.tar.gz" in shown and "not a readable runs archive" in shown

    with pytest.raises(CifarbenchError, match="not a folder of submissions"):
        grade(tmp_path / "missing", data_dir=str(class_data), verify=False)
    assert main(["grade", str(tmp_path / "missing"), "--data-dir", str(class_data), "--no-verify"]) == 1


def test_grading_again_reuses_only_its_own_work_folder(class_data: Path, tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    run = student_run(class_data, tmp_path / "ann", "fnn", epochs=1)
    submit(run.run_id, student="Ann", out=inbox, runs_dir=tmp_path / "ann")
    first = grade(inbox, data_dir=str(class_data), verify=False, device="cpu")
    again = grade(inbox, data_dir=str(class_data), verify=False, device="cpu")
    assert first.runs[0].rescored_accuracy == again.runs[0].rescored_accuracy == run.test_accuracy
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("precious")
    with pytest.raises(CifarbenchError, match="holds files that no grading wrote"):
        grade(inbox, data_dir=str(class_data), verify=False, work_dir=mine)
    assert (mine / "thesis.tex").read_text() == "precious"


def test_the_same_checkpoint_from_two_students_is_flagged(class_data: Path, tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    run = student_run(class_data, tmp_path / "ann", "fnn", epochs=1)
    submit(run.run_id, student="Ann", out=inbox, runs_dir=tmp_path / "ann")
    submit(run.run_id, student="Eve", out=inbox, runs_dir=tmp_path / "ann")
    result = grade(inbox, data_dir=str(class_data), verify=False, device="cpu")
    assert all("duplicate" in [f.kind for f in r.flags] for r in result.runs)


def test_submit_names_the_archive_after_the_student_and_refuses_unsafe_names(class_data: Path,
                                                                             tmp_path: Path) -> None:
    run = student_run(class_data, tmp_path / "runs", "fnn", epochs=1)
    out = submit(run.run_id[:20], student="Ada Lovelace", out=tmp_path / "inbox", runs_dir=tmp_path / "runs")
    assert Path(out.archive).name == f"Ada_Lovelace-{run.run_id}.tar.gz"
    for bad in ("../x", "", " ada", "ada/b", "=cmd()", "-rf", "a\nb"):
        with pytest.raises(CifarbenchError, match="^student .*: use letters"):
            check_student(bad)
    assert check_student("José_2.b-c") == "José_2.b-c"
    assert main(["submit", run.run_id, "--student", "../up", "--out", str(tmp_path / "x"),
                 "--runs-dir", str(tmp_path / "runs")]) == 1
    assert not (tmp_path / "x").exists()


# --- The rules, on made-up numbers ---------------------------------------------------------------------------

def test_claims_within_evaluation_noise_pass_and_beyond_it_are_flagged() -> None:
    assert claim_flags(0.9120, 0.9100, 10_000, same_data=True) == []  # 20 images: float noise
    (flag,) = claim_flags(0.9200, 0.9100, 10_000, same_data=True)
    assert flag.kind == "claim-mismatch" and flag.severity == "error" and "+1.00 points" in flag.message
    (flag,) = claim_flags(0.9200, 0.9100, 10_000, same_data=True, tta_matches=lambda c: "TTA 2 gives it")
    assert flag.message.endswith("TTA 2 gives it")
    assert claim_flags(0.53, 0.50, 100, same_data=True) == []  # 3 images of 100
    assert [f.kind for f in claim_flags(0.60, 0.50, 100, same_data=False)] == ["data-mismatch"]
    assert [f.kind for f in claim_flags(None, 0.50, 100, same_data=True)] == ["no-claim"]


def test_selection_flags_say_when_the_test_set_may_have_chosen_the_model() -> None:
    history = [EpochMetrics(epoch=e, train_loss=1.0, test_loss=1.0, test_accuracy=acc, seconds=e, eval_seconds=0.1)
               for e, acc in ((1, 0.40), (2, 0.55), (3, 0.50))]
    record = RunRecord(run_id="r", model="cnn", recipe="seed", seed=0, epochs=3, history=history)
    config = TrainConfig(model="cnn", epochs=3)
    kinds = lambda flags: [f.kind for f in flags]  # noqa: E731
    assert kinds(selection_flags(record, config, 0.55, 10_000, 10)) == ["claim-from-epoch", "test-selection"]
    assert kinds(selection_flags(record, config, 0.50, 10_000, 3)) == []
    assert kinds(selection_flags(record, replace(config, val_split=5000), 0.50, 10_000, 10)) == []
    assert kinds(selection_flags(record, replace(config, budget_seconds=60.0), 0.50, 10_000, 10)) == []


def entry(student: str, accs: list[float], images: int = 10_000) -> LeaderboardEntry:
    return LeaderboardEntry(rank=0, tied=False, student=student, model="cnn", recipe="seed",
                            run_ids=[f"{student}{i}" for i in range(len(accs))], params=None, train_flops=None,
                            train_seconds=None, claimed=None, rescored=mean_spread(accs), hidden=None, images=images,
                            flags=[])


def test_ranks_share_a_place_only_within_noise() -> None:
    ranked = rank_entries([entry("c", [0.700]), entry("a", [0.712]), entry("b", [0.705]), entry("d", [0.60])])
    assert [(e.student, e.rank_label) for e in ranked] == [("a", "1="), ("b", "1="), ("c", "1="), ("d", "4")]
    ranked = rank_entries([entry("a", [0.712]), entry("b", [0.690])])  # 2.2 points on 10,000 images
    assert [e.rank_label for e in ranked] == ["1", "2"]
    # Seeds that disagree widely make a gap noise that one seed each would not.
    ranked = rank_entries([entry("a", [0.76, 0.66, 0.72]), entry("b", [0.690])])
    assert [e.rank_label for e in ranked] == ["1=", "1="]


def test_several_seeds_of_a_student_are_one_entry_with_mean_and_spread() -> None:
    runs = [GradedRun(archive="x.tar.gz", student="Ann", run_id=f"r{s}", model="cnn", recipe="seed", seed=s, epochs=10,
                      params=100, train_flops=10**12, train_seconds=5.0, claimed_accuracy=a, rescored_accuracy=a,
                      test_images=10_000, flags=[Flag("test-selection", "warning", "...")] if s == 0 else [])
            for s, a in enumerate((0.60, 0.62, 0.64))]
    runs.append(GradedRun(archive="y.tar.gz", student="Ben", run_id="q", model="fnn", recipe="seed", seed=0, epochs=5,
                          params=10, train_flops=10**11, train_seconds=1.0, claimed_accuracy=0.45,
                          rescored_accuracy=0.45, test_images=10_000))
    board = leaderboard(runs, test_images=10_000)
    assert [(e.student, len(e.run_ids), e.rank) for e in board] == [("Ann", 3, 1), ("Ben", 1, 2)]
    assert board[0].rescored.mean == pytest.approx(0.62) and board[0].rescored.std == pytest.approx(0.02)
    assert board[0].flags == ["test-selection"]


# --- predict --labels ------------------------------------------------------------------------------------------

@pytest.fixture
def labelled_folder(tiny_py: Path, tmp_path: Path) -> tuple[Path, list[int]]:
    """Eight test images of the tiny set as PNGs, with their true labels."""
    from cifarbench.config import DataConfig
    from cifarbench.data import load_dataset

    test = load_dataset(DataConfig(data_dir=str(tiny_py), verify=False)).test
    folder = tmp_path / "mine"
    folder.mkdir()
    for i in range(8):
        Image.fromarray(np.moveaxis(test.images[i], 0, -1)).save(folder / f"img{i}.png")
    return folder, test.labels[:8].tolist()


def test_predict_labels_scores_a_folder_with_per_class_results(tiny_py: Path, tmp_path: Path,
                                                              labelled_folder: tuple[Path, list[int]],
                                                              capsys: pytest.CaptureFixture) -> None:
    run = student_run(tiny_py, tmp_path / "runs", "fnn", epochs=2, batch_size=10)
    folder, truth = labelled_folder
    # Names for some rows, indices for the others, a header, a class name in another case.
    rows = [f"img{i}.png,{cifar10.CLASSES[y].upper() if i % 2 else y}" for i, y in enumerate(truth)]
    labels = tmp_path / "labels.csv"
    labels.write_text("filename,label\n" + "\n".join(rows) + "\n")
    top1 = predict_images(run.run_dir, [folder], top=1)["predictions"]
    expected = np.mean([p["top"][0]["index"] == y for p, y in zip(top1, truth, strict=True)])

    assert main(["predict", run.run_id, str(folder), "--labels", str(labels), "--runs-dir", str(tmp_path / "runs"),
                 "--json"]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["n"] == 8 and scored["accuracy"] == pytest.approx(expected)
    assert sum(map(sum, scored["confusion"])) == 8 and len(scored["per_class_accuracy"]) == 10
    assert [i["label"] for i in scored["images"]] == [cifar10.CLASSES[y] for y in truth]

    assert main(["predict", run.run_id, str(folder), "--labels", str(labels), "--runs-dir",
                 str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    assert f"accuracy {100 * expected:.2f}%" in out and "true \\ predicted" in out and "airplane" in out


def test_predict_labels_refuses_missing_extra_and_unknown_labels(tiny_py: Path, tmp_path: Path,
                                                                labelled_folder: tuple[Path, list[int]],
                                                                capsys: pytest.CaptureFixture) -> None:
    run = student_run(tiny_py, tmp_path / "runs", "fnn", epochs=1, batch_size=10)
    folder, truth = labelled_folder
    cases = {"img0.png,cat\n": "no label for 7 image", "\n".join(f"img{i}.png,{y}" for i, y in enumerate(truth))
             + "\nghost.png,cat\n": "not among the images", "img0.png,unicorn\n": "'unicorn' is not one of the model's",
             "img0.png,cat,dog\n": "line 1: expected `filename,label`"}
    for text, message in cases.items():
        labels = tmp_path / "labels.csv"
        labels.write_text(text)
        assert main(["predict", run.run_dir, str(folder), "--labels", str(labels)]) == 1
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


# --- The README's teacher section, and the real data ------------------------------------------------------------

def readme_teacher_commands() -> list[list[str]]:
    """The command lines of the README's `## For teachers` block, as argument lists."""
    text = (Path(__file__).parents[1] / "README.md").read_text()
    section = text.split("## For teachers", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [shlex.split(line.split("  #")[0]) for line in block.splitlines() if line and not line.startswith("#")]


@pytest.mark.slow
def test_readme_teacher_section_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = write_python_layout(tmp_path / "data", n=1010)  # 5,050 training images: --val-split 5000 leaves 50
    folder = data / cifar10.PY_DIR
    monkeypatch.setattr(cifar10, "OFFICIAL_MD5", {p.name: md5_of(p) for p in folder.iterdir()})
    monkeypatch.setenv("CIFARBENCH_DATA", str(data))
    monkeypatch.chdir(tmp_path)
    commands = readme_teacher_commands()
    assert [c[:2] for c in commands] == [["cifarbench", "train"], ["cifarbench", "submit"]] * 2 + [
        ["cifarbench", "grade"]]
    for argv in commands:
        assert main(argv[1:]) == 0, argv
    table = list(csv.DictReader(io.StringIO((tmp_path / "inbox" / "leaderboard.csv").read_text())))
    assert sorted(t["student"] for t in table) == ["Ada", "Alan"] and all(t["rank"] and not t["flags"] for t in table)
    assert all(t["claimed_mean"] == t["rescored_mean"] for t in table)
    assert (tmp_path / "inbox" / "leaderboard.html").is_file()


@pytest.mark.realdata
@pytest.mark.slow
def test_real_short_runs_are_graded_into_a_leaderboard_page_chromium_renders(real_data_dir: Path,
                                                                             tmp_path: Path) -> None:
    from test_report import Dom, chromium, require_chromium

    require_chromium()
    students, inbox = tmp_path / "students", tmp_path / "inbox"  # a second runs folder: not the teacher's
    for model, name in (("fnn", "Ann"), ("cnn", "Ben")):
        assert main(["train", model, "--epochs", "1", "--batch-size", "500", "--data-dir", str(real_data_dir),
                     "--no-verify", "--runs-dir", str(students), "--device", "cpu", "--json"]) == 0
        assert main(["submit", "--student", name, "--out", str(inbox), "--runs-dir", str(students)]) == 0
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    from cifarbench.config import DataConfig
    from cifarbench.data import load_dataset

    test = load_dataset(DataConfig(data_dir=str(real_data_dir), verify=False)).test
    rows = ["filename,label"]
    for i in range(0, 10_000, 50):  # 200 test images, mirrored: a stand-in for images nobody trained on
        Image.fromarray(np.moveaxis(test.images[i], 0, -1)[:, ::-1]).save(hidden / f"h{i}.png")
        rows.append(f"h{i}.png,{cifar10.CLASSES[test.labels[i]]}")
    (hidden / "labels.csv").write_text("\n".join(rows) + "\n")

    result = grade(inbox, data_dir=str(real_data_dir), verify=False, device="cpu", hidden=hidden)
    assert [r.graded for r in result.runs] == [True, True]
    assert all(r.claimed_accuracy == pytest.approx(r.rescored_accuracy, abs=1e-9) and r.test_images == 10_000
               for r in result.runs)
    assert all(not [f for f in r.flags if f.severity == "error"] for r in result.runs)
    page = Path(result.html)
    dom = Dom(chromium("--dump-dom", page.as_uri(), home=tmp_path))
    assert dom.rows["leaderboard"] == 2 and not dom.links
    text = " ".join(dom.text)
    assert "hidden set" in text and "Ann" in text and "Ben" in text
    for run in result.runs:
        assert f"{100 * run.rescored_accuracy:.2f}%" in text and f"{100 * run.hidden_accuracy:.2f}%" in text
