"""The run report: a self-contained HTML page with every section, built from a tiny real run."""

from __future__ import annotations

import base64
import io
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY
from simclr_kit.cli import main
from simclr_kit.report import analysis
from simclr_kit.report.html import write_report

# The result first, the machine and the config last.
SECTIONS = ["result", "curves", "knn-monitor", "evaluation", "label-efficiency", "confusion",
            "augmentations", "embedding-map", "retrieval", "hardware", "config"]


class Page(HTMLParser):
    """Every tag's attributes, and per section: its images and whether it holds a note."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.sections: dict[str, dict[str, list]] = {}
        self.current: str | None = None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        attr = {k: v or "" for k, v in attrs}
        self.tags.append((tag, attr))
        if tag == "section":
            self.current = attr["id"]
            self.sections[self.current] = {"images": [], "notes": []}
        elif self.current and tag == "img":
            self.sections[self.current]["images"].append(attr)
        elif self.current and "note" in attr.get("class", ""):
            self.sections[self.current]["notes"].append(tag)


def parse(path: Path) -> Page:
    page = Page()
    page.feed(path.read_text())
    page.close()
    return page


def decode_image(src: str) -> Image.Image:
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix)
    image = Image.open(io.BytesIO(base64.b64decode(src[len(prefix):], validate=True)))
    image.load()  # decodes every pixel: a truncated PNG fails here
    return image


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    """``simclr run``: pretraining, evaluation (no baseline, to stay quick), then the report."""
    out = tmp_path_factory.mktemp("runs") / "run"
    assert main(["run", "--data", str(data), "--out", str(out), "--epochs", "1", *TINY,
                 "--linear-epochs", "3", "--knn-k", "5", "--baseline", ""]) == 0
    return out


def test_run_writes_self_contained_report_with_every_section(run):
    page = parse(run / "report.html")
    assert list(page.sections) == SECTIONS
    for tag, attrs in page.tags:
        assert tag not in ("script", "link", "iframe", "object", "embed")
        for name in ("src", "href"):
            value = attrs.get(name)
            if value is not None:
                assert not re.search(r"https?://", value), (tag, value[:80])
                assert value.startswith(("data:image/png;base64,", "#")), (tag, value[:80])
    images = [attrs["src"] for tag, attrs in page.tags if tag == "img"]
    assert len(images) == 4 + 6 * 9  # curves, confusion, views, map; 6 x (1 + 8) thumbnails
    for src in images:
        assert min(decode_image(src).size) > 0
    # Without monitored kNN and label-efficiency results those two say so; all others draw.
    for sid in SECTIONS:
        if sid in ("knn-monitor", "label-efficiency"):
            assert page.sections[sid]["notes"] and not page.sections[sid]["images"]
        elif sid not in ("result", "config", "hardware", "evaluation"):
            assert page.sections[sid]["images"] and not page.sections[sid]["notes"], sid
    text = (run / "report.html").read_text()
    assert "peak memory" in text and "training wall time" in text
    assert "| linear |" not in text and "<td>linear</td>" in text  # the eval table, as HTML


def test_confusion_matrix_agrees_with_the_evaluation(run):
    """The report's kNN predictions reproduce eval.json's kNN top-1 (same k and T)."""
    result = json.loads((run / "eval.json").read_text())
    top1 = next(r["value"] for r in result["results"]
                if r["protocol"] == "knn" and r["metric"] == "top1")
    page = parse(run / "report.html")
    alt = page.sections["confusion"]["images"][0]["alt"]
    assert "k=5" in alt
    assert float(re.search(r"top-1 ([0-9.]+)%", alt).group(1)) == pytest.approx(top1, abs=1e-6)


def test_done_record_has_wall_time_memory_and_hardware(run):
    from simclr_kit.report.metrics import read_metrics

    records = read_metrics(run / "metrics.jsonl")
    done = [r for r in records if r["kind"] == "done"][-1]
    assert done["wall_s"] > 0 and done["images_per_s"] > 0 and done["peak_memory_mb"]["host"] > 0
    assert records[0]["hardware"]["torch"] == torch.__version__


def test_monitored_knn_and_label_efficiency_sections_draw_when_present(run, tmp_path):
    """Records of kind 'knn' and a label-efficiency PNG beside eval.json appear in the report."""
    from simclr_kit.evaluation.fractions import plot_label_efficiency

    copy = tmp_path / "run"
    copy.mkdir()
    for name in ("config.yaml", "metrics.jsonl", "eval.json"):
        (copy / name).write_bytes((run / name).read_bytes())
    with open(copy / "metrics.jsonl", "a") as f:
        for epoch, acc in ((1, 40.0), (2, 55.5)):
            f.write(json.dumps({"kind": "knn", "time": 0, "epoch": epoch, "top1": acc,
                                "top5": acc + 20}) + "\n")
    plot_label_efficiency([{"subset": "10%", "kind": "fraction", "value": 0.1, "labels": 3,
                            "mean": 50.0, "std": 5.0, "runs": [45.0, 55.0]}],
                          copy / "label_efficiency.png")
    # No checkpoint here: the encoder sections degrade to notes, the rest still draws.
    page = parse(write_report(copy, embeddings=False))
    for sid in ("knn-monitor", "label-efficiency", "curves"):
        assert page.sections[sid]["images"] and not page.sections[sid]["notes"], sid
    for sid in ("confusion", "augmentations", "embedding-map", "retrieval"):
        assert page.sections[sid]["notes"] and not page.sections[sid]["images"], sid
    assert "55.5" in (copy / "report.html").read_text()


def test_report_command_regenerates_and_rejects_non_runs(run, tmp_path, capsys):
    before = (run / "report.html").stat().st_mtime_ns
    assert main(["report", str(run), "--embeddings", "false"]) == 0
    assert (run / "report.html").stat().st_mtime_ns != before
    assert main(["report", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_embedding_map_and_queries_on_a_few_dozen_points():
    labels = torch.arange(36) % 3
    features = torch.nn.functional.one_hot(labels, 3).float() * 5 + torch.randn(36, 3) * 0.1
    idx = analysis.stratified_subsample(labels, 36, max_points=12)
    assert len(idx) == 12 and set(labels[idx].tolist()) == {0, 1, 2}
    coords = analysis.tsne_map(features)
    assert coords.shape == (36, 2) and np.isfinite(coords).all()
    # Well-separated classes stay separated: each point's nearest map neighbour shares its class.
    d = ((coords[:, None] - coords[None]) ** 2).sum(-1) + np.eye(36) * 1e9
    assert (labels.numpy()[d.argmin(1)] == labels.numpy()).all()
    queries = analysis.pick_queries(labels, 36, 6)
    assert len(set(queries.tolist())) == 6 and set(labels[queries[:3]].tolist()) == {0, 1, 2}


def test_report_reuses_the_features_evaluation_cached(run, monkeypatch):
    # `simclr run` evaluated this run, so both splits' features sit in RUN/features: the report
    # must read them instead of embedding the splits again.
    import simclr_kit.embed

    calls = []
    real = simclr_kit.embed.backbone_features
    monkeypatch.setattr(simclr_kit.embed, "backbone_features",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    assert main(["report", str(run), "--device", "cpu"]) == 0
    assert calls == []
    assert "t-SNE" in (run / "report.html").read_text()


def _section(text: str, sid: str) -> str:
    return text.split(f'<section id="{sid}">')[1].split("</section>")[0]


def test_report_opens_with_the_verdict_and_folds_the_config_at_the_end(run, tmp_path):
    """The sentence `simclr run` prints, the accuracies against the baseline, wall time and
    images/s come first; the config comes last, folded."""
    from simclr_kit.evaluation.tables import result_verdict

    copy = tmp_path / "run"
    copy.mkdir()
    for name in ("config.yaml", "metrics.jsonl"):
        (copy / name).write_bytes((run / name).read_bytes())
    hp = {"k": 5, "temperature": 0.1}
    result = {"checkpoint": str(run), "encoder": {"backbone": "resnet18"}, "results": [
        {"encoder": encoder, "protocol": protocol, "metric": "top1", "value": value,
         "split": "test", "seed": None, "hyperparameters": hp}
        for encoder, protocol, value in (("simclr", "knn", 61.25), ("random-init", "knn", 40.5),
                                         ("simclr", "linear", 70.0),
                                         ("random-init", "linear", 72.5))]}
    (copy / "eval.json").write_text(json.dumps(result))
    text = write_report(copy, embeddings=False).read_text()
    page = parse(copy / "report.html")
    assert list(page.sections)[0] == "result" and list(page.sections)[-1] == "config"
    sentence = result_verdict(result)
    assert sentence == ("SimCLR differs from a random-init resnet18 by +20.8 points (kNN) and "
                        "-2.5 (linear)")
    head = _section(text, "result")
    assert sentence in head and text.index(sentence) < text.index('<section id="curves">')
    for value in ("61.25%", "40.50%", "70.00%", "72.50%"):
        assert value in head
    assert "training wall time" in head and "images/s" in head
    config = _section(text, "config")
    assert "<details><summary>Resolved configuration (config.yaml)</summary><pre>" in config
    assert "<pre>" not in text.split('<section id="config">')[0]  # no YAML before it

    (copy / "eval.json").unlink()  # not evaluated yet: it says so, and how
    head = _section(write_report(copy, embeddings=False).read_text(), "result")
    assert f"Not evaluated yet: run  simclr evaluate {copy} --baseline random" in head


def test_a_run_on_unlabeled_images_is_not_told_to_monitor_knn(run, tmp_path):
    """--monitor-knn needs labels: for a run pretrained on unlabeled images the report points
    at an evaluation on a labelled set instead. Views are of epoch 1, as epochs are counted."""
    copy = tmp_path / "run"
    copy.mkdir()
    (copy / "config.yaml").write_bytes((run / "config.yaml").read_bytes())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    records[0]["dataset"]["label_column"] = None
    (copy / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    text = write_report(copy, embeddings=False).read_text()
    monitor = _section(text, "knn-monitor")
    assert "--monitor-knn" not in monitor and "needs labelled pretraining images" in monitor
    assert f"simclr evaluate {copy} --data LABELLED_DATASET" in monitor
    assert f"simclr evaluate {copy} --data LABELLED_DATASET --baseline random" in \
        _section(text, "result")
    views = _section((run / "report.html").read_text(), "augmentations")
    assert "in epoch 1." in views and "epoch 0" not in views


def test_evaluation_table_puts_encoders_side_by_side(run, tmp_path):
    copy = tmp_path / "run"
    copy.mkdir()
    for name in ("config.yaml", "metrics.jsonl"):
        (copy / name).write_bytes((run / name).read_bytes())
    hp = {"k": 5, "temperature": 0.1}
    rows = [{"encoder": encoder, "protocol": "knn", "metric": "top1", "value": value,
             "split": "test", "seed": None, "hyperparameters": hp}
            for encoder, value in (("simclr", 61.25), ("random-init", 40.5))]
    (copy / "eval.json").write_text(json.dumps({"checkpoint": str(run), "results": rows}))
    text = write_report(copy, embeddings=False).read_text()
    section = text.split('<section id="evaluation">')[1].split("</section>")[0]
    header = re.findall(r"<th>(.*?)</th>", section)
    assert header[:4] == ["protocol", "metric", "simclr", "random-init"]
    body = re.findall(r"<tr>(.*?)</tr>", section.split("<tbody>")[1])
    assert len(body) == 1 and "61.25%" in body[0] and "40.50%" in body[0]


def test_label_efficiency_names_each_subset_once_without_overlap(tmp_path, monkeypatch):
    from matplotlib.figure import Figure
    from matplotlib.text import Text

    from simclr_kit.evaluation.fractions import plot_label_efficiency

    drawn: list[Figure] = []
    real = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: drawn.append(self) or
                        real(self, *a, **k))
    subsets = [("1%", "fraction", 3), ("10%", "fraction", 30), ("100%", "fraction", 300),
               ("1-shot", "shots", 3), ("5-shot", "shots", 15), ("10-shot", "shots", 30)]
    rows = [{"encoder": encoder, "subset": name, "kind": kind, "labels": labels,
             "mean": 50.0 + labels / 10 + shift, "std": 1.0}
            for encoder, shift in (("simclr", 0.0), ("random-init", -0.5))
            for name, kind, labels in subsets]
    plot_label_efficiency(rows, tmp_path / "le.png")
    fig = drawn[0]
    renderer = fig.canvas.get_renderer()
    known = {name for name, _, _ in subsets}
    texts = [t for t in fig.findobj(Text) if t.get_visible() and t.get_text()
             and set(t.get_text().split(" / ")) <= known]
    names = [n for t in texts for n in t.get_text().split(" / ")]
    assert sorted(names) == sorted(name for name, _, _ in subsets)  # once each
    boxes = [t.get_window_extent(renderer) for t in texts]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert not a.overlaps(b), "subset labels overlap"
