"""``RUN/report.html``: one self-contained page that shows what a run did and what it learned.

Self-contained means: images are embedded as base64 PNG data URIs, the CSS is inline, there is
no script and no external URL, so the file opens from disk in any browser, offline, and can be
mailed or archived as it is. Sections whose inputs are missing (no evaluation yet, no labels,
data not reachable) say so in a note instead of failing the whole report.
"""

from __future__ import annotations

import base64
import html
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from simclr_kit import __version__
from simclr_kit.atomic import atomic_write_text
from simclr_kit.config import DataConfig
from simclr_kit.errors import UserError

REPORT_NAME = "report.html"

_CSS = """
body { font-family: -apple-system, 'Segoe UI', Roboto, Helvetica, Arial, sans-serif;
       margin: 0 auto; max-width: 1180px; padding: 0 24px 48px; color: #1d232b; }
header { border-bottom: 2px solid #d8dee6; margin-bottom: 8px; }
h1 { font-size: 1.6em; margin: 24px 0 4px; }
h2 { font-size: 1.25em; margin-top: 36px; border-bottom: 1px solid #e3e7ec; padding-bottom: 4px; }
h3 { font-size: 1.02em; margin: 18px 0 6px; }
.sub { color: #5b6470; margin: 0 0 12px; }
nav { font-size: 0.92em; margin: 10px 0 4px; line-height: 1.8; }
nav a { margin-right: 14px; color: #2457a6; text-decoration: none; }
table { border-collapse: collapse; margin: 8px 0; font-size: 0.9em; }
th, td { border: 1px solid #d8dee6; padding: 4px 9px; text-align: left; vertical-align: top; }
th { background: #f2f5f8; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
pre { background: #f6f8fa; border: 1px solid #e3e7ec; padding: 10px; font-size: 0.84em;
      overflow-x: auto; max-height: 480px; }
img { max-width: 100%; height: auto; display: block; margin: 6px 0; }
.note { background: #fff8e5; border-left: 4px solid #e0b33a; padding: 8px 12px; margin: 8px 0;
        font-size: 0.92em; }
.caption { color: #5b6470; font-size: 0.88em; margin: 2px 0 10px; }
.cols { display: flex; flex-wrap: wrap; gap: 28px; }
table.retrieval td { text-align: center; font-size: 0.78em; padding: 4px; }
table.retrieval img { margin: 0 auto 2px; width: 72px; image-rendering: pixelated; }
table.retrieval td.query { background: #eef3fb; font-weight: 600; }
table.retrieval td.same { color: #1b7a3a; }
table.retrieval td.same img { outline: 3px solid #2ca05a; }
table.retrieval td.other { color: #b3261e; }
table.retrieval td.other img { outline: 3px solid #d9463b; }
"""


@dataclass
class Section:
    """One titled part of the page; ``body`` is HTML built with the helpers below."""

    id: str
    title: str
    body: str


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def image(png: bytes, alt: str, width: int | None = None) -> str:
    """An ``<img>`` holding ``png`` as a data URI (nothing is fetched when the page opens)."""
    data = base64.b64encode(png).decode("ascii")
    size = f' style="width:{int(width)}px"' if width else ""
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{data}"{size}>'


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


def caption(text: str) -> str:
    return f'<p class="caption">{esc(text)}</p>'


def table(header: Sequence[str], rows: Sequence[Sequence[Any]],
          numeric: Sequence[int] = ()) -> str:
    """A table of escaped cells; columns listed in ``numeric`` are right-aligned."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = []
    for row in rows:
        cells = "".join(f'<td class="num">{esc(c)}</td>' if i in numeric else f"<td>{esc(c)}</td>"
                        for i, c in enumerate(row))
        body.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def key_values(values: dict[str, Any]) -> str:
    return table(["field", "value"], [[k, v] for k, v in values.items()])


def preformatted(text: str) -> str:
    return f"<pre>{esc(text)}</pre>"


def render(title: str, subtitle: str, sections: list[Section]) -> str:
    """The whole page: header, a table of contents with in-page links, the sections."""
    nav = "".join(f'<a href="#{esc(s.id)}">{esc(s.title)}</a>' for s in sections)
    parts = [f'<section id="{esc(s.id)}"><h2>{esc(s.title)}</h2>\n{s.body}\n</section>'
             for s in sections]
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{esc(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            f"<header><h1>{esc(title)}</h1><p class=\"sub\">{esc(subtitle)}</p>"
            f"<nav>{nav}</nav></header>\n" + "\n".join(parts) + "\n</body>\n</html>\n")


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
    from simclr_kit.report.sections import ReportContext

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


def build_sections(ctx: Any, embeddings: bool, max_points: int) -> list[Section]:
    """Every section in page order; ``ctx`` is a :class:`sections.ReportContext`."""
    from simclr_kit.report import embedding_sections as emb
    from simclr_kit.report import sections as run

    builders: list[tuple[str, str, Callable[[], Section]]] = [
        ("config", "Configuration and data", lambda: run.config_section(ctx)),
        ("hardware", "Hardware, time and memory", lambda: run.hardware_section(ctx)),
        ("curves", "Loss and learning rate", lambda: run.curves_section(ctx)),
        ("knn-monitor", "Monitored kNN accuracy", lambda: run.knn_monitor_section(ctx)),
        ("evaluation", "Evaluation", lambda: run.evaluation_section(ctx)),
        ("label-efficiency", "Label efficiency", lambda: run.label_efficiency_section(ctx)),
        ("confusion", "Confusion matrix", lambda: emb.confusion_section(ctx, embeddings)),
        ("augmentations", "Augmented views", lambda: run.augment_section(ctx)),
        ("embedding-map", "Embedding map",
         lambda: emb.map_section(ctx, embeddings, max_points)),
        ("retrieval", "Nearest-neighbour retrieval",
         lambda: emb.retrieval_section(ctx, embeddings)),
    ]
    return [run.guard(build, sid, title) for sid, title, build in builders]


def write_report_safely(run_dir: str | Path, **kwargs: Any) -> Path | None:
    """:func:`write_report` for the end of a run: a failing report is a warning, never a failed
    run (the checkpoint and results are already saved)."""
    try:
        return write_report(run_dir, **kwargs)
    except Exception as err:  # noqa: BLE001 - anything here must not lose a finished run
        print(f"warning: the report could not be written ({type(err).__name__}: {err}); "
              f"retry with  simclr report {run_dir}", file=sys.stderr)
        return None
