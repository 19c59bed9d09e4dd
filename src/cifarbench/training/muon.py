"""Muon for convolution filters, SGD for everything else, in one optimiser (one state dict to checkpoint).

Muon (Keller Jordan, 2024) replaces each filter bank's momentum-smoothed gradient by the nearest
semi-orthogonal matrix before stepping: every direction of the update gets the same size, so the rare
directions that plain SGD barely moves learn as fast as the common ones. airbench94_muon reaches airbench94's
accuracy in 8 epochs instead of 10. Following it, the filters are also rescaled to a fixed norm before each
step (their scale is irrelevant under BatchNorm, so the step's angle is what the learning rate sets) and get
no weight decay. Our code, after the public description.
"""

from __future__ import annotations

import torch


def orthogonalise(g: torch.Tensor, steps: int = 3) -> torch.Tensor:
    """Approximately U V^T for g = U S V^T (2-D): a quintic Newton-Schulz iteration whose coefficients push the
    singular values quickly toward 1 (they end in roughly [0.5, 1.5], which trains just as well). bf16 is
    enough for this and is what makes it cheap."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.to(torch.bfloat16)
    transposed = x.size(0) > x.size(1)
    if transposed:  # iterate on the short side: the Gram matrix is then the small one
        x = x.T
    x = x / (x.norm() + 1e-7)  # singular values <= 1, where the iteration converges
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.T if transposed else x).to(g.dtype)


class MuonSGD(torch.optim.Optimizer):
    """Param groups with `muon=True` take Muon steps (`momentum`, Nesterov, no weight decay); the others take
    Nesterov SGD steps exactly like torch.optim.SGD with dampening 0."""

    def __init__(self, groups: list[dict], momentum: float, nesterov: bool = True, ns_steps: int = 3):
        for g in groups:
            g.setdefault("muon", False)
            g.setdefault("weight_decay", 0.0)
        super().__init__(groups, dict(momentum=momentum, nesterov=nesterov, ns_steps=ns_steps))

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - torch's signature
        for group in self.param_groups:
            lr, momentum, nesterov = group["lr"], group["momentum"], group["nesterov"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if not group["muon"] and group["weight_decay"]:
                    g = g.add(p, alpha=group["weight_decay"])
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = g.clone()
                else:
                    state["momentum_buffer"].mul_(momentum).add_(g)
                buf = state["momentum_buffer"]
                update = g.add(buf, alpha=momentum) if nesterov else buf
                if group["muon"]:
                    p.mul_(len(p) ** 0.5 / p.norm().clamp_min(1e-12))
                    update = orthogonalise(update.reshape(len(update), -1), group["ns_steps"]).view_as(p)
                p.add_(update, alpha=-lr)
