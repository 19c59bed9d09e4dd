"""The classroom notebook's two models, layer for layer (see shared/seed)."""

from __future__ import annotations

import torch
from torch import nn

from cifarbench.models.registry import register_model


class FNN(nn.Module):
    """Flatten, Linear(C*H*W, 128), ReLU, Linear(128, classes)."""

    def __init__(self, num_classes: int = 10, in_shape: tuple[int, int, int] = (3, 32, 32), hidden: int = 128):
        super().__init__()
        c, h, w = in_shape
        self.fc1 = nn.Linear(c * h * w, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


class CNN(nn.Module):
    """conv3x3(32) ReLU maxpool2, conv3x3(64) ReLU maxpool2, Linear(128) ReLU, Linear(classes); no padding."""

    def __init__(self, num_classes: int = 10, in_shape: tuple[int, int, int] = (3, 32, 32)):
        super().__init__()
        c, h, w = in_shape
        self.conv1 = nn.Conv2d(c, 32, kernel_size=3)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3)
        # Unpadded 3x3 conv then 2x2 pool, twice: 32 -> 30 -> 15 -> 13 -> 6 on CIFAR-10.
        fh, fw = ((h - 2) // 2 - 2) // 2, ((w - 2) // 2 - 2) // 2
        self.fc1 = nn.Linear(64 * fh * fw, 128)
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)
        # reshape, not view: under channels_last the activations are not contiguous in NCHW order.
        x = torch.relu(self.fc1(x.reshape(x.size(0), -1)))
        return self.fc2(x)


@register_model("fnn")
def fnn(num_classes: int = 10, in_shape: tuple[int, int, int] = (3, 32, 32)) -> nn.Module:
    """The notebook's "regular" fully connected net: 3072 -> 128 -> 10."""
    return FNN(num_classes, in_shape)


@register_model("cnn")
def cnn(num_classes: int = 10, in_shape: tuple[int, int, int] = (3, 32, 32)) -> nn.Module:
    """The notebook's small CNN: two unpadded conv3x3-ReLU-maxpool blocks, then 2304 -> 128 -> 10."""
    return CNN(num_classes, in_shape)
