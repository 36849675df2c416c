"""Some rows of a uint8 image set, seen at another size, read batch by batch without a copy.

The kNN monitor embeds (up to 50,000) rows of the training set: indexing a mapped store with
them would copy those rows into process memory (9.8 GB at 256 px), and training images stored
larger than the training size (``--store-size``) must be seen at the training size, as
evaluation sees its images. :func:`rows_at_size` gives what
:func:`~simclr_kit.evaluation.features.extract_features` reads: ``shape`` and ``[part]``.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F


class ResizedRows:
    """Rows ``rows (K,)`` of ``images (N, 3, H, W) uint8`` as ``(K, 3, size, size)`` uint8.

    A stored square resized to ``size`` (antialiased bilinear, rounded back to uint8) shows what
    evaluation's centre crop at ``size`` shows: the shorter side of the photo, centred.
    """

    def __init__(self, images: Tensor, rows: Tensor | None, size: int) -> None:
        self.images, self.size = images, size
        self.rows = rows.to(images.device) if rows is not None else None
        count = len(images) if rows is None else len(rows)
        self.shape = (count, 3, size, size)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, part: slice | Tensor) -> Tensor:
        if self.rows is not None:
            part = self.rows[part.to(self.rows.device) if isinstance(part, Tensor) else part]
        elif isinstance(part, Tensor):
            part = part.to(self.images.device)
        batch = self.images[part]  # (b, 3, H, W) uint8
        if batch.shape[-1] == self.size:
            return batch
        x = F.interpolate(batch.float(), size=(self.size, self.size), mode="bilinear",
                          antialias=True, align_corners=False)
        return x.round_().clamp_(0, 255).to(torch.uint8)


def rows_at_size(images: Tensor, rows: Tensor | None, size: int) -> Tensor | ResizedRows:
    """``images`` itself when it is all rows at ``size``, else a :class:`ResizedRows` view."""
    if rows is None and images.shape[-1] == size:
        return images
    return ResizedRows(images, rows, size)
