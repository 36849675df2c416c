"""Benchmarks of photo-shaped data: training frames, their crops and costs (JSON lines).

    python bench/photos.py data   --root /tmp/photos-bench            # 20,000 generated JPEGs
    python bench/photos.py views                                      # crop geometry (Monte Carlo)
    python bench/photos.py cap                                        # upsampled views, L / S
    python bench/photos.py decode --root /tmp/photos-bench --rows 2000  # images/s, 1 and 2 workers
    python bench/photos.py draft  --root /tmp/photos-bench            # a 10000 x 10000 JPEG
    python bench/photos.py memory --root /tmp/photos-bench            # peak RssAnon of pretrain
    python bench/photos.py step   --root /tmp/photos-bench            # step time at 224 px
    python bench/photos.py augment --batch 32                         # views of frames vs squares

The set: JPEGs of 500 x 375, 375 x 500, 640 x 360 and 400 x 400 px in turn (smooth colour fields
plus grain, quality 90, so that a file weighs what a photo of that size does), in
``ROOT/photos/train.parquet``. Everything (the Parquet file, the Hugging Face cache, the decoded
cache, the runs) lives under ``--root``: delete it afterwards. ``memory`` reuses the process-tree
sampler of ``bench/store.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

SHAPES = [(375, 500), (500, 375), (360, 640), (400, 400)]  # (height, width)
SIZE = 224  # the training size measured


def make_photos(folder: Path, count: int) -> None:
    """``count`` photo-shaped JPEGs in ``folder/train.parquet`` (one ``image`` column)."""
    from PIL import Image
    from store import write_jpegs

    def image(k: int, rng: np.random.Generator) -> np.ndarray:
        h, w = SHAPES[k % len(SHAPES)]
        small = rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)
        img = np.asarray(Image.fromarray(small).resize((w, h), Image.BILINEAR))
        grain = rng.integers(-12, 12, (h, w, 3))
        return (img + grain).clip(0, 255).astype(np.uint8)

    write_jpegs(folder, count, image, rows_per_write=1000)  # 1000 photos: ~50 MB per write


def _split(folder: Path):
    from simclr_kit.config import DataConfig
    from simclr_kit.data.splits import open_splits

    train, _ = open_splits(DataConfig(data=str(folder)), need_eval=False)
    return train


def _boxes_in_photo(height: int, width: int, n: int, how: str) -> tuple[np.ndarray, float]:
    """``n`` crop boxes (top, left, h, w) in the photo's own pixels and the pixels per stored
    pixel, for ``how``: "frame" (simclr-kit now: the whole photo at L = 2 S), "square" (the
    previous store: the centre square at 256), "torchvision" (RandomResizedCrop on the photo)."""
    import torch
    from torchvision.transforms import RandomResizedCrop

    from simclr_kit.augment import SimCLRAugment
    from simclr_kit.config import AugmentConfig
    from simclr_kit.data.pixels import frame_size
    from simclr_kit.data.size_policy import frame_cap

    if how == "torchvision":
        torch.manual_seed(0)
        image = torch.zeros(3, height, width)
        boxes = [RandomResizedCrop.get_params(image, [0.08, 1.0], [3 / 4, 4 / 3])
                 for _ in range(n)]
        return np.asarray(boxes, np.float64), 1.0
    augment = SimCLRAugment(AugmentConfig(), SIZE, (0.0,) * 3, (1.0,) * 3, seed=0)
    if how == "frame":
        side = frame_cap(SIZE)
        fh, fw = frame_size(height, width, side)
        sizes = torch.tensor([[fh, fw]]).repeat(n, 1)
        box = augment.sample_params(torch.arange(n), 0, 0, side, side, sizes)["crop"].double()
        scale = height / fh  # the frame keeps the aspect ratio (to a rounding)
        return (box * torch.tensor([height / fh, width / fw] * 2)).numpy(), scale
    stored = 256  # the previous default for 224: 8 x ceil(224 / 7), a centre square
    box = augment.sample_params(torch.arange(n), 0, 0, stored, stored)["crop"].double()
    side = min(height, width)
    scale = side / stored
    offset = torch.tensor([(height - side) / 2, (width - side) / 2, 0, 0])
    return (box * scale + offset).numpy(), scale


def views(n: int) -> list[dict]:
    """Per photo shape and method: the fraction of views reaching outside the centre square,
    the crop's area relative to the photo (mean, max) and the fraction upsampled (a side of the
    box below S stored pixels; or its area below S^2 stored pixels)."""
    out = []
    for height, width in SHAPES:
        side = min(height, width)
        top, left = (height - side) / 2, (width - side) / 2
        for how in ("frame", "square", "torchvision"):
            box, scale = _boxes_in_photo(height, width, n, how)
            t, l, h, w = box.T
            outside = (t < top - 0.5) | (l < left - 0.5) | (t + h > top + side + 0.5) \
                | (l + w > left + side + 0.5)
            area = h * w / (height * width)
            sh, sw = h / scale, w / scale  # the box in stored pixels
            out.append({"bench": "views", "photo": f"{width}x{height}", "method": how,
                        "outside_centre_square": round(float(outside.mean()), 4),
                        "area_mean": round(float(area.mean()), 4),
                        "area_max": round(float(area.max()), 4),
                        "upsampled_either_side": round(float(((sh < SIZE - 0.5)
                                                              | (sw < SIZE - 0.5)).mean()), 4),
                        "upsampled_area": round(float((sh * sw < SIZE**2 - 0.5).mean()), 4),
                        "views": n})
    return out


def cap(n: int) -> list[dict]:
    """The fraction of views upsampled on 4:3 frames (and 16:9, square) of longer side L, for
    candidate L at S = 224, and at L = frame_cap(S) for other S."""
    import torch

    from simclr_kit.augment import SimCLRAugment
    from simclr_kit.config import AugmentConfig
    from simclr_kit.data.pixels import frame_size
    from simclr_kit.data.size_policy import frame_cap

    def fractions(size: int, side: int, height: int, width: int) -> tuple[float, float]:
        augment = SimCLRAugment(AugmentConfig(), size, (0.0,) * 3, (1.0,) * 3, seed=1)
        fh, fw = frame_size(height, width, side)
        sizes = torch.tensor([[fh, fw]]).repeat(n, 1)
        box = augment.sample_params(torch.arange(n), 0, 0, side, side, sizes)["crop"]
        either = ((box[:, 2] < size) | (box[:, 3] < size)).double().mean().item()
        area = (box[:, 2] * box[:, 3] < size * size).double().mean().item()
        return round(either, 4), round(area, 4)

    out = []
    for side in range(SIZE, 2 * SIZE + 33, 8):
        row = {"bench": "cap", "size": SIZE, "side": side, "ratio": round(side / SIZE, 3)}
        photos = {"4:3": (3000, 4000), "16:9": (2250, 4000), "1:1": (3000, 3000)}
        for name, (h, w) in photos.items():
            row[f"upsampled_{name}"], row[f"upsampled_area_{name}"] = fractions(SIZE, side, h, w)
        out.append(row)
    for size in (96, 128, 160, 192, 224, 256):
        side = frame_cap(size)
        either, area = fractions(size, side, 3000, 4000)
        out.append({"bench": "cap", "size": size, "side": side, "upsampled_4:3": either,
                    "upsampled_area_4:3": area})
    return out


def decode(root: Path, rows: int, workers: int) -> dict:
    """Decode ``rows`` photos into training frames at L = frame_cap(224), into a fresh cache."""
    import datasets

    from simclr_kit.data.pixels import Layout
    from simclr_kit.data.size_policy import frame_cap, training_sizes
    from simclr_kit.data.store import decode_split

    from store import _cpu_seconds

    cache = root / f"cache-decode-{rows}-{workers}"
    shutil.rmtree(cache, ignore_errors=True)
    os.environ["SIMCLR_KIT_CACHE"] = str(cache)
    split = _split(root / "photos")
    if rows < len(split.dataset):
        split = dataclasses.replace(split, dataset=split.dataset.select(range(rows)))
    size, side = training_sizes(split, SIZE, None)
    assert side == frame_cap(SIZE)
    cpu, started = _cpu_seconds(), time.perf_counter()
    store = decode_split(split, progress=False, labels=False, workers=workers,
                         layout=Layout.frame(side))
    seconds, cpu = time.perf_counter() - started, _cpu_seconds() - cpu
    files = list(cache.glob("decoded/*/images.npy"))
    disk = sum(f.stat().st_blocks * 512 for f in files)
    raw = split.dataset.cast_column(split.image_column, datasets.Image(decode=False))
    jpeg = sum(len(item["bytes"]) for item in raw[:rows][split.image_column])
    result = {"bench": "decode", "images": len(store), "side": side, "workers": workers,
              "seconds": round(seconds, 1), "images_per_s": round(len(store) / seconds, 1),
              "images_per_cpu_s": round(len(store) / cpu, 1),
              "store_bytes_per_image": round(disk / len(store)),
              "jpeg_bytes_per_image": round(jpeg / rows),
              "valid_fraction_of_slots": round(float(store.sizes.double().prod(1).sum())
                                               / (len(store) * side * side), 4),
              "load_avg_1min": round(os.getloadavg()[0], 2)}
    shutil.rmtree(cache, ignore_errors=True)
    return result


_DRAFT_SCRIPT = """
import resource, sys, time
from PIL import Image, JpegImagePlugin
from simclr_kit.data.pixels import Layout, decode_image
if sys.argv[2] == "off":
    JpegImagePlugin.JpegImageFile.draft = lambda self, mode, size: None
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
started = time.perf_counter()
with Image.open(sys.argv[1]) as img:
    out = decode_image(img, Layout.frame(448))
print(out.shape, round(before), round(time.perf_counter() - started, 2),
      round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
"""


def draft(root: Path) -> list[dict]:
    """Seconds and peak RSS of one process decoding a 10000 x 10000 JPEG into a 448 frame,
    with PIL's draft (JPEG DCT scaling) and without."""
    from PIL import Image

    path = root / "huge.jpg"
    if not path.exists():
        rng = np.random.default_rng(0)
        small = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((10_000, 10_000), Image.BILINEAR).save(path, quality=90)
    out = []
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    for mode in ("on", "off"):
        done = subprocess.run([sys.executable, "-c", _DRAFT_SCRIPT, str(path), mode], env=env,
                              capture_output=True, text=True, check=True).stdout.split()
        out.append({"bench": "draft", "draft": mode, "seconds": float(done[-2]),
                    "peak_rss_mb": int(done[-1]), "rss_before_decoding_mb": int(done[-3]),
                    "jpeg_mb": round(path.stat().st_size / 2**20, 1)})
    return out


def memory(root: Path, steps: int, stream: str, batch: int) -> dict:
    """Peak anonymous memory of ``simclr pretrain`` at 224 px on the photos, killed after
    ``steps`` steps (the set decoded beforehand)."""
    from simclr_kit.data.pixels import Layout
    from simclr_kit.data.size_policy import training_sizes
    from simclr_kit.data.store import decode_split

    from store import CRASH, _env, watch

    os.environ["SIMCLR_KIT_CACHE"] = str(root / "cache")
    split = _split(root / "photos")
    decode_split(split, progress=False, labels=False,
                 layout=Layout.frame(training_sizes(split, SIZE, None)[1]))
    out = root / f"run-memory-{time.time_ns()}"
    cmd = [sys.executable, str(CRASH), f"step@{steps}", "pretrain",  # killed after `steps`
           "--data", str(root / "photos"), "--image-size", str(SIZE), "--batch-size", str(batch),
           "--epochs", "1", "--device", "cpu", "--out", str(out), "--log-every", "1",
           "--projection-dim", "32", "--stream", stream]
    return {"bench": "memory", "images": len(split.dataset), "steps": steps, "stream": stream,
            "batch": batch, **watch(cmd, _env(root))}


def step_time(root: Path, steps: int, batch: int) -> list[dict]:
    """Training step time at 224 px with the batches held whole (indexing the map) and streamed
    from the map; the wait for each next batch."""
    import torch

    from simclr_kit.config import DataConfig, PretrainConfig
    from simclr_kit.data.loader import ResidentBatches
    from simclr_kit.data.stream import StreamedBatches
    from simclr_kit.train.loop import prepare

    from store import time_steps

    os.environ["SIMCLR_KIT_CACHE"] = str(root / "cache")
    cfg = PretrainConfig(data=DataConfig(data=str(root / "photos"), image_size=SIZE),
                         batch_size=batch, device="cpu", epochs=1, progress=False,
                         projection_dim=32, out=str(root / f"run-step-{time.time_ns()}"))
    t = prepare(cfg)
    cpu = torch.device("cpu")
    sources = {"held whole (indexing the map)": ResidentBatches(t.store.images, cpu, batch, 0),
               "streamed from the map": StreamedBatches(t.store.images, cpu, batch, 0)}
    times = time_steps(t, sources, steps, warmup=1)
    return [{"bench": "step", "size": SIZE, "side": t.store.image_size, "batch": batch,
             "source": label, "step_s_median": round(statistics.median(step_s), 3),
             "step_s_all": [round(x, 2) for x in step_s],
             "wait_ms_max": round(1000 * max(wait_s), 2),
             "load_avg_1min": round(os.getloadavg()[0], 2)}
            for label, (step_s, wait_s) in times.items()]


def augment_time(batch: int, repeats: int) -> list[dict]:
    """Seconds for both views of a batch at 224 px (all ops of the default recipe), from 4:3
    frames in 448 slots (now) and from 256 centre squares (the previous store), on the CPU."""
    import torch

    from simclr_kit.augment import SimCLRAugment
    from simclr_kit.config import AugmentConfig

    augment = SimCLRAugment(AugmentConfig(), SIZE, (0.5,) * 3, (0.25,) * 3, seed=0)
    g = torch.Generator().manual_seed(0)
    cases = {"frames 448 (4:3, 448 x 336)": (448, torch.tensor([[336, 448]]).repeat(batch, 1)),
             "centre squares 256": (256, None)}
    out = []
    for label, (side, sizes) in cases.items():
        images = torch.randint(0, 256, (batch, 3, side, side), dtype=torch.uint8, generator=g)
        times = []
        for k in range(repeats + 1):
            started = time.perf_counter()
            augment(images, torch.arange(batch), k, sizes)
            times.append(time.perf_counter() - started)
        out.append({"bench": "augment", "input": label, "batch": batch, "size": SIZE,
                    "seconds_median": round(statistics.median(times[1:]), 3),
                    "threads": torch.get_num_threads(),
                    "load_avg_1min": round(os.getloadavg()[0], 2)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["data", "views", "cap", "decode", "draft", "memory",
                                         "step", "augment"])
    parser.add_argument("--root", type=Path, default=Path("/tmp/photos-bench"))
    parser.add_argument("--count", type=int, default=20_000, help="data: photos to generate")
    parser.add_argument("--rows", type=int, default=2000, help="decode: photos decoded")
    parser.add_argument("--views", type=int, default=100_000, help="views, cap: boxes drawn")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--stream", default="on", help="memory: --stream of the run")
    args = parser.parse_args()
    from store import _env

    os.environ.update(_env(args.root))  # before datasets is imported
    results: list[dict] = []
    if args.what == "data":
        started = time.perf_counter()
        make_photos(args.root / "photos", args.count)
        results.append({"bench": "data", "photos": args.count,
                        "seconds": round(time.perf_counter() - started, 1)})
    elif args.what == "views":
        results += views(args.views)
    elif args.what == "cap":
        results += cap(args.views)
    elif args.what == "decode":
        results += [decode(args.root, args.rows, workers) for workers in (1, 2)]
    elif args.what == "draft":
        results += draft(args.root)
    elif args.what == "augment":
        results += augment_time(args.batch, args.steps)
    elif args.what == "memory":
        results.append(memory(args.root, args.steps, args.stream, args.batch))
    else:
        results += step_time(args.root, args.steps, args.batch)
    for r in results:
        print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
