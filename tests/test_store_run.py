"""Pretraining end to end on the mapped store: streamed batches train exactly the weights that
batches held in memory train; training images are stored whole and never enlarged."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY, write_parquet_dataset, write_unlabeled_parquet
from simclr_kit.checkpoint_files import latest_checkpoint, load_weights
from simclr_kit.cli import main
from simclr_kit.models.encoder import load_encoder


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_weights(latest_checkpoint(run) / "model.safetensors")


@pytest.fixture(autouse=True)
def own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test counts the decoded files of its own runs only."""
    monkeypatch.setenv("SIMCLR_KIT_CACHE", str(tmp_path / "cache"))


def _stored_shapes() -> Counter:
    """How many decoded files of each shape the cache holds."""
    root = Path(os.environ["SIMCLR_KIT_CACHE"]) / "decoded"
    return Counter(np.load(f, mmap_mode="r").shape for f in root.glob("*/images.npy"))


def test_streamed_training_gives_the_weights_of_training_in_memory(tmp_path, capsys):
    data = write_unlabeled_parquet(tmp_path / "pq", count=24, size=8)
    for mode in ("off", "on"):
        assert main(["pretrain", "--data", str(data), "--out", str(tmp_path / mode),
                     "--epochs", "2", "--deterministic", "true", "--stream", mode, *TINY]) == 0
    assert "training images: streamed from the decoded file (--stream on)" in \
        capsys.readouterr().out
    on, off = _weights(tmp_path / "on"), _weights(tmp_path / "off")
    assert on.keys() == off.keys() and all(torch.equal(on[k], off[k]) for k in on)
    # --stream and --decode-workers may change on --resume (they change nothing learned).
    assert main(["pretrain", "--resume", str(tmp_path / "on"), "--epochs", "3", "--stream",
                 "off", "--decode-workers", "1"]) == 0


def test_above_64_px_training_images_are_stored_whole_never_enlarged_and_evaluated_cropped(
        tmp_path, capsys):
    data = write_parquet_dataset(tmp_path / "pq", n_per_class=8, classes=2, size=100)
    run = tmp_path / "run"
    assert main(["pretrain", "--data", str(data), "--out", str(run), "--epochs", "1",
                 "--image-size", "72", "--crop-fraction", "0.9", "--monitor-knn", "1", *TINY]) == 0
    # Training images whole at their own 100 px (the frame's cap, 2 x 72 = 144, is larger and
    # nothing is enlarged); the evaluation split as the centre crop at 72, the training size.
    shapes = _stored_shapes()
    assert shapes[(16, 3, 100, 100)] == 1 and shapes[(16, 3, 72, 72)] == 1
    meta = json.loads((latest_checkpoint(run) / "model.json").read_text())
    assert meta["image_size"] == 72 and meta["dataset"]["image_size"] == 100
    assert meta["store_size"] == 100 and meta["crop_fraction"] == 0.9
    assert load_encoder(run).crop_fraction == 0.9  # its transform crops as the run evaluated
    knn = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
           if '"knn"' in line]
    assert knn and knn[-1]["keys"] == 16 and knn[-1]["queries"] == 16
    assert main(["pretrain", "--data", str(data), "--out", str(tmp_path / "same"), "--epochs",
                 "1", "--image-size", "72", "--store-size", "72", *TINY]) == 0
    # The training split as whole frames at 72: a file of its own beside the evaluation crop.
    assert _stored_shapes()[(16, 3, 72, 72)] == 2
    capsys.readouterr()
    assert main(["pretrain", "--data", str(data), "--out", str(tmp_path / "small"),
                 "--image-size", "72", "--store-size", "64", *TINY]) == 2
    assert "--store-size 64 is below the training size 72 px" in capsys.readouterr().err


@pytest.mark.parametrize("flags,message", [
    (["--stream", "maybe"], "unknown stream setting 'maybe' (--stream): choose from 'auto', "
                            "'on', 'off'"),
    (["--decode-workers", "0"], "decode_workers = 0 is out of range: must be at least 1"),
    (["--store-size", "4"], "store_size = 4 is out of range"),
])
def test_bad_store_settings_are_one_line_before_any_data(flags, message, tmp_path, capsys):
    assert main(["pretrain", "--out", str(tmp_path / "run"), *flags, *TINY]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
