"""The report's pictures, each returned as PNG bytes.

Figures are drawn on matplotlib's Agg canvas directly (``Figure`` + ``FigureCanvasAgg``), so the
global pyplot backend and state are never touched, whatever the caller uses.
"""

from __future__ import annotations

import io
import math
from typing import Any, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

DPI = 100


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def to_png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def _series(records: list[dict[str, Any]], x: str, y: str) -> tuple[list[float], list[float]]:
    """(x, y) of the records holding a finite number under both keys."""
    pairs = [(r[x], r[y]) for r in records
             if isinstance(r.get(x), (int, float)) and isinstance(r.get(y), (int, float))
             and math.isfinite(r[y])]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def training_curves(train: list[dict[str, Any]], steps_per_epoch: int | None = None) -> bytes:
    """Loss, learning rate and throughput against the optimisation step, from 'train' records;
    with ``steps_per_epoch``, thin grey lines mark where each epoch ends."""
    fig = _figure(11, 3.2)
    axes = fig.subplots(1, 3)
    panels = (("loss", "NT-Xent loss"), ("lr", "learning rate"), ("images_per_s", "images / s"))
    last_step = max((r["step"] for r in train), default=0)
    for ax, (key, title) in zip(axes, panels):
        xs, ys = _series(train, "step", key)
        ax.plot(xs, ys, marker="." if len(xs) < 50 else None, linewidth=1.2)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        if steps_per_epoch and last_step // steps_per_epoch <= 50:
            for boundary in range(steps_per_epoch, last_step, steps_per_epoch):
                ax.axvline(boundary, color="0.6", linewidth=0.8, linestyle=":", zorder=0)
    fig.tight_layout()
    return to_png(fig)


def metric_curve(records: list[dict[str, Any]], keys: Sequence[str], x: str = "epoch",
                 ylabel: str = "accuracy (%)", title: str = "") -> bytes:
    """One line per key of ``records`` against ``x`` (monitored kNN accuracy per epoch)."""
    fig = _figure(6, 3.5)
    ax = fig.add_subplot()
    for key in keys:
        xs, ys = _series(records, x, key)
        ax.plot(xs, ys, marker="o", label=key)
    ax.set_xlabel(x)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return to_png(fig)


def confusion_matrix(matrix: Tensor, class_names: Sequence[str], title: str) -> bytes:
    """``matrix: (C, C)`` counts, rows = true class, columns = predicted; cells show row percent."""
    counts = matrix.numpy().astype(np.float64)
    rows = counts.sum(1, keepdims=True)
    percent = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0) * 100
    c = counts.shape[0]
    side = min(12.0, max(4.5, 0.55 * c + 2))
    fig = _figure(side + 1, side)
    ax = fig.add_subplot()
    image = ax.imshow(percent, cmap="Blues", vmin=0, vmax=100)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="% of the true class")
    if c <= 30:
        ax.set_xticks(range(c), [str(n) for n in class_names], rotation=60, ha="right",
                      fontsize=8)
        ax.set_yticks(range(c), [str(n) for n in class_names], fontsize=8)
    if c <= 20:
        for i in range(c):
            for j in range(c):
                if counts[i, j]:
                    ax.text(j, i, f"{int(counts[i, j])}", ha="center", va="center", fontsize=7,
                            color="white" if percent[i, j] > 60 else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return to_png(fig)


def embedding_map(coords: np.ndarray, labels: np.ndarray | None,
                  class_names: Sequence[str] | None, title: str) -> bytes:
    """Scatter of ``coords: (n, 2)`` coloured by ``labels: (n,)`` with a legend of class names."""
    fig = _figure(8, 6.5)
    ax = fig.add_subplot()
    if labels is None:
        ax.scatter(coords[:, 0], coords[:, 1], s=8, color="tab:blue", alpha=0.8)
    else:
        classes = np.unique(labels)
        cmap = _colour_map(len(classes))
        for i, c in enumerate(classes):
            pts = coords[labels == c]
            name = class_names[int(c)] if class_names and int(c) < len(class_names) else str(c)
            ax.scatter(pts[:, 0], pts[:, 1], s=10, color=cmap(i), alpha=0.85, label=name)
        if len(classes) <= 20:
            ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, markerscale=1.5,
                      frameon=False)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return to_png(fig)


def _colour_map(n: int) -> Any:
    from matplotlib import colormaps

    if n <= 10:
        return colormaps["tab10"]
    if n <= 20:
        return colormaps["tab20"]
    return colormaps["turbo"].resampled(n)


def thumbnail(image: Tensor, size: int = 72) -> bytes:
    """``image: (3, S, S) uint8`` -> a ``size`` px square PNG; small images are enlarged with
    hard pixel edges (nearest neighbour), so 8 or 32 px images stay readable."""
    from PIL import Image

    pil = Image.fromarray(image.permute(1, 2, 0).contiguous().numpy())
    resample = Image.NEAREST if pil.width < size else Image.LANCZOS
    buf = io.BytesIO()
    pil.resize((size, size), resample).save(buf, format="PNG")
    return buf.getvalue()
