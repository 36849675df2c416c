"""Weighted kNN (Wu et al. 2018) against an independent NumPy brute-force reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from simclr_kit.evaluation.knn import knn_accuracy, knn_predict, nearest_neighbours


def _reference(train: np.ndarray, train_labels: np.ndarray, queries: np.ndarray,
               num_classes: int, k: int, temperature: float) -> np.ndarray:
    """(M, C) class scores, one query at a time, in float64: the protocol written out plainly."""
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    scores = np.zeros((len(queries), num_classes))
    for q, query in enumerate(queries):
        query = query / np.linalg.norm(query)
        sims = train @ query
        neighbours = np.argsort(-sims, kind="stable")[:min(k, len(train))]
        for j in neighbours:
            scores[q, train_labels[j]] += np.exp(sims[j] / temperature)
    return scores


def _reference_accuracy(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Top-1 / top-min(5, C) in percent: rank by score, ties to the lower class, votes > 0."""
    top = min(5, scores.shape[1])
    hits1 = hits5 = 0
    for row, label in zip(scores, labels):
        ranking = sorted(range(len(row)), key=lambda c: (-row[c], c))
        voted = [c for c in ranking if row[c] > 0]
        hits1 += int(voted[:1] == [label])
        hits5 += int(label in voted[:top])
    return {"top1": 100.0 * hits1 / len(labels), "top5": 100.0 * hits5 / len(labels)}


def _data(n: int, m: int, d: int, c: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Clustered random features so that kNN is neither trivial nor chance."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(c, d, generator=g)
    y_train = torch.randint(0, c, (n,), generator=g)
    y_query = torch.randint(0, c, (m,), generator=g)
    x_train = centres[y_train] + 1.5 * torch.randn(n, d, generator=g)
    x_query = centres[y_query] + 1.5 * torch.randn(m, d, generator=g)
    return x_train, y_train, x_query, y_query


@pytest.mark.parametrize("num_classes", [7, 3])
def test_matches_brute_force_reference(num_classes: int) -> None:
    x_train, y_train, x_query, y_query = _data(300, 101, 16, num_classes, seed=num_classes)
    ks, temperature = (1, 5, 17, 200), 0.1
    expected_acc = {}
    for k in ks:
        ref = _reference(x_train.double().numpy(), y_train.numpy(), x_query.double().numpy(),
                         num_classes, k, temperature)
        for chunk_size in (7, 13, 1024):  # 7 and 13 do not divide 101 queries
            scores = knn_predict(x_train, y_train, x_query, num_classes, k=k,
                                 temperature=temperature, chunk_size=chunk_size)
            assert scores.shape == (101, num_classes)
            np.testing.assert_allclose(scores.double().numpy(), ref, rtol=1e-4, atol=1e-6)
            assert torch.equal(scores.argmax(1), torch.from_numpy(ref.argmax(1)))
        expected_acc[k] = _reference_accuracy(ref, y_query.numpy())
    for chunk_size in (7, 13, 1024):
        got = knn_accuracy(x_train, y_train, x_query, y_query, num_classes, ks=ks,
                           temperature=temperature, chunk_size=chunk_size)
        assert set(got) == set(ks)
        for k in ks:
            assert got[k] == pytest.approx(expected_acc[k], abs=1e-9), (k, chunk_size)
    # The data is learnable but not trivially: the check is not comparing two constant outputs.
    assert 40.0 < expected_acc[17]["top1"] < 100.0


def test_top5_ignores_classes_without_votes() -> None:
    # One neighbour votes for one class: top-5 then equals top-1, whatever the class order.
    x_train, y_train, x_query, y_query = _data(200, 64, 8, 10, seed=3)
    acc = knn_accuracy(x_train, y_train, x_query, y_query, 10, ks=(1,))
    assert acc[1]["top5"] == acc[1]["top1"]


def test_k_larger_than_train_set_is_clamped() -> None:
    x_train, y_train, x_query, y_query = _data(40, 25, 8, 4, seed=1)
    big = knn_predict(x_train, y_train, x_query, 4, k=10_000, chunk_size=6)
    full = knn_predict(x_train, y_train, x_query, 4, k=40)
    torch.testing.assert_close(big, full)
    acc = knn_accuracy(x_train, y_train, x_query, y_query, 4, ks=(40, 10_000))
    assert acc[10_000] == acc[40]


def test_hand_computed_example() -> None:
    # Keys at 0, 90 and 180 degrees; the query at 0 degrees. With k = 3 and T = 0.5 the scores
    # are e^(1/0.5) for class 0 and e^(0) + e^(-1/0.5) for class 1.
    keys = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]])
    labels = torch.tensor([0, 1, 1])
    scores = knn_predict(keys, labels, torch.tensor([[5.0, 0.0]]), 2, k=3, temperature=0.5)
    expected = torch.tensor([[np.exp(2.0), 1.0 + np.exp(-2.0)]], dtype=torch.float32)
    torch.testing.assert_close(scores, expected)


def test_scale_invariant_and_fp16_inputs() -> None:
    x_train, y_train, x_query, _ = _data(100, 30, 8, 5, seed=2)
    base = knn_predict(x_train, y_train, x_query, 5, k=10)
    scaled = knn_predict(7.0 * x_train, y_train, 0.1 * x_query, 5, k=10)
    torch.testing.assert_close(base, scaled, rtol=1e-4, atol=1e-4)
    half = knn_predict(x_train.half(), y_train, x_query.half(), 5, k=10)
    assert half.dtype == torch.float32
    assert torch.equal(half.argmax(1), base.argmax(1))


def test_rejects_bad_inputs() -> None:
    x_train, y_train, x_query, y_query = _data(20, 5, 4, 3, seed=0)
    with pytest.raises(ValueError, match="labels span"):
        knn_predict(x_train, y_train + 5, x_query, 3)
    with pytest.raises(ValueError, match="k must be"):
        knn_accuracy(x_train, y_train, x_query, y_query, 3, ks=(0,))
    with pytest.raises(ValueError, match="dims differ"):
        knn_predict(x_train, y_train, x_query[:, :2], 3)
    with pytest.raises(ValueError, match="query labels"):
        knn_accuracy(x_train, y_train, x_query, y_query + 3, 3)


@pytest.mark.parametrize("chunk_size", [1, 3, 1024])
def test_nearest_neighbours_match_brute_force(chunk_size: int) -> None:
    """The search behind kNN and the report's retrieval grid, chunked or not, against NumPy."""
    g = torch.Generator().manual_seed(0)
    train, queries = torch.randn(40, 6, generator=g), torch.randn(7, 6, generator=g) * 3
    t = train.numpy() / np.linalg.norm(train.numpy(), axis=1, keepdims=True)
    q = queries.numpy() / np.linalg.norm(queries.numpy(), axis=1, keepdims=True)
    for k, expected_k in ((8, 8), (100, 40)):  # k above N is clamped to N
        idx, sims = nearest_neighbours(train, queries, k=k, chunk_size=chunk_size)
        reference = np.argsort(-(q @ t.T), axis=1, kind="stable")[:, :expected_k]
        assert idx.shape == (7, expected_k) and idx.dtype == torch.int64
        assert idx.tolist() == reference.tolist()
        assert np.allclose(sims.numpy(), np.take_along_axis(q @ t.T, reference, 1), atol=1e-6)
