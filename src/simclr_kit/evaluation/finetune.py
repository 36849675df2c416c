"""Fine-tuning: the whole network (backbone + new head) trained on augmented labelled images.

Shared by ``simclr train-classifier --finetune`` and the ``finetune`` protocol of
``simclr evaluate``. The backbone learns at ``lr x backbone_lr_mult`` and the head at ``lr``
(Adam, two parameter groups): a small multiplier keeps the pretrained features from being
overwritten by the first large gradients of a random head. The views are random resized crops
(scale 0.5-1) and horizontal flips, drawn per sample on the device (``SimCLRAugment`` with
``FINETUNE_AUGMENT``, keyed by seed, epoch and row), the only ops it keeps; no colour
distortion, which would only blur the class evidence a classifier is being taught.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from simclr_kit.augment import SimCLRAugment, only
from simclr_kit.config import EvalConfig
from simclr_kit.data.store import ImageStore
from simclr_kit.evaluation.features import forward_images
from simclr_kit.models.encoder import Encoder
from simclr_kit.models.heads import Classifier
from simclr_kit.train.optim import set_lr, warmup_cosine

# Fine-tuning augmentation: the ops it keeps, crops and flips; every other op (colour
# distortion, blur, solarize, and any op added to the recipe later) is off.
FINETUNE_AUGMENT = only(("crop", "flip"), crop_scale_min=0.5)


def accuracy(model: nn.Module, images: Tensor, labels: Tensor, mean: Sequence[float],
             std: Sequence[float], device: torch.device | str,
             batch_size: int = 512) -> float:
    """Top-1 accuracy in percent of ``model`` (run in eval mode) on ``images: (N, 3, S, S)
    uint8`` with ``labels: (N,)``."""
    if images.shape[0] == 0:
        return 0.0
    predictions = forward_images(model, images, mean, std, device, batch_size).argmax(1)
    return 100.0 * int((predictions == labels.cpu()).sum()) / images.shape[0]


def finetune_optimizer(model: Classifier, lr: float, backbone_lr_mult: float,
                       weight_decay: float) -> torch.optim.Adam:
    """Adam with two groups: the head at ``lr``, the backbone at ``lr * backbone_lr_mult`` (its
    ``lr_mult``, which :func:`~simclr_kit.train.optim.set_lr` keeps as the schedule moves the
    rate)."""
    groups = [{"params": list(model.head.parameters())},
              {"params": list(model.backbone.parameters()), "lr_mult": backbone_lr_mult}]
    optimizer = torch.optim.Adam(groups, lr=lr, weight_decay=weight_decay)
    set_lr(optimizer, lr)
    return optimizer


def finetune(model: Classifier, images: Tensor, labels: Tensor, mean: Sequence[float],
             std: Sequence[float], *, epochs: int, lr: float, backbone_lr_mult: float,
             batch_size: int, weight_decay: float, seed: int, device: torch.device,
             cosine: bool = False, progress: bool = False) -> list[float]:
    """Train ``model`` (backbone and head) in place; returns the mean loss of each epoch.

    Args:
        model: a :class:`Classifier` built with ``frozen=False``, on ``device``.
        images: ``(N, 3, S, S) uint8`` training images (any device); labels: ``(N,)`` int64.
        mean, std: the encoder's input normalisation.
        epochs, lr, backbone_lr_mult, batch_size, weight_decay: the Adam recipe.
        seed: seeds the batch order and the augmentation (the head's init is the caller's).
        cosine: decay both rates by a cosine over all steps, stepped per batch (the
            ``finetune`` protocol); otherwise they stay constant (``train-classifier``).

    A last batch of a single image is skipped: BatchNorm in train mode cannot normalise one
    sample whose feature map is 1x1 (ResNets on 8-16 px images), and a 1-image batch would make
    a noisy step anyway.
    """
    optimizer = finetune_optimizer(model, lr, backbone_lr_mult, weight_decay)
    augment = SimCLRAugment(FINETUNE_AUGMENT, images.shape[-1], mean, std, seed)
    g = torch.Generator().manual_seed(seed)
    labels = labels.to(device)
    n = images.shape[0]
    steps_per_epoch = sum(1 for s in range(0, n, batch_size) if n - s >= 2)
    total, step = epochs * steps_per_epoch, 0
    losses: list[float] = []
    for epoch in tqdm(range(epochs), desc="fine-tune", unit="epoch", disable=not progress,
                      leave=False):
        model.train()
        perm = torch.randperm(n, generator=g)
        epoch_loss = torch.zeros((), device=device)
        for start in range(0, n, batch_size):
            idx = perm[start:start + batch_size]
            if idx.numel() < 2:
                continue
            if cosine:
                set_lr(optimizer, warmup_cosine(step, total, 0, lr))
            x, _ = augment(images[idx].to(device), idx.to(device), epoch)
            loss = F.cross_entropy(model(x), labels[idx.to(device)])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            epoch_loss += loss.detach() * idx.numel()
            step += 1
        losses.append(float(epoch_loss) / n)
    return losses


def finetune_protocol(encoder: Encoder, train: ImageStore, val: ImageStore, num_classes: int,
                      cfg: EvalConfig, device: torch.device,
                      progress: bool = False) -> tuple[float, dict[str, Any]]:
    """Fine-tune a copy of ``encoder``'s backbone with a new linear head on ``train``; return
    the val top-1 accuracy (percent) and the hyperparameters that produced it.

    ``encoder`` itself is never modified (the frozen protocols may run after this one). The
    head's initialisation is drawn from ``cfg.seed`` without touching the global RNG.
    """
    backbone = copy.deepcopy(encoder.backbone)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = Classifier(backbone, encoder.feature_dim, num_classes, "linear",
                           frozen=False).to(device)
    assert train.labels is not None and val.labels is not None
    losses = finetune(model, train.images, train.labels, encoder.mean, encoder.std,
                      epochs=cfg.finetune_epochs, lr=cfg.finetune_lr,
                      backbone_lr_mult=cfg.finetune_backbone_lr_mult,
                      batch_size=cfg.finetune_batch_size,
                      weight_decay=cfg.finetune_weight_decay, seed=cfg.seed, device=device,
                      cosine=True, progress=progress)
    val_acc = accuracy(model, val.images, val.labels, encoder.mean, encoder.std, device,
                       cfg.batch_size)
    hyperparameters = {
        "epochs": cfg.finetune_epochs, "lr": cfg.finetune_lr,
        "backbone_lr_mult": cfg.finetune_backbone_lr_mult,
        "backbone_lr": cfg.finetune_lr * cfg.finetune_backbone_lr_mult,
        "batch_size": cfg.finetune_batch_size, "weight_decay": cfg.finetune_weight_decay,
        "optimizer": "adam", "schedule": "cosine per step to 0", "head": "linear",
        "augmentation": f"random resized crop (scale {FINETUNE_AUGMENT.crop_scale_min}-"
                        f"{FINETUNE_AUGMENT.crop_scale_max}) + flip (p={FINETUNE_AUGMENT.flip_p})",
        "train_split": train.provenance.get("split"), "train_rows": len(train),
        "final_train_loss": round(losses[-1], 4) if losses else None}
    return val_acc, hyperparameters
