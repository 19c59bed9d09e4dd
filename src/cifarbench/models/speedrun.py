"""An airbench-class network for reaching high accuracy fast, and the notebook CNN with BatchNorm.

The speedrun net: a frozen 2x2 patch-whitening conv (initialised from the training data), then three blocks
of conv-pool-BatchNorm-GELU-conv-BatchNorm-GELU, a global max-pool and a linear head scaled down by 1/9.
The activation is a choice (`act`): GELU as airbench, or SiLU, which costs less on a CPU.
Its ingredients follow Keller Jordan's airbench94 (facts from its public write-up; our own code).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cifarbench.config import shown_value
from cifarbench.errors import CifarbenchError
from cifarbench.models.registry import register_model


class BiasOnlyBatchNorm(nn.BatchNorm2d):
    """BatchNorm with a fixed scale of 1 (only the bias trains) and fast-moving running statistics."""

    def __init__(self, channels: int, momentum: float = 0.4):
        # eps tiny on purpose: with the scale frozen at 1, a large eps would shrink small-variance channels.
        super().__init__(channels, eps=1e-12, momentum=momentum)
        self.weight.requires_grad_(False)


class _MatmulWeightGradConv(torch.autograd.Function):
    """A bf16 3x3 'same' convolution whose weight gradient is one matrix product over im2col columns.

    Why: oneDNN's weight-gradient kernel is slow on CPUs for the last block's shapes (few pixels, many channels);
    for earlier layers the im2col columns are large and this product loses, hence only the last block. Forward and
    input gradient stay oneDNN's. Measurements: docs/cpu-performance.md#matrix-product-weight-gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x, weight = x.to(torch.bfloat16), weight.to(torch.bfloat16)  # what autocast would have given conv2d
        ctx.save_for_backward(x, weight)
        with torch.autocast("cpu", enabled=False):
            return F.conv2d(x, weight, padding=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:  # type: ignore[override]
        x, weight = ctx.saved_tensors
        grad = grad.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(grad, x, weight, None, [1, 1], [1, 1], [1, 1], False, [0, 0],
                                                         1, [True, False, False])[0]
        n, c, h, w = x.shape
        padded = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 1, 1, 1))  # N, H+2, W+2, C
        columns = torch.cat([padded[:, i:i + h, j:j + w] for i in range(3) for j in range(3)], dim=3)
        grad_w = grad.permute(0, 2, 3, 1).reshape(-1, grad.size(1)).t() @ columns.reshape(-1, 9 * c)
        # Autograd casts the bf16 gradient to the fp32 weight's dtype, as it does for autocast's own conv2d.
        return grad_x, grad_w.view(-1, 3, 3, c).permute(0, 3, 1, 2)


class DiracConv(nn.Conv2d):
    """3x3 'same' conv without bias, initialised to pass its input through (an implicit residual).

    With `matmul_weight_grad`, a bf16 CPU training step takes its weight gradient from _MatmulWeightGradConv."""

    def __init__(self, c_in: int, c_out: int, matmul_weight_grad: bool = False):
        super().__init__(c_in, c_out, kernel_size=3, padding=1, bias=False)
        self.matmul_weight_grad = matmul_weight_grad

    def reset_parameters(self) -> None:
        super().reset_parameters()
        w = self.weight.data
        nn.init.dirac_(w[: min(w.size(0), w.size(1))])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.matmul_weight_grad and x.device.type == "cpu" and torch.is_grad_enabled() and self.weight.requires_grad
                and torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16):
            return _MatmulWeightGradConv.apply(x, self.weight)
        return super().forward(x)


ACTIVATIONS = {"gelu": F.gelu, "silu": F.silu, "relu": F.relu}


class ConvBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, act: str = "gelu", matmul_weight_grad: bool = False):
        super().__init__()
        self.conv1, self.norm1 = DiracConv(c_in, c_out, matmul_weight_grad), BiasOnlyBatchNorm(c_out)
        self.conv2, self.norm2 = DiracConv(c_out, c_out, matmul_weight_grad), BiasOnlyBatchNorm(c_out)
        self.act = ACTIVATIONS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.norm1(F.max_pool2d(self.conv1(x), 2)))
        return self.act(self.norm2(self.conv2(x)))


class SpeedrunNet(nn.Module):
    def __init__(self, num_classes: int = 10, in_shape: tuple[int, int, int] = (3, 32, 32),
                 widths: Sequence[int] = (64, 256, 256), whiten_kernel: int = 2, scale: float = 1 / 9,
                 act: str = "gelu", cpu_matmul_weight_grad: bool = True):
        super().__init__()
        check_act(act)
        c = in_shape[0]
        # Both signs of every whitening filter: the activation after it would otherwise discard half of each
        # direction.
        self.whiten = nn.Conv2d(c, 2 * c * whiten_kernel**2, kernel_size=whiten_kernel, bias=True)
        self.whiten.weight.requires_grad_(False)
        nn.init.zeros_(self.whiten.bias)
        chans = [self.whiten.out_channels, *widths]
        last = len(widths) - 1
        self.blocks = nn.Sequential(*(ConvBlock(a, b, act, cpu_matmul_weight_grad and i == last)
                                      for i, (a, b) in enumerate(itertools.pairwise(chans))))
        self.act = ACTIVATIONS[act]
        self.head = nn.Linear(chans[-1], num_classes, bias=False)
        self.scale = scale

    @torch.no_grad()
    def init_whitening(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """Set the whitening filters to the eigenvectors of the patch covariance of `images` (normalised
        float N×C×H×W), scaled by 1/sqrt(eigenvalue), so the layer's outputs are decorrelated with unit variance."""
        k = self.whiten.kernel_size
        c = images.size(1)
        patches = images.float().unfold(2, k[0], 1).unfold(3, k[1], 1)  # N, C, H', W', kh, kw
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, c * k[0] * k[1]).double()
        cov = patches.T @ patches / len(patches)
        eigenvalues, eigenvectors = torch.linalg.eigh(cov)
        filters = (eigenvectors.T / torch.sqrt(eigenvalues + eps)[:, None]).reshape(-1, c, *k)
        self.whiten.weight.copy_(torch.cat([filters, -filters]).to(self.whiten.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.act(self.whiten(x)))
        return self.head(x.amax(dim=(2, 3))) * self.scale


class CNNBN(nn.Module):
    """The notebook's CNN with BatchNorm after each convolution (the first step a student would take)."""

    def __init__(self, num_classes: int = 10, in_shape: tuple[int, int, int] = (3, 32, 32)):
        super().__init__()
        c, h, w = in_shape
        self.conv1, self.bn1 = nn.Conv2d(c, 32, 3, bias=False), nn.BatchNorm2d(32)
        self.conv2, self.bn2 = nn.Conv2d(32, 64, 3, bias=False), nn.BatchNorm2d(64)
        fh, fw = ((h - 2) // 2 - 2) // 2, ((w - 2) // 2 - 2) // 2
        self.fc1 = nn.Linear(64 * fh * fw, 128)
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        return self.fc2(F.relu(self.fc1(x.reshape(x.size(0), -1))))


@register_model("speedrun", default_recipe="fast")
def speedrun(num_classes: int = 10, in_shape: tuple[int, int, int] = (3, 32, 32),
             widths: Sequence[int] = (64, 256, 256), act: str = "gelu",
             cpu_matmul_weight_grad: bool = True) -> nn.Module:
    """airbench-class net: frozen patch whitening, 3 conv-pool-BN-GELU blocks (widths configurable), max-pool head.

    `act` replaces GELU ("silu", "relu"). `cpu_matmul_weight_grad` (a speed choice only, see
    _MatmulWeightGradConv) computes the last block's weight gradients as matrix products in bf16 CPU training."""
    return SpeedrunNet(num_classes, in_shape, widths=check_widths(widths), act=check_act(act),
                       cpu_matmul_weight_grad=check_flag(cpu_matmul_weight_grad, "cpu_matmul_weight_grad"))


MAX_BLOCKS, MAX_WIDTH = 8, 4096
"""Beyond these a net no longer fits the point of this one (and its weights would not fit in memory)."""


def check_widths(widths: object) -> tuple[int, ...]:
    """speedrun's block widths as a tuple: 1..MAX_BLOCKS positive ints up to MAX_WIDTH (bool is no width)."""
    if (not isinstance(widths, (list, tuple)) or not 1 <= len(widths) <= MAX_BLOCKS
            or not all(isinstance(w, int) and not isinstance(w, bool) and 1 <= w <= MAX_WIDTH for w in widths)):
        raise CifarbenchError(f"model_kwargs.widths must be a list of 1 to {MAX_BLOCKS} integers in [1, {MAX_WIDTH}], "
                              f"e.g. [64, 256, 256] (got {shown_value(widths)})")
    return tuple(widths)


def check_act(act: object) -> str:
    """One of ACTIVATIONS' names."""
    if not isinstance(act, str) or act not in ACTIVATIONS:
        raise CifarbenchError(f"model_kwargs.act must be one of: {', '.join(ACTIVATIONS)} (got {shown_value(act)})")
    return act


def check_flag(value: object, name: str) -> bool:
    """A model argument that must be true or false (not 0, 1 or a string)."""
    if not isinstance(value, bool):
        raise CifarbenchError(f"model_kwargs.{name} must be true or false (got {shown_value(value)})")
    return value


@register_model("cnn-bn", default_recipe="fast")
def cnn_bn(num_classes: int = 10, in_shape: tuple[int, int, int] = (3, 32, 32)) -> nn.Module:
    """The notebook's CNN plus BatchNorm after each conv; trained with augmentation by the fast recipe."""
    return CNNBN(num_classes, in_shape)
