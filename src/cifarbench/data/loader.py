"""Device-resident batches: the whole split lives on the device as uint8, batches are index gathers.

No per-sample Python and no worker processes: on CIFAR-sized data this is what makes small models fast
(the notebook's PIL-per-image pipeline costs more than its FNN's arithmetic).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from cifarbench.data.dataset import Split


class DeviceSplit:
    """A split held on `device`, normalised per batch with the recipe's mean and std."""

    def __init__(self, split: Split, device: torch.device, mean: Sequence[float], std: Sequence[float],
                 channels_last: bool = False):
        self.images = torch.from_numpy(np.ascontiguousarray(split.images)).to(device)  # NCHW, whatever made it
        self.labels = torch.from_numpy(split.labels).to(device)
        self.device = device
        self.channels_last = channels_last
        shape = (1, len(mean), 1, 1)
        # Fold the /255 into the affine map so each batch costs one multiply-add.
        std_t = torch.tensor(std, dtype=torch.float32, device=device).view(shape)
        self.scale = 1.0 / (255.0 * std_t)
        self.shift = -torch.tensor(mean, dtype=torch.float32, device=device).view(shape) / std_t

    def __len__(self) -> int:
        return len(self.labels)

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, C, H, W) -> float32, normalised, in the configured memory layout."""
        x = torch.addcmul(self.shift, images.float(), self.scale)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def batch_indices(self, batch_size: int, *, generator: torch.Generator | None = None,
                      drop_last: bool = False) -> Iterator[torch.Tensor | slice]:
        """Indices of each batch: a shuffled order when `generator` is given, in order otherwise."""
        n = len(self)
        # The permutation is drawn on the CPU so that a seed gives the same order on every device.
        order = torch.randperm(n, generator=generator).to(self.device) if generator is not None else None
        stop = n - n % batch_size if drop_last and n >= batch_size else n
        for start in range(0, stop, batch_size):
            yield order[start:start + batch_size] if order is not None else slice(start, start + batch_size)

    def batches(self, batch_size: int, *, generator: torch.Generator | None = None,
                drop_last: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Normalised (x, y) batches, in the order of `batch_indices`."""
        for idx in self.batch_indices(batch_size, generator=generator, drop_last=drop_last):
            yield self.normalise(self.images[idx]), self.labels[idx]
