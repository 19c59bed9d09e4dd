"""The trust boundary: nothing from a submission, an import or a copied folder runs or is read unless the user
said so (docs/safety.md, docs/classroom.md).

Each family is attacked through the real entry points with a victim that must survive and a marker that must
never appear: model references that name importable callables or files, a foreign config's data folder,
archives that inflate or multiply, checkpoints that claim huge shapes, student code that interrupts, exits,
hangs, crashes or eats memory under `grade --trust-code`, renamed copies, look-alike names and a roster.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

import cifarbench as cb
from cifarbench.api import grade
from cifarbench.classroom import name_flags, name_skeleton, submit
from cifarbench.cli import main
from cifarbench.errors import CifarbenchError
from cifarbench.running import train_run
from cifarbench.runs import bundle as bundle_mod
from cifarbench.runs.bundle import export_runs, import_runs, read_bundle
from cifarbench.runs.limits import BundleLimits
from cifarbench.sandbox import Limits, choose_isolation
from cifarbench.training.checkpoint import save_checkpoint
from cifarbench.training.recipes import make_config
from conftest import write_python_layout

MARKER = "trust-boundary-marker"


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return write_python_layout(tmp_path / "data", n=100)


def tiny_run(data: Path, runs: Path, model: str = "fnn", **choices):
    config = make_config(model, "seed", device="cpu", data_dir=str(data), verify=False, epochs=1, batch_size=50,
                         **choices)
    return train_run(config, runs_dir=runs, progress=False)


def rewrite(archive: Path, out: Path, *, config=None, checkpoint=None, manifest=None, add=()) -> Path:
    """A copy of a runs archive with its run's config (config.json, the checkpoint's and the manifest's) and
    checkpoint payload edited, file hashes made to match: what an adversary with Python can produce."""
    with tarfile.open(archive, "r:gz") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isreg()}
    data = json.loads(members.pop("manifest.json"))
    for entry in data["runs"]:
        run_id = entry["record"]["run_id"]
        payload = torch.load(io.BytesIO(members[f"{run_id}/checkpoint.pt"]), weights_only=True)
        if config:
            config(payload["config"])
            payload["model"] = payload["config"]["model"]
            config(entry["record"]["config"])
            entry["record"]["model"] = entry["record"]["config"]["model"]
            stored = json.loads(members[f"{run_id}/config.json"])
            config(stored["config"])
            stored["model"] = stored["config"]["model"]
            members[f"{run_id}/config.json"] = json.dumps(stored).encode()
        if checkpoint:
            checkpoint(payload)
        tmp = out.parent / f".{out.name}.ckpt"
        save_checkpoint(payload, tmp)
        members[f"{run_id}/checkpoint.pt"] = tmp.read_bytes()
        tmp.unlink()
        import hashlib

        entry["files"] = {name.split("/", 1)[1]: hashlib.sha256(content).hexdigest()
                          for name, content in members.items() if name.startswith(run_id + "/")}
    if manifest:
        manifest(data)
    with tarfile.open(out, "w:gz") as tar:
        for name, content in [("manifest.json", json.dumps(data).encode()), *members.items(), *add]:
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return out


def callable_refs(tmp_path: Path) -> dict[str, dict]:
    """Config changes that name code to run: importable callables with arguments, and a file."""
    victim = tmp_path / "victim"
    victim.mkdir(exist_ok=True)
    (victim / "keep.txt").write_text("the teacher's file")
    evil = tmp_path / "evil.py"
    evil.write_text(f"import pathlib\npathlib.Path({str(tmp_path / MARKER)!r}).write_text('ran')\n"
                    "from torch import nn\nclass Tiny(nn.Module):\n    def __init__(self, **kw):\n"
                    "        super().__init__()\n        self.fc = nn.Linear(3072, 10)\n"
                    "    def forward(self, x):\n        return self.fc(x.flatten(1))\n")
    return {
        "shell": {"model": "subprocess:getoutput", "model_kwargs": {"cmd": f"touch {tmp_path / MARKER}"}},
        "rmtree": {"model": "shutil:rmtree", "model_kwargs": {"path": str(victim)}},
        "file": {"model": f"{evil}:Tiny", "model_kwargs": {}},
        "relative-file": {"model": "../evil.py:Tiny", "model_kwargs": {}},
    }


def untouched(tmp_path: Path) -> None:
    assert not list(tmp_path.rglob(MARKER)), "code named by a foreign config ran"
    assert (tmp_path / "victim" / "keep.txt").read_text() == "the teacher's file"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["shell", "rmtree", "file", "relative-file"])
def test_a_foreign_config_naming_code_is_refused_by_every_command_and_the_api(
        data: Path, tmp_path: Path, kind: str, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    run = tiny_run(data, tmp_path / "alice")
    archive = export_runs([run.run_id], tmp_path / "alice.tar.gz", runs_dir=tmp_path / "alice")
    change = callable_refs(tmp_path)[kind]
    forged = rewrite(archive, tmp_path / "forged.tar.gz",
                     config=lambda c: c.update(model=change["model"], model_kwargs=change["model_kwargs"],
                                               model_sha256=None))
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")  # so that ../evil.py would resolve
    runs = str(tmp_path / "teacher")
    assert main(["runs", "import", str(forged), "--runs-dir", runs]) == 0
    capsys.readouterr()
    images = tmp_path / "img"
    images.mkdir()
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 10, 10)).save(images / "a.png")
    on_data = ["--data-dir", str(data), "--no-verify"]
    commands = [["eval", run.run_id, *on_data], ["predict", run.run_id, str(images)],
                ["report", run.run_id, "--out", str(tmp_path / "r.html"), *on_data],
                ["explain", run.run_id, "--out", str(tmp_path / "ex"), *on_data],
                ["experiment", "translation", run.run_id, "--out", str(tmp_path / "exp"), *on_data],
                ["runs", "compare", run.run_id, "--mcnemar", *on_data]]
    for command in commands:
        for trust in ([], ["--trust-code"]):
            code = main([*command, "--runs-dir", runs, *trust])
            err = capsys.readouterr().err
            assert code == 1 and "Traceback" not in err, (command, err)
            errors = [line for line in err.splitlines() if line.startswith("cifarbench: error:")]
            assert len(errors) == 1 and change["model"] in errors[0], (command, trust, err)
            untouched(tmp_path)
    for api in (lambda: cb.evaluate(run.run_id, runs_dir=runs, data_dir=str(data), verify=False, trust_code=True),
                lambda: cb.load_trained_model(run.run_id, runs_dir=runs, trust_code=True)):
        with pytest.raises(CifarbenchError, match="came from elsewhere"):
            api()
        untouched(tmp_path)


def resumable_forgery(data: Path, tmp_path: Path) -> tuple[str, Path]:
    """An interrupted run exported by hand (export takes completed runs only), its config naming a callable."""
    run = tiny_run(data, tmp_path / "alice")
    folder = tmp_path / "alice" / run.run_id
    payload = torch.load(folder / "checkpoint.pt", weights_only=True)
    payload["position"]["step"] = 0  # not finished: resumable
    save_checkpoint(payload, folder / "checkpoint.pt")
    archive = export_runs([run.run_id], tmp_path / "alice.tar.gz", runs_dir=tmp_path / "alice")
    change = callable_refs(tmp_path)["shell"]
    return run.run_id, rewrite(archive, tmp_path / "forged.tar.gz", config=lambda c: c.update(
        model=change["model"], model_kwargs=change["model_kwargs"], model_sha256=None))


@pytest.mark.slow
def test_resume_of_a_foreign_run_naming_code_is_refused(data: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    run_id, forged = resumable_forgery(data, tmp_path)
    runs = str(tmp_path / "teacher")
    import_runs(forged, runs_dir=runs)
    for trust in ([], ["--trust-code"]):
        code = main(["train", "--resume", run_id, "--runs-dir", runs, *trust])
        err = capsys.readouterr().err
        assert code == 1 and "subprocess:getoutput" in err and "Traceback" not in err, err
    untouched(tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("trust", [False, True])
def test_grade_refuses_a_submission_naming_code_and_grades_the_rest(data: Path, tmp_path: Path, trust: bool) -> None:
    inbox = tmp_path / "inbox"
    good = tiny_run(data, tmp_path / "ann")
    submit(good.run_id, student="Ann", out=inbox, runs_dir=tmp_path / "ann")
    bad = tiny_run(data, tmp_path / "bob", seed=1)
    archive = Path(submit(bad.run_id, student="Bob", out=tmp_path / "bob-out", runs_dir=tmp_path / "bob").archive)
    for kind, change in callable_refs(tmp_path).items():
        rewrite(archive, inbox / f"Bob-{kind}.tar.gz", config=lambda c, change=change: c.update(
            model=change["model"], model_kwargs=change["model_kwargs"], model_sha256=None),
            manifest=lambda m, kind=kind: m.update(student=f"Bob {kind}"))
    result = grade(inbox, data_dir=str(data), verify=False, device="cpu", trust_code=trust,
                   limits=Limits(timeout=300, memory_mib=4096))
    rows = {r.student: r for r in result.runs}
    assert rows["Ann"].graded
    for kind, change in callable_refs(tmp_path).items():
        row = rows[f"Bob {kind}"]
        assert not row.graded and change["model"] in row.error and "came from elsewhere" in row.error, row
    untouched(tmp_path)
    assert Path(result.html).is_file()


@pytest.mark.slow
def test_a_foreign_runs_data_settings_never_choose_the_test_set(data: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The student's config names a forged test set (every label the model's prediction) and verify: false;
    the teacher's eval reads the local data ($CIFARBENCH_DATA) instead, and says the fingerprints differ."""
    run = tiny_run(data, tmp_path / "alice")
    honest = run.test_accuracy
    loaded = cb.load_trained_model(run.run_id, runs_dir=tmp_path / "alice")
    forged_dir = write_python_layout(tmp_path / "forged", n=100, seed=7)
    from cifarbench.data.cifar10 import load_cifar10

    forged = load_cifar10(forged_dir, verify=False)
    labels = loaded.predicted_classes(forged.test.images)
    import pickle

    batch = forged_dir / "cifar-10-batches-py" / "test_batch"
    content = pickle.loads(batch.read_bytes(), encoding="bytes")
    content[b"labels"] = [int(x) for x in labels]
    batch.write_bytes(pickle.dumps(content))
    assert cb.evaluate(run.run_id, runs_dir=tmp_path / "alice", data_dir=str(forged_dir),
                       verify=False).test_accuracy == 1.0  # the forgery works when asked for
    archive = export_runs([run.run_id], tmp_path / "a.tar.gz", runs_dir=tmp_path / "alice")
    forged_archive = rewrite(archive, tmp_path / "f.tar.gz",
                             config=lambda c: c["data"].update(data_dir=str(forged_dir), verify=False))
    import_runs(forged_archive, runs_dir=tmp_path / "teacher")
    monkeypatch.setenv("CIFARBENCH_DATA", str(data))
    # The local default is to verify; the tiny local copy is not the official files, so the teacher says so.
    with pytest.raises(CifarbenchError, match="md5"):
        cb.evaluate(run.run_id, runs_dir=tmp_path / "teacher")
    result = cb.evaluate(run.run_id, runs_dir=tmp_path / "teacher", verify=False)
    assert result.test_accuracy == pytest.approx(honest) and result.test_accuracy < 1.0
    assert result.dataset_matches_training


# --- sizes and counts -----------------------------------------------------------------------------------------

def bomb(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    """A gzip'd tar whose members are written header by header (content may be short of what is declared)."""
    with gzip.open(path, "wb", compresslevel=1) as out:
        for info, content in members:
            out.write(info.tobuf(format=tarfile.PAX_FORMAT if info.pax_headers else tarfile.USTAR_FORMAT))
            if content is not None:
                out.write(content + b"\0" * (-len(content) % 512))
        out.write(b"\0" * 1024)
    return path


def info(name: str, size: int, pax: dict | None = None) -> tarfile.TarInfo:
    member = tarfile.TarInfo(name)
    member.size = size
    if pax:
        member.pax_headers = pax
    return member


def manifest_member(runs: int, files: dict | None = None) -> tuple[tarfile.TarInfo, bytes]:
    record = {"run_id": "r1", "model": "fnn", "recipe": "seed", "seed": 0, "epochs": 1, "config": {}, "dataset": {}}
    entries = [{"record": {**record, "run_id": f"20260101-000000-fnn-s0-{i:04x}"},
                "files": files or {"checkpoint.pt": "0" * 64, "config.json": "0" * 64}} for i in range(runs)]
    content = json.dumps({"format": bundle_mod.FORMAT, "student": "Eve", "runs": entries}).encode()
    return info("manifest.json", len(content)), content


@pytest.fixture
def inflated(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many bytes each read of an archive inflated: a bound on its time and memory, whatever the machine."""
    counts: list[int] = []
    original = bundle_mod._Inflated.read

    def read(self, n: int = -1) -> bytes:
        out = original(self, n)
        counts.append(self.count)
        return out

    monkeypatch.setattr(bundle_mod._Inflated, "read", read)
    return counts


def test_a_declared_huge_member_is_refused_at_its_header(tmp_path: Path, inflated: list[int]) -> None:
    run_id = "20260101-000000-fnn-s0-0000"
    archive = bomb(tmp_path / "b.tar.gz", [manifest_member(1), (info(f"{run_id}/checkpoint.pt", 5 << 30), None)])
    with pytest.raises(CifarbenchError, match="more than 1024 MiB uncompressed.*BundleLimits.max_bytes="):
        import_runs(archive, runs_dir=tmp_path / "runs")
    assert max(inflated) < 1 << 20
    assert not list((tmp_path / "runs").glob("*/checkpoint.pt"))


def test_an_archive_that_inflates_past_the_cap_is_cut_off_in_one_pass(tmp_path: Path, inflated: list[int]) -> None:
    """A member that declares a small size but a stream of 64 MiB of zeros after the archive: the inflated bytes
    read stay within the cap, and the archive is refused or ends there."""
    limits = BundleLimits(max_bytes=4 << 20)
    run_id = "20260101-000000-fnn-s0-0000"
    zeros = b"\0" * (64 << 20)
    archive = tmp_path / "z.tar.gz"
    header, content = manifest_member(1)
    with gzip.open(archive, "wb", compresslevel=1) as out:
        out.write(header.tobuf() + content + b"\0" * (-len(content) % 512))
        out.write(info(f"{run_id}/checkpoint.pt", 8 << 20).tobuf())
        out.write(zeros)
    with pytest.raises(CifarbenchError, match="BundleLimits.max_bytes="):
        import_runs(archive, runs_dir=tmp_path / "runs", limits=limits)
    assert max(inflated) <= limits.max_bytes + bundle_mod.MAX_MANIFEST_BYTES + (2 << 20)


def test_many_members_and_many_runs_are_refused_by_count(tmp_path: Path, inflated: list[int]) -> None:
    run_id = "20260101-000000-fnn-s0-0000"
    folder = info(run_id, 0)
    folder.type = tarfile.DIRTYPE
    archive = bomb(tmp_path / "m.tar.gz", [manifest_member(1), *[(folder, None)] * 100_000])  # 51 MiB of headers
    with pytest.raises(CifarbenchError, match="more than 256 members.*BundleLimits.max_members="):
        import_runs(archive, runs_dir=tmp_path / "runs")
    assert max(inflated) < 1 << 20
    with pytest.raises(CifarbenchError, match="more than 8 members"):
        import_runs(archive, runs_dir=tmp_path / "runs", limits=BundleLimits(max_members=8))
    unlisted = bomb(tmp_path / "u.tar.gz", [manifest_member(1), (info(f"{run_id}/x", 0), b"")])
    with pytest.raises(CifarbenchError, match="not listed in the manifest"):
        import_runs(unlisted, runs_dir=tmp_path / "runs")
    many = bomb(tmp_path / "r.tar.gz", [manifest_member(40)])
    with pytest.raises(CifarbenchError, match="40 runs, more than 32.*BundleLimits.max_runs="):
        read_bundle(many)
    assert len(read_bundle(many, BundleLimits(max_runs=40)).runs) == 40


def test_a_huge_extended_header_is_refused_before_it_is_read(tmp_path: Path, inflated: list[int]) -> None:
    header, content = manifest_member(1)
    pax = info("x", 0, pax={"comment": "x" * (2 << 20)})
    archive = bomb(tmp_path / "p.tar.gz", [(header, content), (pax, b"")])
    with pytest.raises(CifarbenchError, match="not a readable runs archive"):
        import_runs(archive, runs_dir=tmp_path / "runs")


def test_grade_keeps_no_submission_in_its_work_folder(data: Path, tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    for i, name in enumerate(("Ann", "Ben", "Cy")):
        run = tiny_run(data, tmp_path / name, seed=i)
        submit(run.run_id, student=name, out=inbox, runs_dir=tmp_path / name)
    result = grade(inbox, data_dir=str(data), verify=False, device="cpu", work_dir=tmp_path / "work")
    assert all(r.graded for r in result.runs)
    left = [p for p in Path(result.work_dir).rglob("*") if p.is_file()]
    assert [p.name for p in left] == [".cifarbench-grading"]  # each submission removed once graded
    again = grade(inbox, data_dir=str(data), verify=False, device="cpu")  # by default: a temporary folder, gone
    assert all(r.graded for r in again.runs) and not Path(again.work_dir).exists()


# --- huge shapes ----------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("change", [
    {"in_shape": [3, 1024, 1024]},
    {"in_shape": [3, 256, 256]},  # within the bounds, but the weights are not a 3x256x256 model's
    {"classes": [f"c{i}" for i in range(5000)]},
    {"config": {"model": "speedrun", "model_kwargs": {"widths": [4096] * 8}}},
])
def test_a_checkpoint_claiming_huge_shapes_is_refused_before_anything_is_allocated(
        data: Path, tmp_path: Path, change: dict) -> None:
    """In a process whose memory is capped at 2 GiB: building the claimed model for real would need more."""
    run = tiny_run(data, tmp_path / "alice", model="speedrun" if "config" in change else "fnn")
    archive = export_runs([run.run_id], tmp_path / "a.tar.gz", runs_dir=tmp_path / "alice")

    def edit(payload: dict) -> None:
        for key, value in change.items():
            if key == "config":
                payload["config"]["model_kwargs"] = value["model_kwargs"]
            else:
                payload[key] = value

    forged = rewrite(archive, tmp_path / "f.tar.gz", checkpoint=edit)
    import_runs(forged, runs_dir=tmp_path / "teacher")
    script = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30)); "
              "from cifarbench.cli import main; sys.exit(main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", script, "eval", run.run_id, "--runs-dir", str(tmp_path / "teacher"),
                           "--data-dir", str(data), "--no-verify"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr and "MemoryError" not in proc.stderr
    assert any(w in proc.stderr for w in ("weights do not fit", "in_shape is not", "classes is not")), proc.stderr


# --- student code that misbehaves under --trust-code ----------------------------------------------------------

MISBEHAVING = '''
import os, sys, time
from torch import nn

GRADING = "classroom_worker" in sys.argv[0]  # behave while training, misbehave while being graded


class Net(nn.Module):
    def __init__(self, num_classes=10, in_shape=(3, 32, 32)):
        super().__init__()
        self.fc = nn.Linear(3072, num_classes)

    def forward(self, x):
        if GRADING:
            {action}
        return self.fc(x.flatten(1))
'''

ACTIONS = {
    "interrupt": "raise KeyboardInterrupt",
    "exit": "os._exit(0)",
    "system-exit": "sys.exit(0)",
    "hang": "time.sleep(3600)",
    "memory": "blocks = [bytearray(1 << 30) for _ in range(64)]",
    "segfault": "import ctypes; ctypes.string_at(0)",
    "daemon": "os.fork() == 0 and (os.setsid(), time.sleep(3600)); sys.exit(3)",  # leaves a process behind
    "leak": "print('Error: what it read'); raise ValueError('what it ' + 'read')",  # its text is not published
}
PRINTS = "print('PK fake result'); sys.stdout.flush()"  # prints go to stderr: the result stays the grader's


def misbehaving_inbox(data: Path, tmp_path: Path) -> Path:
    inbox = tmp_path / "inbox"
    good = tiny_run(data, tmp_path / "ann")
    submit(good.run_id, student="Ann", out=inbox, runs_dir=tmp_path / "ann")
    for i, (name, action) in enumerate([*ACTIONS.items(), ("print", PRINTS)]):
        code = tmp_path / f"{name}.py"
        code.write_text(MISBEHAVING.replace("{action}", action))
        run = tiny_run(data, tmp_path / name, model=f"{code}:Net", seed=i)
        submit(run.run_id, student=f"S {name}", out=inbox, runs_dir=tmp_path / name)
    return inbox


def isolations() -> list[str]:
    kinds = ["process"]
    if choose_isolation("auto").kind == "bubblewrap":
        kinds.append("bubblewrap")
    elif os.environ.get("CI"):
        pytest.fail("CI must install bubblewrap (.ci/run) so that the sandbox is tested")
    return kinds


@pytest.mark.slow
@pytest.mark.parametrize("isolation", ["process", "bubblewrap"])
def test_each_misbehaving_submission_is_one_row_and_the_leaderboard_is_written(
        data: Path, tmp_path: Path, isolation: str) -> None:
    if isolation not in isolations():
        pytest.skip("bubblewrap cannot create namespaces here")
    inbox = misbehaving_inbox(data, tmp_path)
    result = grade(inbox, data_dir=str(data), verify=False, device="cpu", trust_code=True, isolation=isolation,
                   limits=Limits(timeout=20, memory_mib=3072))  # an honest one takes ~3 s; the hang waits it out
    rows = {r.student: r for r in result.runs}
    assert rows["Ann"].graded and rows["Ann"].isolation == isolation
    reasons = {name: rows[f"S {name}"].error or "" for name in ACTIONS}
    assert all(not rows[f"S {name}"].graded for name in ACTIONS), reasons
    assert "KeyboardInterrupt" in reasons["interrupt"], reasons
    assert "without a result" in reasons["exit"] and "without a result" in reasons["system-exit"], reasons
    assert "timed out after 20 s per submission" in reasons["hang"], reasons
    assert "memory" in reasons["memory"], reasons
    assert "SIGSEGV" in reasons["segfault"], reasons
    assert "exited with status 3" in reasons["daemon"] and not _children_running("classroom_worker"), reasons
    assert reasons["leak"].endswith("exited with status 1: ValueError") and "what it read" not in reasons["leak"]
    assert rows["S print"].graded and rows["S print"].rescored_accuracy == pytest.approx(
        rows["S print"].claimed_accuracy)
    assert Path(result.html).is_file() and Path(result.csv).is_file()
    assert sorted(e.student for e in result.leaderboard) == ["Ann", "S print"]
    assert {e.isolation for e in result.leaderboard} == {isolation}
    assert isolation in result.isolation


@pytest.mark.slow
def test_in_the_bubblewrap_box_student_code_has_no_network_and_cannot_read_the_hidden_or_write_outside(
        data: Path, tmp_path: Path) -> None:
    if "bubblewrap" not in isolations():
        pytest.skip("bubblewrap cannot create namespaces here")
    secret = tmp_path / "inbox-secret.txt"
    probe = f'''
import os, socket, sys
from pathlib import Path
from torch import nn
GRADING = "classroom_worker" in sys.argv[0]
if GRADING:
    seen = []
    for path in {[str(tmp_path / "hidden" / "labels.csv"), str(tmp_path / "inbox")]!r}:
        try:
            seen.append(os.listdir(path) if os.path.isdir(path) else open(path).read())
        except OSError:
            seen.append(None)
    try:
        socket.create_connection(("127.0.0.1", PORT), timeout=5).sendall(b"escaped")
        net = "connected"
    except OSError as exc:
        net = type(exc).__name__
    try:  # a socket file on the host (a session bus, docker.sock): no network namespace stops these
        unix = socket.socket(socket.AF_UNIX)
        unix.settimeout(5)
        unix.connect(UNIX_PATH)
        unix.sendall(b"escaped")
        net = "connected"
    except OSError:
        pass
    wrote = []  # its own run folder and the interpreter's are bound read-only; elsewhere is its scratch space
    for path in (Path(__file__).parent / "written", Path(sys.executable).parent / "written"):
        try:
            path.write_text("x")
            wrote.append(str(path))
        except OSError:
            pass
    for path in {[str(tmp_path / "written"), str(Path.home() / "written")]!r}:
        try:
            Path(path).write_text("x")  # lands in the box's scratch tmpfs, or fails: never on the disk
        except OSError:
            pass
    if seen[0] is not None or (seen[1] and any(".tar.gz" in n for n in seen[1])) or wrote or net == "connected":
        raise SystemExit("escaped: " + repr((seen, wrote, net)))


class Net(nn.Module):
    def __init__(self, num_classes=10, in_shape=(3, 32, 32)):
        super().__init__()
        self.fc = nn.Linear(3072, num_classes)

    def forward(self, x):
        return self.fc(x.flatten(1))
'''
    import socket

    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    run_dir = Path("/run") if os.access("/run", os.W_OK) else tmp_path  # where host sockets live
    unix_path = run_dir / f"cifarbench-test-{os.getpid()}.sock"
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(str(unix_path))
    unix.listen()
    unix.settimeout(0.1)
    code = tmp_path / "probe.py"
    code.write_text(probe.replace("PORT", str(listener.getsockname()[1])).replace("UNIX_PATH", repr(str(unix_path))))
    run = tiny_run(data, tmp_path / "pia", model=f"{code}:Net")
    inbox = tmp_path / "inbox"
    submit(run.run_id, student="Pia", out=inbox, runs_dir=tmp_path / "pia")
    secret.write_text("not for students")
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    from PIL import Image

    Image.new("RGB", (32, 32), (10, 200, 10)).save(hidden / "a.png")
    (hidden / "labels.csv").write_text("a.png,frog\n")
    result = grade(inbox, data_dir=str(data), verify=False, device="cpu", trust_code=True, isolation="bubblewrap",
                   hidden=hidden, limits=Limits(timeout=120))
    (row,) = result.runs
    assert row.graded, row.error
    assert not (tmp_path / "written").exists() and not (Path.home() / "written").exists()
    assert not (Path(sys.executable).parent / "written").exists()
    with pytest.raises(TimeoutError):  # nobody knocked
        listener.accept()
    with pytest.raises(TimeoutError):
        unix.accept()
    listener.close()
    unix.close()
    unix_path.unlink()


@pytest.mark.slow
def test_ctrl_c_from_the_teacher_stops_grading_cleanly_and_leaves_no_child(data: Path, tmp_path: Path) -> None:
    code = tmp_path / "hang.py"
    code.write_text(MISBEHAVING.replace("{action}", ACTIONS["hang"]))
    run = tiny_run(data, tmp_path / "hal", model=f"{code}:Net")
    inbox = tmp_path / "inbox"
    submit(run.run_id, student="Hal", out=inbox, runs_dir=tmp_path / "hal")
    env = {**os.environ, "HOME": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-m", "cifarbench", "grade", str(inbox), "--data-dir", str(data),
                             "--no-verify", "--device", "cpu", "--trust-code", "--isolation", "process"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not _children_running("classroom_worker"):
        time.sleep(0.5)
    assert _children_running("classroom_worker"), "the child never started"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith("cifarbench: interrupted")
    time.sleep(1)
    assert not _children_running("classroom_worker")


def _children_running(needle: str) -> bool:
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and needle.encode() in (proc / "cmdline").read_bytes():
                return True
        except OSError:
            continue
    return False


# --- honesty --------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_renamed_copy_of_another_students_run_is_a_duplicate(data: Path, tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    run = tiny_run(data, tmp_path / "ann")
    ann = Path(submit(run.run_id, student="Ann", out=inbox, runs_dir=tmp_path / "ann").archive)
    new_id = run.run_id[:-4] + "beef"

    def rename(m: dict) -> None:
        m["student"] = "Bob"

    copy = rewrite(ann, tmp_path / "bob.tar.gz", checkpoint=lambda p: p.update(run_id=new_id), manifest=rename)
    with tarfile.open(copy, "r:gz") as tar:  # every name and record under the new id
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    manifest = json.loads(members.pop("manifest.json"))
    manifest["runs"][0]["record"]["run_id"] = new_id
    members = {k.replace(run.run_id, new_id): v for k, v in members.items()}
    config = json.loads(members[f"{new_id}/config.json"])
    config["run_id"] = new_id
    members[f"{new_id}/config.json"] = json.dumps(config).encode()
    import hashlib

    manifest["runs"][0]["files"] = {k.split("/")[1]: hashlib.sha256(v).hexdigest() for k, v in members.items()}
    with tarfile.open(inbox / "Bob.tar.gz", "w:gz") as tar:
        for name, content in [("manifest.json", json.dumps(manifest).encode()), *members.items()]:
            tar.addfile(info(name, len(content)), io.BytesIO(content))
    result = grade(inbox, data_dir=str(data), verify=False, device="cpu")
    rows = {r.student: r for r in result.runs}
    assert rows["Bob"].run_id == new_id and rows["Bob"].graded
    assert [f.kind for f in rows["Bob"].flags if f.kind == "duplicate"] == ["duplicate"]
    assert [f.kind for f in rows["Ann"].flags if f.kind == "duplicate"] == ["duplicate"]


def test_look_alike_names_are_flagged_and_the_roster_is_checked() -> None:
    from cifarbench.classroom import GradedRun

    runs = [GradedRun(archive=f"{n}.tar.gz", student=n, rescored_accuracy=0.5)
            for n in ("Ada", "\u0410da", "Zed", "Bob")]
    missing = name_flags(runs, ["Ada", "Bob", "Eve", "Ｄａｎ"])
    flags = {r.student: {f.kind for f in r.flags} for r in runs}
    assert flags["\u0410da"] == {"look-alike", "not-on-roster"}
    assert flags["Ada"] == {"look-alike"} and flags["Bob"] == set()
    assert flags["Zed"] == {"not-on-roster"}
    assert missing == ["Eve", "Ｄａｎ"]
    assert name_skeleton("Ｄａｎ") == name_skeleton("dan") and name_skeleton("B0b") == name_skeleton("Bob")
    alone = [GradedRun(archive="x.tar.gz", student="Jоhn")]  # Cyrillic о, no other name to collide with
    name_flags(alone, None)
    assert {f.kind for f in alone[0].flags} == {"mixed-script"}


@pytest.mark.slow
def test_grade_roster_flag_lists_who_did_not_submit(data: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    inbox = tmp_path / "inbox"
    run = tiny_run(data, tmp_path / "ann")
    submit(run.run_id, student="Ann", out=inbox, runs_dir=tmp_path / "ann")
    roster = tmp_path / "roster.txt"
    roster.write_text("# class of 2026\nAnn\nBea\n")
    code = main(["grade", str(inbox), "--data-dir", str(data), "--no-verify", "--device", "cpu", "--roster",
                 str(roster)])
    out = capsys.readouterr().out
    assert code == 0 and "on the roster, no submission: Bea" in out
    code = main(["grade", str(inbox), "--data-dir", str(data), "--no-verify", "--roster", str(tmp_path / "none")])
    err = capsys.readouterr().err
    assert code == 1 and "--roster" in err and len(err.strip().splitlines()) == 1


def test_runs_import_says_which_runs_carry_code(data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = tmp_path / "mine.py"
    code.write_text(MISBEHAVING.replace("{action}", "pass"))
    own = tiny_run(data, tmp_path / "alice", model=f"{code}:Net")
    plain = tiny_run(data, tmp_path / "alice", seed=1)
    archive = export_runs([own.run_id, plain.run_id], tmp_path / "a.tar.gz", runs_dir=tmp_path / "alice")
    assert main(["runs", "import", str(archive), "--runs-dir", str(tmp_path / "bob")]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[2]: line for line in out.splitlines() if line.startswith("imported run")}
    assert "carries its own model code" in lines[own.run_id]
    assert "carries" not in lines[plain.run_id] and "--trust-code" in out
    shutil.rmtree(tmp_path / "bob")


PLANTER = '''
import os, site, sys, sysconfig
from pathlib import Path
from torch import nn

if "classroom_worker" in sys.argv[0]:
    for target in (Path(sysconfig.get_paths()["purelib"]) / "planted.pth", Path(sys.executable).parent / "planted"):
        try:
            target.write_text("import os; os.system('touch /tmp/pwned')")
        except OSError:
            pass
    try:  # a link beside the leaderboard, for a publishing step that follows links to copy
        os.symlink(SECRET, os.path.join(RESULTS, "leaderboard.secret.html"))
    except OSError:
        pass


class Net(nn.Module):
    def __init__(self, num_classes=10, in_shape=(3, 32, 32)):
        super().__init__()
        self.fc = nn.Linear(3072, num_classes)

    def forward(self, x):
        return self.fc(x.flatten(1))
'''


@pytest.mark.slow
def test_the_separate_user_recipe_keeps_student_code_out_of_the_venv_and_publishes_no_link(
        data: Path, tmp_path: Path) -> None:
    """docs/classroom.md's separate-user recipe, with `setpriv` for `sudo -u` and nobody for the grader user:
    the venv is root's, so student code cannot change the grader; publishing copies regular files only. (nobody
    keeps CAP_DAC_READ_SEARCH, to reach this machine's Python in root's 0700 home; it grants no writes.)"""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to act as another user")
    import stat
    import tempfile

    venv = Path(sys.executable).parent.parent
    assert not os.stat(venv).st_mode & stat.S_IWOTH
    home = Path(tempfile.mkdtemp(prefix="cifarbench-grader-"))
    try:
        home.chmod(0o755)
        secret = home / "teacher-secret.txt"
        secret.write_text("the teacher's file")
        secret.chmod(0o644)
        code = tmp_path / "planter.py"
        code.write_text(PLANTER.replace("SECRET", repr(str(secret))).replace("RESULTS", repr(str(home / "results"))))
        run = tiny_run(data, tmp_path / "sam", model=f"{code}:Net")
        shutil.copytree(data, home / "data")
        for folder in ("inbox", "results"):
            (home / folder).mkdir()
            shutil.chown(home / folder, "nobody", "nogroup")
        archive = submit(run.run_id, student="Sam", out=tmp_path / "out", runs_dir=tmp_path / "sam").archive
        shutil.copy(archive, home / "inbox")
        shutil.chown(home / "inbox" / Path(archive).name, "nobody", "nogroup")
        env = {"PATH": os.environ["PATH"], "HOME": str(home)}
        proc = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                               "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search", "timeout", "600",
                               sys.executable, "-m", "cifarbench", "grade", str(home / "inbox"), "--data-dir",
                               str(home / "data"), "--no-verify", "--device", "cpu", "--trust-code", "--isolation",
                               "process", "--out", str(home / "results")],
                              capture_output=True, text=True, env=env, cwd=home, timeout=900)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "re-scored" in proc.stderr  # Sam was graded, the planting attempts notwithstanding
        assert not (Path(sysconfig_purelib()) / "planted.pth").exists() and not Path("/tmp/pwned").exists()
        assert (home / "results" / "leaderboard.secret.html").is_symlink()  # planted: the recipe must not follow it
        publish = tmp_path / "published"
        publish.mkdir()
        subprocess.run(f"find {home / 'results'} -maxdepth 1 -type f -name 'leaderboard.*' -exec cp -t . {{}} +",
                       shell=True, check=True, cwd=publish)
        assert sorted(p.name for p in publish.iterdir()) == ["leaderboard.csv", "leaderboard.html"]
    finally:
        shutil.rmtree(home, ignore_errors=True)


def sysconfig_purelib() -> str:
    import sysconfig

    return sysconfig.get_paths()["purelib"]


# --- what an attack on the first version found ----------------------------------------------------------------

def test_a_checkpoint_with_an_expanded_tensor_is_refused_before_it_is_copied(tmp_path: Path) -> None:
    """One stored byte seen as 2 GiB: hashing or copying it would cost the shape, not the file."""
    from cifarbench.training.checkpoint import load_checkpoint
    from conftest import checkpoint_payload

    wide = torch.zeros(1, dtype=torch.uint8).expand(1 << 31)
    path = save_checkpoint(checkpoint_payload(state_dict={"w": wide}), tmp_path / "ck.pt")
    assert path.stat().st_size < 1 << 20
    with pytest.raises(CifarbenchError, match="stored whole"):
        load_checkpoint(path)
    overlapping = torch.arange(10.0).as_strided((5, 5), (1, 1))  # rows share elements
    with pytest.raises(CifarbenchError, match="stored whole"):
        load_checkpoint(save_checkpoint(checkpoint_payload(state_dict={"w": overlapping}), tmp_path / "o.pt"))
    transposed = torch.arange(12.0).reshape(3, 4).t()  # not contiguous, but every element its own
    load_checkpoint(save_checkpoint(checkpoint_payload(state_dict={"w": transposed}), tmp_path / "t.pt"))


def test_model_kwargs_cannot_set_what_the_data_decides() -> None:
    from cifarbench.models import build_model

    with pytest.raises(CifarbenchError, match="may not set num_classes"):
        build_model("fnn", kwargs={"num_classes": 2_000_000})
    with pytest.raises(CifarbenchError, match="may not set in_shape"):
        build_model("cnn", kwargs={"in_shape": [3, 4096, 4096]})


def test_a_registered_model_from_elsewhere_is_bounded_in_size_and_compute() -> None:
    from cifarbench.models.registry import build_model, foreign_cost_excess, skeleton

    for name in ("fnn", "cnn", "cnn-bn", "speedrun", "resnet18"):  # every default passes, on the meta device
        shapes = skeleton(lambda name=name: build_model(name))
        assert shapes is not None and foreign_cost_excess(shapes, (3, 32, 32)) is None
    wide = skeleton(lambda: build_model("speedrun", kwargs={"widths": [2048] * 3}))
    assert "multiply-accumulates per image" in foreign_cost_excess(wide, (3, 32, 32))
    huge = skeleton(lambda: build_model("speedrun", kwargs={"widths": [4096] * 4}))
    assert "parameters" in foreign_cost_excess(huge, (3, 32, 32))


@pytest.mark.slow
def test_a_manifest_of_huge_numbers_is_graded_without_them(data: Path, tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    for seed in (0, 1):
        run = tiny_run(data, tmp_path / "ann", seed=seed)
        archive = Path(submit(run.run_id, student="Ann", out=tmp_path / "out", runs_dir=tmp_path / "ann").archive)
        rewrite(archive, inbox / archive.name, manifest=lambda m: m["runs"][0]["record"].update(
            train_seconds=1.7e308, test_accuracy=1.7e308))
    result = grade(inbox, data_dir=str(data), verify=False, device="cpu")
    assert all(r.graded and r.train_seconds is None and r.claimed_accuracy is None for r in result.runs), result.runs
    assert Path(result.html).is_file() and result.leaderboard[0].claimed is None


def test_names_that_pass_for_another_are_flagged_and_unusual_letters_refused() -> None:
    from cifarbench.classroom import GradedRun, check_student

    pairs = [("Ann Lee", "ann lee"), ("Ann Lee", "Ann  Lee"), ("Alice", "AIice"), ("Ada", "ɑda"), ("Kim", "Kirn"),
             ("HANNA", "ΗANNA"), ("Nina", "Νina")]
    for real, fake in pairs:
        runs = [GradedRun(archive="a.tar.gz", student=real), GradedRun(archive="b.tar.gz", student=fake)]
        name_flags(runs, None)
        assert all("look-alike" in {f.kind for f in r.flags} for r in runs), (real, fake)
    for bad in ("Ａnn", "\U0001d400nn", "Ann\u3164", "\u3164"):
        with pytest.raises(CifarbenchError, match="plain letters"):
            check_student(bad)
    assert check_student("José María") == "José María" and check_student("Łukasz") == "Łukasz"


@pytest.mark.slow
def test_what_anyone_with_the_inbox_can_plant_does_not_stop_grading(data: Path, tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    run = tiny_run(data, tmp_path / "ann")
    archive = Path(submit(run.run_id, student="Ann", out=inbox, runs_dir=tmp_path / "ann").archive)
    (inbox / ".grading").mkdir()
    (inbox / ".grading" / "x").write_text("planted")  # the old default work folder: no longer used
    outside = tmp_path / "elsewhere.tar.gz"
    shutil.copy(archive, outside)
    (inbox / "Zed.tar.gz").symlink_to(outside)  # a link to an archive outside the inbox is not graded
    result = grade(inbox, data_dir=str(data), verify=False, device="cpu")
    assert [r.student for r in result.runs] == ["Ann"] and result.runs[0].graded
    assert not Path(result.work_dir).exists()
    (inbox / "leaderboard.csv").unlink()
    (inbox / "leaderboard.csv").mkdir()
    with pytest.raises(CifarbenchError, match="not a plain file"):
        grade(inbox, data_dir=str(data), verify=False, device="cpu")


@pytest.mark.slow
def test_the_same_weights_stored_as_float64_are_a_duplicate(data: Path, tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    run = tiny_run(data, tmp_path / "ann")
    ann = Path(submit(run.run_id, student="Ann", out=inbox, runs_dir=tmp_path / "ann").archive)
    rewrite(ann, inbox / "Bob.tar.gz", manifest=lambda m: m.update(student="Bob"), checkpoint=lambda p: p.update(
        state_dict={k: v.double() if v.is_floating_point() else v for k, v in p["state_dict"].items()}))
    result = grade(inbox, data_dir=str(data), verify=False, device="cpu")
    assert all("duplicate" in {f.kind for f in r.flags} for r in result.runs), result.runs


@pytest.mark.slow
def test_code_loaded_with_consent_for_one_run_is_no_consent_for_another(data: Path, tmp_path: Path) -> None:
    code = tmp_path / "mine.py"
    code.write_text(MISBEHAVING.replace("{action}", "pass"))
    own = tiny_run(data, tmp_path / "alice", model=f"{code}:Net")
    archive = export_runs([own.run_id], tmp_path / "a.tar.gz", runs_dir=tmp_path / "alice")
    import_runs(archive, runs_dir=tmp_path / "teacher")
    cb.load_trained_model(own.run_id, runs_dir=tmp_path / "teacher", trust_code=True)  # consent for this one
    other = tiny_run(data, tmp_path / "bob", seed=1)
    sha = json.loads((tmp_path / "alice" / own.run_id / "config.json").read_text())["config"]["model_sha256"]
    forged = rewrite(export_runs([other.run_id], tmp_path / "b.tar.gz", runs_dir=tmp_path / "bob"),
                     tmp_path / "f.tar.gz", config=lambda c: c.update(model="whatever.py:Net", model_sha256=sha))
    import_runs(forged, runs_dir=tmp_path / "teacher")
    with pytest.raises(CifarbenchError, match="refusing to run .*trust_code=True"):
        cb.load_trained_model(other.run_id, runs_dir=tmp_path / "teacher")


def test_directional_controls_are_shown_not_obeyed_in_html() -> None:
    from cifarbench.reporting.html import esc

    assert esc("Ann\u202eevil<b>") == "Ann\\u202eevil&lt;b&gt;"
