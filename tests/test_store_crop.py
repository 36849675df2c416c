"""Random resized crops from images stored larger than the training size (``--store-size``):
the boxes are torchvision's RandomResizedCrop boxes on the stored image, and each view is
torchvision's resized crop of that box, down to the training size."""

from __future__ import annotations

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import RandomResizedCrop

from simclr_kit.augment import SimCLRAugment
from simclr_kit.config import AugmentConfig
from simclr_kit.data.rows_view import rows_at_size
from simclr_kit.data.store import resize_center_crop

TRAIN, STORED, N = 32, 48, 64
ATOL = 1e-5  # float32 rounding on the [0, 1] scale, as in test_augment.py
CROP_AND_FLIP = AugmentConfig(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0)


def _stored_images(n: int = N) -> torch.Tensor:
    """``(n, 3, STORED, STORED)`` uint8: 70 x 55 photos stored as the decoder stores them."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        photo = rng.integers(0, 255, (55, 70, 3), dtype=np.uint8)
        out.append(resize_center_crop(photo, STORED).transpose(2, 0, 1))
    return torch.from_numpy(np.stack(out))


def test_views_are_torchvision_resized_crops_of_the_stored_image():
    images, idx = _stored_images(), torch.arange(N)
    augment = SimCLRAugment(CROP_AND_FLIP, TRAIN, (0.0,) * 3, (1.0,) * 3, seed=5)
    views = augment(images, idx, 3)
    for view in (0, 1):
        params = augment.sample_params(idx, 3, view, STORED, STORED)
        assert (params["crop"][:, 2] > TRAIN).any(), "some crops are larger than the views"
        for k in range(N):
            ref = TF.resized_crop(images[k].float() / 255, *params["crop"][k].tolist(),
                                  [TRAIN, TRAIN], antialias=True)
            ref = TF.horizontal_flip(ref) if params["flip"][k] else ref
            assert views[view][k].shape == (3, TRAIN, TRAIN)
            assert (views[view][k] - ref).abs().max() <= ATOL


def test_crop_boxes_follow_random_resized_crop_on_the_stored_image():
    n_ours, n_tv = 20000, 3000
    augment = SimCLRAugment(CROP_AND_FLIP, TRAIN, (0.0,) * 3, (1.0,) * 3)
    box = augment.sample_params(torch.arange(n_ours), 0, 0, STORED, STORED)["crop"].double()
    torch.manual_seed(0)
    ref = torch.tensor([RandomResizedCrop.get_params(torch.zeros(3, STORED, STORED),
                                                     [0.08, 1.0], [3 / 4, 4 / 3])
                        for _ in range(n_tv)], dtype=torch.float64)
    assert (box[:, 0] + box[:, 2] <= STORED).all() and (box[:, 1] + box[:, 3] <= STORED).all()

    def stats(b: torch.Tensor) -> torch.Tensor:  # area fraction, log aspect, centre row, centre col
        return torch.stack([b[:, 2] * b[:, 3] / STORED**2, torch.log(b[:, 3] / b[:, 2]),
                            b[:, 0] + b[:, 2] / 2, b[:, 1] + b[:, 3] / 2], 1)

    a, r = stats(box), stats(ref)
    z = (a.mean(0) - r.mean(0)).abs() / torch.sqrt(a.var(0) / n_ours + r.var(0) / n_tv)
    assert (z < 4).all(), f"z-scores {z.tolist()} (area, log ratio, centre y, centre x)"
    # On the stored image, not on a training-size one: the mean box side follows the stored side.
    assert abs(a[:, 0].mean() - r[:, 0].mean()) < 0.02
    assert abs(box[:, 2].mean() / STORED - ref[:, 2].mean() / STORED) < 0.02


def test_monitor_keys_see_the_stored_images_at_the_training_size():
    """Keys of the kNN monitor: rows of the stored set, resized to the training size batch by
    batch, show what evaluation's centre crop at the training size shows."""
    yy, xx = np.mgrid[0:55, 0:70].astype(np.float32)
    photos = [np.stack([xx * 3.6, yy * 4.6, (xx + yy) * 2.0 + 10 * k], -1).clip(0, 255)
              .astype(np.uint8) for k in range(4)]  # smooth: resampling twice costs little
    stored = torch.from_numpy(np.stack([resize_center_crop(p, STORED).transpose(2, 0, 1)
                                        for p in photos]))
    rows = torch.tensor([3, 1])
    view = rows_at_size(stored, rows, TRAIN)
    assert view.shape == (2, 3, TRAIN, TRAIN) and len(view) == 2
    keys = torch.cat([view[0:1], view[torch.tensor([1])]])
    for key, row in zip(keys, rows.tolist()):
        evaluation = np.array(resize_center_crop(photos[row], TRAIN)).transpose(2, 0, 1)
        # 0.7 levels here; a 32-px centre crop of the stored 48 px would be 16 levels off.
        assert (key.float() - torch.from_numpy(evaluation).float()).abs().mean() < 1.5
    assert rows_at_size(stored, None, STORED) is stored  # all rows, stored at the size: as is
    same = rows_at_size(stored, rows, STORED)
    assert torch.equal(same[0:2], stored[rows])
