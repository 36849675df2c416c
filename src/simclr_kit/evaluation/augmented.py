"""Linear probe on augmented views (``--probe-augment``): the frozen backbone runs every batch.

The cached-feature probe (``linear.py``) sees each training image exactly as the evaluation
does. Some papers instead train the linear layer on random crops and flips of the training
images, with the backbone still frozen, and report slightly higher numbers (dkobak's CIFAR-10
ResNet-18: 91.1% vs 90.9%). That needs a backbone forward per batch and epoch, so it is far
slower, and it is opt-in.

What stays fixed, so the number is still a linear probe: the encoder is in eval mode for the
whole run (BatchNorm uses and never updates its running statistics), it gets no gradients, and
its previous mode is restored after. The features of the views are standardised with the clean
train features' statistics, and val accuracy is measured on the clean val features, so the two
probes differ only in what the linear layer was trained on. The views are ``FINETUNE_AUGMENT``
(random resized crop scale 0.5-1, flip), keyed by seed, epoch and row.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from simclr_kit.augment import SimCLRAugment
from simclr_kit.encoder import Encoder
from simclr_kit.evaluation.finetune import FINETUNE_AUGMENT
from simclr_kit.evaluation.linear import (LinearProbeResult, _accuracy, _cosine_lr, _forward,
                                          _init_head, _logits, _standardisation, history_epoch,
                                          probe_epochs)


def _augmented_epoch(encoder: Encoder, head: torch.nn.Linear, optimizer: torch.optim.Optimizer,
                     augment: SimCLRAugment, images: Tensor, labels: Tensor, mean: Tensor,
                     std: Tensor, generator: torch.Generator, batch_size: int, base_lr: float,
                     epoch: int, total_steps: int) -> tuple[float, float]:
    """One shuffled pass over ``images: (N, 3, S, S) uint8``; returns (mean loss, last lr)."""
    n, device = images.shape[0], mean.device
    steps_per_epoch = math.ceil(n / batch_size)
    perm = torch.randperm(n, generator=generator)
    total_loss, step_lr = torch.zeros((), device=device), base_lr
    for i in range(steps_per_epoch):
        step_lr = _cosine_lr(base_lr, epoch * steps_per_epoch + i, total_steps)
        for group in optimizer.param_groups:
            group["lr"] = step_lr
        idx = perm[i * batch_size:(i + 1) * batch_size]
        view, _ = augment(images[idx].to(device), idx.to(device), epoch)
        with torch.no_grad():
            features = encoder(view).float()  # (b, D), frozen backbone in eval mode
        loss = F.cross_entropy(_forward(head, (features - mean) / std), labels[idx.to(device)])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total_loss += loss.detach() * idx.numel()
    return float(total_loss) / n, step_lr


def train_augmented_probe(encoder: Encoder, images: Tensor, labels: Tensor,
                          clean_train_features: Tensor, val_features: Tensor,
                          val_labels: Tensor, num_classes: int, *, epochs: int, lr: float,
                          batch_size: int, weight_decay: float, min_steps: int, seed: int,
                          device: torch.device, progress: bool = False) -> LinearProbeResult:
    """Train a linear layer on frozen features of augmented views of ``images``.

    Args:
        encoder: the frozen encoder (its weights and buffers are left untouched).
        images: ``(N, 3, S, S) uint8`` training images; labels: ``(N,)`` int64.
        clean_train_features: ``(N, D)`` unaugmented features of ``images`` (the cache): the
            standardisation statistics and the reported train accuracy come from them.
        val_features: ``(M, D)`` clean val features; val_labels: ``(M,)``.
        epochs, lr, batch_size, weight_decay, min_steps, seed: as in
            :func:`~simclr_kit.evaluation.linear.train_linear_probe` (the seed also keys the
            views).

    Returns:
        :class:`LinearProbeResult`, accuracies in percent on the clean features.
    """
    was_training = encoder.training
    encoder.eval()
    clean = clean_train_features.to(device, torch.float32)
    mean, std = _standardisation(clean)
    generator = torch.Generator().manual_seed(seed)
    head = _init_head(clean.shape[1], num_classes, generator, device)
    optimizer = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=weight_decay)
    augment = SimCLRAugment(FINETUNE_AUGMENT, images.shape[-1], encoder.mean, encoder.std, seed)
    y = labels.to(device, torch.long)
    epochs = probe_epochs(images.shape[0], epochs, batch_size, min_steps)
    total_steps = epochs * math.ceil(images.shape[0] / batch_size)
    history: list[dict] = []
    try:
        for epoch in tqdm(range(epochs), desc="augmented probe", unit="epoch",
                          disable=not progress, leave=False):
            loss, last_lr = _augmented_epoch(encoder, head, optimizer, augment, images, y, mean,
                                             std, generator, batch_size, lr, epoch, total_steps)
            if history_epoch(epoch + 1, epochs):
                val_acc = _accuracy(_logits(head, mean, std, val_features).argmax(1), val_labels)
                history.append({"epoch": epoch + 1, "lr": last_lr, "loss": loss,
                                "val_accuracy": val_acc})
    finally:
        encoder.train(was_training)
    val_predictions = _logits(head, mean, std, val_features).argmax(1)
    return LinearProbeResult(head=head, mean=mean, std=std,
                             train_accuracy=_accuracy(_logits(head, mean, std, clean).argmax(1), y),
                             val_accuracy=_accuracy(val_predictions, val_labels),
                             val_predictions=val_predictions, epochs=epochs, steps=total_steps,
                             history=history)
