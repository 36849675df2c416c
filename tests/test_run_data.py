"""Commands left without --data use the run's own dataset, never the embedded digits; an
evaluation on another dataset never replaces an earlier one; the report looks at the encoder
on the dataset the run was last evaluated on."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import TINY, write_unlabeled_parquet
from simclr_kit.cli import main

KNN = ["--protocols", "knn", "--knn-k", "3", "--device", "cpu"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A run pretrained on unlabeled images: evaluation needs another, labelled, dataset."""
    unlabeled = write_unlabeled_parquet(tmp_path_factory.mktemp("unlabeled") / "pq")
    out = tmp_path_factory.mktemp("runs") / "run"
    assert main(["pretrain", "--data", str(unlabeled), "--out", str(out), "--epochs", "1",
                 *TINY]) == 0
    return out


@pytest.fixture
def run(pretrained, tmp_path) -> Path:
    """A private copy: each test evaluates it its own way."""
    return Path(shutil.copytree(pretrained, tmp_path / "run"))


def _eval_source(run: Path) -> str:
    return json.loads((run / "eval.json").read_text())["data"]["data"]


def test_evaluate_without_data_takes_the_runs_dataset_not_digits(run, data, capsys):
    # Pretrained on unlabeled images and never evaluated: those images, which have no labels.
    assert main(["evaluate", str(run), *KNN]) == 2
    err = capsys.readouterr().err
    assert "has no label column" in err and "digits" not in err
    assert not (run / "eval.json").exists()

    assert main(["evaluate", str(run), "--data", str(data), *KNN]) == 0
    assert _eval_source(run) == str(data)
    # Evaluated once: evaluating again without --data means that labelled dataset.
    capsys.readouterr()
    assert main(["evaluate", str(run), "--protocols", "knn", "--knn-k", "5",
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert f"the run's own dataset {str(data)!r} (the one its last evaluation used)" in out
    result = json.loads((run / "eval.json").read_text())
    assert result["data"]["data"] == str(data) and result["eval"]["images"] == 24
    assert {r["hyperparameters"]["k"] for r in result["results"]} == {5}


def test_an_evaluation_of_another_dataset_never_replaces_one(run, data, tmp_path, capsys):
    assert main(["evaluate", str(run), "--data", str(data), *KNN]) == 0
    before = {name: (run / name).read_bytes() for name in ("eval.json", "eval.md")}
    capsys.readouterr()
    assert main(["evaluate", str(run), "--data", "digits", *KNN]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "would replace it" in err[0] and "--out" in err[0]
    assert {name: (run / name).read_bytes() for name in before} == before
    # The same folder spelled another way is the same dataset.
    respelled = data.parent / ".." / data.parent.name / data.name
    assert main(["evaluate", str(run), "--data", str(respelled), *KNN]) == 0
    assert main(["evaluate", str(run), "--data", "digits", "--out", str(tmp_path / "digits"),
                 *KNN]) == 0
    assert _eval_source(tmp_path / "digits") == "digits" and _eval_source(run) != "digits"


def test_train_classifier_without_data_uses_the_evaluated_dataset(run, data, tmp_path):
    assert main(["evaluate", str(run), "--data", str(data), *KNN]) == 0
    cls = tmp_path / "cls"
    assert main(["train-classifier", str(run), "--out", str(cls), "--epochs", "1",
                 "--device", "cpu"]) == 0
    meta = json.loads((cls / "classifier.json").read_text())
    assert meta["class_names"] == ["c0", "c1", "c2"]  # digits would be "0" .. "9"


def test_report_uses_the_dataset_of_the_last_evaluation(pretrained, run, data, capsys):
    # The quick report written by pretraining names the run in its hints, not "RUN".
    quick = (pretrained / "report.html").read_text()
    retrieval = quick.split('<section id="retrieval">')[1].split("</section>")[0]
    assert f"simclr report {pretrained}" in retrieval and "simclr report RUN" not in quick
    evaluation = quick.split('<section id="evaluation">')[1].split("</section>")[0]
    assert f"simclr evaluate {pretrained}" in evaluation

    assert main(["evaluate", str(run), "--data", str(data), *KNN]) == 0
    assert main(["report", str(run), "--device", "cpu"]) == 0
    page = (run / "report.html").read_text()
    for sid in ("confusion", "embedding-map", "retrieval"):
        section = page.split(f'<section id="{sid}">')[1].split("</section>")[0]
        assert "<img" in section and 'class="note"' not in section, sid
    # The augmented views still show the images the run was pretrained on.
    views = page.split('<section id="augmentations">')[1].split("</section>")[0]
    assert "<img" in views
