"""Linear probe on augmented views (``--probe-augment``): the frozen backbone runs every batch.

The cached-feature probe (``linear.py``) sees each training image exactly as the evaluation
does. Some papers instead train the linear layer on random crops and flips of the training
images, with the backbone still frozen, and report slightly higher numbers (dkobak's CIFAR-10
ResNet-18: 91.1% vs 90.9%). That needs a backbone forward per batch and epoch, so it is far
slower, and it is opt-in.

What stays fixed, so the number is still a linear probe: the same trainer as the cached probe
(:class:`~simclr_kit.evaluation.linear.HeadTrainer`: recipe, schedule, seeding), only the
batches' features differ. The encoder is in eval mode for the whole run (BatchNorm uses and
never updates its running statistics), it gets no gradients, and its previous mode is restored
after. The features of the views are standardised with the clean train features' statistics,
and val accuracy is measured on the clean val features, so the two probes differ only in what
the linear layer was trained on. The views are ``FINETUNE_AUGMENT`` (random resized crop scale
0.5-1, flip), keyed by seed, epoch and row.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from simclr_kit.augment import SimCLRAugment
from simclr_kit.evaluation.finetune import FINETUNE_AUGMENT
from simclr_kit.evaluation.linear import HeadTrainer, LinearProbeResult, standardisation
from simclr_kit.models.encoder import Encoder


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
    clean = clean_train_features.to(device, torch.float32)
    mean, std = standardisation(clean)
    head = nn.utils.skip_init(nn.Linear, clean.shape[1], num_classes, device=device)
    trainer = HeadTrainer(head, mean, std, images.shape[0], epochs=epochs, lr=lr,
                          batch_size=batch_size, weight_decay=weight_decay, min_steps=min_steps,
                          seed=seed)
    augment = SimCLRAugment(FINETUNE_AUGMENT, images.shape[-1], encoder.mean, encoder.std, seed)

    @torch.no_grad()
    def view_features(rows: Tensor, epoch: int) -> Tensor:
        """``(B,)`` rows -> ``(B, D)`` frozen features of one augmented view of each."""
        view, _ = augment(images[rows.to(images.device)].to(device), rows, epoch)
        return encoder(view)

    y = labels.to(device, torch.long)
    was_training = encoder.training
    encoder.eval()
    try:
        trainer.fit(view_features, y, val_features, val_labels, desc="augmented probe",
                    progress=progress)
    finally:
        encoder.train(was_training)
    return trainer.result(clean, y, val_features, val_labels)
