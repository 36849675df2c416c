"""kNN accuracy during pretraining (``--monitor-knn N``): the kNN protocol every N epochs.

A :class:`~simclr_kit.train.loop.Trainer` hook. After every N-th epoch (and the last one) it
embeds the pretraining split and the labelled evaluation split with the backbone in eval mode
(clean images, no augmentation), runs the weighted kNN of ``knn.py`` with the ``EvalConfig``
defaults (k = 200, T = 0.1), and logs a ``knn`` record (epoch, step, top1, top5 above 5 classes, k, ...) to
``metrics.jsonl``, from where the run report draws its curve.

Cost: one forward pass over both splits, about a sixth of a training epoch (which runs forward
and backward on two views). The keys are the whole pretraining split up to
``MONITOR_MAX_KEYS`` rows (CIFAR-10's 50,000 fit, so its curve is the exact protocol); above
that, a fixed class-stratified subsample of that many rows, the same at every epoch, keeps the
features of an ImageNet-sized set out of host memory (1.28M x 2048 floats would be 10 GB).
The record says how many keys and queries were used.

Training is not perturbed: no gradients, no random numbers drawn, BatchNorm in eval mode (its
running statistics are read, never updated) and the model's train mode restored after. Under
torchrun every rank embeds its share of the rows (``extract_features`` shards them) and rank 0
computes and logs the accuracy.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable

from torch import Tensor
from tqdm.auto import tqdm

from simclr_kit import distributed
from simclr_kit.config import EvalConfig
from simclr_kit.data.rows_view import rows_at_size
from simclr_kit.errors import UserError
from simclr_kit.evaluation.features import extract_features
from simclr_kit.evaluation.fractions import stratified_fraction
from simclr_kit.evaluation.knn import knn_accuracy

if TYPE_CHECKING:
    from simclr_kit.train.state import Trainer

MONITOR_MAX_KEYS = 50_000
_DEFAULTS = EvalConfig()


def key_rows(labels: Tensor, cap: int = MONITOR_MAX_KEYS) -> Tensor | None:
    """Rows of the pretraining split used as kNN keys: None (all of them) up to ``cap``, else a
    class-stratified ``(about cap,)`` subsample fixed by seed 0."""
    if labels.shape[0] <= cap:
        return None
    return stratified_fraction(labels, cap / labels.shape[0], seed=0)


def knn_monitor(t: Trainer, every: int, k: int = _DEFAULTS.knn_k[0],
                temperature: float = _DEFAULTS.knn_temperature,
                batch_size: int = _DEFAULTS.batch_size) -> Callable[[Trainer], None]:
    """A hook for ``t.hooks`` that logs the kNN accuracy every ``every`` epochs and at the end.

    Raises :class:`UserError` now (before any training) when either split has no labels.
    """
    if t.store.labels is None:
        raise UserError(f"--monitor-knn needs labels in the pretraining split "
                        f"{t.store.provenance.get('split')!r} (its features are the kNN keys)")
    if t.eval_store is None or t.eval_store.labels is None:
        raise UserError("--monitor-knn needs a labelled evaluation split (--eval-split)")
    rows = key_rows(t.store.labels)
    train_labels = t.store.labels if rows is None else t.store.labels[rows]
    eval_labels = t.eval_store.labels
    num_classes = max(int(train_labels.max()), int(eval_labels.max())) + 1

    def hook(trainer: Trainer) -> None:
        if trainer.epoch % every and trainer.epoch != trainer.total_epochs:
            return
        started = time.perf_counter()
        backbone = trainer.model.backbone
        mean, std = trainer.meta["mean"], trainer.meta["std"]
        # Keys as evaluation sees images (the centre crop of each whole frame, at the training
        # size), read batch by batch (no copy of a mapped store).
        images = rows_at_size(trainer.images, rows, trainer.meta["image_size"],
                              trainer.store.sizes, trainer.meta["crop_fraction"])
        keys = extract_features(backbone, images, mean, std, trainer.device, batch_size)
        queries = extract_features(backbone, trainer.eval_store.images, mean, std,  # type: ignore[union-attr]
                                   trainer.device, batch_size)
        if not distributed.is_main():
            return
        acc = knn_accuracy(keys.to(trainer.device), train_labels, queries.to(trainer.device),
                           eval_labels, num_classes, ks=(k,), temperature=temperature)[k]
        # As evaluate: k capped at the keys, top-5 only where it can miss (above 5 classes).
        used = min(k, int(keys.shape[0]))
        top5 = {"top5": acc["top5"]} if num_classes > 5 else {}
        trainer.log.write("knn", epoch=trainer.epoch, step=trainer.global_step,
                          top1=acc["top1"], **top5, k=used, temperature=temperature,
                          keys=int(keys.shape[0]), queries=int(queries.shape[0]),
                          split=trainer.eval_store.provenance.get("split"),  # type: ignore[union-attr]
                          seconds=round(time.perf_counter() - started, 2))
        if trainer.config.progress:
            tqdm.write(f"epoch {trainer.epoch}: kNN (k={used}) top-1 {acc['top1']:.2f}%"
                       + (f", top-5 {acc['top5']:.2f}%" if top5 else ""))

    return hook
