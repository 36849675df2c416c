"""Weighted k-nearest-neighbour classification of frozen features (the InstDisc protocol).

The protocol of Wu et al. 2018, "Unsupervised Feature Learning via Non-Parametric Instance
Discrimination" (section 3.4), as implemented in DINO's ``eval_knn.py`` (Caron et al. 2021):

1. L2-normalise train (key) and query features, so the dot product is the cosine similarity.
2. Take the k most similar train features of each query.
3. Each neighbour votes for its label with weight ``exp(sim / T)``; T = 0.1 and k = 200 are the
   InstDisc defaults (``EvalConfig.knn_temperature`` / ``EvalConfig.knn_k``).
4. The class scores are the summed votes; top-1 / top-5 accuracy are read from them.

Ranking and ties are pinned down so the numbers are reproducible: classes are ranked by score,
ties going to the lower class index (``torch.argmax`` semantics), and a class that received no
vote at all is never counted as a top-5 hit (with k = 1 most classes score exactly 0, and their
order would otherwise be an artefact of the sort).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from simclr_kit.config import EvalConfig

_DEFAULTS = EvalConfig()
_DEFAULT_K: int = _DEFAULTS.knn_k[0]
_DEFAULT_KS: tuple[int, ...] = _DEFAULTS.knn_k
_DEFAULT_T: float = _DEFAULTS.knn_temperature


def _check_inputs(train_features: Tensor, train_labels: Tensor, query_features: Tensor,
                  num_classes: int, ks: Sequence[int], temperature: float,
                  chunk_size: int) -> None:
    if train_features.ndim != 2 or query_features.ndim != 2:
        raise ValueError("kNN: features must be 2-D (N, D) and (M, D), got "
                         f"{tuple(train_features.shape)} and {tuple(query_features.shape)}")
    if train_features.shape[1] != query_features.shape[1]:
        raise ValueError(f"kNN: feature dims differ: train {train_features.shape[1]}, "
                         f"query {query_features.shape[1]}")
    if train_labels.shape != (train_features.shape[0],):
        raise ValueError(f"kNN: train_labels must have shape ({train_features.shape[0]},), "
                         f"got {tuple(train_labels.shape)}")
    if train_features.shape[0] == 0:
        raise ValueError("kNN: the train (key) set is empty")
    if num_classes < 1:
        raise ValueError(f"kNN: num_classes must be >= 1, got {num_classes}")
    if len(ks) == 0 or min(ks) < 1:
        raise ValueError(f"kNN: every k must be >= 1, got {tuple(ks)}")
    if not temperature > 0:
        raise ValueError(f"kNN: temperature must be > 0, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"kNN: chunk_size must be >= 1, got {chunk_size}")
    lo, hi = int(train_labels.min()), int(train_labels.max())
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"kNN: train labels span [{lo}, {hi}], outside [0, {num_classes - 1}]")


def _neighbour_chunks(train_features: Tensor, query_features: Tensor, k: int,
                      chunk_size: int) -> Iterator[tuple[int, int, Tensor, Tensor]]:
    """Yield ``(start, end, sims, idx)`` per chunk of queries: the ``min(k, N)`` most
    cosine-similar train rows of each query, ``(end - start, min(k, N))`` float32 similarities
    and int64 indices into ``train_features``, most similar first.

    Runs on ``query_features``' device. Memory: one normalised float32 copy of the keys, plus
    ``chunk_size * N`` similarities.
    """
    # float32 because exp(sim / T) reaches e^10 at T = 0.1 and fp16 sums of 200 such votes are
    # coarse; the cast also lets half-precision cached features go straight in.
    keys = F.normalize(train_features.to(device=query_features.device, dtype=torch.float32),
                       dim=1)
    top = min(k, keys.shape[0])
    for start in range(0, query_features.shape[0], chunk_size):
        end = min(start + chunk_size, query_features.shape[0])
        queries = F.normalize(query_features[start:end].to(torch.float32), dim=1)
        sim, idx = (queries @ keys.T).topk(top, dim=1, largest=True, sorted=True)
        yield start, end, sim, idx


def nearest_neighbours(train_features: Tensor, query_features: Tensor, k: int,
                       chunk_size: int = 1024) -> tuple[Tensor, Tensor]:
    """The ``min(k, N)`` train rows most cosine-similar to each query, most similar first.

    Args:
        train_features: ``(N, D)`` keys (any scale: they are L2-normalised here).
        query_features: ``(M, D)``; the search runs on this tensor's device.
        k: neighbours per query, clamped to N.
        chunk_size: queries per similarity block; memory is ``chunk_size * N`` floats.

    Returns:
        ``(M, min(k, N))`` int64 indices into ``train_features`` and the float32 cosine
        similarities, each row sorted by decreasing similarity.
    """
    if train_features.ndim != 2 or query_features.ndim != 2 or k < 1 or chunk_size < 1:
        raise ValueError("nearest_neighbours: features must be 2-D (N, D) and (M, D), k and "
                         f"chunk_size >= 1; got {tuple(train_features.shape)}, "
                         f"{tuple(query_features.shape)}, k={k}, chunk_size={chunk_size}")
    top = min(k, train_features.shape[0])
    sims = torch.empty(query_features.shape[0], top, device=query_features.device)
    idx = torch.empty(query_features.shape[0], top, device=query_features.device,
                      dtype=torch.long)
    for start, end, sim, chunk_idx in _neighbour_chunks(train_features, query_features, k,
                                                        chunk_size):
        sims[start:end], idx[start:end] = sim, chunk_idx
    return idx, sims


def _knn_scores_chunks(train_features: Tensor, train_labels: Tensor, query_features: Tensor,
                       num_classes: int, ks: Sequence[int], temperature: float,
                       chunk_size: int) -> Iterator[tuple[int, int, dict[int, Tensor]]]:
    """Yield ``(start, end, {k: scores (end - start, num_classes)})`` per chunk of queries.

    The top ``max(k)`` neighbours are found once per chunk (sorted by similarity) and each k
    reads the first k of them, so several k cost one similarity matrix and one ``topk``.
    """
    device = query_features.device
    labels = train_labels.to(device=device, dtype=torch.long)
    for start, end, sim, idx in _neighbour_chunks(train_features, query_features, max(ks),
                                                  chunk_size):
        weights = (sim / temperature).exp()  # (chunk, max_k)
        neighbour_labels = labels[idx]  # (chunk, max_k)
        out: dict[int, Tensor] = {}
        for k in ks:
            kk = min(k, idx.shape[1])
            scores = torch.zeros(end - start, num_classes, device=device, dtype=torch.float32)
            scores.scatter_add_(1, neighbour_labels[:, :kk], weights[:, :kk])
            out[k] = scores
        yield start, end, out


def knn_predict(train_features: Tensor, train_labels: Tensor, query_features: Tensor,
                num_classes: int, k: int = _DEFAULT_K, temperature: float = _DEFAULT_T,
                chunk_size: int = 1024) -> Tensor:
    """Weighted kNN class scores of each query (Wu et al. 2018; defaults k=200, T=0.1).

    Args:
        train_features: ``(N, D)`` keys (any scale: they are L2-normalised here).
        train_labels: ``(N,)`` int64 in ``[0, num_classes)``.
        query_features: ``(M, D)``; the computation runs on this tensor's device.
        num_classes: number of classes C.
        k: neighbours per query; values above N are clamped to N.
        temperature: T in the vote weight ``exp(cos_sim / T)``; float32 holds it for
            T >= 0.012 (e^(1/T) overflows below that).
        chunk_size: queries per similarity block; memory is ``chunk_size * N`` floats.

    Returns:
        ``(M, C)`` float32 class scores (summed vote weights); ``argmax(1)`` is the prediction.
    """
    _check_inputs(train_features, train_labels, query_features, num_classes, (k,), temperature,
                  chunk_size)
    scores = torch.zeros(query_features.shape[0], num_classes, device=query_features.device)
    for start, end, chunk in _knn_scores_chunks(train_features, train_labels, query_features,
                                                num_classes, (k,), temperature, chunk_size):
        scores[start:end] = chunk[k]
    return scores


def _hits(scores: Tensor, labels: Tensor, top: int) -> Tensor:
    """``(M,)`` bool: the true class is among the ``top`` best-ranked classes with a vote.

    scores: ``(M, C)``; labels: ``(M,)``. Rank = number of classes ranked above the true one,
    where higher score wins and equal scores go to the lower class index.
    """
    true = scores.gather(1, labels[:, None])  # (M, 1)
    classes = torch.arange(scores.shape[1], device=scores.device)
    above = (scores > true) | ((scores == true) & (classes[None, :] < labels[:, None]))
    return (above.sum(1) < top) & (true[:, 0] > 0)


def knn_accuracy(train_features: Tensor, train_labels: Tensor, query_features: Tensor,
                 query_labels: Tensor, num_classes: int, ks: Sequence[int] = _DEFAULT_KS,
                 temperature: float = _DEFAULT_T,
                 chunk_size: int = 1024) -> dict[int, dict[str, float]]:
    """Top-1 and top-5 weighted-kNN accuracy in percent, for several k in one pass.

    Args:
        train_features: ``(N, D)``; train_labels: ``(N,)`` int64.
        query_features: ``(M, D)``; query_labels: ``(M,)`` int64.
        num_classes: C. Top-5 uses ``min(5, C)`` classes (so with C <= 5 it counts queries
            whose true class got any vote).
        ks: neighbour counts, each clamped to N; the result is keyed by the k asked for.
        temperature, chunk_size: as in :func:`knn_predict`.

    Returns:
        ``{k: {"top1": percent, "top5": percent}}``.
    """
    ks = tuple(dict.fromkeys(ks))  # duplicates would only be computed twice
    _check_inputs(train_features, train_labels, query_features, num_classes, ks, temperature,
                  chunk_size)
    if query_labels.shape != (query_features.shape[0],):
        raise ValueError(f"kNN: query_labels must have shape ({query_features.shape[0]},), "
                         f"got {tuple(query_labels.shape)}")
    m = query_features.shape[0]
    if m == 0:
        raise ValueError("kNN: the query set is empty")
    labels = query_labels.to(device=query_features.device, dtype=torch.long)
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise ValueError(f"kNN: query labels span [{int(labels.min())}, {int(labels.max())}], "
                         f"outside [0, {num_classes - 1}]")
    top5 = min(5, num_classes)
    correct = {k: [0, 0] for k in ks}
    for start, end, chunk in _knn_scores_chunks(train_features, train_labels, query_features,
                                                num_classes, ks, temperature, chunk_size):
        for k, scores in chunk.items():
            correct[k][0] += int(_hits(scores, labels[start:end], 1).sum())
            correct[k][1] += int(_hits(scores, labels[start:end], top5).sum())
    return {k: {"top1": 100.0 * c1 / m, "top5": 100.0 * c5 / m} for k, (c1, c5) in correct.items()}
