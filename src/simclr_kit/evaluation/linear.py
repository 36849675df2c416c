"""Linear probe on cached (frozen) features, and the one trainer of a head on frozen features.

The linear evaluation protocol of SimCLR (Chen et al. 2020, "linear evaluation"): the
encoder is frozen, its features are computed once, and only a linear classifier is trained on
them. There is no backbone here at all, so nothing can silently fine-tune it (p3i0t #8) or run
its BatchNorm in train mode (lightly #1440).

:class:`HeadTrainer` is the recipe, and every head trained on frozen features goes through it:
this probe, the label-fraction probes (``fractions.py``), the probe on augmented views
(``augmented.py``) and ``train-classifier``'s frozen head (``classifier.py``, linear or mlp),
so ``evaluate`` and ``train-classifier --head linear`` give the same accuracy.

Choices, and why:

- Features are standardised with the train set's per-dimension mean and std (as
  ``sklearn.preprocessing.StandardScaler``; a zero-variance dimension gets std 1 so it stays 0
  instead of exploding on val data). The statistics are returned with the head, because the head
  is meaningless without them; :func:`fold_standardisation` turns the pair into one head that
  reads raw features.
- Adam, lr 1e-3, batch 256, 100 epochs, no weight decay (``EvalConfig.linear_*``): the seed's
  downstream recipe. The LR follows a cosine from ``lr`` to 0 (``optim.warmup_cosine`` without
  warm-up), stepped per batch with the period counted in batches (a period in epochs stepped
  per batch is the sthalles #8 bug).
- At least ``min_steps`` optimizer steps (``EvalConfig.linear_min_steps``, 2000): the epochs
  are raised to ``ceil(min_steps / steps_per_epoch)`` when ``epochs`` would give fewer. A
  recipe counted in epochs starves small sets (1% of CIFAR-10 is 2 steps per epoch), and the
  accuracy would then measure the step count, not the features (bench/RESULTS.md, "Linear
  probe: step floor and CPU threads"). Sets of ~5,000 rows and more already get >= 2000 steps
  from 100 epochs, so the standard recipe is unchanged there.
- Speed: the features stay one tensor in memory and each batch is an ``index_select`` of a
  seeded permutation, standardised by one fused ``addcmul``; no DataLoader, no per-sample
  Python, no standardised copy of the train set. The last partial batch is kept. On the CPU the
  loop runs on half of torch's intra-op threads (:func:`_cpu_train_threads`), restored after.
- All randomness (head init, shuffling) comes from one ``torch.Generator(seed)``; the global RNG
  is neither read nor advanced.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from simclr_kit.config import EvalConfig
from simclr_kit.train.optim import set_lr, warmup_cosine

_DEFAULTS = EvalConfig()
# Rows per forward pass when scoring a whole set: bounds the (rows, C) logits in memory.
_EVAL_CHUNK = 8192
# Epochs at which val accuracy is recorded in the history, at most (evenly spread, last one
# included): a small subset trained for thousands of 1-step epochs would otherwise spend most
# of its time scoring the val set.
_HISTORY_POINTS = 50


@dataclass
class LinearProbeResult:
    """A trained probe and how it did.

    Attributes:
        head: the trained head acting on standardised features: ``nn.Linear(D, C)``, or the
            module :func:`train_linear_probe` was given (an mlp for ``train-classifier``).
        mean, std: ``(D,)`` train-set statistics; the head's input is ``(x - mean) / std``.
        train_accuracy, val_accuracy: percent, final head (NaN for an empty set).
        val_predictions: ``(M,)`` int64 predicted class of each val row.
        epochs, steps: what was trained: ``max(epochs, ceil(min_steps / steps_per_epoch))``
            epochs, and the optimizer steps they took.
        history: one dict per recorded epoch (every epoch when there are at most
            ``_HISTORY_POINTS``, else that many evenly spread, the last included): ``epoch``,
            ``lr`` (at the epoch's last step), ``loss`` (mean train cross-entropy over the
            epoch), ``val_accuracy`` (percent).
    """

    head: nn.Module
    mean: Tensor
    std: Tensor
    train_accuracy: float
    val_accuracy: float
    val_predictions: Tensor
    epochs: int = 0
    steps: int = 0
    history: list[dict] = field(default_factory=list)

    def logits(self, features: Tensor) -> Tensor:
        """``(M, D)`` raw (unstandardised) features -> ``(M, C)`` float32 logits."""
        return _logits(self.head, self.mean, self.std, features)

    def folded_head(self) -> nn.Module:
        """A copy of the head that reads raw features (:func:`fold_standardisation`)."""
        return fold_standardisation(self.head, self.mean, self.std)


def fold_standardisation(head: nn.Module, mean: Tensor, std: Tensor) -> nn.Module:
    """A copy of ``head`` whose first ``nn.Linear`` absorbs the standardisation, so it reads
    raw ``(M, D)`` features: ``W (x - m) / s + b = (W / s) x + (b - (W / s) m)``.

    The first ``nn.Linear`` in module order must be the layer that reads the features (a
    linear head, or the first layer of an mlp). The copy computes the same function as
    ``head((x - mean) / std)``; scoring with it is one matmul per layer instead of three passes
    over the features.
    """
    folded = copy.deepcopy(head)
    first = next(m for m in folded.modules() if isinstance(m, nn.Linear))
    with torch.no_grad():
        weight = first.weight / std
        first.bias.copy_(first.bias - weight @ mean)
        first.weight.copy_(weight)
    return folded


@torch.no_grad()
def _logits(head: nn.Module, mean: Tensor, std: Tensor, features: Tensor) -> Tensor:
    """``(M, D)`` raw features -> ``(M, C)`` float32 logits of the standardised features."""
    folded = fold_standardisation(head, mean, std)
    device = mean.device
    out = [folded(features[i:i + _EVAL_CHUNK].to(device, torch.float32))
           for i in range(0, features.shape[0], _EVAL_CHUNK)]
    return torch.cat(out) if out else folded(features[:0].to(device, torch.float32))


def _accuracy(predictions: Tensor, labels: Tensor) -> float:
    """Percent of ``(M,)`` predictions equal to ``(M,)`` labels; NaN when M = 0."""
    if labels.numel() == 0:
        return float("nan")
    return 100.0 * (predictions == labels.to(predictions.device)).float().mean().item()


def standardisation(features: Tensor) -> tuple[Tensor, Tensor]:
    """``(N, D)`` -> per-dimension ``(D,)`` float32 mean and std (std 1 where it is ~0).

    Two passes over row chunks: as exact as ``torch.std_mean``, ~3x faster on the CPU for a
    column reduction, and no full-size temporary.
    """
    n = features.shape[0]
    mean = features.sum(0, dtype=torch.float32) / n
    sq_dev = torch.zeros_like(mean)
    for i in range(0, n, _EVAL_CHUNK):
        sq_dev += (features[i:i + _EVAL_CHUNK].to(torch.float32) - mean).square_().sum(0)
    std = (sq_dev / n).sqrt_()
    # A constant dimension would divide by ~0 and blow up val rows that differ from the constant.
    std = torch.where(std > 1e-6 * (1.0 + mean.abs()), std, torch.ones_like(std))
    return mean, std


@torch.no_grad()
def _init_head(head: nn.Module, generator: torch.Generator) -> None:
    """Redraw every ``nn.Linear`` of ``head`` (weight, then bias, layer by layer) with PyTorch's
    default init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), from ``generator``.

    Drawn on the CPU and copied, so the values do not depend on the head's device, and the
    global RNG (which ``nn.Linear``'s own init reads) is left alone.
    """
    for layer in head.modules():
        if isinstance(layer, nn.Linear):
            bound = 1.0 / math.sqrt(layer.in_features)
            for param in (layer.weight, layer.bias):
                param.copy_(torch.empty(param.shape).uniform_(-bound, bound, generator=generator))


def _forward(head: nn.Module, x: Tensor) -> Tensor:
    """``head(x)`` for ``x: (B, D)`` -> ``(B, C)``; a linear head as ``(W x^T + b)^T``.

    Same numbers, but with few classes MKL runs the (C x D) @ (D x B) product faster on the CPU
    than ``F.linear``'s (B x D) @ (D x C) (bench/RESULTS.md, "Linear probe: step floor and CPU
    threads").
    """
    if isinstance(head, nn.Linear):
        return torch.addmm(head.bias[:, None], head.weight, x.T).T
    return head(x)


def _cpu_train_threads() -> int:
    """Half of torch's intra-op threads, at least 1: a step of a few MFLOP cannot keep many
    threads busy, and each op waits for its slowest thread, so a thread descheduled by other work
    stalls them all (bench/RESULTS.md, "Linear probe: step floor and CPU threads")."""
    return max(1, torch.get_num_threads() // 2)


@contextmanager
def _train_threads(device: torch.device) -> Iterator[None]:
    """On the CPU, run on :func:`_cpu_train_threads` intra-op threads; restore on exit."""
    previous = torch.get_num_threads()
    if device.type == "cpu" and _cpu_train_threads() < previous:
        torch.set_num_threads(_cpu_train_threads())
    try:
        yield
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)


def _check_inputs(train_features: Tensor, train_labels: Tensor, val_features: Tensor,
                  val_labels: Tensor, num_classes: int, epochs: int, lr: float,
                  batch_size: int, weight_decay: float, min_steps: int) -> None:
    if train_features.ndim != 2 or val_features.ndim != 2:
        raise ValueError("linear probe: features must be 2-D (N, D) and (M, D)")
    if train_features.shape[1] != val_features.shape[1]:
        raise ValueError(f"linear probe: feature dims differ: train {train_features.shape[1]}, "
                         f"val {val_features.shape[1]}")
    if train_labels.shape != (train_features.shape[0],) or val_labels.shape != (
            val_features.shape[0],):
        raise ValueError("linear probe: labels must be 1-D with one entry per feature row")
    if train_features.shape[0] == 0:
        raise ValueError("linear probe: the train set is empty")
    if num_classes < 1 or epochs < 1 or batch_size < 1 or not lr > 0 or weight_decay < 0 \
            or min_steps < 0:
        raise ValueError("linear probe: need num_classes >= 1, epochs >= 1, batch_size >= 1, "
                         f"lr > 0, weight_decay >= 0, min_steps >= 0; got {num_classes}, "
                         f"{epochs}, {batch_size}, {lr}, {weight_decay}, {min_steps}")
    for name, y in (("train", train_labels), ("val", val_labels)):
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise ValueError(f"linear probe: {name} labels span [{int(y.min())}, {int(y.max())}]"
                             f", outside [0, {num_classes - 1}]")


def probe_epochs(rows: int, epochs: int, batch_size: int, min_steps: int) -> int:
    """Epochs to train on ``rows`` examples: ``epochs``, raised so that at least ``min_steps``
    optimizer steps are taken (see the module docstring)."""
    steps_per_epoch = math.ceil(rows / batch_size)
    return max(epochs, math.ceil(min_steps / steps_per_epoch))


def history_epoch(epoch: int, epochs: int) -> bool:
    """Whether 1-based ``epoch`` of ``epochs`` is recorded in a history (``_HISTORY_POINTS``)."""
    every = math.ceil(epochs / _HISTORY_POINTS)
    return epoch % every == 0 or epoch == epochs


class HeadTrainer:
    """A head on standardised frozen features: Adam, a per-batch cosine LR, at least
    ``min_steps`` steps, all randomness from ``torch.Generator(seed)``.

    The one training loop of every frozen-feature head. What differs between them is where a
    batch's features come from, the ``batch_features`` callable of :meth:`fit`: rows of the
    cached features (:func:`train_linear_probe`) or a frozen backbone's features of augmented
    views (``augmented.py``).

    Args:
        head: the module to train, on the device of ``mean``; every ``nn.Linear`` in it is
            redrawn from the seed (its first one must read the features).
        mean, std: ``(D,)`` float32 standardisation (:func:`standardisation` of the clean
            train features); the head sees ``(x - mean) / std``.
        rows: N, the training examples per epoch.
        epochs, lr, batch_size, weight_decay, min_steps, seed: the recipe (``EvalConfig``
            ``linear_*`` defaults: 100, 1e-3, 256, 0, 2000, 0).
    """

    def __init__(self, head: nn.Module, mean: Tensor, std: Tensor, rows: int, *, epochs: int,
                 lr: float, batch_size: int, weight_decay: float, min_steps: int,
                 seed: int) -> None:
        self.head, self.mean, self.std, self.rows = head, mean, std, rows
        self.lr, self.batch_size = lr, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        _init_head(head, self.generator)
        device = mean.device
        # The fused kernel (CPU and CUDA since torch 2.4) is one op per step instead of ~10: on
        # a linear head the optimizer step otherwise costs as much as the forward and backward.
        self.optimizer = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=weight_decay,
                                          fused=device.type in ("cpu", "cuda"))
        self.epochs = probe_epochs(rows, epochs, batch_size, min_steps)
        self.steps_per_epoch = math.ceil(rows / batch_size)
        self.total_steps = self.epochs * self.steps_per_epoch
        self.history: list[dict] = []

    def fit(self, batch_features: Callable[[Tensor, int], Tensor], labels: Tensor,
            val_features: Tensor, val_labels: Tensor, *, desc: str = "linear probe",
            progress: bool = False) -> None:
        """Train the head for ``self.epochs`` shuffled passes, recording the history.

        Args:
            batch_features: ``(rows, epoch)`` -> ``(B, D)`` raw features of those rows, where
                ``rows`` is ``(B,)`` int64 on the head's device (the last batch may be partial).
            labels: ``(N,)`` int64 on the head's device.
            val_features: ``(M, D)`` raw val features; val_labels: ``(M,)``.
        """
        device = self.mean.device
        inv_std, shift = 1.0 / self.std, -self.mean / self.std  # (x - m) / s in one addcmul
        bar = tqdm(range(self.epochs), desc=desc, unit="epoch", disable=not progress,
                   leave=False)
        for epoch in bar:
            # Drawn on the CPU generator so results do not depend on the device.
            perm = torch.randperm(self.rows, generator=self.generator).to(device)
            losses: list[Tensor] = []
            for i in range(self.steps_per_epoch):
                step_lr = warmup_cosine(epoch * self.steps_per_epoch + i, self.total_steps, 0,
                                        self.lr)
                set_lr(self.optimizer, step_lr)
                rows = perm[i * self.batch_size:(i + 1) * self.batch_size]
                x = torch.addcmul(shift, batch_features(rows, epoch).to(torch.float32), inv_std)
                loss = F.cross_entropy(_forward(self.head, x), labels[rows])
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                # Kept on the device: .item() per step would sync a GPU every batch.
                losses.append(loss.detach())
            if history_epoch(epoch + 1, self.epochs):
                val_acc = _accuracy(self.logits(val_features).argmax(1), val_labels)
                self.history.append({"epoch": epoch + 1, "lr": step_lr,
                                     "loss": self._mean_loss(losses), "val_accuracy": val_acc})
                bar.set_postfix(loss=f"{self.history[-1]['loss']:.4f}", val=f"{val_acc:.2f}")

    def _mean_loss(self, losses: list[Tensor]) -> float:
        """Mean cross-entropy per example over an epoch of per-batch mean losses."""
        rows_per_step = torch.full((len(losses),), float(self.batch_size),
                                   device=losses[0].device)
        rows_per_step[-1] = self.rows - (len(losses) - 1) * self.batch_size  # the partial batch
        return (torch.stack(losses) @ rows_per_step).item() / self.rows

    def logits(self, features: Tensor) -> Tensor:
        """``(M, D)`` raw features -> ``(M, C)`` float32 logits of the current head."""
        return _logits(self.head, self.mean, self.std, features)

    def result(self, train_features: Tensor, train_labels: Tensor, val_features: Tensor,
               val_labels: Tensor) -> LinearProbeResult:
        """The trained head, its accuracies on clean ``(N, D)`` train / ``(M, D)`` val features,
        and the history."""
        val_predictions = self.logits(val_features).argmax(1)
        return LinearProbeResult(
            head=self.head, mean=self.mean, std=self.std,
            train_accuracy=_accuracy(self.logits(train_features).argmax(1), train_labels),
            val_accuracy=_accuracy(val_predictions, val_labels), val_predictions=val_predictions,
            epochs=self.epochs, steps=self.total_steps, history=self.history)


def train_linear_probe(train_features: Tensor, train_labels: Tensor, val_features: Tensor,
                       val_labels: Tensor, num_classes: int,
                       epochs: int = _DEFAULTS.linear_epochs, lr: float = _DEFAULTS.linear_lr,
                       batch_size: int = _DEFAULTS.linear_batch_size,
                       weight_decay: float = _DEFAULTS.linear_weight_decay,
                       seed: int = _DEFAULTS.seed, progress: bool = False,
                       min_steps: int = _DEFAULTS.linear_min_steps,
                       head: nn.Module | None = None) -> LinearProbeResult:
    """Train a linear classifier on frozen features; report train and val accuracy.

    Args:
        train_features: ``(N, D)`` cached features; training runs on their device.
        train_labels: ``(N,)`` int64 in ``[0, num_classes)``.
        val_features: ``(M, D)``; val_labels: ``(M,)`` int64 (M may be 0: accuracy NaN).
        num_classes: C.
        epochs, lr, batch_size, weight_decay: Adam recipe (``EvalConfig`` defaults:
            100, 1e-3, 256, 0); the LR decays by a per-batch cosine to 0.
        seed: seeds the head init and the per-epoch shuffles.
        progress: show a tqdm bar over epochs.
        min_steps: train at least this many optimizer steps, adding epochs when ``epochs``
            gives fewer (``EvalConfig`` default 2000; 0 turns it off). See the module docstring.
        head: the module to train instead of ``nn.Linear(D, C)`` (``train-classifier``'s mlp),
            on the features' device; its ``nn.Linear`` layers are redrawn from ``seed``.

    Returns:
        :class:`LinearProbeResult` (accuracies in percent).
    """
    _check_inputs(train_features, train_labels, val_features, val_labels, num_classes, epochs,
                  lr, batch_size, weight_decay, min_steps)
    device = train_features.device
    y = train_labels.to(device, torch.long)
    mean, std = standardisation(train_features)
    if head is None:  # skip_init: nn.Linear's own init would draw from the global RNG
        head = nn.utils.skip_init(nn.Linear, train_features.shape[1], num_classes, device=device)
    trainer = HeadTrainer(head, mean, std, train_features.shape[0], epochs=epochs, lr=lr,
                          batch_size=batch_size, weight_decay=weight_decay, min_steps=min_steps,
                          seed=seed)
    with _train_threads(device):
        # Batches are gathered row by row from the raw features (a 256-row gather stays in
        # cache; gathering a whole shuffled epoch would stream the full set through memory).
        trainer.fit(lambda rows, _epoch: train_features.index_select(0, rows), y, val_features,
                    val_labels, progress=progress)
    return trainer.result(train_features, y, val_features, val_labels)
