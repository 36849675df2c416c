"""SimCLRAugment: both views of a batch, on the images' device, by walking the recipe's ops.

Per (sample, view) it draws one row of keyed uniforms, hands each op its columns to sample its
parameters, then applies the active ops in order and normalises. Also ``save_view_grid``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import Tensor

from simclr_kit.augment.filters import blur_kernel_size
from simclr_kit.augment.keyed import keyed_uniforms
from simclr_kit.augment.op import Frame, Op, slot_layout
from simclr_kit.augment.recipe import OPS
from simclr_kit.augment.stats import normalize_
from simclr_kit.config import AugmentConfig

_CPU_CHUNK_PIXELS = 128 * 32 * 32  # output pixels per CPU chunk: 0.5 MB per float plane


def _on_cpu_chunks(work: Callable[[slice], None], n: int, size: int) -> None:
    """Run ``work`` on slices of the batch of ``n`` views of side ``size``, on worker threads.

    On CPU, fresh full-batch buffers cost more (page faults) than the arithmetic filling them, and
    per-op OpenMP barriers stall whenever another process holds a core; cache-sized chunks on one
    thread each avoid both. Samples never interact, so the results do not depend on the chunking.
    """
    chunk = max(1, _CPU_CHUNK_PIXELS // (size * size))

    def run(start: int) -> None:
        torch.set_num_threads(1)  # this worker thread only; the caller's setting is untouched
        work(slice(start, start + chunk))

    starts = range(0, n, chunk)
    with ThreadPoolExecutor(max(1, min(torch.get_num_threads(), len(starts)))) as pool:
        list(pool.map(run, starts))


class SimCLRAugment:
    """Two SimCLR views per image, computed in batches on the images' device.

    Args:
        config: the augmentation settings; size-dependent ``None`` fields are resolved here with
            ``config.resolved(image_size)``.
        image_size: side S of the square output views, in pixels.
        mean, std: per-channel normalisation on the [0, 1] scale (see :func:`channel_stats`).
        seed: root of the keyed randomness; with the epoch and a sample's index it fixes the
            sample's views, whatever the batching, device or number of processes.
        ops: the recipe, applied in order (default ``OPS``); the first op must be the crop.
    """

    def __init__(self, config: AugmentConfig, image_size: int, mean: Sequence[float],
                 std: Sequence[float], seed: int = 0, *, ops: Sequence[Op] = OPS) -> None:
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1 pixel, got {image_size}")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean and std need 3 values each, std > 0; got {mean}, {std}")
        self.config = config.resolved(image_size)
        self.image_size = image_size
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.seed = int(seed)
        self.blur_kernel_size = blur_kernel_size(image_size)
        self.ops = tuple(ops)
        self.columns = slot_layout(self.ops)  # op name -> its columns of the uniform draws
        self.slots = sum(op.slots for op in self.ops)

    def __call__(self, images: Tensor, indices: Tensor, epoch: int,
                 sizes: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Both views of a batch: uint8 ``(B, 3, H, W)`` -> two float32 ``(B, 3, S, S)``.

        ``indices (B,)`` int64 are the samples' dataset row numbers, the key of their randomness.
        ``sizes (B, 2)`` int: each image's valid ``(height, width)`` at the top-left of its slot
        (training frames), whose crops are drawn over that part only; None: every image fills
        ``H x W``.
        """
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images (B, 3, H, W), got {images.dtype} "
                             f"{tuple(images.shape)}")
        if indices.shape != images.shape[:1]:
            raise ValueError(f"expected indices of shape ({len(images)},), "
                             f"got {tuple(indices.shape)}")
        if sizes is not None and sizes.shape != (len(images), 2):
            raise ValueError(f"expected sizes of shape ({len(images)}, 2), "
                             f"got {tuple(sizes.shape)}")
        indices = indices.to(images.device, non_blocking=True)  # staged: no wait on the GPU
        if sizes is not None:
            sizes = sizes.to(images.device, non_blocking=True)
        n, size = len(images), self.image_size
        if images.device.type != "cpu":
            both = self._views(images, indices, epoch, sizes)
            return both[:n], both[n:]
        first, second = (torch.empty((n, 3, size, size)) for _ in range(2))

        def chunk(part: slice) -> None:
            both = self._views(images[part], indices[part], epoch,
                               None if sizes is None else sizes[part])
            first[part], second[part] = both.chunk(2)

        _on_cpu_chunks(chunk, n, size)
        return first, second

    def _views(self, images: Tensor, indices: Tensor, epoch: int,
               sizes: Tensor | None) -> Tensor:
        """Views 0 and 1 stacked, ``(2B, 3, S, S)``: one pass halves the launches per view."""
        both = None if sizes is None else torch.cat([sizes, sizes])  # rows as the draws: view 0, 1
        params = self._sample(indices, epoch, (0, 1), *images.shape[2:], both)
        return self._apply(torch.cat([images, images]), params)

    def sample_params(self, indices: Tensor, epoch: int, view: int, height: int,
                      width: int, sizes: Tensor | None = None) -> dict[str, Tensor]:
        """Per-sample parameters of one view of ``(height, width)`` images, on indices' device;
        ``sizes (N, 2)``: each image's own valid ``(height, width)`` (see ``__call__``).

        Every op's parameters, active or not, each under its own keys (see the ops' docstrings);
        with the default recipe: ``crop (N, 4)`` int64 boxes (top, left, height, width); bool
        ``(N,)`` flags ``flip``, ``jitter``, ``grayscale``, ``blur``, ``solarize``; float32 ``(N,)``
        factors ``brightness``, ``contrast``, ``saturation`` (uniform in torchvision's range
        [max(0, 1 - x), 1 + x]), ``hue`` ([-x, x]) and blur ``sigma``; ``order (N, 4)`` int64, the
        jitter ops (0 brightness, 1 contrast, 2 saturation, 3 hue) in the order they are applied.
        """
        return self._sample(indices, epoch, (view,), height, width, sizes)

    def _sample(self, indices: Tensor, epoch: int, views: tuple[int, ...], height: int,
                width: int, sizes: Tensor | None = None) -> dict[str, Tensor]:
        u = keyed_uniforms(indices, self.seed, epoch, views, self.slots)  # (len(views) * N, slots)
        frame = Frame(height, width, self.image_size, sizes)
        params: dict[str, Tensor] = {}
        for op in self.ops:
            params.update(op.sample(u[:, self.columns[op.name]], self.config, frame))
        return params

    def apply(self, images: Tensor, params: dict[str, Tensor]) -> Tensor:
        """One view per image from parameters: uint8 ``(N, 3, H, W)`` -> float32 ``(N, 3, S, S)``.

        Deterministic given ``params`` (as from :meth:`sample_params`). Operations that are off
        under the config (probability, or jitter range, 0) are skipped, whatever their flags say;
        the flip is the crop's doing, so its flags always count. Needs no ``sizes``: the crop
        boxes already lie inside each image, and nothing outside a box is read.
        """
        p = {k: v.to(images.device) for k, v in params.items()}
        if images.device.type != "cpu":
            return self._apply(images, p)
        out = torch.empty((len(images), 3, self.image_size, self.image_size))

        def chunk(part: slice) -> None:
            out[part] = self._apply(images[part], {k: v[part] for k, v in p.items()})

        _on_cpu_chunks(chunk, len(images), self.image_size)
        return out

    def _apply(self, images: Tensor, p: dict[str, Tensor]) -> Tensor:
        frame = Frame(images.shape[2], images.shape[3], self.image_size)
        x = images  # the crop makes float32 (N, 3, S, S) of the uint8 (N, 3, H, W)
        for op in self.ops:
            if op.active(self.config):
                x = op.apply(x, p, self.config, frame)
        return normalize_(x, self.mean, self.std)


def save_view_grid(images: Tensor, augment: SimCLRAugment, path: str | Path,
                   epoch: int = 0, sizes: Tensor | None = None) -> None:
    """Write a PNG with one row per image: the original, view 1 and view 2 (de-normalised).

    ``images``: uint8 ``(B, 3, H, W)``; their sample indices are taken as 0..B-1. ``sizes
    (B, 2)``: each image's valid ``(height, width)`` (training frames): the original column
    shows that part.
    """
    from matplotlib.figure import Figure  # lazily: plotting is not on the training path

    images = images.cpu()
    views = augment(images, torch.arange(len(images)), epoch, sizes)
    mean = torch.tensor(augment.mean)[:, None, None]
    std = torch.tensor(augment.std)[:, None, None]
    fig = Figure(figsize=(3 * 1.5, len(images) * 1.5))
    axes = fig.subplots(len(images), 3, squeeze=False)
    for row, image in enumerate(images):
        if sizes is not None:
            image = image[:, :int(sizes[row, 0]), :int(sizes[row, 1])]
        cells = [image.float() / 255.0] + [(v[row] * std + mean).clamp(0.0, 1.0) for v in views]
        for ax, cell, title in zip(axes[row], cells, ("original", "view 1", "view 2")):
            ax.imshow(cell.permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_axis_off()
            if row == 0:
                ax.set_title(title, fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
