"""The standard evaluation crop end to end: a run pretrained above 64 px records its
``--crop-fraction``, and ``evaluate``, ``embed`` and ``predict`` see each photo as torchvision's
``Resize(round(S / f))`` + ``CenterCrop(S)`` makes it, with the run's f unless the flag is
given."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from conftest import TINY
from simclr_kit import classifier, embed
from simclr_kit.cli import main
from simclr_kit.data.store import ImageStore
from simclr_kit.models.encoder import load_encoder
from simclr_kit.evaluation import protocols

SIZE, FRACTION = 72, 0.9  # resized shorter side round(72 / 0.9) = 80, then the centre 72
SHAPES = [(90, 120), (120, 90), (81, 144)]  # 4:3, 3:4, 16:9


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two classes of 8 smooth photos each, of mixed shapes, in class folders."""
    root = tmp_path_factory.mktemp("photos") / "photos"
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for k in range(8):
            h, w = SHAPES[k % len(SHAPES)]
            small = rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)
            Image.fromarray(small).resize((w, h), Image.BILINEAR).save(root / c / f"{k}.png")
    return root


@pytest.fixture(scope="module")
def run(photos: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "run"
    assert main(["pretrain", "--data", str(photos), "--out", str(out), "--epochs", "1",
                 "--image-size", str(SIZE), "--crop-fraction", str(FRACTION),
                 "--monitor-knn", "0", *TINY]) == 0
    return out


def reference(files: list[str], fraction: float) -> torch.Tensor:
    """torchvision's evaluation crop of each file: ``(N, 3, SIZE, SIZE) uint8``."""
    crop = transforms.Compose([transforms.Resize(round(SIZE / fraction)),
                               transforms.CenterCrop(SIZE)])
    return torch.stack([torch.from_numpy(np.array(crop(Image.open(f).convert("RGB"))))
                        .permute(2, 0, 1) for f in files])


def assert_torchvision_crop(store: ImageStore, fraction: float) -> None:
    """The store's pixels are torchvision's crop at ``fraction`` (uint8 rounding only), and
    visibly not the crop at the other fraction."""
    expected = reference(store.files, fraction)
    assert store.images.shape == expected.shape
    assert (store.images.int() - expected.int()).abs().max() <= 1
    other = reference(store.files, 1.0 if fraction != 1.0 else FRACTION)
    assert (store.images.float() - other.float()).abs().mean() > 3  # the test can tell them apart


@pytest.fixture
def decoded(monkeypatch: pytest.MonkeyPatch) -> list[ImageStore]:
    """Every store that evaluate, embed, train-classifier and predict decode, in order."""
    stores: list[ImageStore] = []
    for module in (protocols, embed, classifier):
        real = module.decode_split

        def spy(*args, _real=real, **kwargs) -> ImageStore:
            store = _real(*args, **kwargs)
            stores.append(store)
            return store

        monkeypatch.setattr(module, "decode_split", spy)
    return stores


def _normalised(images: torch.Tensor, mean, std) -> torch.Tensor:
    x = images.float() / 255.0
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def test_evaluate_uses_and_records_the_runs_crop(run, photos, decoded, tmp_path):
    assert load_encoder(run).crop_fraction == FRACTION
    out = tmp_path / "eval"
    assert main(["evaluate", str(run), "--data", str(photos), "--out", str(out), "--protocols",
                 "knn", "--device", "cpu"]) == 0
    assert len(decoded) == 2  # the train and validation parts
    for store in decoded:
        assert_torchvision_crop(store, FRACTION)
    assert json.loads((out / "eval.json").read_text())["data"]["crop_fraction"] == FRACTION


def test_embed_features_are_the_encoders_on_torchvisions_crop(run, photos, decoded, tmp_path):
    encoder = load_encoder(run)
    for flag, fraction in (([], FRACTION), (["--crop-fraction", "1"], 1.0)):
        out = tmp_path / f"e{fraction}.npy"
        assert main(["embed", str(run), "--data", str(photos), "--out", str(out),
                     "--device", "cpu", *flag]) == 0
        assert_torchvision_crop(decoded[-1], fraction)
        files = np.load(tmp_path / f"e{fraction}.files.npy").tolist()
        with torch.no_grad():
            expected = encoder(_normalised(reference(files, fraction), encoder.mean, encoder.std))
        assert np.allclose(np.load(out), expected.numpy(), rtol=1e-3, atol=1e-4)


def test_predict_sees_torchvisions_crop_at_the_runs_fraction(run, photos, decoded, tmp_path):
    cls = tmp_path / "cls"
    assert main(["train-classifier", str(run), "--data", str(photos), "--out", str(cls),
                 "--epochs", "1", "--device", "cpu"]) == 0
    for store in decoded:
        assert_torchvision_crop(store, FRACTION)
    assert main(["predict", str(cls), "--data", str(photos), "--out", str(tmp_path / "p.csv"),
                 "--device", "cpu"]) == 0
    assert_torchvision_crop(decoded[-1], FRACTION)
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    model, meta = classifier.load_classifier(cls, "cpu")
    assert meta["crop_fraction"] == FRACTION
    with torch.no_grad():
        logits = model(_normalised(reference([r["id"] for r in rows], FRACTION), meta["mean"],
                                   meta["std"]))
    p, c = logits.softmax(1).max(1)
    assert [r["predicted"] for r in rows] == [meta["class_names"][int(k)] for k in c]
    assert np.allclose([float(r["probability"]) for r in rows], p.numpy(), atol=1e-4)
