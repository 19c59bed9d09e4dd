"""Looking inside trained models: FNN class templates, first-layer filters, feature maps and saliency.

Each `*_figure`-style function returns a matplotlib Figure built with the object API (see reporting.plots).
Layers are found by running the model on a batch and watching which modules it calls, in order, so any
registered model works whatever its attributes are called. Everything runs in float32 without autocast
(a bf16-trained model is copied to fp32 first) and accepts channels_last inputs.
Saliency uses Captum, an optional extra: pip install -e '.[interpret]' in the cifarbench folder.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from torch import nn

from cifarbench.errors import CifarbenchError
from cifarbench.reporting.plots import _figure, _to_rgb

CAPTUM_MISSING = "saliency maps need the optional extra: pip install -e '.[interpret]' in the cifarbench folder"


# --- Shared helpers ----------------------------------------------------------------------------------------

def _device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def fp32_model(model: nn.Module) -> nn.Module:
    """`model` itself when every floating parameter and buffer is float32, else an fp32 copy (interpretation
    needs fp32 gradients; the trained model is left as it is)."""
    tensors = [*model.parameters(), *model.buffers()]
    if all(t.dtype == torch.float32 for t in tensors if t.is_floating_point()):
        return model
    return copy.deepcopy(model).float()


def modules_in_forward_order(model: nn.Module, inputs: torch.Tensor, kinds: tuple[type[nn.Module], ...] = (
        nn.Conv2d, nn.Linear)) -> list[tuple[str, nn.Module]]:
    """(name, module) of every module of `kinds` that a forward pass of `inputs` calls, in the order of
    their first call (which is not always the order they were defined in)."""
    names = {m: n for n, m in model.named_modules()}
    order: list[tuple[str, nn.Module]] = []

    def record(module: nn.Module, args: tuple, output: object) -> None:
        if all(m is not module for _, m in order):
            order.append((names[module], module))

    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, kinds)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(inputs.float())
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return order


def _probe(in_shape: Sequence[int], model: nn.Module) -> torch.Tensor:
    return torch.zeros(1, *in_shape, device=_device(model))


def _minmax(a: np.ndarray) -> np.ndarray:
    """Scaled to [0, 1]; a constant array becomes mid-grey rather than a division by zero."""
    lo, hi = float(a.min()), float(a.max())
    return (a - lo) / (hi - lo) if hi > lo else np.full_like(a, 0.5, dtype=float)


def _chw_to_display(chw: np.ndarray) -> np.ndarray:
    """A (C, H, W) weight or image, min-max scaled as a whole, as an (H, W, 3) or (H, W) array for imshow."""
    scaled = _minmax(np.asarray(chw, dtype=float))
    if scaled.shape[0] == 3:
        return np.moveaxis(scaled, 0, -1)
    return scaled.mean(0) if scaled.shape[0] != 1 else scaled[0]


def _display_images(inputs: torch.Tensor, display: np.ndarray | None) -> list[np.ndarray]:
    """What to show for each input: the uint8 originals when given, else the inputs min-max scaled."""
    if display is not None:
        return [_to_rgb(np.asarray(image)) for image in display]
    return [_chw_to_display(x) for x in inputs.detach().float().cpu().numpy()]


def _grid(n: int, max_cols: int) -> tuple[int, int]:
    cols = max(1, min(n, max_cols))
    return math.ceil(n / cols), cols


def _blank(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


# --- FNN templates -----------------------------------------------------------------------------------------

def fnn_templates(model: nn.Module, in_shape: Sequence[int], classes: Sequence[str], *, units: int = 32):
    """What a fully connected net's weights look for, drawn as images.

    When the Linear layers reached by the forward pass chain into one another and the last one outputs a
    score per class (the notebook's 3072 -> 128 -> 10 FNN), each class's template is its row of the product
    W_last @ ... @ W_1: the linear path from pixels to that class's score with every hidden unit switched on
    (ReLUs and biases left out), in the manner of CS231n's linear-classifier templates. Otherwise the first
    `units` hidden units' weight rows are drawn. Each image is min-max scaled on its own.
    """
    model = fp32_model(model)
    order = modules_in_forward_order(model, _probe(in_shape, model))
    if not order or not isinstance(order[0][1], nn.Linear):
        first = f"its first layer is {type(order[0][1]).__name__} {order[0][0]!r}" if order else "it has no layers"
        raise CifarbenchError("FNN templates need a model whose first layer is a Linear on the flattened image; "
                              + first)
    linears = [m for _, m in order]
    pixels = int(np.prod(in_shape))
    if linears[0].in_features != pixels:
        raise CifarbenchError(f"FNN templates need a first Linear on all {pixels} pixel values; "
                              f"{order[0][0]!r} takes {linears[0].in_features}")
    chained = all(isinstance(m, nn.Linear) for m in linears) and all(
        b.in_features == a.out_features for a, b in zip(linears, linears[1:], strict=False))
    with torch.no_grad():
        if chained and linears[-1].out_features == len(classes):
            weights = linears[0].weight.float()
            for layer in linears[1:]:
                weights = layer.weight.float() @ weights
            titles = list(classes)
            heading = "Class templates: rows of W_last @ ... @ W_1 (the linear path from pixels to each class score)"
        else:
            weights = linears[0].weight.float()[:units]
            titles = [f"unit {i}" for i in range(len(weights))]
            heading = f"First-layer weights of {len(weights)} hidden units ({order[0][0]})"
    # The weights' columns are in the (C, H, W) order that flatten(1) gives, channels_last or not.
    templates = weights.detach().cpu().numpy().reshape(len(weights), *in_shape)  # one Linear: its Parameter
    rows, cols = _grid(len(templates), 10 if len(templates) <= 10 else 8)
    fig = _figure(1.3 * cols + 0.4, 1.45 * rows + 0.5)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, template, title in zip(axes, templates, titles, strict=False):
        ax.imshow(_chw_to_display(template), cmap="gray", interpolation="nearest")
        ax.set_title(title, fontsize=8)
    for ax in axes:
        _blank(ax)
    for ax in axes[len(templates):]:
        ax.set_frame_on(False)
    fig.suptitle(heading, fontsize=9)
    return fig


# --- Conv filters and feature maps -------------------------------------------------------------------------

def first_conv(model: nn.Module, in_shape: Sequence[int] = (3, 32, 32)) -> tuple[str, nn.Conv2d]:
    """The first Conv2d a forward pass calls, with its name; a model without one is a user error."""
    order = modules_in_forward_order(model, _probe(in_shape, model), (nn.Conv2d,))
    if not order:
        raise CifarbenchError(f"{type(model).__name__} has no convolution: its filters cannot be drawn")
    return order[0]  # type: ignore[return-value]


def first_layer_filters(model: nn.Module, *, in_shape: Sequence[int] = (3, 32, 32), max_filters: int = 64):
    """The first convolution's filters as a grid of small images (RGB for 3 input channels), each min-max
    scaled on its own: what the net looks for in every small patch of the image."""
    model = fp32_model(model)
    name, conv = first_conv(model, in_shape)
    weights = conv.weight.detach().float().cpu().numpy()[:max_filters]
    rows, cols = _grid(len(weights), 8)
    fig = _figure(0.8 * cols + 0.4, 0.8 * rows + 0.6)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, w in zip(axes, weights, strict=False):
        ax.imshow(_chw_to_display(w), cmap="gray", interpolation="nearest")
    for ax in axes:
        _blank(ax)
    for ax in axes[len(weights):]:
        ax.set_frame_on(False)
    kh, kw = conv.kernel_size
    shown = "" if len(weights) == conv.out_channels else f", first {len(weights)}"
    fig.suptitle(f"{name}: {conv.out_channels} filters of {conv.in_channels}x{kh}x{kw}{shown}", fontsize=9)
    return fig


def collect_activations(model: nn.Module, inputs: torch.Tensor,
                        layers: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """The 4-D outputs of the named modules (by default every Conv2d, before its activation) for `inputs`,
    in forward order, on the CPU."""
    model = fp32_model(model)
    modules = dict(model.named_modules())
    if layers is None:
        chosen = [n for n, m in modules.items() if isinstance(m, nn.Conv2d)]
    else:
        unknown = [n for n in layers if n not in modules or n == ""]
        if unknown:
            known = ", ".join(n for n in modules if n)
            raise CifarbenchError(f"the model has no layer {', '.join(map(repr, unknown))}; its layers: {known}")
        chosen = list(layers)
    outputs: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            if isinstance(output, torch.Tensor) and output.dim() == 4 and name not in outputs:
                outputs[name] = output.detach().float().cpu().contiguous()
        return hook

    hooks = [modules[n].register_forward_hook(keep(n)) for n in chosen]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(inputs.float().to(_device(model)))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return outputs


def feature_maps(model: nn.Module, images: torch.Tensor, layers: Sequence[str] | None = None, *,
                 channels: int = 8, display: np.ndarray | None = None):
    """For each input image (normalised, N×C×H×W), a row per layer of its first `channels` activation maps
    (by default after every Conv2d, before the nonlinearity), each map min-max scaled on its own.

    `display` (uint8 N×C×H×W) is shown as the image; without it the input is min-max scaled.
    """
    activations = collect_activations(model, images, layers)
    if not activations:
        raise CifarbenchError("no layer with image-shaped (4-D) outputs was found to draw feature maps of")
    shown = _display_images(images, display)
    n_layers = len(activations)
    rows = len(shown) * n_layers
    fig = _figure(1.0 * (channels + 1) + 1.6, 1.0 * rows + 0.5)
    axes = fig.subplots(rows, channels + 1, squeeze=False)
    for i, image in enumerate(shown):
        for j, (name, act) in enumerate(activations.items()):
            row = axes[i * n_layers + j]
            if j == 0:
                row[0].imshow(image, interpolation="nearest")
            else:
                row[0].set_frame_on(False)
            maps = act[i, :channels].numpy()
            for ax, fmap in zip(row[1:], maps, strict=False):
                ax.imshow(_minmax(fmap), cmap="viridis", interpolation="nearest")
            for ax in row[1 + len(maps):]:
                ax.set_frame_on(False)
            row[1].set_ylabel(f"{name}\n{act.shape[1]}x{act.shape[2]}x{act.shape[3]}", fontsize=7)
            for ax in row:
                _blank(ax)
    fig.suptitle(f"Activation maps (first {channels} channels of each layer)", fontsize=9)
    return fig


# --- Saliency (Captum) -------------------------------------------------------------------------------------

Method = Literal["saliency", "integrated_gradients"]


def _captum_attr():
    import warnings

    from tqdm import TqdmWarning

    try:
        with warnings.catch_warnings():  # captum imports tqdm.auto, which warns in a notebook without ipywidgets
            warnings.simplefilter("ignore", TqdmWarning)
            import captum.attr as attr
    except ImportError:
        raise CifarbenchError(CAPTUM_MISSING) from None
    return attr


def _prepared(model: nn.Module, images: torch.Tensor, targets: Sequence[int] | torch.Tensor):
    model = fp32_model(model)
    device = _device(model)
    x = images.detach().float().to(device)
    if images.dim() == 4 and images.is_contiguous(memory_format=torch.channels_last):
        x = x.contiguous(memory_format=torch.channels_last)
    return model, x, torch.as_tensor(targets, dtype=torch.int64, device=device)


def saliency_attributions(model: nn.Module, images: torch.Tensor, targets: Sequence[int] | torch.Tensor, *,
                          method: Method = "saliency", steps: int = 32) -> torch.Tensor:
    """Per-pixel importance (N, H, W) on the CPU for the `targets` class of each input image.

    "saliency": |d score / d pixel|, maximum over the colour channels (Simonyan et al. 2014).
    "integrated_gradients": |attributions| summed over channels, from an all-zero input (the mean image
    after normalisation) in `steps` steps (Sundararajan et al. 2017).
    """
    attr = _captum_attr()
    model, x, target = _prepared(model, images, targets)
    x.requires_grad_(True)
    was_training = model.training
    model.eval()
    try:
        if method == "saliency":
            maps = attr.Saliency(model).attribute(x, target=target, abs=True).amax(dim=1)
        elif method == "integrated_gradients":
            ig = attr.IntegratedGradients(model).attribute(x, baselines=torch.zeros_like(x), target=target,
                                                           n_steps=steps)
            maps = ig.abs().sum(dim=1)
        else:
            raise CifarbenchError(f"saliency method must be 'saliency' or 'integrated_gradients', not {method!r}")
    finally:
        model.train(was_training)
    return maps.detach().float().cpu().contiguous()


def gradcam_attributions(model: nn.Module, images: torch.Tensor, targets: Sequence[int] | torch.Tensor,
                         layer: str | None = None) -> torch.Tensor | None:
    """Grad-CAM (N, H, W) on the CPU for the `targets` class, from the last Conv2d the forward pass calls
    (or the named `layer`), upsampled bilinearly to the image size; None for a model without convolutions."""
    attr = _captum_attr()
    model, x, target = _prepared(model, images, targets)
    if layer is None:
        convs = modules_in_forward_order(model, x[:1], (nn.Conv2d,))
        if not convs:
            return None
        module = convs[-1][1]
    else:
        module = dict(model.named_modules()).get(layer)
        if module is None or layer == "":
            raise CifarbenchError(f"the model has no layer {layer!r}")
    was_training = model.training
    model.eval()
    try:
        cam = attr.LayerGradCam(model, module).attribute(x, target=target, relu_attributions=True)
    finally:
        model.train(was_training)
    cam = attr.LayerAttribution.interpolate(cam.float().contiguous(), tuple(x.shape[-2:]), interpolate_mode="bilinear")
    return cam[:, 0].detach().cpu().contiguous()


def pick_examples(labels: Sequence[int] | np.ndarray, predictions: Sequence[int] | np.ndarray, *, right: int = 4,
                  wrong: int = 4, seed: int = 0) -> list[int]:
    """Indices of up to `right` correctly and `wrong` wrongly predicted examples, chosen at random by `seed`."""
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for mask, k in ((labels == predictions, right), (labels != predictions, wrong)):
        idx = np.flatnonzero(mask)
        chosen += sorted(rng.choice(idx, size=min(k, len(idx)), replace=False).tolist()) if len(idx) else []
    return chosen


def saliency_maps(model: nn.Module, images: torch.Tensor, labels: Sequence[int], predictions: Sequence[int],
                  classes: Sequence[str], *, method: Method = "saliency", display: np.ndarray | None = None):
    """A row per image: the image, its saliency map and, for a conv net, its Grad-CAM, both for the
    predicted class (what the decision rested on), captioned true / predicted and whether it was right.

    `images` are the model's inputs (normalised N×C×H×W); `display` (uint8) is shown in their place."""
    saliency = saliency_attributions(model, images, predictions, method=method).numpy()
    cam = gradcam_attributions(model, images, predictions)
    shown = _display_images(images, display)
    cols = 3 if cam is not None else 2
    fig = _figure(1.9 * cols + 0.4, 1.9 * len(shown) + 0.5)
    axes = fig.subplots(max(len(shown), 1), cols, squeeze=False)
    label_of = {"saliency": "saliency |d score / d pixel|", "integrated_gradients": "integrated gradients"}[method]
    for i, (row, image) in enumerate(zip(axes, shown, strict=False)):
        true, pred = int(labels[i]), int(predictions[i])
        verdict = "right" if true == pred else "wrong"
        row[0].imshow(image, interpolation="nearest")
        row[0].set_title(f"true {classes[true][:10]}, pred {classes[pred][:10]} ({verdict})", fontsize=7)
        row[1].imshow(image, interpolation="nearest")
        row[1].imshow(_minmax(saliency[i]), cmap="inferno", alpha=0.7, interpolation="nearest")
        row[1].set_title(label_of if i == 0 else "", fontsize=7)
        if cam is not None:
            row[2].imshow(image, interpolation="nearest")
            row[2].imshow(_minmax(cam[i].numpy()), cmap="jet", alpha=0.45, interpolation="bilinear")
            row[2].set_title("Grad-CAM (last conv)" if i == 0 else "", fontsize=7)
        for ax in row:
            _blank(ax)
    fig.suptitle("Where the model looked, for its predicted class", fontsize=9)
    return fig
