"""Lookahead with a warming-up average: the model is pulled toward (and replaced by) an EMA of its weights."""

from __future__ import annotations

import torch
from torch import nn

from cifarbench.config import LookaheadConfig


class Lookahead:
    def __init__(self, model: nn.Module, config: LookaheadConfig):
        self.config = config
        # Float state only (weights and BatchNorm statistics); integer counters are left alone.
        self.average = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float) -> None:
        """average <- decay * average + (1 - decay) * model, then model <- average."""
        state = model.state_dict()
        for name, avg in self.average.items():
            avg.lerp_(state[name], 1.0 - decay)
            state[name].copy_(avg)

    def decay(self, progress: float) -> float:
        """Small early (follow the model), close to decay_base**every at the end (average strongly)."""
        c = self.config
        return c.decay_base ** c.every * progress ** c.decay_pow
