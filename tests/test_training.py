"""The training loop and the run API on tiny synthetic data."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import pytest
import torch

from cifarbench.config import TrainConfig, parse_changes
from cifarbench.data.cifar10 import load_cifar10
from cifarbench.device import resolve_device
from cifarbench.errors import CifarbenchError
from cifarbench.inference import evaluate_checkpoint
from cifarbench.models import create_model
from cifarbench.running import train_run
from cifarbench.runs.store import RunStore
from cifarbench.training.loop import train
from cifarbench.training.recipes import make_config


def tiny_config(model: str, data_dir: Path, **kw) -> TrainConfig:
    return make_config(model, "seed", data_dir=str(data_dir), verify=False, download=False, batch_size=10,
                       device="cpu", **kw)


def test_seed_recipe_is_the_notebooks() -> None:
    fnn, cnn = make_config("fnn"), make_config("cnn")
    assert (fnn.epochs, cnn.epochs) == (5, 10)
    for c in (fnn, cnn):
        assert c.batch_size == 100 and c.precision == "fp32"
        assert (c.optimizer.lr, c.optimizer.momentum, c.optimizer.weight_decay) == (0.01, 0.0, 0.0)
        assert c.data.mean == (0.5, 0.5, 0.5) and c.data.std == (0.5, 0.5, 0.5)


def test_overrides_and_validation() -> None:
    c = make_config("cnn", epochs=3, seed=7, verify=False, precision=None)
    assert (c.epochs, c.seed, c.data.verify, c.precision) == (3, 7, False, "fp32")
    with pytest.raises(CifarbenchError, match="recipe"):
        make_config("cnn", "nope")
    with pytest.raises(CifarbenchError, match="precision"):
        make_config("cnn", precision="fp8")
    with pytest.raises(CifarbenchError, match="epochs"):
        make_config("cnn", epochs=0)
    assert TrainConfig.from_dict(c.to_dict()) == c


def test_with_changes_sets_dotted_fields_and_refuses_typos() -> None:
    c = make_config("speedrun", epochs=2)
    d = c.with_changes({"optimizer.lr": 0.5, "tta": 0, "augment.flip": False, "model_kwargs": {"widths": [8, 8, 8]}})
    assert (d.optimizer.lr, d.tta, d.augment.flip, d.model_kwargs) == (0.5, 0, False, {"widths": [8, 8, 8]})
    assert d.optimizer.momentum == c.optimizer.momentum and c.optimizer.lr != 0.5  # the rest kept, c untouched
    for typo in ("optimiser.lr", "optimizer.learning_rate", "tta.x", "nope"):
        with pytest.raises(CifarbenchError, match="unknown config field"):
            c.with_changes({typo: 1})
    # One model argument, the others kept; a wrong name is refused when the model is built.
    assert d.with_changes({"model_kwargs.act": "silu"}).model_kwargs == {"widths": [8, 8, 8], "act": "silu"}
    with pytest.raises(CifarbenchError, match="model 'speedrun' has no argument 'widht'"):
        create_model("speedrun", widht=[8, 8, 8])
    with pytest.raises(CifarbenchError, match="tta"):
        c.with_changes({"tta": 5})  # validated like the field itself
    with pytest.raises(CifarbenchError, match="optimizer.lr"):
        c.with_changes({"optimizer.lr": "fast"})
    changes = ["optimizer.name=muon", "tta=0", 'model_kwargs={"widths": [8, 8, 8]}', "lookahead.enabled=false"]
    assert parse_changes(changes) == {"optimizer.name": "muon", "tta": 0, "model_kwargs": {"widths": [8, 8, 8]},
                                      "lookahead.enabled": False}
    with pytest.raises(CifarbenchError, match="FIELD=VALUE"):
        parse_changes(["=3"])


def test_training_learns_the_synthetic_classes(tiny_py: Path) -> None:
    config = tiny_config("fnn", tiny_py, epochs=15)
    config.optimizer.lr = 0.05
    dataset = load_cifar10(tiny_py, verify=False, download=False)
    result = train(config, dataset, torch.device("cpu"), progress=False)
    assert [h.epoch for h in result.history] == list(range(1, 16))
    assert result.history[-1].train_loss < result.history[0].train_loss
    assert result.final.accuracy >= 0.5  # chance is 0.1; the classes differ by mean colour
    assert result.final.n == len(dataset.test)
    assert sum(map(sum, result.final.confusion)) == len(dataset.test)
    assert all(b.seconds >= a.seconds for a, b in itertools.pairwise(result.history))


@pytest.mark.parametrize("model", ["fnn", "cnn"])
def test_same_seed_same_weights_other_seed_other_weights(tiny_py: Path, model: str) -> None:
    dataset = load_cifar10(tiny_py, verify=False, download=False)
    runs = [train(tiny_config(model, tiny_py, epochs=2, seed=s), dataset, torch.device("cpu"), progress=False)
            for s in (1, 1, 2)]
    a, b, c = (r.model.state_dict() for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_bf16_precision_trains(tiny_py: Path) -> None:
    dataset = load_cifar10(tiny_py, verify=False, download=False)
    result = train(tiny_config("cnn", tiny_py, epochs=2, precision="bf16"), dataset, torch.device("cpu"),
                   progress=False)
    assert all(torch.isfinite(p).all() for p in result.model.parameters())
    # The accuracy is the confusion matrix's diagonal over the test set, whose rows hold each class's images.
    labels = load_cifar10(tiny_py, verify=False, download=False).test.labels
    confusion = result.final.confusion
    assert [sum(row) for row in confusion] == [int((labels == k).sum()) for k in range(10)]
    assert result.final.accuracy == sum(confusion[k][k] for k in range(10)) / len(labels)


def test_train_run_writes_folder_and_history(tiny_py: Path, tmp_path: Path) -> None:
    seen = []
    summary = train_run(tiny_config("cnn", tiny_py, epochs=2), runs_dir=tmp_path / "r", on_epoch=seen.append,
                        progress=False).to_dict()
    run_dir = Path(summary["run_dir"])
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint.pt", "config.json", "metrics.json",
                                                        "predictions.npz"]
    assert json.loads((run_dir / "metrics.json").read_text())["test_accuracy"] == summary["test_accuracy"]
    assert [m.epoch for m in seen] == [1, 2]
    config = json.loads((run_dir / "config.json").read_text())
    assert config["config"]["data"]["verify"] is False and config["dataset"]["verified"] is False
    assert config["torch_version"] == torch.__version__ and config["code_version"]
    assert f"{os.cpu_count()} logical CPUs" in config["cpu"]  # which processor the seconds were measured on
    # Compute: every training image of both epochs (the seed recipe keeps the last, smaller batch), 3 passes each.
    n_train = len(load_cifar10(tiny_py, verify=False, download=False).train)
    assert summary["train_flops"] == 3 * summary["flops_per_image"] * 2 * n_train
    with RunStore(tmp_path / "r") as store:
        run = store.get_run(summary["run_id"])
    assert run["status"] == "completed" and len(run["history"]) == 2
    assert run["test_accuracy"] == summary["test_accuracy"] and run["dataset"]["sha256"] == summary["dataset"]["sha256"]
    again = evaluate_checkpoint(summary["run_id"], runs_dir=tmp_path / "r").to_dict()
    assert again["test_accuracy"] == summary["test_accuracy"] and again["dataset_matches_training"]
    assert again["confusion"] == summary["confusion"]


def test_failed_run_is_recorded_as_failed(tiny_py: Path, tmp_path: Path) -> None:
    def explode(_metrics) -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        train_run(tiny_config("fnn", tiny_py, epochs=3), runs_dir=tmp_path, on_epoch=explode, progress=False)
    with RunStore(tmp_path) as store:
        (run,) = store.list_runs()
    assert run["status"] == "failed" and "boom" in run["error"]


def test_auto_device_prefers_cuda_then_mps_then_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda, mps = [False], [False]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda[0])
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps[0])
    assert resolve_device("auto") == torch.device("cpu")
    mps[0] = True
    assert resolve_device("auto") == torch.device("mps")
    cuda[0] = True
    assert resolve_device("auto") == torch.device("cuda")


def test_explicit_devices_that_are_absent_or_unknown_are_user_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(CifarbenchError, match="no CUDA GPU"):
        resolve_device("cuda")
    with pytest.raises(CifarbenchError, match="MPS is not available"):
        resolve_device("mps")
    with pytest.raises(CifarbenchError, match="unknown device"):
        resolve_device("tpu")
