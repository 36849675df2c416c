"""``simclr embed`` against the encoder itself, and what ``simclr pretrain`` leaves behind."""

from __future__ import annotations

import io
import json
from importlib.util import find_spec

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import TINY
from simclr_kit.checkpoint_files import latest_checkpoint
from simclr_kit.cli import main
from simclr_kit.models.encoder import load_encoder
from simclr_kit.models.heads import SimCLR
from simclr_kit.report.metrics import read_metrics

HAS_TENSORBOARD = find_spec("tensorboard") is not None


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "run"
    loggers = ["--logger", "tensorboard"] if HAS_TENSORBOARD else []
    assert main(["pretrain", "--data", str(data), "--out", str(out), "--epochs", "1", *TINY,
                 *loggers]) == 0
    return out


def reference_images(data, split: str) -> list[Image.Image]:
    """The split's images read straight from the Parquet file, independently of the package."""
    table = pq.read_table(data / f"{split}.parquet")
    return [Image.open(io.BytesIO(cell["bytes"])) for cell in table.column("img").to_pylist()]


def test_parquet_rows_ids_and_values_equal_the_encoder(run, data, tmp_path):
    out = tmp_path / "emb.parquet"
    assert main(["embed", str(run), "--data", str(data), "--out", str(out), "--split", "test",
                 "--projections", "--batch-size", "5", "--device", "cpu"]) == 0
    table = pq.read_table(out)
    images = reference_images(data, "test")
    encoder = load_encoder(run)
    assert table.num_rows == len(images) == 24
    assert table.column("id").to_pylist() == list(range(24))
    assert set(table.column("split").to_pylist()) == {"test"}
    labels = pq.read_table(data / "test.parquet").column("label").to_pylist()
    assert table.column("label").to_pylist() == labels
    assert table.column("class_name").to_pylist() == [f"c{i}" for i in labels]

    features = np.stack(table.column("feature").to_numpy(zero_copy_only=False))
    assert features.shape == (24, encoder.feature_dim) and features.dtype == np.float32
    with torch.no_grad():
        expected = encoder(encoder.transform(images))
        # Projections: the whole SimCLR module, rebuilt from the checkpoint file, in eval mode.
        model = SimCLR(encoder.backbone, encoder.feature_dim, projection_dim=16).eval()
        weights = load_file(str(latest_checkpoint(run) / "model.safetensors"))
        model.load_state_dict(weights, strict=True)
        expected_z = model(encoder.transform(images))
    assert np.allclose(features, expected.numpy(), rtol=1e-4, atol=1e-5)
    projections = np.stack(table.column("projection").to_numpy(zero_copy_only=False))
    assert np.allclose(projections, expected_z.numpy(), rtol=1e-4, atol=1e-5)
    meta = json.loads(table.schema.metadata[b"simclr_kit"])
    assert meta["feature_dim"] == encoder.feature_dim and meta["class_names"] == ["c0", "c1", "c2"]


def test_npy_format_writes_the_same_rows(run, data, tmp_path):
    parquet, npy = tmp_path / "a.parquet", tmp_path / "b.npy"
    for out in (parquet, npy):
        assert main(["embed", str(run), "--data", str(data), "--out", str(out),
                     "--device", "cpu"]) == 0
    table = pq.read_table(parquet)
    features = np.load(npy)
    assert features.shape == (24, 512)
    assert np.array_equal(np.load(tmp_path / "b.ids.npy"), table.column("id").to_numpy())
    assert np.array_equal(np.load(tmp_path / "b.labels.npy"), table.column("label").to_numpy())
    assert np.allclose(features, np.stack(table.column("feature").to_numpy(zero_copy_only=False)))
    meta = json.loads((tmp_path / "b.json").read_text())
    assert meta["split"] == "train" and meta["rows"] == 24 and "projections" not in meta["files"]
    # Without --data: the run's own dataset (the one it was pretrained on), the same rows.
    own = tmp_path / "own.npy"
    assert main(["embed", str(run), "--out", str(own), "--device", "cpu"]) == 0
    assert np.array_equal(np.load(own), features)
    assert np.array_equal(np.load(tmp_path / "own.ids.npy"), np.load(tmp_path / "b.ids.npy"))


def test_projections_need_a_pretraining_checkpoint(run, data, tmp_path, capsys):
    backbone = tmp_path / "bb.safetensors"
    assert main(["export", str(run), str(backbone)]) == 0
    assert main(["embed", str(backbone), "--data", str(data), "--out", str(tmp_path / "e.parquet"),
                 "--projections"]) == 2
    assert "projection head" in capsys.readouterr().err
    assert main(["embed", str(run), "--data", str(data), "--out", str(tmp_path / "e.parquet"),
                 "--format", "npy"]) == 2


def test_pretrain_writes_the_quick_report(run):
    """The report at the end of pretraining has the data-free sections and says how to get the
    embedding ones."""
    text = (run / "report.html").read_text()
    for sid in ("config", "hardware", "curves", "augmentations", "embedding-map", "retrieval"):
        assert f'<section id="{sid}">' in text
    retrieval = text.split('<section id="retrieval">')[1]
    assert f"simclr report {run}" in retrieval and "<img" not in retrieval
    assert "<img" in text.split('<section id="augmentations">')[1].split("</section>")[0]


@pytest.mark.skipif(not HAS_TENSORBOARD, reason="tensorboard is not installed")
def test_pretrain_mirrors_metrics_to_tensorboard(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("train/loss")]
    train = [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"]
    assert [s for s, _ in logged] == [r["step"] for r in train]
    assert np.allclose([v for _, v in logged], [r["loss"] for r in train], rtol=1e-6)
    assert "done/wall_s" in events.Tags()["scalars"]


def test_an_image_folder_embeds_with_file_names_and_says_what_it_skipped(run, tmp_path, capsys):
    folder = tmp_path / "photos"
    rng = np.random.default_rng(1)
    for label in ("cat", "dog"):
        (folder / label).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (10, 10, 3), dtype=np.uint8)).save(
                folder / label / f"{i}.png")
    (folder / "dog" / "9_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 30)
    capsys.readouterr()
    for out in (tmp_path / "e.parquet", tmp_path / "e.npy"):
        assert main(["embed", str(run), "--data", str(folder), "--out", str(out),
                     "--device", "cpu"]) == 0
        text = capsys.readouterr().out  # the line pretraining prints for the same folder
        listed = tmp_path / "e.skipped.txt"
        assert "skipped 1 unreadable image(s) in 'train' (UnidentifiedImageError x1), kept 6" \
            in text and "no embedding" in text and f"listed in {listed}" in text
        rows = [line.split("\t") for line in listed.read_text().splitlines()]
        assert rows[0] == ["row", "file", "reason"] and len(rows) == 2
        assert rows[1][1] == str(folder / "dog" / "9_broken.png")
    expected = [str(folder / label / f"{i}.png") for label in ("cat", "dog") for i in range(3)]
    table = pq.read_table(tmp_path / "e.parquet")
    assert table.column("file").to_pylist() == expected
    assert table.column("class_name").to_pylist() == ["cat"] * 3 + ["dog"] * 3
    assert np.load(tmp_path / "e.files.npy").tolist() == expected
    assert json.loads((tmp_path / "e.json").read_text())["files"]["files"] == "e.files.npy"


def test_predict_on_a_labelled_folder_writes_files_and_true_labels(run, data, tmp_path):
    import csv

    cls = tmp_path / "cls"
    assert main(["train-classifier", str(run), "--data", str(data), "--out", str(cls),
                 "--epochs", "1", "--device", "cpu"]) == 0
    folder = tmp_path / "photos"
    for label in ("c0", "c2"):
        (folder / label).mkdir(parents=True)
        Image.new("RGB", (8, 8), (200, 10, 10)).save(folder / label / "x.png")
    assert main(["predict", str(cls), "--data", str(folder), "--out", str(tmp_path / "p.csv"),
                 "--device", "cpu"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    assert [(r["id"], r["label"]) for r in rows] == [(str(folder / "c0" / "x.png"), "c0"),
                                                     (str(folder / "c2" / "x.png"), "c2")]
