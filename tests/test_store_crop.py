"""Random resized crops from training frames: each image stored whole (aspect ratio kept) at the
top-left of a padded slot. The boxes are torchvision's RandomResizedCrop boxes on each image's
own size, each view is torchvision's resized crop of that box, the padding never reaches a view,
and the views reach the parts of a photo outside its centre square."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms.transforms as tv_transforms
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torchvision.transforms import RandomResizedCrop

from simclr_kit.augment import SimCLRAugment, keyed_uniforms
from simclr_kit.config import AugmentConfig, DataConfig, PretrainConfig
from simclr_kit.data.pixels import Layout, frame_size, resize_center_crop
from simclr_kit.data.rows_view import rows_at_size

TRAIN, STORED, N = 32, 48, 64
ATOL = 1e-5  # float32 rounding on the [0, 1] scale, as in test_augment.py
CROP_AND_FLIP = AugmentConfig(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0)
SHAPES = [(55, 70), (70, 55), (27, 48), (48, 48), (4, 100), (100, 4), (9, 16)]


def _frames(photos: list[np.ndarray], side: int,
            pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(n, 3, side, side)`` uint8 slots holding the photos' frames (padding ``pad``) and their
    ``(n, 2)`` sizes, as the decoder stores them."""
    slots = np.full((len(photos), 3, side, side), pad, np.uint8)
    sizes = []
    for k, photo in enumerate(photos):
        frame = Layout.frame(side).fit(photo, frame_size(*photo.shape[:2], side))
        h, w = frame.shape[:2]
        slots[k, :, :h, :w] = frame.transpose(2, 0, 1)
        sizes.append([h, w])
    return torch.from_numpy(slots), torch.tensor(sizes, dtype=torch.int32)


def _photos(n: int = N, shapes: list[tuple[int, int]] = SHAPES[:3]) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 255, (*shapes[k % len(shapes)], 3), dtype=np.uint8) for k in range(n)]


def test_views_are_torchvision_resized_crops_of_each_whole_frame():
    images, sizes = _frames(_photos(), STORED)
    idx = torch.arange(N)
    augment = SimCLRAugment(CROP_AND_FLIP, TRAIN, (0.0,) * 3, (1.0,) * 3, seed=5)
    views = augment(images, idx, 3, sizes)
    for view in (0, 1):
        params = augment.sample_params(idx, 3, view, STORED, STORED, sizes)
        box = params["crop"]
        assert (box[:, 0] + box[:, 2] <= sizes[:, 0]).all(), "inside the image, not the padding"
        assert (box[:, 1] + box[:, 3] <= sizes[:, 1]).all()
        assert (box[:, 3] > TRAIN).any(), "some crops are larger than the views"
        for k in range(N):
            h, w = sizes[k].tolist()
            ref = TF.resized_crop(images[k, :, :h, :w].float() / 255, *box[k].tolist(),
                                  [TRAIN, TRAIN], antialias=True)
            ref = TF.horizontal_flip(ref) if params["flip"][k] else ref
            assert views[view][k].shape == (3, TRAIN, TRAIN)
            assert (views[view][k] - ref).abs().max() <= ATOL


def test_padding_never_reaches_a_view():
    """The same frames in slots padded with zeros and with a sentinel colour: identical views."""
    photos = _photos()
    zeros, sizes = _frames(photos, STORED, pad=0)
    sentinel, _ = _frames(photos, STORED, pad=255)
    assert not torch.equal(zeros, sentinel)
    augment = SimCLRAugment(AugmentConfig(), TRAIN, (0.4,) * 3, (0.2,) * 3, seed=1)
    for epoch in range(3):
        a = augment(zeros, torch.arange(N), epoch, sizes)
        b = augment(sentinel, torch.arange(N), epoch, sizes)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_full_sizes_give_the_views_of_no_sizes():
    """Square sets (CIFAR, digits) fill their slots: per-sample sizes change no bit of a view."""
    for side, out in ((8, 8), (32, 32), (8, 32)):
        images = torch.randint(0, 256, (40, 3, side, side), dtype=torch.uint8,
                               generator=torch.Generator().manual_seed(side))
        full = torch.tensor([[side, side]]).repeat(40, 1)
        augment = SimCLRAugment(AugmentConfig(), out, (0.5,) * 3, (0.25,) * 3, seed=3)
        plain = augment(images, torch.arange(40), 2)
        sized = augment(images, torch.arange(40), 2, full)
        assert torch.equal(plain[0], sized[0]) and torch.equal(plain[1], sized[1])


class _FedTorch:
    """``torch`` as torchvision's ``RandomResizedCrop.get_params`` sees it, drawing given
    uniforms in its own order: (area, ratio) per try, then top and left."""

    def __init__(self, u: list[float], columns: dict[str, int]) -> None:
        self.u, self.columns, self.draws, self.ints = u, columns, 0, 0

    def empty(self, *shape: int) -> "_FedTorch":
        return self

    def uniform_(self, low: torch.Tensor | float, high: torch.Tensor | float) -> torch.Tensor:
        k, kind = divmod(self.draws, 2)
        self.draws += 1
        x = self.u[self.columns["area" if kind == 0 else "ratio"] + k]
        low, high = float(low), float(high)
        return torch.tensor([low + (high - low) * x], dtype=torch.float64)

    def randint(self, low: int, high: int, size: tuple[int, ...]) -> torch.Tensor:
        x = self.u[self.columns["top" if self.ints == 0 else "left"]]
        self.ints += 1
        return torch.tensor([int(x * high)])

    def tensor(self, data: list[float]) -> torch.Tensor:  # the log-ratio bounds in float64
        return torch.tensor(data, dtype=torch.float64)

    def __getattr__(self, name: str):
        return getattr(torch, name)


def test_boxes_are_torchvisions_on_each_images_own_size(monkeypatch):
    """Per sample, the box torchvision's get_params draws on an image of that sample's own size
    from the same uniforms (its central fallback too: the 4 x 100 and 100 x 4 images)."""
    cfg = AugmentConfig(crop_scale_min=0.3)  # with 4 x 100 images, fallbacks happen
    augment = SimCLRAugment(cfg, TRAIN, (0.0,) * 3, (1.0,) * 3, seed=7)
    n = 350
    rng = np.random.default_rng(1)
    sizes = torch.tensor([SHAPES[k % len(SHAPES)] if k < 70 else tuple(rng.integers(1, 120, 2))
                          for k in range(n)], dtype=torch.int64)
    idx = torch.arange(n) * 3 + 11
    boxes = augment.sample_params(idx, 4, 1, 128, 128, sizes)["crop"]
    u = keyed_uniforms(idx, augment.seed, 4, (1,), augment.slots)[:, augment.columns["crop"]]
    columns = {"area": 0, "ratio": 10, "top": 20, "left": 21}
    fallbacks = 0
    for k in range(n):
        fed = _FedTorch(u[k].tolist(), columns)
        monkeypatch.setattr(tv_transforms, "torch", fed)
        h, w = sizes[k].tolist()
        expected = RandomResizedCrop.get_params(torch.zeros(3, h, w), [0.3, 1.0], [3 / 4, 4 / 3])
        monkeypatch.undo()
        fallbacks += fed.ints == 0
        assert boxes[k].tolist() == list(expected), f"sample {k}, image {h} x {w}"
    assert fallbacks >= 20, "the fallback was exercised"


@pytest.mark.parametrize("height,width", [(150, 200), (200, 150), (360, 640)])
def test_crop_boxes_follow_random_resized_crop_on_the_photo(height, width):
    """Distribution of boxes on a frame (stored at 0.4 x the photo) against torchvision's on the
    photo itself, in the photo's coordinates: area, log ratio, centre."""
    n_ours, n_tv = 20000, 3000
    fh, fw = frame_size(height, width, round(0.4 * max(height, width)))
    augment = SimCLRAugment(CROP_AND_FLIP, TRAIN, (0.0,) * 3, (1.0,) * 3)
    sizes = torch.tensor([[fh, fw]]).repeat(n_ours, 1)
    box = augment.sample_params(torch.arange(n_ours), 0, 0, max(fh, fw), max(fh, fw),
                                sizes)["crop"].double()
    torch.manual_seed(0)
    ref = torch.tensor([RandomResizedCrop.get_params(torch.zeros(3, height, width),
                                                     [0.08, 1.0], [3 / 4, 4 / 3])
                        for _ in range(n_tv)], dtype=torch.float64)

    def stats(b: torch.Tensor, h: int, w: int) -> torch.Tensor:  # on the unit square
        return torch.stack([b[:, 2] * b[:, 3] / (h * w), torch.log(b[:, 3] / b[:, 2] * h / w),
                            (b[:, 0] + b[:, 2] / 2) / h, (b[:, 1] + b[:, 3] / 2) / w], 1)

    a, r = stats(box, fh, fw), stats(ref, height, width)
    z = (a.mean(0) - r.mean(0)).abs() / torch.sqrt(a.var(0) / n_ours + r.var(0) / n_tv)
    assert (z < 4).all(), f"z-scores {z.tolist()} (area, log ratio, centre y, centre x)"


def _banded_photo(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Random colours whose red stays below 60%, and pure red outside the centre square."""
    photo = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    photo[..., 0] = photo[..., 0] * 150 // 255
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    red = np.ones((height, width), bool)
    red[top:top + side, left:left + side] = False
    photo[red] = (255, 0, 0)
    return photo


def test_training_views_reach_outside_the_centre_square(tmp_path):
    """On 4:3 and 3:4 photos whose bands outside the centre square are red, a sizeable part of
    the views that training steps see show red (torchvision on the originals: about 60%)."""
    from simclr_kit.train.loop import prepare, train_step

    rng = np.random.default_rng(0)
    folder = tmp_path / "photos"
    folder.mkdir()
    for k in range(32):
        shape = (150, 200) if k % 2 else (200, 150)
        Image.fromarray(_banded_photo(*shape, rng)).save(folder / f"p{k:02d}.png")
    cfg = PretrainConfig(data=DataConfig(data=str(folder), image_size=TRAIN), batch_size=32,
                         epochs=1, device="cpu", progress=False, projection_dim=16,
                         augment=CROP_AND_FLIP, out=str(tmp_path / "run"))
    t = prepare(cfg)
    seen: list[torch.Tensor] = []
    augment = t.augment

    def record(*args, **kwargs):
        views = augment(*args, **kwargs)
        seen.extend(views)
        return views

    t.augment = record  # type: ignore[assignment]
    for epoch in range(2):
        t.epoch = epoch
        for idx in t.batches.epoch(epoch, 0, t.steps_per_epoch):
            train_step(t, idx)
    mean = torch.tensor(augment.mean).view(1, 3, 1, 1)
    std = torch.tensor(augment.std).view(1, 3, 1, 1)
    views = torch.cat(seen) * std + mean  # (V, 3, S, S) on the [0, 1] scale
    red = (views[:, 0] > 0.8) & (views[:, 1] < 0.25) & (views[:, 2] < 0.25)
    shown = red.flatten(1).any(1).double().mean().item()
    assert len(views) == 128 and shown > 0.3, f"{shown:.0%} of the views show the bands"


def test_monitor_keys_are_the_evaluation_crop_of_each_frame():
    """Keys of the kNN monitor: rows of the stored frames, cropped and resized batch by batch,
    show what evaluation's crop of the original shows (at 64 px and below the whole shorter
    side; above, the centre 0.875 of it)."""
    yy, xx = np.mgrid[0:150, 0:200].astype(np.float32)
    photos = [np.stack([xx * 1.2, yy * 1.6, (xx + yy) * 0.6 + 10 * k], -1).clip(0, 255)
              .astype(np.uint8) for k in range(4)]  # smooth: resampling twice costs little
    photos[1] = photos[1].transpose(1, 0, 2).copy()  # one portrait
    for train, side, fraction in ((TRAIN, STORED, 0.875), (72, 144, 0.875), (72, 144, 1.0)):
        stored, sizes = _frames(photos, side)
        rows = torch.tensor([3, 1, 0])
        view = rows_at_size(stored, rows, train, sizes, fraction)
        assert view.shape == (3, 3, train, train) and len(view) == 3
        keys = torch.cat([view[0:1], view[torch.tensor([1, 2])]])
        for key, row in zip(keys, rows.tolist()):
            evaluation = resize_center_crop(photos[row], train, fraction).transpose(2, 0, 1)
            err = (key.float() - torch.from_numpy(evaluation.copy()).float()).abs().mean()
            # ~1 level here; the whole frame squeezed, or the wrong fraction, is 10+ levels off.
            assert err < 2.5, (train, fraction, row, float(err))
    square = torch.randint(0, 256, (5, 3, TRAIN, TRAIN), dtype=torch.uint8)
    full = torch.tensor([[TRAIN, TRAIN]]).repeat(5, 1)
    assert rows_at_size(square, None, TRAIN, full, 0.875) is square  # at <= 64 px: as is
    assert torch.equal(rows_at_size(square, torch.tensor([4, 2]), TRAIN, full)[0:2],
                       square[[4, 2]])
