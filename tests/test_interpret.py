"""Looking inside models: templates, filters, feature maps and saliency on tiny freshly built models."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from torch import nn

from cifarbench.errors import CifarbenchError
from cifarbench.evaluation.interpret import (
    CAPTUM_MISSING,
    collect_activations,
    feature_maps,
    first_conv,
    first_layer_filters,
    fnn_templates,
    gradcam_attributions,
    modules_in_forward_order,
    pick_examples,
    saliency_attributions,
    saliency_maps,
)
from cifarbench.models import create_model
from cifarbench.reporting.plots import png_bytes

CLASSES = [f"class{k}" for k in range(10)]


def _panels(fig) -> int:
    """Axes that show an image."""
    return sum(1 for ax in fig.axes if ax.images)


def _model(name: str, channels_last: bool = False, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    model = create_model(name, **kwargs).eval()
    return model.to(memory_format=torch.channels_last) if channels_last else model


def _inputs(n: int = 3, channels_last: bool = False) -> torch.Tensor:
    x = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


class Reordered(nn.Module):
    """Defines its layers in the opposite order to the one its forward pass calls them in."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(16, 10)
        self.body = nn.Linear(3 * 8 * 8, 16)

    def forward(self, x):
        return self.head(torch.relu(self.body(x.flatten(1))))


def test_layers_are_found_in_forward_order_not_definition_order():
    order = modules_in_forward_order(Reordered(), torch.zeros(1, 3, 8, 8))
    assert [name for name, _ in order] == ["body", "head"]


def test_fnn_templates_draw_one_panel_per_class():
    fig = fnn_templates(_model("fnn"), (3, 32, 32), CLASSES)
    assert _panels(fig) == 10
    assert [ax.get_title() for ax in fig.axes if ax.images] == CLASSES
    assert png_bytes(fig).startswith(b"\x89PNG")


def test_fnn_templates_are_the_product_of_the_linear_layers():
    model = Reordered()
    fig = fnn_templates(model, (3, 8, 8), CLASSES)
    expected = (model.head.weight @ model.body.weight).detach().numpy().reshape(10, 3, 8, 8)[4]
    shown = fig.axes[4].images[0].get_array()
    scaled = (expected - expected.min()) / (expected.max() - expected.min())
    np.testing.assert_allclose(np.asarray(shown), np.moveaxis(scaled, 0, -1), atol=1e-5)


def test_fnn_templates_refuse_a_conv_net():
    with pytest.raises(CifarbenchError, match="first layer is Conv2d 'conv1'"):
        fnn_templates(_model("cnn"), (3, 32, 32), CLASSES)


def test_first_layer_filters_draw_every_filter_of_conv1():
    model = _model("cnn", channels_last=True)
    assert first_conv(model)[0] == "conv1"
    fig = first_layer_filters(model)
    assert _panels(fig) == model.conv1.out_channels == 32
    assert fig.axes[0].images[0].get_array().shape == (3, 3, 3)  # an RGB 3x3 filter


def test_first_layer_filters_of_another_conv_net_and_refusal_for_an_fnn():
    speedrun = _model("speedrun", widths=(8, 16, 16))
    assert _panels(first_layer_filters(speedrun)) == speedrun.whiten.out_channels
    with pytest.raises(CifarbenchError, match="no convolution"):
        first_layer_filters(_model("fnn"))


def test_feature_maps_show_a_row_for_every_conv_layer():
    model = _model("cnn", channels_last=True)
    activations = collect_activations(model, _inputs(2, channels_last=True))
    assert list(activations) == ["conv1", "conv2"]
    assert activations["conv1"].shape == (2, 32, 30, 30)
    fig = feature_maps(model, _inputs(2, channels_last=True), channels=4)
    labels = [ax.get_ylabel().split("\n")[0] for ax in fig.axes if ax.get_ylabel()]
    assert labels == ["conv1", "conv2", "conv1", "conv2"]  # two images, two layers each
    assert _panels(fig) == 2 * (1 + 2 * 4)  # each image once, four maps per layer


def test_feature_maps_of_named_layers_and_an_unknown_name():
    model = _model("speedrun", widths=(8, 16, 16))
    activations = collect_activations(model, _inputs(1), ["blocks.0", "blocks.2"])
    assert [a.shape[1] for a in activations.values()] == [8, 16]
    with pytest.raises(CifarbenchError, match="no layer 'block9'"):
        collect_activations(model, _inputs(1), ["block9"])


def test_saliency_on_a_channels_last_conv_net_gives_maps_of_the_image_size():
    pytest.importorskip("captum")
    model = _model("cnn", channels_last=True)
    x = _inputs(3, channels_last=True)
    targets = [0, 3, 7]
    maps = saliency_attributions(model, x, targets)
    assert maps.shape == (3, 32, 32)
    assert (maps >= 0).all() and maps.flatten(1).amax(1).gt(0).all()
    # Saliency is the input gradient of the target's score: check one against autograd directly.
    xi = x[1:2].clone().requires_grad_(True)
    model(xi)[0, 3].backward()
    torch.testing.assert_close(maps[1], xi.grad[0].abs().amax(0))
    cam = gradcam_attributions(model, x, targets)
    assert cam is not None and cam.shape == (3, 32, 32)
    ig = saliency_attributions(model, x, targets, method="integrated_gradients", steps=4)
    assert ig.shape == (3, 32, 32)


def test_saliency_figure_for_right_and_wrong_predictions():
    pytest.importorskip("captum")
    model = _model("cnn")
    labels, predictions = [1, 2, 5], [1, 4, 5]
    fig = saliency_maps(model, _inputs(3), labels, predictions, CLASSES,
                        display=np.zeros((3, 3, 32, 32), dtype=np.uint8))
    titles = [ax.get_title() for ax in fig.axes]
    assert "true class2, pred class4 (wrong)" in titles and "true class1, pred class1 (right)" in titles
    assert len(fig.axes) == 3 * 3  # image, saliency, Grad-CAM
    fnn_fig = saliency_maps(_model("fnn"), _inputs(2), [0, 1], [0, 0], CLASSES)
    assert len(fnn_fig.axes) == 2 * 2  # no Grad-CAM without convolutions


def test_interpretation_runs_in_fp32_and_leaves_a_bf16_model_alone():
    pytest.importorskip("captum")
    model = _model("cnn").to(torch.bfloat16)
    maps = saliency_attributions(model, _inputs(1), [2])
    assert maps.dtype == torch.float32 and maps.shape == (1, 32, 32)
    assert _panels(first_layer_filters(model)) == 32
    assert model.conv1.weight.dtype == torch.bfloat16


def test_missing_captum_is_a_user_error_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "captum", None)
    monkeypatch.setitem(sys.modules, "captum.attr", None)
    with pytest.raises(CifarbenchError) as err:
        saliency_attributions(_model("cnn"), _inputs(1), [0])
    assert str(err.value) == CAPTUM_MISSING
    assert "pip install -e '.[interpret]'" in CAPTUM_MISSING


def test_pick_examples_takes_right_then_wrong_predictions():
    labels = np.array([0, 1, 2, 3, 4, 5])
    predictions = np.array([0, 9, 2, 9, 4, 9])
    chosen = pick_examples(labels, predictions, right=2, wrong=5)
    assert len(chosen) == 5
    assert all(labels[i] == predictions[i] for i in chosen[:2])
    assert sorted(chosen[2:]) == [1, 3, 5]


def _tiny_test(n: int = 12):
    from cifarbench.data.dataset import Split
    from cifarbench.data.loader import DeviceSplit

    rng = np.random.default_rng(0)
    split = Split(rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8), np.arange(n, dtype=np.int64) % 10)
    return DeviceSplit(split, torch.device("cpu"), (0.5,) * 3, (0.5,) * 3, channels_last=True)


def test_explain_model_picks_the_figures_that_fit_each_architecture():
    pytest.importorskip("captum")
    from cifarbench.evaluation.explain import explain_model

    test = _tiny_test()
    args = dict(classes=CLASSES, in_shape=(3, 32, 32), mean=(0.5,) * 3, std=(0.5,) * 3, examples=2)
    fnn = explain_model(_model("fnn", channels_last=True), test, label="fnn", experiments=False, **args)
    assert [f.heading for f in fnn.figures] == ["fnn: what the weights look for", "fnn: saliency"]
    assert fnn.correct.shape == (12,) and fnn.translation is None
    cnn = explain_model(_model("cnn", channels_last=True), test, label="cnn", shifts=[0, 1], kinds=("contrast",),
                        severities=(5,), **args)
    assert [f.heading.split(": ")[1] for f in cnn.figures] == ["first-layer filters", "feature maps", "saliency"]
    assert cnn.translation.accuracy[0] == cnn.accuracy == cnn.corruption.clean_accuracy
    assert cnn.to_dict()["corruption"]["accuracy"].keys() == {"contrast"}


def test_explain_model_without_captum_notes_the_missing_extra(monkeypatch):
    from cifarbench.evaluation.explain import explain_model

    monkeypatch.setitem(sys.modules, "captum", None)
    monkeypatch.setitem(sys.modules, "captum.attr", None)
    result = explain_model(_model("fnn"), _tiny_test(), label="fnn", classes=CLASSES, in_shape=(3, 32, 32),
                           mean=(0.5,) * 3, std=(0.5,) * 3, experiments=False)
    assert [f.heading for f in result.figures] == ["fnn: what the weights look for"]
    assert result.notes == [f"fnn: no saliency maps ({CAPTUM_MISSING})"]
