"""Views per second: batched on-device SimCLR augmentation vs a per-image PIL pipeline.

The baseline is how peers feed SimCLR: a torch DataLoader whose workers (one per core) decode each
image from its stored JPEG/PNG bytes and run torchvision's RandomResizedCrop, RandomHorizontalFlip,
RandomApply(ColorJitter), RandomGrayscale (and GaussianBlur above 32 px), ToTensor and Normalize,
twice per image. simclr_kit instead decodes once to a uint8 tensor (not timed: the data path keeps
it) and augments whole batches on the device. Both use the same recipe, images and machine.

    python bench/augment.py --device cpu --image-size 32 --batch-size 512
    python bench/augment.py --device cuda --data ../shared/datasets/cifar10
"""

from __future__ import annotations

import argparse
import io
import os
import time

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from simclr_kit.augment import SimCLRAugment, blur_kernel_size
from simclr_kit.config import AugmentConfig

MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)


def load_bytes(data: str | None, count: int, size: int, seed: int = 0) -> list[bytes]:
    """Encoded images: the first ``count`` of a Parquet dataset, else smooth random PNGs."""
    if data:
        import datasets

        ds = datasets.load_dataset("parquet", data_dir=data, split="train")
        column = next(k for k, f in ds.features.items() if isinstance(f, datasets.Image))
        ds = ds.cast_column(column, datasets.Image(decode=False))
        return [row[column]["bytes"] for row in ds.select(range(min(count, len(ds))))]
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        # Low-frequency colour blobs compress and decode like photos, unlike white noise.
        small = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
        buf = io.BytesIO()
        small.resize((size, size), Image.BICUBIC).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def decode(blobs: list[bytes], size: int) -> torch.Tensor:
    """Decode once to uint8 ``(N, 3, size, size)`` (what the data store holds)."""
    arrays = [np.asarray(Image.open(io.BytesIO(b)).convert("RGB").resize((size, size)))
              for b in blobs]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


class TwoViews(Dataset):
    """Per-image decode + torchvision transforms, two views per image (the peers' pipeline)."""

    def __init__(self, blobs: list[bytes], cfg: AugmentConfig, size: int) -> None:
        self.blobs = blobs
        b, c, s, h = cfg.jitter
        steps = [T.RandomResizedCrop(size, scale=(cfg.crop_scale_min, cfg.crop_scale_max),
                                     ratio=(cfg.crop_ratio_min, cfg.crop_ratio_max)),
                 T.RandomHorizontalFlip(cfg.flip_p),
                 T.RandomApply([T.ColorJitter(b, c, s, h)], p=cfg.jitter_p),
                 T.RandomGrayscale(cfg.grayscale_p)]
        if cfg.blur_p:
            blur = T.GaussianBlur(blur_kernel_size(size), (cfg.blur_sigma_min, cfg.blur_sigma_max))
            steps.append(T.RandomApply([blur], p=cfg.blur_p))
        self.transform = T.Compose(steps + [T.ToTensor(), T.Normalize(MEAN, STD)])

    def __len__(self) -> int:
        return len(self.blobs)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = Image.open(io.BytesIO(self.blobs[i])).convert("RGB")
        return self.transform(image), self.transform(image)


def bench_module(images: torch.Tensor, aug: SimCLRAugment, batch: int, device: torch.device,
                 min_seconds: float) -> float:
    """Views/s of SimCLRAugment over whole epochs of ``images``, after one warm-up batch."""
    images = images.to(device)
    indices = torch.arange(len(images), device=device)
    aug(images[:batch], indices[:batch], 0)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    views, epoch, start = 0, 0, time.perf_counter()
    while views == 0 or time.perf_counter() - start < min_seconds:
        epoch += 1
        for s in range(0, len(images) - batch + 1, batch):
            v1, v2 = aug(images[s:s + batch], indices[s:s + batch], epoch)
            views += len(v1) + len(v2)
        sync()
    return views / (time.perf_counter() - start)


def bench_loader(blobs: list[bytes], cfg: AugmentConfig, size: int, batch: int, workers: int,
                 min_seconds: float) -> float:
    """Views/s of the per-image pipeline in a DataLoader over whole epochs, after a warm-up epoch.

    Workers persist, so the timed epochs pay no start-up; each epoch's iterator starts empty, so
    no batch prefetched during the warm-up is counted.
    """
    loader = DataLoader(TwoViews(blobs, cfg, size), batch_size=batch, shuffle=True,
                        num_workers=workers, drop_last=True, persistent_workers=workers > 0)
    for _ in loader:
        pass
    views, start = 0, time.perf_counter()
    while views == 0 or time.perf_counter() - start < min_seconds:
        for v1, v2 in loader:
            views += len(v1) + len(v2)
    return views / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--image-size", type=int, default=32, help="view side S in pixels")
    parser.add_argument("--batch-size", type=int, default=512, help="images per batch")
    parser.add_argument("--num-images", type=int, default=4096, help="images in the test set")
    parser.add_argument("--data", default=None,
                        help="Parquet dataset dir (e.g. ../shared/datasets/cifar10-mini); "
                             "default: generated PNGs")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="DataLoader workers for the baseline (default: one per core)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads for the batched module (default: torch's own); "
                             "with --workers 0, --threads 1 compares the two per core")
    parser.add_argument("--min-seconds", type=float, default=3.0,
                        help="time each pipeline for at least this long (whole epochs)")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = AugmentConfig().resolved(args.image_size)
    blobs = load_bytes(args.data, args.num_images, args.image_size)
    images = decode(blobs, args.image_size)
    aug = SimCLRAugment(cfg, args.image_size, MEAN, STD, seed=0)
    batch = min(args.batch_size, len(blobs))
    print(f"{len(blobs)} images, {args.image_size} px, batch {batch}, torch threads "
          f"{torch.get_num_threads()}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    fast = bench_module(images, aug, batch, device, args.min_seconds)
    print(f"simclr_kit.augment (batched, on {device}): {fast:12,.0f} views/s")
    slow = bench_loader(blobs, cfg, args.image_size, batch, args.workers, args.min_seconds)
    print(f"PIL + torchvision per image, DataLoader x{args.workers} workers: {slow:12,.0f} views/s")
    print(f"ratio: {fast / slow:.1f}x")


if __name__ == "__main__":
    main()
