"""Some rows of the stored training set, seen as evaluation sees images, read batch by batch
without a copy.

The kNN monitor embeds (up to 50,000) rows of the training set: indexing a mapped store with
them would copy those rows into process memory (30 GB at 448 px), and the training images are
stored as whole frames (data/pixels.py), larger than the training size and of their own aspect
ratio, while evaluation sees the standard centre crop at the training size. :func:`rows_at_size`
gives what :func:`~simclr_kit.evaluation.features.extract_features` reads: ``shape`` and
``[part]``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from simclr_kit.augment.geometry import crop_resize
from simclr_kit.data.pixels import resize_side


def center_boxes(sizes: Tensor, size: int, crop_fraction: float) -> Tensor:
    """The evaluation crop's box in each stored frame: ``sizes (b, 2)`` -> ``(b, 4)`` int64
    (top, left, height, width).

    Evaluation resizes the shorter side to ``resize_side(size, f)`` and keeps the centre
    ``size`` square: on a frame that is the centred square of side shorter x size / that side.
    """
    sizes = sizes.to(torch.int64)
    shorter = sizes.min(dim=1).values
    side = torch.round(shorter.to(torch.float64) * (size / resize_side(size, crop_fraction)))
    side = side.to(torch.int64).clamp_(min=1)
    top = torch.round((sizes[:, 0] - side).to(torch.float64) / 2).to(torch.int64)
    left = torch.round((sizes[:, 1] - side).to(torch.float64) / 2).to(torch.int64)
    return torch.stack([top, left, side, side], dim=1)


class ResizedRows:
    """Rows ``rows (K,)`` of ``images (N, 3, L, L) uint8`` as ``(K, 3, size, size)`` uint8: the
    evaluation crop of each frame (:func:`center_boxes`, ``sizes (N, 2)`` their valid
    ``(height, width)``, None when every image fills its slot) resized to ``size`` with the
    crop's antialiased bilinear weights and rounded back to uint8.
    """

    def __init__(self, images: Tensor, rows: Tensor | None, size: int,
                 sizes: Tensor | None = None, crop_fraction: float = 1.0) -> None:
        self.images, self.size, self.crop_fraction = images, size, crop_fraction
        self.rows = rows.to(images.device) if rows is not None else None
        side = images.shape[-1]
        self.sizes = sizes if sizes is not None else torch.tensor([[side, side]]).expand(
            len(images), 2)
        count = len(images) if rows is None else len(rows)
        self.shape = (count, 3, size, size)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, part: slice | Tensor) -> Tensor:
        if self.rows is not None:
            part = self.rows[part.to(self.rows.device) if isinstance(part, Tensor) else part]
        elif isinstance(part, Tensor):
            part = part.to(self.images.device)
        batch = self.images[part]  # (b, 3, L, L) uint8
        sizes = self.sizes[part.cpu() if isinstance(part, Tensor) else part]
        box = center_boxes(sizes, self.size, self.crop_fraction).to(batch.device)
        x = crop_resize(batch, box, None, self.size)  # float32 (b, 3, size, size) on [0, 1]
        return x.mul_(255.0).round_().clamp_(0, 255).to(torch.uint8)


def rows_at_size(images: Tensor, rows: Tensor | None, size: int, sizes: Tensor | None = None,
                 crop_fraction: float = 1.0) -> Tensor | ResizedRows:
    """``images`` itself when it is all rows, each already its own evaluation crop at ``size``
    (every image fills a ``size`` slot and the crop keeps the whole of it), else a
    :class:`ResizedRows` view."""
    whole = sizes is None or bool((sizes == images.shape[-1]).all())
    if rows is None and images.shape[-1] == size and whole \
            and resize_side(size, crop_fraction) == size:
        return images
    return ResizedRows(images, rows, size, sizes, crop_fraction)
