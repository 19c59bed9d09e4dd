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


def test_registering_another_model_under_a_taken_name_is_refused() -> None:
    with pytest.raises(CifarbenchError, match="already registered"):
        register_model("fnn")(lambda **kw: torch.nn.Identity())


def test_running_a_notebook_cell_again_replaces_its_model() -> None:
    """The same factory (module and name) registered again, as a re-run cell does, replaces the first."""
    from cifarbench.models.registry import _REGISTRY

    def make_twice(width: int):
        def cell_model(num_classes: int = 10, in_shape=(3, 32, 32)) -> torch.nn.Module:
            return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, width))
        return cell_model

    try:
        register_model("cell-model")(make_twice(4))
        register_model("cell-model")(make_twice(7))
        assert create_model("cell-model")[1].out_features == 7
    finally:
        _REGISTRY.pop("cell-model", None)


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
    with pytest.raises(CifarbenchError, match="model_kwargs.act must be one of"):
        create_model("speedrun", act="tanh")


def test_matmul_weight_grad_conv_is_the_convolutions_exact_gradient() -> None:
    import torch.nn.functional as F

    from cifarbench.models.speedrun import _MatmulWeightGradConv

    # Entries in {-1, 0, 1}: every product and sum (at most 4*5*7 terms) is exact in bf16 with fp32 accumulation, so
    # any slip (a transposed 3x3 kernel, swapped height and width, a shifted tap) shows as a difference, not noise.
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-1, 2, (4, 8, 5, 7), generator=g).float().contiguous(memory_format=torch.channels_last)
    w = torch.randint(-1, 2, (16, 8, 3, 3), generator=g).float()
    grad = torch.randint(-1, 2, (4, 16, 5, 7), generator=g).to(torch.bfloat16)
    results = []
    for conv in (lambda a, b: F.conv2d(a, b, padding=1), _MatmulWeightGradConv.apply):
        a, b = x.clone().requires_grad_(), w.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = conv(a, b)
        out.backward(grad)
        assert out.dtype == torch.bfloat16 and b.grad.dtype == torch.float32
        results.append((out.float(), a.grad, b.grad))
    (out0, gx0, gw0), (out1, gx1, gw1) = results
    assert gw0.abs().max() > 10  # a real gradient, not zeros
    assert torch.equal(out0, out1) and torch.equal(gx0, gx1) and torch.equal(gw0, gw1)


def test_speedrun_takes_matmul_weight_grads_only_in_bf16_cpu_training_of_its_last_block(monkeypatch) -> None:
    from cifarbench.models import speedrun

    calls = []
    apply = speedrun._MatmulWeightGradConv.apply
    monkeypatch.setattr(speedrun._MatmulWeightGradConv, "apply", lambda *a: calls.append(a[0].shape) or apply(*a))
    x = torch.randn(4, 3, 32, 32)

    def grads(matmul: bool, bf16: bool = True) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = create_model("speedrun", widths=[8, 16, 32], cpu_matmul_weight_grad=matmul)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(x)
        out.float().logsumexp(1).mean().backward()
        return [p.grad for p in model.parameters() if p.requires_grad]

    stock = grads(False)
    assert calls == []
    matmul = grads(True)
    assert calls == [(4, 16, 7, 7), (4, 32, 3, 3)]  # the last block's two convolutions, nothing else
    for a, b in zip(stock, matmul, strict=True):  # the same gradients up to bf16 rounding of the summation order
        torch.testing.assert_close(b, a, rtol=2e-2, atol=1e-2 * a.abs().max().item())
    calls.clear()
    grads(True, bf16=False)  # fp32 keeps the stock kernels (and --deterministic's thread-independent ones)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        create_model("speedrun", widths=[8, 16, 32])(x)  # inference needs no weight gradient
    assert calls == []
