"""Counting a model's multiply-accumulates: what its cost per image is reported in, and what bounds a model from
elsewhere (`registry.foreign_cost_excess`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


@torch.no_grad()
def count_macs(model: nn.Module, in_shape: Sequence[int]) -> int:
    """Multiply-accumulates of the Conv2d and Linear layers in one forward pass of a single 1×C×H×W image."""
    total = 0

    def conv(module: nn.Conv2d, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        kh, kw = module.kernel_size
        # Every output element is a dot product over (in_channels / groups) × kh × kw inputs.
        total += output.numel() * (module.in_channels // module.groups) * kh * kw

    def linear(module: nn.Linear, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        total += output.numel() * module.in_features

    hooks = []
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            hooks.append(module.register_forward_hook(conv))
        elif isinstance(module, nn.Linear):
            hooks.append(module.register_forward_hook(linear))
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        model(torch.zeros(1, *in_shape, device=device))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return total
