"""The optimiser a config names: SGD (the notebook's and airbench's), Muon for convolution filters, Adam, AdamW."""

from __future__ import annotations

import torch
from torch import nn

from cifarbench.config import TrainConfig
from cifarbench.training.muon import MuonSGD


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """Parameter groups, then the optimiser. BatchNorm parameters get `bias_lr_scale` x the learning rate and
    / that the decay (the same net decay); with muon the convolution filters form a group that takes Muon
    steps. Every group records its `base_lr`, which the schedule scales."""
    o = config.optimizer
    norm_ids = {id(p) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                for p in m.parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    filters = [p for p in trainable if p.dim() == 4] if o.name == "muon" else []
    norm = [p for p in trainable if id(p) in norm_ids]
    taken = norm_ids | {id(p) for p in filters}
    other = [p for p in trainable if id(p) not in taken]
    groups = [{"params": other, "lr": o.lr, "weight_decay": o.weight_decay}]
    if norm:
        groups.append({"params": norm, "lr": o.lr * o.bias_lr_scale, "weight_decay": o.weight_decay / o.bias_lr_scale})
    if filters:
        groups.append({"params": filters, "lr": o.muon_lr, "momentum": o.muon_momentum, "muon": True})
    groups = [g for g in groups if g["params"]]
    for g in groups:
        g["base_lr"] = g["lr"]
    if o.name == "muon":
        return MuonSGD(groups, momentum=o.momentum, nesterov=o.nesterov)
    if o.name in ("adam", "adamw"):
        kind = torch.optim.Adam if o.name == "adam" else torch.optim.AdamW
        return kind(groups, lr=o.lr, betas=(o.beta1, o.beta2))
    return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov)
