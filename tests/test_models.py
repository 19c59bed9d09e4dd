"""Every registered model: builds, runs forward and backward, stays finite (timm's per-model test)."""

from __future__ import annotations

import pytest
import torch

from cifarbench.errors import CifarbenchError
from cifarbench.models import count_parameters, create_model, list_models, register_model


@pytest.mark.parametrize("name", list_models())
def test_forward_backward(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name)
    x = torch.randn(4, 3, 32, 32)
    out = model(x)
    assert out.shape == (4, 10)
    out.logsumexp(1).mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("name", list_models())
def test_channels_last_gives_the_same_output(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name).eval()
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    got = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", list_models())
def test_other_input_shapes_and_class_counts(name: str) -> None:
    model = create_model(name, num_classes=7, in_shape=(1, 28, 28))
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 7)


def test_notebook_architectures_are_exact() -> None:
    fnn, cnn = create_model("fnn"), create_model("cnn")
    assert [tuple(p.shape) for p in fnn.parameters()] == [(128, 3072), (128,), (10, 128), (10,)]
    assert [tuple(p.shape) for p in cnn.parameters()] == [
        (32, 3, 3, 3), (32,), (64, 32, 3, 3), (64,), (128, 2304), (128,), (10, 128), (10,)]
    assert count_parameters(fnn) == 3072 * 128 + 128 + 128 * 10 + 10
    assert not any(isinstance(m, (torch.nn.BatchNorm2d, torch.nn.Dropout)) for m in cnn.modules())


def test_unknown_model_is_a_user_error() -> None:
    with pytest.raises(CifarbenchError, match="unknown model 'nope'.*cnn"):
        create_model("nope")


def test_registering_twice_is_refused() -> None:
    with pytest.raises(ValueError):
        register_model("fnn")(lambda **kw: torch.nn.Identity())


def test_speedrun_activations_are_switches() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    outs = {}
    for act in ["gelu", "silu", "relu"]:
        torch.manual_seed(0)  # the same weights, so only the activations differ
        model = create_model("speedrun", widths=[8, 16, 16], act=act)
        out = model(x)
        out.logsumexp(1).mean().backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
        outs[act] = out.detach()
    assert len({tuple(o.flatten().tolist()) for o in outs.values()}) == 3
    with pytest.raises(CifarbenchError, match="activations must be one of"):
        create_model("speedrun", act="tanh")
