"""Pretraining throughput: simclr-kit's step against a plain per-image pipeline, same model.

What is timed is the whole SimCLR step (two augmented views, forward, NT-Xent, backward,
optimizer), in steady state: warm-up steps (compilation, cuDNN autotuning, DataLoader start)
are run first and not counted, and the device is synchronised at both ends of the timed window.

- ``batched``: simclr-kit: the uint8 images resident on the device, both views made there in
  one batched pass (``SimCLRAugment``), the step of ``simclr_kit.train.step`` that training runs.
- ``per-image``: what most SimCLR code does: PIL images, torchvision transforms drawn per image
  in DataLoader worker processes (one per core), float batches copied to the device. Same
  model, precision, memory format and optimizer; never compiled.

One Markdown row per configuration, with images/s (images, not views: each image gives two
views), ms/step, peak memory and the ratio to the per-image row. Runs from the source tree::

    python bench/throughput.py --image-size 32 --batch-size 512 --device cuda --compile false,true
    python bench/throughput.py --image-size 32 --batch-size 64 --device cpu --steps 3

Needs only torch, torchvision, numpy and Pillow; ``--data`` (a real dataset instead of random
images) also needs the package's data dependencies (``datasets``).
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402
from PIL import Image  # noqa: E402
from torch import Tensor  # noqa: E402

from simclr_kit.augment import SimCLRAugment, blur_kernel_size, channel_stats  # noqa: E402
from simclr_kit.config import AugmentConfig  # noqa: E402
from simclr_kit.devices import (autocast_dtype, compile_by_default, resolve_device,  # noqa: E402
                                tune_backends)
from simclr_kit.models.heads import build_simclr  # noqa: E402
from simclr_kit.train.optim import build_optimizer, effective_lr  # noqa: E402
from simclr_kit.train.step import simclr_step  # noqa: E402

TEMPERATURE = 0.1
PREFETCH = 2  # DataLoader batches queued per worker (its default)


@dataclass
class Row:
    """One measured configuration."""

    pipeline: str
    backbone: str
    image_size: int
    batch_size: int
    device: str
    precision: str
    compile: bool
    channels_last: bool
    images_per_s: float
    ms_per_step: float
    peak_mib: float
    syncs_per_step: int | None = None  # host synchronisations in one step (CUDA only)
    ratio: float | None = None  # images/s over the per-image pipeline's
    repeats: list[float] | None = None  # images/s of each repeat, with --repeats > 1

    def markdown(self) -> str:
        syncs = "-" if self.syncs_per_step is None else str(self.syncs_per_step)
        ratio = "-" if self.ratio is None else f"{self.ratio:.2f}x"
        return (f"| {self.pipeline} | {self.backbone} | {self.image_size} | {self.batch_size} | "
                f"{self.device} | {self.precision} | {'on' if self.compile else 'off'} | "
                f"{'on' if self.channels_last else 'off'} | {self.images_per_s:,.1f} | "
                f"{self.ms_per_step:,.1f} | {self.peak_mib:,.0f} | {syncs} | {ratio} |")


HEADER = ("| pipeline | backbone | px | batch | device | precision | compile | channels_last | "
          "images/s | ms/step | peak MiB | host syncs/step | vs per-image |\n"
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")


def _bool_list(text: str) -> list[bool | None]:
    values: list[bool | None] = []
    for part in text.split(","):
        word = part.strip().lower()
        if word not in ("true", "false", "auto", "on", "off", "1", "0"):
            raise argparse.ArgumentTypeError(f"expected a comma list of true/false/auto, got {text!r}")
        values.append(None if word == "auto" else word in ("true", "on", "1"))
    return values


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--backbone", default="resnet18", help="torchvision model name or timm/NAME")
    p.add_argument("--image-size", type=int, default=32, help="pixels (CIFAR stem at <= 64)")
    p.add_argument("--batch-size", type=int, default=512, help="images per step (2x views)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--precision", default="auto", help="auto (bf16 on CUDA, fp32 elsewhere), "
                   "fp32, bf16, fp16")
    p.add_argument("--compile", type=_bool_list, default=[None],
                   help="torch.compile the batched step: a comma list gives one row each "
                   "(auto: on with CUDA and Triton)")
    p.add_argument("--channels-last", type=_bool_list, default=[True],
                   help="comma list of true/false: one batched row each")
    p.add_argument("--optimizer", default="lars", help="lars, sgd or adam")
    p.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps before them")
    p.add_argument("--baseline-steps", type=int, default=None, help="default: --steps")
    p.add_argument("--baseline-warmup", type=int, default=None,
                   help="default: max(--warmup, 2 x workers x 2 queued batches), so the "
                   "loader's initial queue is drained before timing")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="DataLoader workers of the per-image pipeline")
    p.add_argument("--no-baseline", action="store_true", help="skip the per-image pipeline")
    p.add_argument("--images", type=int, default=4096, help="random images in the set "
                   "(at least 2 batches); ignored with --data")
    p.add_argument("--data", default=None, help="a dataset instead of random images "
                   "(as simclr pretrain --data; needs the datasets package)")
    p.add_argument("--repeats", type=int, default=1,
                   help="measure every configuration this many times, interleaved, and report "
                   "the median (for machines shared with other work)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if (args.batch_size < 2 or args.steps < 1 or args.warmup < 0 or args.image_size < 8
            or args.repeats < 1):
        p.error("need --batch-size >= 2, --steps >= 1, --warmup >= 0, --image-size >= 8, "
                "--repeats >= 1")
    return args


def load_images(args: argparse.Namespace) -> Tensor:
    """``(N, 3, S, S)`` uint8 on the CPU: random pixels, or ``--data`` decoded by the package."""
    if args.data is not None:
        from simclr_kit.config import DataConfig
        from simclr_kit.data.splits import open_splits
        from simclr_kit.data.store import decode_split

        train, _ = open_splits(DataConfig(data=args.data, image_size=args.image_size),
                               need_eval=False)
        return decode_split(train, args.image_size, progress=False).images
    g = torch.Generator().manual_seed(args.seed)
    n = max(args.images, 2 * args.batch_size)
    return torch.randint(0, 256, (n, 3, args.image_size, args.image_size), dtype=torch.uint8,
                         generator=g)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mib(device: torch.device) -> float:
    """CUDA: the allocator's peak since the timed window began; CPU: the process's RSS peak."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def time_steps(step: Callable[[int], Tensor], warmup: int, steps: int,
               device: torch.device) -> tuple[float, float]:
    """(seconds for ``steps`` steps after ``warmup`` untimed ones, peak MiB)."""
    for i in range(warmup):
        step(i)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    for i in range(warmup, warmup + steps):
        loss = step(i)
    _sync(device)
    seconds = time.perf_counter() - started
    if not torch.isfinite(loss).item():
        raise RuntimeError("the loss is not finite: the benchmark is not training")
    return seconds, _peak_mib(device)


def count_syncs(step: Callable[[], Tensor], device: torch.device) -> int | None:
    """Host synchronisations one more step makes (CUDA's sync debug mode warns on each)."""
    if device.type != "cuda" or not hasattr(torch.cuda, "set_sync_debug_mode"):
        return None
    _sync(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message).lower() for w in caught)


def _model_and_optimizer(args: argparse.Namespace, device: torch.device, channels_last: bool):
    torch.manual_seed(args.seed)
    model = build_simclr(args.backbone, "auto", args.image_size).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    lr = effective_lr(0.3, args.batch_size)
    return model, build_optimizer(model, args.optimizer, lr, 0.9, 1e-6)


def measure_batched(args: argparse.Namespace, images: Tensor, device: torch.device,
                    compile_model: bool, channels_last: bool) -> Row:
    """simclr-kit's pipeline: resident uint8 images, batched views, the training step."""
    model, optimizer = _model_and_optimizer(args, device, channels_last)
    forward = torch.compile(model) if compile_model else model
    model.train()
    mean, std = channel_stats(images)
    augment = SimCLRAugment(AugmentConfig(), args.image_size, mean, std, args.seed)
    resident = images.to(device)
    b, batches = args.batch_size, len(images) // args.batch_size
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(args.seed))
    perm = perm.to(device)  # as training does: indices where the images are
    dtype = autocast_dtype(args.precision, device)

    def step(i: int) -> Tensor:
        idx = perm[(i % batches) * b:(i % batches + 1) * b]
        v1, v2 = augment(resident[idx], idx, epoch=i // batches)
        return simclr_step(forward, optimizer, v1, v2, TEMPERATURE, dtype, channels_last)

    seconds, peak = time_steps(step, args.warmup, args.steps, device)
    syncs = count_syncs(lambda: step(args.warmup + args.steps), device)
    return _row("batched", args, device, compile_model, channels_last, seconds, args.steps, peak,
                syncs)


def per_image_transform(config: AugmentConfig, size: int, mean: Sequence[float],
                        std: Sequence[float]) -> Callable[[Image.Image], Tensor]:
    """The same SimCLR recipe as torchvision transforms on one PIL image (v2 where present)."""
    cfg = config.resolved(size)
    try:
        import torchvision.transforms.v2 as T

        to_tensor = [T.ToImage(), T.ToDtype(torch.float32, scale=True)]
    except (ImportError, AttributeError):  # torchvision < 0.16: no v2, or v2 without ToImage
        import torchvision.transforms as T  # type: ignore[no-redef]

        to_tensor = [T.ToTensor()]
    b, c, s, h = cfg.jitter
    steps = [T.RandomResizedCrop(size, scale=(cfg.crop_scale_min, cfg.crop_scale_max),
                                 ratio=(cfg.crop_ratio_min, cfg.crop_ratio_max), antialias=True),
             T.RandomHorizontalFlip(cfg.flip_p),
             T.RandomApply([T.ColorJitter(b, c, s, h)], p=cfg.jitter_p),
             T.RandomGrayscale(cfg.grayscale_p)]
    if cfg.blur_p:
        sigma = (cfg.blur_sigma_min, cfg.blur_sigma_max)
        steps.append(T.RandomApply([T.GaussianBlur(blur_kernel_size(size), sigma)], p=cfg.blur_p))
    return T.Compose(steps + to_tensor + [T.Normalize(list(mean), list(std))])


class PerImageViews(torch.utils.data.Dataset):
    """Images held as ``(N, S, S, 3)`` uint8, as torchvision's CIFAR10 holds them; each item is
    a PIL image turned into two independently transformed views."""

    def __init__(self, images_hwc: np.ndarray, transform: Callable[[Image.Image], Tensor]) -> None:
        self.images, self.transform = images_hwc, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        img = Image.fromarray(self.images[i])
        return self.transform(img), self.transform(img)


def measure_per_image(args: argparse.Namespace, images: Tensor, device: torch.device,
                      channels_last: bool) -> Row:
    """The per-image baseline: PIL + torchvision transforms in DataLoader workers."""
    model, optimizer = _model_and_optimizer(args, device, channels_last)
    model.train()
    mean, std = channel_stats(images)
    dataset = PerImageViews(images.permute(0, 2, 3, 1).contiguous().numpy(),
                            per_image_transform(AugmentConfig(), args.image_size, mean, std))
    workers = max(0, args.workers)
    warmup = args.baseline_warmup
    if warmup is None:
        warmup = max(args.warmup, 2 * workers * PREFETCH)
    steps = args.baseline_steps or args.steps
    total = (warmup + steps + 1) * args.batch_size  # +1: the sync-counting step
    sampler = torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=total,
                                             generator=torch.Generator().manual_seed(args.seed))
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, sampler=sampler, num_workers=workers,
        drop_last=True, pin_memory=device.type == "cuda",
        prefetch_factor=PREFETCH if workers else None, persistent_workers=False)
    batches = iter(loader)
    dtype = autocast_dtype(args.precision, device)

    def step(_: int) -> Tensor:
        v1, v2 = next(batches)
        v1, v2 = v1.to(device, non_blocking=True), v2.to(device, non_blocking=True)
        return simclr_step(model, optimizer, v1, v2, TEMPERATURE, dtype, channels_last)

    seconds, peak = time_steps(step, warmup, steps, device)
    syncs = count_syncs(lambda: step(0), device)
    del batches  # ends the workers
    return _row("per-image", args, device, False, channels_last, seconds, steps, peak, syncs)


def _row(pipeline: str, args: argparse.Namespace, device: torch.device, compiled: bool,
         channels_last: bool, seconds: float, steps: int, peak: float,
         syncs: int | None) -> Row:
    precision = autocast_dtype(args.precision, device)
    name = "fp32" if precision is None else str(precision).replace("torch.", "").replace(
        "bfloat16", "bf16").replace("float16", "fp16")
    return Row(pipeline, args.backbone, args.image_size, args.batch_size, _device_name(device),
               name, compiled, channels_last, steps * args.batch_size / seconds,
               1000 * seconds / steps, peak, syncs)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores)"


def run(args: argparse.Namespace) -> list[Row]:
    """Measure every configuration; the per-image row (if any) comes last.

    With ``--repeats R`` the configurations are measured R times in turn (A B C A B C ...), so
    that load from other processes falls on all of them alike; each row is then the run with the
    median images/s, and its ratio is the median of the per-repeat ratios.
    """
    device = resolve_device(args.device)
    tune_backends(device)
    images = load_images(args)
    if len(images) < 2 * args.batch_size:
        raise SystemExit(f"{len(images)} images: need at least 2 batches of {args.batch_size}")
    configs = [(compile_by_default(device) if c is None else c, cl)
               for c in args.compile for cl in args.channels_last]
    runs: list[list[Row]] = []
    for _ in range(args.repeats):
        rows = [measure_batched(args, images, device, c, cl) for c, cl in configs]
        if not args.no_baseline:
            base = measure_per_image(args, images, device, args.channels_last[0])
            for row in rows:
                row.ratio = row.images_per_s / base.images_per_s
            base.ratio = 1.0
            rows.append(base)
        runs.append(rows)
    return [_median_row([r[i] for r in runs]) for i in range(len(runs[0]))]


def _median_row(repeats: list[Row]) -> Row:
    ordered = sorted(repeats, key=lambda r: r.images_per_s)
    row = ordered[(len(ordered) - 1) // 2]
    ratios = sorted(r.ratio for r in repeats if r.ratio is not None)
    if ratios:
        row.ratio = ratios[(len(ratios) - 1) // 2]
    if len(repeats) > 1:
        row.repeats = [round(r.images_per_s, 1) for r in repeats]
    return row


def describe_machine(device: torch.device) -> str:
    return (f"{time.strftime('%Y-%m-%d %H:%M %Z')}; {_device_name(device)}; "
            f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
            f"python {platform.python_version()}, torch {torch.__version__}, "
            f"torchvision {torchvision.__version__}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    rows = run(args)
    print(f"\n{describe_machine(resolve_device(args.device))}")
    print(f"command: python bench/throughput.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(f"timed: {args.steps} steps after {args.warmup} warm-up steps (per-image: see "
          "--baseline-warmup); peak MiB: CUDA allocator peak in the timed window, or on CPU "
          "this process's RSS high-water mark (workers not included)\n")
    print(HEADER)
    for row in rows:
        print(row.markdown())
    if args.repeats > 1:
        print(f"\nmedian of {args.repeats} interleaved repeats; images/s of each:")
        for row in rows:
            print(f"  {row.pipeline}, compile {'on' if row.compile else 'off'}, channels_last "
                  f"{'on' if row.channels_last else 'off'}: {row.repeats}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
