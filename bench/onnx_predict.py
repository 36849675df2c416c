"""Images/s of ``simclr predict`` with torch against ``predict --onnx`` (ONNX Runtime), on the CPU.

A random-init ResNet-18 classifier (CIFAR stem at 32 px, ImageNet stem at 224 px; a linear head
trained for a few steps on generated images) and a folder of generated photos (32 x 32 PNGs; 4:3
and 3:4 JPEGs around 224 px). Two measurements per size, batch 64, runs of the two runtimes
interleaved and the median kept:

- forward alone: the decoded uint8 images through torch (``forward_images``, the loop
  ``predict`` runs) or through ONNX Runtime (``run_batches``, the loop ``predict --onnx`` runs);
- end to end: ``predict`` / ``predict_onnx`` as the command calls them, from the folder to the
  CSV: loading the model, decoding every image (a fresh cache each time), the forward, the CSV.

    .venv/bin/python bench/onnx_predict.py                      # 32 and 224 px, 256 images each
    .venv/bin/python bench/onnx_predict.py --sizes 32 --images 512 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from simclr_kit.checkpoint_files import save_weights
from simclr_kit.classifier import decode_for_predict, load_classifier, predict, train_classifier
from simclr_kit.config import ClassifierConfig
from simclr_kit.deploy.onnx_export import export_onnx
from simclr_kit.deploy.onnx_predict import predict_onnx
from simclr_kit.deploy.onnx_runtime import cpu_session, run_batches
from simclr_kit.evaluation.features import forward_images
from simclr_kit.models.backbones import build_backbone

MEAN, STD = [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]


def _photos(folder: Path, count: int, size: int, seed: int) -> Path:
    """``count`` photos in two class folders: S x S PNGs at <= 64 px, else 4:3 and 3:4 JPEGs
    whose shorter side is S (noise with a coloured half, so JPEG has work to do)."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        label = "ab"[i % 2]
        (folder / label).mkdir(parents=True, exist_ok=True)
        w, h = (size, size) if size <= 64 else ((size * 4 // 3, size) if i % 3 else
                                                (size, size * 4 // 3))
        img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        img[:, : w // 2, i % 3] = 200
        name = f"{i:05d}.png" if size <= 64 else f"{i:05d}.jpg"
        Image.fromarray(img).save(folder / label / name, quality=90)
    return folder


def _classifier(root: Path, size: int) -> Path:
    """A frozen random-init ResNet-18 and a linear head trained briefly on generated photos."""
    torch.manual_seed(0)
    stem = "cifar" if size <= 64 else "imagenet"
    weights = root / "backbone.safetensors"
    save_weights(weights, build_backbone("resnet18", stem).state_dict(),
                 {"backbone": "resnet18", "stem": stem, "image_size": size, "mean": MEAN,
                  "std": STD})
    data = root / "train-data"
    for split, seed in (("train", 1), ("test", 2)):
        _photos(data / split, 16, size, seed)
    train_classifier(weights, str(data), root / "cls",
                     ClassifierConfig(epochs=1, min_steps=10), device="cpu", progress=False)
    return root / "cls"


def _timed(fn: Callable[[], object]) -> tuple[float, float]:
    """Wall seconds and this process's CPU seconds (all its threads): on a shared machine the
    wall time includes waiting for the cores, the CPU time does not."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def _fresh_cache(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` with an empty decode cache: each end-to-end run decodes every image."""
    def run() -> object:
        with tempfile.TemporaryDirectory(prefix="bench-cache-") as cache:
            os.environ["SIMCLR_KIT_CACHE"] = cache
            return fn()
    return run


def bench_size(size: int, count: int, batch: int, repeats: int,
               root: Path) -> dict[str, tuple[float, float]]:
    """Median images/s (wall) and CPU ms per image of the four measurements at ``size`` px."""
    cls = _classifier(root, size)
    graph = root / "classifier.onnx"
    export_onnx(cls, graph)
    photos = _photos(root / "photos", count, size, seed=3)
    model, meta = load_classifier(cls, torch.device("cpu"))
    session = cpu_session(graph)
    images = _fresh_cache(lambda: decode_for_predict(meta, str(photos)))().images.clone()
    runs: dict[str, Callable[[], object]] = {
        "torch forward": lambda: forward_images(model, images, meta["mean"], meta["std"],
                                                "cpu", batch),
        "onnxruntime forward": lambda: run_batches(session, images, batch),
        "torch end to end": _fresh_cache(lambda: predict(cls, str(photos), root / "t.csv",
                                                         "cpu", batch_size=batch)),
        "onnxruntime end to end": _fresh_cache(lambda: predict_onnx(graph, str(photos),
                                                                    root / "o.csv",
                                                                    batch_size=batch)),
    }
    for fn in runs.values():  # warm-up: first-call allocations and ORT's graph optimisation
        fn()
    seconds: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            seconds[name].append(_timed(fn))
    return {name: (count / statistics.median(t[0] for t in times),
                   1000 * statistics.median(t[1] for t in times) / count)
            for name, times in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="32,224", help="image sizes, px (default: 32,224)")
    parser.add_argument("--images", type=int, default=256, help="photos per size (default: 256)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward (default: 64)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs; the median "
                        "is kept (default: 3)")
    args = parser.parse_args()
    import onnxruntime

    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), onnxruntime "
          f"{onnxruntime.__version__} (CPUExecutionProvider, default threads), "
          f"{os.cpu_count()} CPUs; batch {args.batch_size}, {args.images} images, median of "
          f"{args.repeats}")
    print("\n| size | measurement | torch images/s | onnxruntime images/s | ratio | torch CPU "
          "ms/image | onnxruntime CPU ms/image |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for size in (int(s) for s in args.sizes.split(",")):
        with tempfile.TemporaryDirectory(prefix=f"bench-onnx-{size}-") as tmp:
            rate = bench_size(size, args.images, args.batch_size, args.repeats, Path(tmp))
        for what in ("forward", "end to end"):
            (t, t_cpu), (o, o_cpu) = rate[f"torch {what}"], rate[f"onnxruntime {what}"]
            print(f"| {size} px | {what} | {t:.1f} | {o:.1f} | {o / t:.2f}x | {t_cpu:.1f} | "
                  f"{o_cpu:.1f} |", flush=True)


if __name__ == "__main__":
    main()
