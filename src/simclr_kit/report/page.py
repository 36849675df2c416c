"""The report page's building blocks: a titled :class:`Section`, HTML helpers that escape what
they are given, and :func:`render`, which lays the sections out as one self-contained page.

Self-contained means: images are embedded as base64 PNG data URIs, the CSS is inline, there is
no script and no external URL. Nothing here reads a run; the sections (``sections.py``,
``embedding_sections.py``) build on these helpers and ``html.py`` writes the page.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass
from typing import Any, Callable, Sequence

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
.verdict { font-size: 1.15em; font-weight: 600; margin: 12px 0; }
summary { cursor: pointer; font-weight: 600; margin: 12px 0 6px; }
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


def folded(summary: str, body: str) -> str:
    """``body`` (HTML) closed under a one-line ``summary`` that opens it."""
    return f"<details><summary>{esc(summary)}</summary>{body}</details>"


def render(title: str, subtitle: str, sections: list[Section]) -> str:
    """The whole page: header, a table of contents with in-page links, the sections."""
    nav = "".join(f'<a href="#{esc(s.id)}">{esc(s.title)}</a>' for s in sections)
    parts = [f'<section id="{esc(s.id)}"><h2>{esc(s.title)}</h2>\n{s.body}\n</section>'
             for s in sections]
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{esc(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            f"<header><h1>{esc(title)}</h1><p class=\"sub\">{esc(subtitle)}</p>"
            f"<nav>{nav}</nav></header>\n" + "\n".join(parts) + "\n</body>\n</html>\n")


class Missing(Exception):
    """An input a section needs is not there; the message says what to do."""


def guard(build: Callable[[], Section], sid: str, title: str) -> Section:
    """Run a builder; a missing input or a failure becomes a note in that section only."""
    try:
        return build()
    except Missing as err:
        return Section(sid, title, note(str(err)))
    except Exception as err:  # noqa: BLE001 - one broken picture must not hide the others
        return Section(sid, title, note(f"this section could not be drawn: "
                                        f"{type(err).__name__}: {err}"))
