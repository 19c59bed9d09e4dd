"""What the driver accepts from a Ray task (no Ray needed here): exactly the run it launched, under the id it chose,
from the config it sent; and the one-line refusals when the ray or tune extra is missing."""

from __future__ import annotations

import importlib.util
from dataclasses import replace
from pathlib import Path

import pytest

from cifarbench import executors
from cifarbench.cli import main
from cifarbench.errors import CifarbenchError, as_flag
from cifarbench.running import train_run
from cifarbench.runs.bundle import export_runs, import_launched_run
from cifarbench.runs.store import RunStore
from cifarbench.training.recipes import make_config


@pytest.fixture
def worker_bundle(tiny_py: Path, tmp_path: Path):
    """A run trained as a Ray task trains it (in a folder of its own, under the id the driver chose), exported."""
    config = make_config("fnn", data_dir=str(tiny_py), verify=False, epochs=1, batch_size=20, device="cpu")
    run_id = "20260101-000000-fnn-s0-abcd"
    train_run(config, runs_dir=tmp_path / "worker", progress=False, run_id=run_id)
    return config, run_id, export_runs([run_id], tmp_path / "run.tar.gz", runs_dir=tmp_path / "worker")


def test_the_launched_run_is_stored_as_the_users_own(worker_bundle, tmp_path: Path) -> None:
    config, run_id, archive = worker_bundle
    record = import_launched_run(archive, run_id=run_id, requested=config.to_dict(), runs_dir=tmp_path / "runs")
    with RunStore(tmp_path / "runs", read_only=True) as store:
        row = store.get_run(run_id)
    assert row["origin"] is None and row["status"] == "completed"  # own: its code and data settings are trusted
    assert row["test_accuracy"] == record.test_accuracy and len(row["history"]) == 1
    assert (tmp_path / "runs" / run_id / "checkpoint.pt").is_file()


@pytest.mark.parametrize("claim", ["another id", "another config", "another seed"])
def test_a_bundle_that_claims_another_run_is_refused_whole(worker_bundle, tmp_path: Path, claim: str) -> None:
    config, run_id, archive = worker_bundle
    expected_id, requested = run_id, config.to_dict()
    if claim == "another id":
        expected_id = "20260101-000000-fnn-s0-ffff"
    elif claim == "another config":
        requested = replace(config, epochs=5).to_dict()
    else:
        requested = replace(config, seed=1).to_dict()
    with pytest.raises(CifarbenchError, match="refused|not that run alone"):
        import_launched_run(archive, run_id=expected_id, requested=requested, runs_dir=tmp_path / "runs")
    with RunStore(tmp_path / "runs", read_only=True) as store:
        assert store.list_runs() == []
    assert [p.name for p in (tmp_path / "runs").iterdir() if not p.name.startswith("cifarbench.db")] == []


@pytest.mark.parametrize("forged", ["the checkpoint's model", "config.json's data folder",
                                    "config.json's download setting"])
def test_a_bundle_whose_run_chose_its_own_code_or_data_is_refused(tiny_py: Path, tmp_path: Path, forged: str) -> None:
    # A worker answers with the right run id and `requested`, but the run inside names other code to import, or
    # another data folder to read: as an own run either would be trusted, so the whole bundle is refused.
    import json

    from cifarbench.training.checkpoint import load_checkpoint
    from cifarbench.training.checkpoint_file import save_checkpoint

    config = make_config("fnn", data_dir=str(tiny_py), verify=False, epochs=1, batch_size=20, device="cpu")
    run_id = "20260101-000000-fnn-s0-abcd"
    folder = tmp_path / "worker" / run_id
    train_run(config, runs_dir=tmp_path / "worker", progress=False, run_id=run_id)
    if forged == "the checkpoint's model":
        payload = load_checkpoint(folder / "checkpoint.pt")
        payload.pop("format", None)
        payload["model"] = payload["config"]["model"] = f"{tmp_path / 'evil.py'}:Net"
        save_checkpoint(payload, folder / "checkpoint.pt")
    else:
        stored = json.loads((folder / "config.json").read_text())
        stored["config"]["data"].update({"data_dir": str(tmp_path / "elsewhere")} if "folder" in forged
                                        else {"download": not config.data.download})
        (folder / "config.json").write_text(json.dumps(stored))
    archive = export_runs([run_id], tmp_path / "run.tar.gz", runs_dir=tmp_path / "worker")
    with pytest.raises(CifarbenchError, match="refused"):
        import_launched_run(archive, run_id=run_id, requested=config.to_dict(), runs_dir=tmp_path / "runs")
    with RunStore(tmp_path / "runs", read_only=True) as store:
        assert store.list_runs() == []


def test_a_run_already_stored_is_not_overwritten(worker_bundle, tmp_path: Path) -> None:
    config, run_id, archive = worker_bundle
    import_launched_run(archive, run_id=run_id, requested=config.to_dict(), runs_dir=tmp_path / "runs")
    with pytest.raises(CifarbenchError, match="already in this store"):
        import_launched_run(archive, run_id=run_id, requested=config.to_dict(), runs_dir=tmp_path / "runs")


@pytest.mark.parametrize("argv, extra", [
    (["compare", "fnn", "--executor", "ray"], "ray"),
    (["grade", "inbox", "--executor", "ray"], "ray"),
    (["tune", "fnn", "--param", "optimizer.lr=log:1e-3:1e-1", "--val-split", "10"], "tune"),
])
def test_without_the_extra_one_line_names_it(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
                                             tiny_py: Path, tmp_path: Path, argv: list[str], extra: str) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("ray", "optuna")
                        else real(name, *a))
    (tmp_path / "inbox").mkdir()
    (tmp_path / "inbox" / "a.tar.gz").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    runs = [] if argv[0] == "grade" else ["--runs-dir", str(tmp_path / "runs")]
    assert main([*argv, "--data-dir", str(tiny_py), "--no-verify", *runs]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"pip install -e '.[{extra}]'" in err
    assert not (tmp_path / "runs").exists()


def test_an_address_without_ray_is_refused() -> None:
    with pytest.raises(CifarbenchError, match="^address names a Ray cluster: use it with executor='ray'$") as raised:
        executors.check_executor("local", "10.0.0.1:6379")  # the keywords, from Python
    assert raised.value.spelled(as_flag) == "--address names a Ray cluster: use it with --executor ray"


def test_the_extras_are_declared_and_not_in_the_default_install() -> None:
    import tomllib

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert any(d.startswith("ray") for d in extras["ray"]) and any(d.startswith("optuna") for d in extras["tune"])
    assert not any(d.startswith(("ray", "optuna")) for d in project["dependencies"] + extras["dev"])
