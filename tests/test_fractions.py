"""Label-efficiency subsets (stratified fractions, k-shot), the runs over seeds, and the plot."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import pytest
import torch

from simclr_kit.evaluation.fractions import (
    k_shot,
    label_efficiency,
    plot_label_efficiency,
    stratified_fraction,
)

# Unbalanced on purpose; class 4 has 3 members (10% rounds to 0, must still give 1) and class 2
# is absent (labels need not be contiguous).
_COUNTS = {0: 100, 1: 250, 3: 37, 4: 3, 5: 1000, 6: 45}


def _labels(seed: int = 0) -> torch.Tensor:
    labels = torch.cat([torch.full((n,), c) for c, n in _COUNTS.items()])
    return labels[torch.randperm(labels.numel(), generator=torch.Generator().manual_seed(seed))]


@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.145, 0.5, 1.0])
def test_stratified_fraction_preserves_class_proportions(fraction: float) -> None:
    labels = _labels()
    idx = stratified_fraction(labels, fraction, seed=0)
    assert idx.dtype == torch.int64
    assert torch.equal(idx, torch.sort(idx).values)
    assert idx.unique().numel() == idx.numel()
    counts = torch.bincount(labels[idx], minlength=7).tolist()
    for c in range(7):
        n = _COUNTS.get(c, 0)
        expected = 0 if n == 0 else max(1, math.floor(fraction * n + 0.5 + 1e-9))
        assert counts[c] == expected, (c, counts[c], expected)
    if fraction == 1.0:
        assert torch.equal(idx, torch.arange(labels.numel()))
    if fraction == 0.145:  # 0.145 * 100 = 14.4999...: half rounds up, float error or not
        assert counts[0] == 15


def test_fraction_reproducible_per_seed_different_across_seeds() -> None:
    labels = _labels()
    a = stratified_fraction(labels, 0.1, seed=0)
    assert torch.equal(a, stratified_fraction(labels, 0.1, seed=0))
    others = [stratified_fraction(labels, 0.1, seed=s) for s in (1, 2, 3)]
    assert all(not torch.equal(a, b) for b in others)
    assert not torch.equal(others[0], others[1])


def test_subsets_are_nested_for_a_seed() -> None:
    labels = _labels()
    small = set(stratified_fraction(labels, 0.01, seed=7).tolist())
    large = set(stratified_fraction(labels, 0.1, seed=7).tolist())
    assert small < large
    one, five = set(k_shot(labels, 1, seed=7).tolist()), set(k_shot(labels, 5, seed=7).tolist())
    assert one < five


@pytest.mark.parametrize("k", [1, 5, 10])
def test_k_shot_exactly_k_per_class(k: int) -> None:
    labels = _labels()
    idx = k_shot(labels, k, seed=1)
    counts = torch.bincount(labels[idx], minlength=7).tolist()
    assert counts == [0 if c not in _COUNTS else min(k, _COUNTS[c]) for c in range(7)]
    assert torch.equal(idx, k_shot(labels, k, seed=1))
    assert not torch.equal(idx, k_shot(labels, k, seed=2))


def test_bad_arguments() -> None:
    labels = _labels()
    for fraction in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="fraction"):
            stratified_fraction(labels, fraction, seed=0)
    with pytest.raises(ValueError, match="k must be"):
        k_shot(labels, 0, seed=0)


def _blobs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = 1.2 * torch.randn(4, 8, generator=torch.Generator().manual_seed(99))
    labels = torch.randint(0, 4, (n,), generator=g)
    return centres[labels] + torch.randn(n, 8, generator=g), labels


def test_label_efficiency_rows_and_plot(tmp_path: Path) -> None:
    from PIL import Image

    x_train, y_train = _blobs(400, seed=0)
    x_val, y_val = _blobs(200, seed=1)
    rows = label_efficiency(x_train, y_train, x_val, y_val, 4, fractions=(0.05, 1.0),
                            shots=(1, 5), seeds=3, epochs=30, lr=5e-2, min_steps=0)
    assert [r["subset"] for r in rows] == ["5%", "100%", "1-shot", "5-shot"]
    per_class = torch.bincount(y_train, minlength=4)
    expected_labels = [int(sum(max(1, math.floor(0.05 * n + 0.5)) for n in per_class.tolist())),
                       400, 4, 20]
    assert [r["labels"] for r in rows] == expected_labels
    for r in rows:
        assert len(r["runs"]) == 3
        assert r["mean"] == pytest.approx(statistics.fmean(r["runs"]))
        assert r["std"] == pytest.approx(statistics.stdev(r["runs"]))
        assert 0.0 <= r["mean"] <= 100.0
    assert rows[0]["std"] > 0.0  # different subsets per seed give different accuracies
    assert rows[1]["mean"] > 90.0  # all labels of fairly well-separated blobs
    assert rows[1]["mean"] > rows[0]["mean"] and rows[3]["mean"] > rows[2]["mean"]

    path = tmp_path / "label_efficiency.png"
    plot_label_efficiency(rows, path)
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size[0] > 100 and image.size[1] > 100


def test_label_efficiency_seed_offsets_probe_and_subset() -> None:
    x_train, y_train = _blobs(200, seed=2)
    kwargs = dict(fractions=(0.1,), shots=(), seeds=2, epochs=2, min_steps=0)
    a = label_efficiency(x_train, y_train, x_train, y_train, 4, **kwargs)
    b = label_efficiency(x_train, y_train, x_train, y_train, 4, **kwargs, seed=0)
    c = label_efficiency(x_train, y_train, x_train, y_train, 4, **kwargs, seed=1)
    assert a == b  # the default base seed is EvalConfig.seed = 0
    assert c[0]["runs"][0] == a[0]["runs"][1]  # run 0 with base 1 is run 1 with base 0


def test_subsets_of_the_same_labels_are_one_row_named_for_both() -> None:
    """With 100 images per class, 1% is 1 per class and 10% is 10: the very labels of 1-shot and
    10-shot (each subset is a prefix of the same per-class shuffle). Each pair is one row whose
    numbers are those the k-shot subset gives on its own."""
    from simclr_kit.evaluation.fractions import _name_groups

    labels = torch.arange(10).repeat_interleave(100)
    features = torch.nn.functional.one_hot(labels, 10).float() + 0.5 * torch.randn(1000, 10)
    kwargs = dict(seeds=2, epochs=2, min_steps=0)
    rows = label_efficiency(features, labels, features, labels, 10, fractions=(0.01, 0.1),
                            shots=(1, 5, 10), **kwargs)
    assert [(r["subset"], r.get("same_as")) for r in rows] == [
        ("1%", ["1-shot"]), ("10%", ["10-shot"]), ("5-shot", None)]
    alone = label_efficiency(features, labels, features, labels, 10, fractions=(),
                             shots=(1, 10), **kwargs)
    assert [r["runs"] for r in rows[:2]] == [r["runs"] for r in alone]
    assert [names for _, names in _name_groups(rows)] == [["1%", "1-shot"], ["5-shot"],
                                                          ["10%", "10-shot"]]
