"""A new student's path, exactly as the README gives it: a fresh copy of the project, its install line, then the
"Do the exercise" commands as written (read from README.md, so this breaks when the README changes), and the
report opened in Chromium. Nothing is added to the commands: the data comes from $CIFARBENCH_DATA, as the README
allows."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from test_report import Dom, chromium, require_chromium

from cifarbench.data import cifar10
from cifarbench.runs.store import RunStore
from conftest import md5_of, write_python_layout

ROOT = Path(__file__).resolve().parents[1]

# The tiny files stand in for the official CIFAR-10 files, so in the fresh install their md5s stand in for the
# official ones (the commands run as written: no --no-verify). Loaded by Python at startup from $PYTHONPATH; it
# touches nothing until cifarbench's data module is imported.
OFFICIAL_FOR_THE_TEST = '''
import importlib.abc, importlib.util, json, os, sys


class _TinyIsOfficial(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "cifarbench.data.cifar10":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            module.OFFICIAL_MD5.update(json.loads(os.environ["TINY_CIFAR_MD5"]))

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _TinyIsOfficial())
'''


def code_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of each fenced block, in order."""
    return re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.S | re.M)


def section(text: str, heading: str) -> str:
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else None]


def commands(body: str) -> list[str]:
    """A bash block's commands: each line without its trailing comment."""
    lines = (re.sub(r"\s+#.*$", "", line).strip() for line in body.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def readme_path() -> tuple[str, dict[str, str], list[str]]:
    """The README's install line, the files the exercise asks for (name -> text), and its commands."""
    readme = (ROOT / "README.md").read_text()
    install = next(c for lang, body in code_blocks(readme) if lang == "bash" for c in commands(body)
                   if "make venv" in c or "pip install" in c)
    files, run = {}, []
    for lang, body in code_blocks(section(readme, "Do the exercise")):
        first = body.splitlines()[0]
        if lang == "python" and re.fullmatch(r"# [\w./-]+\.py", first):
            files[first[2:]] = body
        elif lang == "bash":
            run += commands(body)
    return install, files, run


def fresh_copy(dest: Path) -> Path:
    """The project's files as a clone has them (tracked, and new ones not ignored): no .venv, no runs."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                            capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


def test_the_readme_gives_an_install_line_a_model_file_and_the_exercise_commands() -> None:
    install, files, run = readme_path()
    assert install.startswith("make venv") and ". .venv/bin/activate" in install
    assert list(files) == ["mycnn.py"] and "class MyCNN(nn.Module)" in files["mycnn.py"]
    assert [c.split()[:2] for c in run] == [["cifarbench", "train"], ["cifarbench", "compare"]]


@pytest.mark.slow
def test_a_new_student_follows_the_readme_from_a_fresh_copy_to_the_report_in_chromium(tmp_path: Path) -> None:
    require_chromium()
    install, files, run = readme_path()
    project = fresh_copy(tmp_path / "project")
    assert not (project / ".venv").exists() and not (project / "runs").exists()
    for name, text in files.items():
        (project / name).write_text(text)
    data = write_python_layout(tmp_path / "data")
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(OFFICIAL_FOR_THE_TEST)
    md5s = {name: md5_of(data / cifar10.PY_DIR / name) for name in cifar10.OFFICIAL_MD5}
    env = {k: v for k, v in os.environ.items()
           if k not in ("VIRTUAL_ENV", "CIFARBENCH_HOME", "CIFARBENCH_MIRROR", "PYTHONHOME")}
    # The student's own PATH, less any virtual environment's (this test may run from the project's .venv).
    path = [p for p in env.get("PATH", "/usr/bin:/bin").split(os.pathsep)
            if not (Path(p) / "activate").is_file()]
    env.update(CIFARBENCH_DATA=str(data), CIFARBENCH_CACHE=str(tmp_path / "cache"), PYTHONPATH=str(hook),
               TINY_CIFAR_MD5=json.dumps(md5s), PATH=os.pathsep.join(path))
    # One shell, as a student types them: the install line (activating the venv), then each command.
    script = "set -e\n" + "\n".join([install, *[f"echo '$ {c}' >&2\n{c}" for c in run]]) + "\n"
    proc = subprocess.run(["bash", "-c", script], cwd=project, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-5000:])
    assert (project / ".venv" / "bin" / "cifarbench").is_file()

    trained = re.search(r"^run (\S+): test accuracy", proc.stderr + proc.stdout, flags=re.M)
    assert trained, proc.stderr[-3000:]
    assert f"reusing run {trained.group(1)}" in proc.stderr  # compare after train: seed 0 is not trained again
    with RunStore(project / "runs", read_only=True) as store:
        statuses = [r["status"] for r in store.list_runs()]
    assert statuses == ["completed"] * 6  # 2 models x 3 seeds, one of them the train's

    report = project / "report.html"
    dom = Dom(chromium("--dump-dom", report.as_uri(), home=tmp_path))
    text = " ".join(dom.text)
    assert "MyCNN" in text and "cnn" in text and "McNemar" in text
    assert dom.rows.get("summary") == 2 and len(dom.imgs) > 5
