"""Class-stratified sampling: the one seeded rule behind the carved validation split and the
label-fraction subsets.

The rule is scikit-learn's ``StratifiedShuffleSplit`` as ``datasets.Dataset.train_test_split``
runs it with ``stratify_by_column`` (so a carve made through here picks the rows, in the order,
that ``train_test_split(test_size=fraction, seed=seed, stratify_by_column=...)`` picks): the
part gets ``ceil(fraction * N)`` rows, shared out between the classes by the approximate mode
of the multivariate hypergeometric distribution (each class's share, rounded so the total is
exact, ties broken at random), every class's rows permuted once by NumPy's PCG64 from ``seed``.
"""

from __future__ import annotations

import math

import numpy as np


def _approximate_mode(class_counts: np.ndarray, n_draws: int,
                      rng: np.random.Generator) -> np.ndarray:
    """``(C,)`` rows drawn per class: the floor of each class's share of ``n_draws``, plus one
    for the classes with the largest remainders (ties broken by ``rng``) until they sum to it."""
    continuous = n_draws * class_counts / class_counts.sum()
    floored = np.floor(continuous)
    need = int(n_draws - floored.sum())
    remainder = continuous - floored
    for value in np.sort(np.unique(remainder))[::-1]:
        if need <= 0:
            break
        (candidates,) = np.where(remainder == value)
        add = min(len(candidates), need)
        floored[rng.choice(candidates, size=add, replace=False)] += 1
        need -= add
    return floored.astype(np.int64)


def stratified_split(labels: np.ndarray, fraction: float,
                     seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split ``labels: (N,)`` into ``(rest, part)``: int64 row indices, in the rule's shuffled
    order, ``part`` holding ``ceil(fraction * N)`` rows with each class in proportion.

    Classes with a single row, or fewer part rows than classes, are allowed here (a class may
    then get no row); a caller that needs every class on both sides checks that first.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    n = len(labels)
    n_part = math.ceil(fraction * n)
    rng = np.random.default_rng(seed)
    _, classes = np.unique(labels, return_inverse=True)
    counts = np.bincount(classes)
    members = np.split(np.argsort(classes, kind="mergesort"), np.cumsum(counts)[:-1])
    rest_sizes = _approximate_mode(counts, n - n_part, rng)
    part_sizes = _approximate_mode(counts - rest_sizes, n_part, rng)
    rest: list[int] = []
    part: list[int] = []
    for rows, r, p in zip(members, rest_sizes, part_sizes):
        shuffled = rows[rng.permutation(len(rows))]
        rest.extend(shuffled[:r])
        part.extend(shuffled[r:r + p])
    return (rng.permutation(np.asarray(rest, dtype=np.int64)),
            rng.permutation(np.asarray(part, dtype=np.int64)))
