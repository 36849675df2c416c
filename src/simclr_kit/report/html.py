"""``RUN/report.html``: one self-contained page that shows what a run did and what it learned.

Self-contained means: images are embedded as base64 PNG data URIs, the CSS is inline, there is
no script and no external URL, so the file opens from disk in any browser, offline, and can be
mailed or archived as it is. Sections whose inputs are missing (no evaluation yet, no labels,
data not reachable) say so in a note instead of failing the whole report.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Callable

from simclr_kit import __version__
from simclr_kit.atomic import atomic_write_text
from simclr_kit.config import DataConfig
from simclr_kit.errors import UserError
from simclr_kit.report import embedding_sections as emb
from simclr_kit.report import sections as sec
from simclr_kit.report.headline import result_section
from simclr_kit.report.page import Section, guard, render
from simclr_kit.report.sections import ReportContext

REPORT_NAME = "report.html"


def write_report(run_dir: str | Path, data: DataConfig | str | dict[str, Any] | None = None,
                 embeddings: bool = True, device: str = "auto", max_points: int = 1000,
                 progress: bool = False) -> Path:
    """Write ``RUN/report.html`` and return its path.

    Args:
        run_dir: a run directory (``config.yaml``, ``metrics.jsonl``, ``checkpoints/``, and
            ``eval.json`` once evaluated).
        data: the dataset for the sections that look at images (augmented views, confusion
            matrix, embedding map, retrieval): a DataConfig, a ``--data`` string, a dict of
            DataConfig fields laid over the run's recorded ones, or None for the run's own:
            the dataset of its last evaluation (``eval.json``) for the sections that need
            labels, the one in its ``config.yaml`` for the augmented views.
        embeddings: compute the sections that need the encoder's features of the train and
            evaluation splits (confusion matrix, embedding map, retrieval); without it the
            report needs no forward pass and takes seconds.
        device: where features are computed.
        max_points: images of the evaluation split placed on the t-SNE map (a stratified
            sample; t-SNE time grows faster than linearly).
        progress: progress bars while decoding and embedding.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise UserError(f"{run} is not a directory: give a run directory written by pretrain")
    if not (run / "config.yaml").is_file() and not (run / "metrics.jsonl").is_file():
        raise UserError(f"{run} has neither config.yaml nor metrics.jsonl: not a run directory")
    if max_points < 4:
        raise UserError(f"max_points = {max_points}: t-SNE needs at least 4 points")
    ctx = ReportContext.load(run, data, device, progress)
    parts = build_sections(ctx, embeddings, max_points)
    subtitle = (f"{run.resolve()} · generated {time.strftime('%Y-%m-%d %H:%M:%S')} by "
                f"simclr-kit {__version__}")
    path = run / REPORT_NAME
    atomic_write_text(path, render(f"SimCLR run report: {run.resolve().name}", subtitle, parts))
    return path


def build_sections(ctx: ReportContext, embeddings: bool, max_points: int) -> list[Section]:
    """Every section in page order: the result first, then how the run got there, the
    machine, and the config last (folded)."""
    builders: list[tuple[str, str, Callable[[], Section]]] = [
        ("result", "Result", lambda: result_section(ctx)),
        ("curves", "Loss and learning rate", lambda: sec.curves_section(ctx)),
        ("knn-monitor", "Monitored kNN accuracy", lambda: sec.knn_monitor_section(ctx)),
        ("evaluation", "Evaluation", lambda: sec.evaluation_section(ctx)),
        ("label-efficiency", "Label efficiency", lambda: sec.label_efficiency_section(ctx)),
        ("confusion", "Confusion matrix", lambda: emb.confusion_section(ctx, embeddings)),
        ("augmentations", "Augmented views", lambda: sec.augment_section(ctx)),
        ("embedding-map", "Embedding map",
         lambda: emb.map_section(ctx, embeddings, max_points)),
        ("retrieval", "Nearest-neighbour retrieval",
         lambda: emb.retrieval_section(ctx, embeddings)),
        ("hardware", "Hardware, time and memory", lambda: sec.hardware_section(ctx)),
        ("config", "Configuration and data", lambda: sec.config_section(ctx)),
    ]
    return [guard(build, sid, title) for sid, title, build in builders]


def write_report_safely(run_dir: str | Path, **kwargs: Any) -> Path | None:
    """:func:`write_report` for the end of a run: a failing report is a warning, never a failed
    run (the checkpoint and results are already saved)."""
    try:
        return write_report(run_dir, **kwargs)
    except Exception as err:  # noqa: BLE001 - anything here must not lose a finished run
        print(f"warning: the report could not be written ({type(err).__name__}: {err}); "
              f"retry with  simclr report {run_dir}", file=sys.stderr)
        return None
