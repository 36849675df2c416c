"""What the encoder does with the data, computed for the run report.

kNN predictions for the confusion matrix, a 2-D t-SNE map of the evaluation split and the
queries of the retrieval grid (their neighbours come from ``evaluation.knn.nearest_neighbours``).
Everything here is rank-local and seeded, so a report is reproducible and cheap: at most
``max_points`` images go into t-SNE.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from simclr_kit.data.store import ImageStore
from simclr_kit.evaluation.fractions import stratified_fraction
from simclr_kit.evaluation.knn import knn_predict


@dataclass
class KnnConfusion:
    """``matrix: (C, C)`` int64 counts (rows true, columns predicted) and the settings used."""

    matrix: Tensor
    k: int
    temperature: float
    accuracy: float


def knn_confusion(train_features: Tensor, train_labels: Tensor, eval_features: Tensor,
                  eval_labels: Tensor, num_classes: int, k: int,
                  temperature: float) -> KnnConfusion:
    """Confusion matrix of the weighted-kNN protocol's top-1 predictions on the eval split.

    ``train_features: (N, D)``, ``eval_features: (M, D)``, labels int64. k is clamped to N,
    as the protocol does.
    """
    scores = knn_predict(train_features, train_labels, eval_features, num_classes, k=k,
                         temperature=temperature)
    predicted = scores.argmax(1).cpu()
    truth = eval_labels.cpu()
    # bincount over (true, predicted) pairs flattened to one index: a (C, C) count table.
    matrix = torch.bincount(truth * num_classes + predicted,
                            minlength=num_classes * num_classes).view(num_classes, num_classes)
    accuracy = 100.0 * float((predicted == truth).float().mean()) if len(truth) else float("nan")
    return KnnConfusion(matrix, min(k, train_features.shape[0]), temperature, accuracy)


def stratified_subsample(labels: Tensor | None, n: int, max_points: int, seed: int = 0) -> Tensor:
    """Sorted indices of at most ``max_points`` of ``n`` rows, classes in proportion.

    The label-fraction sampler (:func:`~simclr_kit.evaluation.fractions.stratified_fraction`)
    at fraction ``max_points / n``: every class keeps its share of rows, and at least one, so
    a small class still shows on the map. Where those minimums overshoot ``max_points``, a
    seeded random ``max_points`` of the draw are kept.
    """
    g = torch.Generator().manual_seed(seed)
    if n <= max_points:
        return torch.arange(n)
    if labels is None or max_points < 1:
        return torch.randperm(n, generator=g)[:max_points].sort().values
    chosen = stratified_fraction(labels.cpu(), max_points / n, seed)
    if chosen.numel() > max_points:
        chosen = chosen[torch.randperm(chosen.numel(), generator=g)[:max_points]].sort().values
    return chosen


def tsne_map(features: Tensor, seed: int = 0) -> np.ndarray:
    """``features: (n, D)`` -> ``(n, 2)`` t-SNE coordinates (van der Maaten & Hinton 2008).

    Features are L2-normalised first (the encoder's geometry is the cosine one the kNN protocol
    uses), reduced to 50 dimensions by PCA (the usual speed-up, which keeps the neighbourhoods),
    and the perplexity is lowered for tiny sets, where t-SNE needs perplexity < n.
    """
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    x = F.normalize(features.float(), dim=1).numpy()
    n = x.shape[0]
    if n < 4:  # nothing to lay out; t-SNE itself refuses so few points
        return np.zeros((n, 2))
    dims = min(50, n - 1, x.shape[1])
    if x.shape[1] > dims:
        x = PCA(n_components=dims, random_state=seed).fit_transform(x)
    perplexity = float(min(30.0, max(2.0, (n - 1) / 3)))
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed,
                learning_rate="auto")
    # One OpenMP thread: on a busy machine the Barnes-Hut gradient's threads spin-wait on each
    # other (bench/RESULTS.md, "Report: t-SNE on one thread").
    with threadpool_limits(limits=1):
        return tsne.fit_transform(x)


def pick_queries(labels: Tensor | None, n: int, count: int, seed: int = 0) -> Tensor:
    """``count`` query rows, one per class in turn (seeded), so the grid shows several classes."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=g)
    if labels is None:
        return order[:count]
    chosen: list[int] = []
    seen: set[int] = set()
    for i in order.tolist():  # first pass: a new class each time; then fill up
        if int(labels[i]) not in seen:
            chosen.append(i)
            seen.add(int(labels[i]))
        if len(chosen) == count:
            break
    for i in order.tolist():
        if len(chosen) >= count:
            break
        if i not in chosen:
            chosen.append(i)
    return torch.tensor(chosen[:count], dtype=torch.int64)


def label_names(store: ImageStore, rows: Tensor) -> list[str]:
    """Class name of each row (the label number when the split has no names)."""
    if store.labels is None:
        return ["" for _ in rows.tolist()]
    names = store.class_names or []
    return [names[int(store.labels[i])] if int(store.labels[i]) < len(names)
            else str(int(store.labels[i])) for i in rows.tolist()]
