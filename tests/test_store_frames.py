"""How images are stored and evaluated: the training frame's side (never enlarged, the same
whether a default was typed out or not), JPEGs decoded at a reduced scale, and the standard
evaluation crop (torchvision's Resize + CenterCrop) in decode_split and load_encoder's
transform."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, JpegImagePlugin
from torchvision import transforms

from simclr_kit.config import DataConfig
from simclr_kit.data.pixels import Layout, decode_image, to_rgb_array
from simclr_kit.data.size_policy import training_sizes
from simclr_kit.data.splits import open_splits
from simclr_kit.data.store import decode_split
from simclr_kit.models.encoder import Encoder


def _folder(root: Path, shapes: list[tuple[int, int]], fmt: str = "PNG", seed: int = 0) -> Path:
    """A flat folder of smooth random images of ``(height, width)`` shapes."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for k, (h, w) in enumerate(shapes):
        small = rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((w, h), Image.BILINEAR)
        img.save(root / f"img{k:03d}.{fmt.lower()}", fmt)
    return root


def _train(folder: Path):
    train, _ = open_splits(DataConfig(data=str(folder)), need_eval=False)
    return train


def test_own_size_images_are_stored_at_their_size_typed_or_not(tmp_path):
    square = _train(_folder(tmp_path / "224", [(224, 224)] * 3))
    assert training_sizes(square, None, None) == (224, 224)  # not interpolated up to 256
    small = _train(_folder(tmp_path / "96", [(96, 96)] * 3))
    assert training_sizes(small, None, None) == training_sizes(small, 96, None) == (96, 96)
    stores = [decode_split(small, progress=False, labels=False,
                           layout=Layout.frame(training_sizes(small, typed, None)[1]))
              for typed in (None, 96)]
    assert torch.equal(stores[0].images, stores[1].images)
    photos = _train(_folder(tmp_path / "photos", [(375, 500), (500, 375), (360, 640)]))
    assert training_sizes(photos, None, None) == training_sizes(photos, 224, None) == (224, 448)
    assert training_sizes(photos, 160, None) == (160, 320)
    assert training_sizes(photos, 32, None) == (32, 64)


def test_a_frame_is_never_enlarged_and_keeps_the_aspect_ratio(tmp_path):
    split = _train(_folder(tmp_path / "mixed", [(30, 40), (375, 500), (500, 375), (90, 160)]))
    got = decode_split(split, progress=False, labels=False, layout=Layout.frame(128))
    assert got.images.shape == (4, 3, 128, 128)
    assert got.sizes.tolist() == [[30, 40], [96, 128], [128, 96], [72, 128]]
    assert int(got.images[0, :, 30:].sum()) == int(got.images[0, :, :, 40:].sum()) == 0


def _exact(img: Image.Image, layout: Layout) -> np.ndarray:
    """The image in ``layout``'s form from its full-size decode (no JPEG draft)."""
    arr = to_rgb_array(img)
    return layout.fit(arr, layout.target(*arr.shape[:2]))


@pytest.mark.parametrize("layout", [Layout.frame(256), Layout.crop(96)])
def test_big_jpegs_are_decoded_reduced_and_match_the_exact_path(tmp_path, monkeypatch, layout):
    folder = _folder(tmp_path / "big", [(1800, 2400)], fmt="JPEG")
    png = _folder(tmp_path / "png", [(1800, 2400)], fmt="PNG")
    scales: list[tuple[int, int]] = []
    real = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        full = self.size
        out = real(self, mode, size)
        scales.append((full[0] // self.size[0], full[1] // self.size[1]))
        return out

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    with Image.open(folder / "img000.jpeg") as img:
        reduced = decode_image(img, layout)
    with Image.open(folder / "img000.jpeg") as img:
        img.load()  # loaded: a draft no longer applies
        exact = _exact(img, layout)
    assert scales and scales[0][0] >= 2 and scales[0][0] == scales[0][1]
    assert reduced.shape == exact.shape
    assert np.abs(reduced.astype(int) - exact.astype(int)).mean() < 2.0
    scales.clear()
    with Image.open(png / "img000.png") as img:  # other formats: decoded whole, exactly
        assert np.array_equal(decode_image(img, layout), _exact(img, layout))
    assert not scales


def test_exif_rotated_jpegs_keep_their_orientation_when_reduced(tmp_path):
    photo = np.zeros((1200, 1600, 3), np.uint8)
    photo[:, :800] = (255, 0, 0)  # left half red, as stored in the file
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90 degrees clockwise: the red half on top
    Image.fromarray(photo).save(tmp_path / "turned.jpg", exif=exif, quality=95)
    with Image.open(tmp_path / "turned.jpg") as img:
        frame = decode_image(img, Layout.frame(200))
    assert frame.shape == (200, 150, 3)  # portrait, as shown
    assert frame[:90, :, 0].mean() > 240 and frame[110:, :, 0].mean() < 15


SHAPES = {"4:3": (150, 200), "3:4": (200, 150), "16:9": (135, 240), "square": (130, 130)}


@pytest.mark.parametrize("size,fraction", [(96, 0.875), (72, 0.875), (80, 0.9), (96, 1.0),
                                           (32, 0.875)])
def test_evaluation_crop_is_torchvisions_resize_and_center_crop(tmp_path, size, fraction):
    """decode_split and load_encoder's transform (PIL and uint8 tensor inputs) against
    torchvision's Resize(round(S / f)) + CenterCrop(S) on the PNG (at 64 px and below:
    Resize(S))."""
    folder = _folder(tmp_path / "eval", list(SHAPES.values()))
    side = size if size <= 64 else round(size / fraction)
    reference = transforms.Compose([transforms.Resize(side), transforms.CenterCrop(size)])
    originals = [Image.open(p).convert("RGB") for p in sorted(folder.iterdir())]
    expected = torch.stack([torch.from_numpy(np.array(reference(im))).permute(2, 0, 1)
                            for im in originals])
    split = _train(folder)
    decoded = decode_split(split, size, progress=False, labels=False, crop_fraction=fraction)
    encoder = Encoder(torch.nn.Flatten(), size, (0.5,) * 3, (0.5,) * 3,
                      {"crop_fraction": fraction})
    from_pil = encoder.to_uint8(originals)
    for got in (decoded.images, from_pil):
        assert got.shape == expected.shape
        assert (got.int() - expected.int()).abs().max() <= 1  # uint8 rounding only
    for im in originals:  # tensors of any shape: torchvision's tensor Resize + CenterCrop
        x = torch.from_numpy(np.array(im)).permute(2, 0, 1).contiguous()
        assert (encoder.to_uint8(x)[0].int() - reference(x).int()).abs().max() <= 1
    assert Encoder(torch.nn.Flatten(), 72, (0.5,) * 3, (0.5,) * 3).crop_fraction == 0.875
