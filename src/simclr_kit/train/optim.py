"""LARS and the warm-up + cosine learning-rate schedule, as a function of the step.

SimCLR (Chen et al. 2020, appendix B.1) trains with LARS (You et al. 2017), linear warm-up for
10 epochs, then cosine decay without restarts, lr = 0.3 x batch / 256 (or 0.075 x sqrt(batch)),
weight decay 1e-6, and excludes biases and BatchNorm parameters from both weight decay and the
LARS adaptation. That recipe targets ImageNet at batch 4096; the defaults simclr-kit uses for
small images and small batches were measured (bench/RESULTS.md, "Pretraining recipe").
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from simclr_kit.config import LR_SCALINGS, OPTIMIZER_DEFAULTS


def _no_decay_names(model: nn.Module) -> set[str]:
    """Full names of the parameters a submodule asks to keep from weight decay through timm's
    ``no_weight_decay()`` (a ViT's ``pos_embed`` and ``cls_token``, also ``dist_token``...)."""
    names: set[str] = set()
    for prefix, module in model.named_modules():
        ask = getattr(module, "no_weight_decay", None)
        if callable(ask):
            names |= {f"{prefix}.{n}" if prefix else n for n in ask()}
    return names


# Parameter names (their last part) of embeddings and tokens: timm's pos_embed, cls_token,
# dist_token, reg_token; torchvision's class_token and pos_embedding.
_EMBEDDING_ENDINGS = ("_embed", "_embedding", "token", "tokens")


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Up to three groups, empty ones left out:

    - weights: decayed, LARS-adapted;
    - embeddings: a ViT's position embedding and class, distillation and register tokens
      (parameters named ``*_embed``, ``*_embedding``, ``*token(s)``, or listed by timm's
      ``no_weight_decay()``): LARS-adapted, not decayed. Decaying them pulls every token's
      position towards zero (timm, MAE, DINO and MoCo v3 exclude them); left unadapted, a
      LARS step at the global rate would move them by several times their norm, where the
      trust ratio moves them by ``lr x eta`` of it, as every other weight;
    - biases and normalisation scales and shifts (one dimension): neither (SimCLR, appendix
      B.1).
    """
    excluded = _no_decay_names(model)
    decay, embeddings, rest = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1:
            rest.append(p)
        elif name in excluded or name.rsplit(".", 1)[-1].endswith(_EMBEDDING_ENDINGS):
            embeddings.append(p)
        else:
            decay.append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "lars": True},
        {"params": embeddings, "weight_decay": 0.0, "lars": True},
        {"params": rest, "weight_decay": 0.0, "lars": False},
    ]
    return [g for g in groups if g["params"]]


class LARS(torch.optim.Optimizer):
    """SGD with momentum whose per-layer step is scaled by the trust ratio
    ``eta * ||w|| / ||g + wd * w||`` (You et al. 2017). Groups with ``lars=False`` take plain
    SGD steps.

    ``clip=True`` caps the adapted rate at the global one: the ratio becomes
    ``min(eta ||w|| / (lr ||d||), 1)`` (solo-learn's ``clip_lr``), so a layer never moves faster
    than plain SGD at ``lr`` would move it, whatever ``eta``.

    Per group, every parameter is updated by a handful of multi-tensor (``torch._foreach_*``)
    kernels rather than ~10 kernels per parameter, and the norms and trust ratios stay on the
    device: a step never waits for the GPU (no ``.item()``, no Python branch on a tensor).
    """

    def __init__(self, params: Iterable, lr: float, momentum: float = 0.9,
                 weight_decay: float = 0.0, eta: float = 0.001, clip: bool = False) -> None:
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, clip=clip,
                        lars=True)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._update_group(group, params)
        return loss

    def _update_group(self, group: dict, params: list[Tensor]) -> None:
        """``d = g + wd w``; ``d *= trust`` (LARS groups); ``buf = m buf + d``; ``w -= lr buf``."""
        steps = [p.grad for p in params]
        owned = False  # whether ``steps`` are new tensors (else they alias the gradients)
        if group["weight_decay"]:
            steps, owned = torch._foreach_add(steps, params, alpha=group["weight_decay"]), True
        if group["lars"]:
            ratios = self._trust_ratios(params, steps, group["eta"],
                                        group["lr"] if group.get("clip") else None)
            if owned:
                torch._foreach_mul_(steps, ratios)
            else:
                steps, owned = torch._foreach_mul(steps, ratios), True
        bufs, old_bufs, old_steps = [], [], []
        for p, d in zip(params, steps):
            state = self.state[p]
            if "momentum_buffer" not in state:  # the first buffer is the step, as in SGD
                state["momentum_buffer"] = d if owned else d.clone()
            else:
                old_bufs.append(state["momentum_buffer"])
                old_steps.append(d)
            bufs.append(state["momentum_buffer"])
        if old_bufs:
            torch._foreach_mul_(old_bufs, group["momentum"])
            torch._foreach_add_(old_bufs, old_steps)
        torch._foreach_add_(params, bufs, alpha=-group["lr"])

    @staticmethod
    def _trust_ratios(params: list[Tensor], steps: list[Tensor], eta: float,
                      clip_lr: float | None = None) -> list[Tensor]:
        """``eta ||w|| / ||d||`` per tensor as 0-dim device tensors, 1 where either norm is 0;
        with ``clip_lr``, ``min(ratio / clip_lr, 1)``."""
        w_norm = torch.stack(torch._foreach_norm(params))  # (P,)
        d_norm = torch.stack(torch._foreach_norm(steps))
        ratio = eta * w_norm / d_norm
        if clip_lr is not None:
            ratio = torch.clamp(ratio / clip_lr, max=1.0) if clip_lr > 0 else torch.ones_like(ratio)
        ratio = torch.where((w_norm > 0) & (d_norm > 0), ratio, torch.ones_like(w_norm))
        return list(ratio.unbind(0))


def _fast_kwargs(cls: type[torch.optim.Optimizer], params: list[Tensor]) -> dict[str, bool]:
    """``fused=True`` on CUDA where this torch's optimizer has it, else ``foreach=True``.

    Fused kernels update every parameter in one or two launches; older releases (SGD before
    2.3) lack them, and CPU parameters take the foreach path.
    """
    on_cuda = bool(params) and all(p.device.type == "cuda" for p in params)
    if on_cuda and "fused" in inspect.signature(cls.__init__).parameters:
        return {"fused": True}
    return {"foreach": True}


def _lars(groups: list[dict], lr: float, momentum: float, weight_decay: float, eta: float,
          clip: bool) -> torch.optim.Optimizer:
    """SimCLR's: trust coefficient ``eta``, optionally clipped."""
    return LARS(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, clip=clip)


def _sgd(groups: list[dict], lr: float, momentum: float, **_: Any) -> torch.optim.Optimizer:
    """SGD with momentum."""
    groups = _without_lars(groups)
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=False,
                           **_fast_kwargs(torch.optim.SGD, _params(groups)))


def _adam(groups: list[dict], lr: float, **_: Any) -> torch.optim.Optimizer:
    """Adam, its weight decay added to the gradient (L2)."""
    groups = _without_lars(groups)
    return torch.optim.Adam(groups, lr=lr, **_fast_kwargs(torch.optim.Adam, _params(groups)))


def _adamw(groups: list[dict], lr: float, **_: Any) -> torch.optim.Optimizer:
    """AdamW: decoupled weight decay (Loshchilov & Hutter 2019)."""
    groups = _without_lars(groups)
    return torch.optim.AdamW(groups, lr=lr, **_fast_kwargs(torch.optim.AdamW, _params(groups)))


def _without_lars(groups: list[dict]) -> list[dict]:
    return [{k: v for k, v in g.items() if k != "lars"} for g in groups]


def _params(groups: list[dict]) -> list[Tensor]:
    return [p for g in groups for p in g["params"]]


# Every --optimizer is a row of config.OPTIMIZER_DEFAULTS, the one table of their names and
# default rate, weight decay and warm-up; its builder here is the function named after it
# (_lars, _sgd, _adam, _adamw), so a row without one fails at import. A builder gets
# parameter_groups(model, weight_decay) and the rate; the schedule then sets each group's "lr"
# every step (set_lr).
BUILDERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    name: globals()[f"_{name}"] for name in OPTIMIZER_DEFAULTS}


def build_optimizer(model: nn.Module, name: str, lr: float, momentum: float,
                    weight_decay: float, lars_eta: float = 0.001,
                    lars_clip: bool = False) -> torch.optim.Optimizer:
    """The optimizer ``name`` (a key of :data:`BUILDERS`) over ``model``'s parameter groups."""
    return BUILDERS[name](parameter_groups(model, weight_decay), lr=lr, momentum=momentum,
                          weight_decay=weight_decay, eta=lars_eta, clip=lars_clip)


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


def warmup_epochs_within(warmup_epochs: float, total_epochs: float, max_fraction: float) -> float:
    """The warm-up a run of ``total_epochs`` gets: ``warmup_epochs``, but at most
    ``max_fraction`` of the run, so a short run is not over while it is still warming up."""
    return min(warmup_epochs, max_fraction * total_epochs)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's rate to ``lr`` times the group's ``lr_mult`` (1 when absent), so a
    group with its own multiple keeps it as the schedule moves."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)


def effective_lr(lr_per_256: float, global_batch: int, scaling: str = "linear") -> float:
    """The rate for ``global_batch`` from the rate for a batch of 256: ``linear`` scales it with
    the batch (Goyal et al. 2017), ``sqrt`` with its square root (SimCLR appendix B.1:
    0.075 x sqrt(B) is 1.2 x sqrt(B / 256), better for small batches and short runs)."""
    if scaling == "sqrt":
        return lr_per_256 * math.sqrt(global_batch / 256)
    if scaling != "linear":
        raise ValueError(f"unknown learning-rate scaling {scaling!r}; use one of {LR_SCALINGS}")
    return lr_per_256 * global_batch / 256


__all__ = ["LARS", "build_optimizer", "warmup_cosine", "warmup_epochs_within", "set_lr",
           "effective_lr"]
