"""The permuted-pixels experiment's fixed scrambling of pixel positions (`DataConfig.permute_pixels`): a data
transformation, applied to train and test alike by `data.prepare`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import numpy as np
import torch

from cifarbench.errors import CifarbenchError

Images = TypeVar("Images", torch.Tensor, np.ndarray)


def pixel_permutation(seed: int, shape: Sequence[int]) -> torch.Tensor:
    """A fixed random permutation of the H*W pixel positions of images of `shape` ((C, H, W) or (H, W)),
    shared by every channel: output position j takes the pixel at input position permutation[j]."""
    h, w = shape[-2:]
    return torch.randperm(int(h) * int(w), generator=torch.Generator().manual_seed(int(seed)))


def inverse_permutation(permutation: torch.Tensor) -> torch.Tensor:
    """The permutation that undoes `permutation` under `permute_pixels`."""
    return torch.argsort(torch.as_tensor(permutation))


def permute_pixels(images: Images, permutation: torch.Tensor | np.ndarray) -> Images:
    """Scramble the pixel positions of (N, C, H, W) images (numpy or torch, same type out) with
    `permutation`, the same for every channel. A fully connected net learns as well from scrambled images
    (they are a relabelling of its inputs); a conv net loses the neighbourhoods its filters rely on."""
    n, c, h, w = images.shape
    if len(permutation) != h * w:
        raise CifarbenchError(f"a permutation of {len(permutation)} positions does not fit {h}x{w} images")
    if isinstance(images, np.ndarray):
        index = np.asarray(permutation)
        return np.ascontiguousarray(images.reshape(n, c, h * w)[..., index].reshape(n, c, h, w))
    index = torch.as_tensor(permutation, device=images.device)
    # reshape, not view: a channels_last batch is not contiguous in NCHW order.
    return images.reshape(n, c, h * w)[..., index].reshape(n, c, h, w).contiguous()
