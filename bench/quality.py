"""Encoder quality side by side: simclr-kit recipes, lightly 1.6's SimCLR and a random-init
ResNet-18, each pretrained on the same images for the same epochs and batch, and all scored
by the same frozen-feature protocols (kNN k=200 T=0.1 and the linear probe of
``simclr evaluate``).

    python bench/quality.py --data ../shared/datasets/cifar10 --train-images 10000 \\
        --test-images 2000 --image-size 16 --epochs 5 --batch-size 128 \\
        --runs kit 'kit:lr=4.0,warmup_epochs=0.5' lightly random --out bench/quality.jsonl

A run is ``kit`` (the defaults), ``kit:FIELD=VALUE,...`` (``PretrainConfig`` fields; nested
ones as ``augment.flip_p=0``), ``lightly`` (lightly's own CIFAR-10 recipe: its SimCLRTransform
with ``cj_strength=0.5`` and no blur, SimCLRProjectionHead(512, 512, 128), NTXentLoss at its
default T=0.5, SGD lr 0.06 x B/128, momentum 0.9, weight decay 5e-4, cosine over the epochs;
on the same torchvision ResNet-18 with the CIFAR stem) or ``random``. Each result is printed
and appended to ``--out`` as one JSON line. lightly is a bench-only extra:
``pip install 'simclr-kit[bench]'``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from simclr_kit.config import DataConfig, EvalConfig, PretrainConfig, from_dict, merge  # noqa: E402
from simclr_kit.data.sources import open_splits  # noqa: E402
from simclr_kit.data.store import ImageStore, decode_split  # noqa: E402
from simclr_kit.encoder import IMAGENET_MEAN, IMAGENET_STD, Encoder, load_encoder  # noqa: E402
from simclr_kit.evaluation.protocols import run_protocols  # noqa: E402
from simclr_kit.augment import channel_stats  # noqa: E402
from simclr_kit.models import build_backbone  # noqa: E402


def subset(data: str, train_images: int, test_images: int, out: Path) -> Path:
    """The first rows of ``data``'s train and test Parquet files (its rows are shuffled), as a
    Parquet folder of their own: every encoder trains and is scored on exactly these."""
    folder = out / f"{Path(data).name}-{train_images}-{test_images}"
    for split, n in (("train", train_images), ("test", test_images)):
        target = folder / f"{split}.parquet"
        if not target.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            table = pq.read_table(Path(data) / f"{split}.parquet")
            pq.write_table(table.slice(0, n), target)
    return folder


def parse_value(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def kit_overrides(spec: str) -> dict[str, Any]:
    """``kit:lr=4.0,augment.flip_p=0`` -> ``{"lr": 4.0, "augment": {"flip_p": 0}}``."""
    out: dict[str, Any] = {}
    _, _, rest = spec.partition(":")
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        node = out
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = parse_value(value.strip())
    return out


def train_kit(spec: str, args: argparse.Namespace, data: DataConfig, run_dir: Path) -> Encoder:
    from simclr_kit.training import pretrain

    base = {"data": dataclasses.asdict(data), "epochs": args.epochs,
            "batch_size": args.batch_size, "seed": args.seed, "out": str(run_dir),
            "progress": False, "checkpoint_every": 0, "device": args.device}
    pretrain(from_dict(PretrainConfig, merge(base, kit_overrides(spec))), report=False)
    return load_encoder(run_dir, args.device)


def train_lightly(args: argparse.Namespace, store: ImageStore) -> Encoder:
    """lightly's SimCLR CIFAR-10 recipe on the same decoded images (PIL in, per-image views)."""
    from lightly.loss import NTXentLoss
    from lightly.models.modules import SimCLRProjectionHead
    from lightly.transforms import SimCLRTransform
    from PIL import Image

    torch.manual_seed(args.seed)
    transform = SimCLRTransform(input_size=store.image_size, cj_strength=0.5, gaussian_blur=0.0)
    pixels = store.images.permute(0, 2, 3, 1).numpy()  # (N, S, S, 3) uint8

    class Views(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(pixels)

        def __getitem__(self, i: int):
            return transform(Image.fromarray(pixels[i]))

    loader = torch.utils.data.DataLoader(Views(), batch_size=args.batch_size, shuffle=True,
                                         drop_last=True, num_workers=args.lightly_workers,
                                         persistent_workers=args.lightly_workers > 0)
    backbone = build_backbone("resnet18", "cifar")
    head = SimCLRProjectionHead(512, 512, 128)
    params = list(backbone.parameters()) + list(head.parameters())
    optimizer = torch.optim.SGD(params, lr=0.06 * args.batch_size / 128, momentum=0.9,
                                weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.epochs)
    criterion = NTXentLoss()
    backbone.train()
    head.train()
    for _ in range(args.epochs):
        for x0, x1 in loader:
            z0 = head(backbone(x0).flatten(1))
            z1 = head(backbone(x1).flatten(1))
            loss = criterion(z0, z1)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        scheduler.step()
    return Encoder(backbone, store.image_size, IMAGENET_MEAN, IMAGENET_STD)


def random_encoder(args: argparse.Namespace, store: ImageStore) -> Encoder:
    torch.manual_seed(args.seed)
    return Encoder(build_backbone("resnet18", "cifar"), store.image_size,
                   *channel_stats(store.images))


def score(encoder: Encoder, train: ImageStore, test: ImageStore, name: str) -> dict[str, float]:
    rows, _ = run_protocols(encoder, train, test, EvalConfig(protocols=("knn", "linear")),
                            torch.device("cpu"), name, progress=False)
    return {f"{r['protocol']}_{r['metric']}": round(r["value"], 2) for r in rows}


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/datasets/cifar10")
    parser.add_argument("--train-images", type=int, default=10_000)
    parser.add_argument("--test-images", type=int, default=2_000)
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--lightly-workers", type=int, default=2,
                        help="DataLoader workers of the lightly run (its per-image transforms)")
    parser.add_argument("--runs", nargs="+", default=["kit", "lightly", "random"])
    parser.add_argument("--work", default=".data/quality", help="subsets and run directories")
    parser.add_argument("--out", default=None, help="append each result as a JSON line here")
    args = parser.parse_args()

    work = Path(args.work)
    folder = subset(args.data, args.train_images, args.test_images, work)
    data = DataConfig(data=str(folder), image_size=args.image_size)
    train_split, test_split = open_splits(data, need_eval=True)
    train = decode_split(train_split, args.image_size, progress=False)
    test = decode_split(test_split, args.image_size, progress=False)
    print(f"{len(train)} train / {len(test)} test images at {args.image_size} px; "
          f"{args.epochs} epochs, batch {args.batch_size}, seed {args.seed}; "
          f"torch threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.1f}", flush=True)
    for spec in args.runs:
        started = time.perf_counter()
        if spec.startswith("kit"):
            run_dir = work / "runs" / f"{time.strftime('%Y%m%d-%H%M%S')}-{len(os.listdir(work))}"
            encoder = train_kit(spec, args, data, run_dir)
        elif spec == "lightly":
            encoder = train_lightly(args, train)
        elif spec == "random":
            encoder = random_encoder(args, train)
        else:
            raise SystemExit(f"unknown run {spec!r}: kit[:FIELD=VALUE,...], lightly or random")
        seconds = time.perf_counter() - started
        result = {"run": spec, "train_s": round(seconds, 1), **score(encoder, train, test, spec),
                  "images": len(train), "image_size": args.image_size, "epochs": args.epochs,
                  "batch_size": args.batch_size, "seed": args.seed, "commit": commit(),
                  "load": round(os.getloadavg()[0], 1), "date": time.strftime("%Y-%m-%d %H:%M")}
        print(json.dumps(result), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
