"""Muon for the filters, SGD for the rest: the orthogonalisation, the SGD half against torch's, the grouping."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from cifarbench.config import OptimizerConfig
from cifarbench.errors import CifarbenchError
from cifarbench.models import create_model
from cifarbench.training.loop import make_optimizer
from cifarbench.training.muon import MuonSGD, orthogonalise
from cifarbench.training.recipes import make_config


@pytest.mark.parametrize("shape", [(16, 144), (144, 16), (64, 64)])
def test_orthogonalise_brings_every_singular_value_near_one(shape) -> None:
    torch.manual_seed(0)
    # Singular values spread over two orders of magnitude: plain SGD would step 100 times more along the top one.
    u, _ = torch.linalg.qr(torch.randn(shape[0], shape[0]))
    v, _ = torch.linalg.qr(torch.randn(shape[1], shape[1]))
    k = min(shape)
    g = u[:, :k] @ torch.diag(torch.logspace(0, -2, k)) @ v[:, :k].T
    s = torch.linalg.svdvals(orthogonalise(g, steps=5).float())
    assert s.max() < 1.6 and s.min() > 0.3, s  # the quintic lands in roughly [0.5, 1.5], not exactly 1
    assert orthogonalise(g).shape == g.shape and orthogonalise(g).dtype == g.dtype
    # Same singular vectors: the result is U f(S) V^T, so projecting back onto U, V is (nearly) diagonal.
    proj = u[:, :k].T @ orthogonalise(g, steps=5).float() @ v[:, :k]
    off = proj - torch.diag(torch.diag(proj))
    assert off.abs().max() < 0.1 * torch.diag(proj).abs().min()


def test_sgd_groups_step_exactly_like_torch_sgd() -> None:
    torch.manual_seed(0)
    a = torch.randn(5, 3, requires_grad=True)
    b = a.detach().clone().requires_grad_(True)
    ours = MuonSGD([{"params": [a], "lr": 0.1, "weight_decay": 0.01}], momentum=0.85, nesterov=True)
    ref = torch.optim.SGD([b], lr=0.1, momentum=0.85, nesterov=True, weight_decay=0.01)
    for _ in range(4):
        g = torch.randn(5, 3)
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_muon_group_steps_orthogonally_from_a_fixed_norm() -> None:
    torch.manual_seed(0)
    w = (5 * torch.randn(8, 4, 3, 3)).requires_grad_(True)
    opt = MuonSGD([{"params": [w], "lr": 0.01, "muon": True, "momentum": 0.6}], momentum=0.85)
    w.grad = torch.randn_like(w)
    before = w.detach().clone()
    opt.step()
    normalised = before * (8 ** 0.5 / before.norm())  # filters are rescaled to norm sqrt(out channels) first
    step = (normalised - w.detach()).reshape(8, -1) / 0.01
    s = torch.linalg.svdvals(step)
    assert s.min() > 0.3 and s.max() < 1.6  # an orthogonalised step, not the raw gradient
    assert w.norm().item() == pytest.approx(8 ** 0.5, rel=0.05)


def test_make_optimizer_gives_trainable_filters_to_muon() -> None:
    config = make_config("speedrun", model_kwargs={"widths": [8, 16, 16]}, epochs=1)
    config = replace(config, optimizer=replace(config.optimizer, name="muon", muon_lr=0.05))
    model = create_model("speedrun", widths=[8, 16, 16])
    opt = make_optimizer(model, config)
    assert isinstance(opt, MuonSGD)
    muon = [g for g in opt.param_groups if g["muon"]]
    assert len(muon) == 1 and muon[0]["lr"] == 0.05 and muon[0]["momentum"] == config.optimizer.muon_momentum
    filters = {id(p) for p in muon[0]["params"]}
    convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert filters == {id(w) for w in convs if w.requires_grad} and len(filters) == 6  # the six block convs
    assert id(model.whiten.weight) not in filters  # frozen: not optimised at all
    others = [p for g in opt.param_groups if not g["muon"] for p in g["params"]]
    assert all(p.dim() < 4 for p in others) and len(others) + len(filters) == sum(
        p.requires_grad for p in model.parameters())


def test_unknown_optimizer_is_a_user_error() -> None:
    with pytest.raises(CifarbenchError, match="optimizer.name 'lion'; choose one of: sgd, muon"):
        OptimizerConfig(name="lion")
    with pytest.raises(CifarbenchError):
        OptimizerConfig(name="muon", muon_lr=0.0)


def test_cli_trains_with_muon_and_records_it(tiny_py, tmp_path, capsys) -> None:
    import json

    from cifarbench.cli import main

    argv = ["train", "speedrun", "--widths", "8,16,16", "--epochs", "2", "--batch-size", "25", "--optimizer", "muon",
            "--lr", "0.2", "--data-dir", str(tiny_py), "--no-verify", "--device", "cpu",
            "--runs-dir", str(tmp_path / "runs"), "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["config"]["optimizer"]["name"] == "muon" and out["config"]["optimizer"]["lr"] == 0.2
    assert len(out["history"]) == 2
    # The accuracy is the count of correct predictions (the confusion's diagonal) over the 20 test images.
    assert sum(map(sum, out["confusion"])) == 20
    assert out["test_accuracy"] == sum(out["confusion"][k][k] for k in range(10)) / 20
    with pytest.raises(SystemExit) as bad:
        main(argv[:-1] + ["--optimizer", "lion"])
    assert bad.value.code == 1 and "invalid choice: 'lion'" in capsys.readouterr().err
