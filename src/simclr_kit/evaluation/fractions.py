"""Label efficiency: linear probes trained on stratified label fractions and k-shot subsets.

The semi-supervised protocol of SimCLR (Chen et al. 2020, table 7: 1% and 10% of
ImageNet labels, class-balanced) and the few-shot k = 1, 5, 10 examples per class, each repeated
over several seeds and reported as mean and standard deviation.

Subsets are drawn from one per-class shuffle per seed: class c's indices are permuted by a
``torch.Generator(seed)`` and every subset takes a prefix of that permutation. So for a given
seed the subsets are nested (1% inside 10%, 1-shot inside 5-shot) and a curve over subset sizes
differs only in how many labels it sees, not in which ones it happened to draw.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from simclr_kit.config import EvalConfig
from simclr_kit.evaluation.linear import train_linear_probe

_DEFAULTS = EvalConfig()


def _class_permutations(labels: Tensor, seed: int) -> list[Tensor]:
    """One random permutation of each present class's indices into ``labels`` ``(N,)``.

    Classes are visited in increasing label order and the generator is used for nothing else,
    so the permutation of a class depends only on the seed and the label vector.
    """
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D (N,), got shape {tuple(labels.shape)}")
    cpu_labels = labels.detach().to("cpu", torch.long)
    order = torch.argsort(cpu_labels, stable=True)  # indices grouped by class, ascending within
    counts = torch.unique(cpu_labels, return_counts=True)[1].tolist()
    generator = torch.Generator().manual_seed(seed)
    perms = []
    for members in torch.split(order, counts):
        perms.append(members[torch.randperm(members.numel(), generator=generator)])
    return perms


def _take(perms: list[Tensor], sizes: list[int], device: torch.device) -> Tensor:
    """Sorted ``(sum(sizes),)`` int64 indices: the first ``sizes[c]`` of each class permutation."""
    if not perms:
        raise ValueError("labels is empty: there is nothing to draw a subset from")
    chosen = torch.cat([perm[:size] for perm, size in zip(perms, sizes)])
    return torch.sort(chosen).values.to(device)


def stratified_fraction(labels: Tensor, fraction: float, seed: int) -> Tensor:
    """Indices of a class-stratified ``fraction`` of a labelled set.

    Each class c with n_c members contributes ``round(fraction * n_c)`` of them (half rounds up,
    unlike Python's banker's ``round``), and at least one, so every class stays present.

    Args:
        labels: ``(N,)`` integer class labels.
        fraction: in ``(0, 1]``; 1 returns every index.
        seed: the same seed gives the same subset; different seeds give different ones.

    Returns:
        ``(K,)`` int64 indices into ``labels``, sorted ascending, on ``labels``' device.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    perms = _class_permutations(labels, seed)
    # The 1e-9 absorbs float error: 0.145 * 100 is 14.499999999999998, which must round to 15.
    sizes = [max(1, min(p.numel(), math.floor(fraction * p.numel() + 0.5 + 1e-9)))
             for p in perms]
    return _take(perms, sizes, labels.device)


def k_shot(labels: Tensor, k: int, seed: int) -> Tensor:
    """Indices of k examples of every class (all of a class that has fewer than k).

    Args:
        labels: ``(N,)`` integer class labels.
        k: examples per class, >= 1.
        seed: as in :func:`stratified_fraction`.

    Returns:
        ``(K,)`` int64 indices into ``labels``, sorted ascending, on ``labels``' device.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    perms = _class_permutations(labels, seed)
    return _take(perms, [min(k, p.numel()) for p in perms], labels.device)


def _subset_specs(fractions: Sequence[float],
                  shots: Sequence[int]) -> list[tuple[str, str, float]]:
    """``(name, kind, value)`` per subset: ("1%", "fraction", 0.01), ("5-shot", "shots", 5)."""
    specs = [(f"{100 * f:g}%", "fraction", float(f)) for f in fractions]
    return specs + [(f"{k}-shot", "shots", int(k)) for k in shots]


def label_efficiency(train_features: Tensor, train_labels: Tensor, val_features: Tensor,
                     val_labels: Tensor, num_classes: int,
                     fractions: Sequence[float] = (0.01, 0.1, 1.0),
                     shots: Sequence[int] = (1, 5, 10), seeds: int = _DEFAULTS.seeds,
                     **probe_kwargs: Any) -> list[dict[str, Any]]:
    """Linear-probe accuracy on label subsets, several seeds each (Chen et al. 2020, table 7).

    Run ``i`` of a subset draws the subset with seed ``base + i`` and trains the probe with the
    same seed, where ``base`` is ``probe_kwargs["seed"]`` (default ``EvalConfig.seed``). The val
    set is always the full ``val_features``.

    Args:
        train_features: ``(N, D)``; train_labels: ``(N,)`` int64.
        val_features: ``(M, D)``; val_labels: ``(M,)`` int64.
        num_classes: C.
        fractions: label fractions in ``(0, 1]``; shots: examples per class.
        seeds: runs per subset (>= 1).
        **probe_kwargs: passed to :func:`train_linear_probe` (epochs, lr, batch_size, ...).

    Returns:
        One dict per subset, fractions first: ``subset`` ("1%", "5-shot"), ``kind``
        ("fraction" | "shots"), ``value`` (0.01 | 5), ``labels`` (number of labelled train
        rows), ``mean`` and ``std`` (percent val accuracy over the runs; sample std, 0 for one
        run), ``runs`` (the per-seed accuracies), ``seeds`` (the seed of each run), ``epochs``
        and ``steps`` (what each probe trained: a subset's size is the same for every seed, so
        ``min_steps`` raises the epochs alike). A subset that draws exactly the labels of an
        earlier one for every seed (1% and 1-shot of 100 images per class) gets no row of its
        own: the earlier row names it in ``same_as``.
    """
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    base_seed = int(probe_kwargs.pop("seed", _DEFAULTS.seed))
    rows: list[dict[str, Any]] = []
    by_labels: dict[tuple[bytes, ...], dict[str, Any]] = {}  # each subset's rows, over seeds
    for name, kind, value in _subset_specs(fractions, shots):
        subsets = [(stratified_fraction(train_labels, value, base_seed + i) if kind == "fraction"
                    else k_shot(train_labels, int(value), base_seed + i)) for i in range(seeds)]
        drawn = tuple(idx.cpu().numpy().tobytes() for idx in subsets)
        if drawn in by_labels:  # the same labels: the same numbers, said once
            by_labels[drawn].setdefault("same_as", []).append(name)
            continue
        runs: list[float] = []
        result = None
        for i, idx in enumerate(subsets):
            idx = idx.to(train_features.device)
            result = train_linear_probe(train_features[idx], train_labels.to(idx.device)[idx],
                                        val_features, val_labels, num_classes,
                                        seed=base_seed + i, **probe_kwargs)
            runs.append(result.val_accuracy)
        assert result is not None
        by_labels[drawn] = {
            "subset": name, "kind": kind, "value": value, "labels": int(subsets[-1].numel()),
            "mean": statistics.fmean(runs), "std": statistics.stdev(runs) if len(runs) > 1 else 0.0,
            "runs": runs, "seeds": [base_seed + i for i in range(seeds)],
            "epochs": result.epochs, "steps": result.steps}
        rows.append(by_labels[drawn])
    return rows


def label_efficiency_figure(rows: list[dict[str, Any]]) -> Any:
    """The matplotlib Figure of :func:`plot_label_efficiency` (Agg canvas, pyplot untouched)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullLocator

    fig = Figure(figsize=(6, 4.6), dpi=120)  # the top axis names the subsets
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    encoders = list(dict.fromkeys(r.get("encoder") for r in rows))
    for number, encoder in enumerate(encoders):
        colour = f"C{number % 10}"
        for kind, label, marker, line in (("fraction", "label fraction", "o", "-"),
                                          ("shots", "k-shot", "s", "--")):
            series = sorted((r for r in rows if r.get("encoder") == encoder
                             and r.get("kind", _kind_of(r)) == kind), key=lambda r: r["labels"])
            if not series:
                continue
            ax.errorbar([r["labels"] for r in series], [r["mean"] for r in series],
                        yerr=[r["std"] for r in series], marker=marker, linestyle=line,
                        color=colour, capsize=3,
                        label=label if encoder is None else f"{encoder}: {label}")
    ax.set_xscale("log")
    # Subset names once per position, not per encoder and series, upright on a top axis:
    # labels beside the points collided (1% and 1-shot often coincide, encoders lie close).
    groups = _name_groups(rows)
    top = ax.secondary_xaxis("top")
    top.set_xticks([count for count, _ in groups], [" / ".join(n) for _, n in groups],
                   rotation=90, fontsize=7)
    top.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("labelled training examples (log scale)")
    ax.set_ylabel("val accuracy (%), linear probe")
    ax.set_title("Label efficiency (mean ± std over seeds)")
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    return fig


def _name_groups(rows: list[dict[str, Any]], gap: float = 0.06) -> list[tuple[float, list[str]]]:
    """Subset names grouped by label count, counts closer than ``gap`` decades merged (their
    upright names would touch): ``[(count, ["1%", "1-shot"]), ...]``."""
    by_count: dict[int, list[str]] = {}
    for r in sorted(rows, key=lambda r: r["labels"]):
        names = by_count.setdefault(int(r["labels"]), [])
        for name in [str(r["subset"]), *r.get("same_as", [])]:
            if name not in names:
                names.append(name)
    groups: list[tuple[float, list[str]]] = []
    for count, names in by_count.items():
        if groups and math.log10(count) - math.log10(groups[-1][0]) < gap:
            groups[-1][1].extend(n for n in names if n not in groups[-1][1])
        else:
            groups.append((count, list(names)))
    return groups


def plot_label_efficiency(rows: list[dict[str, Any]], path: str | Path) -> None:
    """Write a PNG of val accuracy vs number of labels (log x), error bars = std over seeds.

    ``rows`` is the output of :func:`label_efficiency`; fractions and k-shot subsets are drawn
    as two series, per encoder when the rows carry an ``encoder`` key (``simclr evaluate`` with
    baselines), so encoders compare on one figure; each subset is named once, at its position.
    """
    label_efficiency_figure(rows).savefig(Path(path), format="png")


def _kind_of(row: dict[str, Any]) -> str:
    """Series of a row without a ``kind`` key, read from its name ("10%" vs "5-shot")."""
    return "shots" if str(row["subset"]).endswith("-shot") else "fraction"
