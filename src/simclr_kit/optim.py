"""LARS and the warm-up + cosine learning-rate schedule, as a function of the step.

SimCLR (Chen et al. 2020, appendix B.1) trains with LARS (You et al. 2017), linear warm-up for
10 epochs, then cosine decay without restarts, lr = 0.3 x batch / 256, weight decay 1e-6, and
excludes biases and BatchNorm parameters from both weight decay and the LARS adaptation.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: weights (decayed, LARS-adapted) and biases/norm parameters (neither).

    A parameter with one dimension is a bias or a normalisation scale/shift.
    """
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "lars": True},
        {"params": no_decay, "weight_decay": 0.0, "lars": False},
    ]


class LARS(torch.optim.Optimizer):
    """SGD with momentum whose per-layer step is scaled by the trust ratio
    ``eta * ||w|| / ||g + wd * w||`` (You et al. 2017). Groups with ``lars=False`` take plain
    SGD steps. Runs without host synchronisation: the ratio stays a device tensor.
    """

    def __init__(self, params: Iterable, lr: float, momentum: float = 0.9,
                 weight_decay: float = 0.0, eta: float = 0.001) -> None:
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars=True)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if group["weight_decay"]:
                    grad = grad.add(p, alpha=group["weight_decay"])
                if group["lars"]:
                    w_norm = torch.linalg.vector_norm(p)
                    g_norm = torch.linalg.vector_norm(grad)
                    ratio = torch.where((w_norm > 0) & (g_norm > 0),
                                        group["eta"] * w_norm / g_norm, torch.ones_like(w_norm))
                    grad = grad * ratio
                buf = self.state[p].get("momentum_buffer")
                if buf is None:
                    buf = self.state[p]["momentum_buffer"] = grad.clone()
                else:
                    buf.mul_(group["momentum"]).add_(grad)
                p.add_(buf, alpha=-group["lr"])
        return loss


def build_optimizer(model: nn.Module, name: str, lr: float, momentum: float,
                    weight_decay: float) -> torch.optim.Optimizer:
    """'lars' (SimCLR), 'sgd' (momentum, biases and norms not decayed) or 'adam' (AdamW)."""
    groups = parameter_groups(model, weight_decay)
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    for g in groups:
        g.pop("lars")
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=False)
    return torch.optim.AdamW(groups, lr=lr)


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, base_lr: float,
                  final_lr: float = 0.0) -> float:
    """Learning rate at ``step`` (0-based, counted in batches, not epochs): linear warm-up from
    ``base_lr / warmup_steps`` to ``base_lr``, then cosine decay to ``final_lr`` at ``total_steps``.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return final_lr + 0.5 * (base_lr - final_lr) * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def effective_lr(lr_per_256: float, global_batch: int) -> float:
    """Linear scaling rule (Goyal et al. 2017): the rate grows with the global batch."""
    return lr_per_256 * global_batch / 256


__all__ = ["LARS", "build_optimizer", "warmup_cosine", "set_lr", "effective_lr"]
