"""The stratified rule against datasets' own stratified train_test_split (the reference)."""

from __future__ import annotations

import datasets
import numpy as np
import pytest

from simclr_kit.data.stratify import stratified_split


def _reference(labels: np.ndarray, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    classes = int(labels.max()) + 1
    ds = datasets.Dataset.from_dict(
        {"row": np.arange(len(labels)), "label": labels},
        features=datasets.Features({"row": datasets.Value("int64"),
                                    "label": datasets.ClassLabel(num_classes=classes)}))
    parts = ds.train_test_split(test_size=fraction, seed=seed, stratify_by_column="label")
    return parts["train"]["row"], parts["test"]["row"]


@pytest.mark.parametrize("counts", [(100, 100, 100), (97, 3, 40, 2, 11), (5, 5, 5, 5, 5, 5, 5)])
@pytest.mark.parametrize("fraction,seed", [(0.2, 0), (0.1, 7), (0.5, 3), (0.37, 11)])
def test_split_is_the_rows_and_order_of_datasets_stratified_split(counts, fraction, seed):
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(counts)])
    labels = labels[np.random.default_rng(99).permutation(len(labels))]
    if min(np.ceil(fraction * len(labels)), len(labels) - np.ceil(fraction * len(labels))) \
            < len(counts):
        pytest.skip("the reference refuses fewer rows than classes on a side")
    rest, part = stratified_split(labels, fraction, seed)
    ref_rest, ref_part = _reference(labels, fraction, seed)
    assert rest.tolist() == ref_rest and part.tolist() == ref_part
    assert sorted(rest.tolist() + part.tolist()) == list(range(len(labels)))


def test_allows_what_the_reference_refuses():
    labels = np.array([0] * 50 + [1] * 50 + [2])  # a class of one; 2 part rows for 3 classes
    rest, part = stratified_split(labels, 0.01, seed=0)
    assert len(part) == 2 and len(rest) == 99  # ceil(0.01 * 101)
    assert sorted(rest.tolist() + part.tolist()) == list(range(101))
    with pytest.raises(ValueError, match="fraction"):
        stratified_split(labels, 1.0, seed=0)
