"""Augmentation on whole batches of tensors on the device: flips and translations, no per-image Python.

Random draws depend only on (seed, epoch), so a run is reproducible and a resumed run sees the same views.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cifarbench.config import AugmentConfig


class Augmenter:
    """Draws each epoch's flips and shifts for every training example, then applies them batch by batch."""

    def __init__(self, config: AugmentConfig, num_examples: int, seed: int, device: torch.device):
        self.config = config
        self.n = num_examples
        self.seed = seed
        self.device = device
        g = torch.Generator().manual_seed(seed * 7919 + 1)
        # Alternating flips: one coin per image for the whole run, inverted on every other epoch.
        self.base_flips = (torch.rand(num_examples, generator=g) < 0.5).to(device)

    @property
    def active(self) -> bool:
        return self.config.flip or self.config.translate > 0

    def start_epoch(self, epoch: int) -> None:
        g = torch.Generator().manual_seed(self.seed * 7919 + 1000 + epoch)
        if self.config.alternate_flip:
            self.flips = self.base_flips ^ bool(epoch % 2 == 0)
        else:
            self.flips = (torch.rand(self.n, generator=g) < 0.5).to(self.device)
        r = self.config.translate
        self.shifts = torch.randint(-r, r + 1, (self.n, 2), generator=g).to(self.device) if r else None

    def __call__(self, x: torch.Tensor, index: torch.Tensor | slice) -> torch.Tensor:
        """Augment the normalised batch `x` whose rows are training examples `index`."""
        if self.config.flip:
            x = torch.where(self.flips[index].view(-1, 1, 1, 1), x.flip(-1), x)
        if self.shifts is not None:
            x = translate(x, self.shifts[index], self.config.translate)
        return x


def translate(x: torch.Tensor, shifts: torch.Tensor, r: int) -> torch.Tensor:
    """Shift each image by (dy, dx) in [-r, r] pixels with reflect padding; output has x's shape."""
    h, w = x.shape[-2:]
    padded = F.pad(x, (r, r, r, r), mode="reflect")
    out = torch.empty_like(x)
    # One masked copy per distinct shift: (2r+1)^2 vectorised copies instead of one per image.
    for dy in range(-r, r + 1):
        rows = shifts[:, 0] == dy
        for dx in range(-r, r + 1):
            mask = rows & (shifts[:, 1] == dx)
            if mask.any():
                out[mask] = padded[mask, :, r + dy:r + dy + h, r + dx:r + dx + w]
    return out
