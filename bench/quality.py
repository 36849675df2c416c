"""Encoder quality side by side: simclr-kit recipes, lightly 1.6's SimCLR and a random-init
ResNet-18, each pretrained on the same images for the same epochs and batch, and all scored
by the same frozen-feature protocols (kNN k=200 T=0.1 and the linear probe of
``simclr evaluate``).

Settings are chosen on validation, and the test split is reported once, for the chosen ones:
every encoder pretrains on the first ``--train-images`` rows of the train split, the probes
are fitted on those rows' labels, and they are scored on a validation part of train that
pretraining never sees (``--val-images`` rows drawn class-stratified, with ``--split-seed``,
from the rows after the training subset). ``--report-test`` also scores the first
``--test-images`` rows of the test split; leave it off while comparing settings.

    python bench/quality.py --data ../shared/datasets/cifar10 --train-images 10000 \\
        --val-images 2000 --image-size 16 --epochs 5 --batch-size 128 --seed 0 \\
        --runs kit 'kit:lr=1.2' lightly random --out bench/quality.jsonl
    python bench/quality.py ... --runs kit lightly random --report-test --out bench/quality.jsonl
    python bench/quality.py --summarize bench/quality.jsonl    # mean and range over the seeds

A run is ``kit`` (the defaults), ``kit:FIELD=VALUE,...`` (``PretrainConfig`` fields; nested
ones as ``augment.flip_p=0``), ``lightly`` (lightly's own CIFAR-10 recipe: its SimCLRTransform
with ``cj_strength=0.5`` and no blur, SimCLRProjectionHead(512, 512, 128), NTXentLoss at its
default T=0.5, SGD lr 0.06 x B/128, momentum 0.9, weight decay 5e-4, cosine over the epochs;
on the same torchvision ResNet-18 with the CIFAR stem), ``random``, or ``from:RUN_DIR=NAME``: a
simclr-kit run this script trained before (its directory under ``--work``/runs, same seed),
scored again under the name NAME, e.g. on the test split once its setting is chosen. Each
result is printed and appended to ``--out`` as one JSON line. lightly is a bench-only extra:
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

import numpy as np
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from simclr_kit.config import DataConfig, EvalConfig, PretrainConfig, from_dict, merge  # noqa: E402
from simclr_kit.data.splits import open_splits  # noqa: E402
from simclr_kit.data.store import ImageStore, decode_split  # noqa: E402
from simclr_kit.models.encoder import (IMAGENET_MEAN, IMAGENET_STD, Encoder,  # noqa: E402
                                       load_encoder)
from simclr_kit.evaluation.protocols import run_protocols  # noqa: E402
from simclr_kit.augment import channel_stats  # noqa: E402
from simclr_kit.models.backbones import build_backbone  # noqa: E402


def validation_rows(labels: np.ndarray, start: int, n: int, seed: int) -> np.ndarray:
    """``n`` row numbers of ``labels`` at or after ``start``, the same number from each class
    (``n // classes``; the first ``n % classes`` classes one more), drawn with ``seed``; sorted.
    Rows before ``start`` (the pretraining subset) are never drawn."""
    rng = np.random.default_rng(seed)
    classes = np.unique(labels[start:])
    rows = []
    for i, c in enumerate(classes):
        pool = start + np.flatnonzero(labels[start:] == c)
        take = n // len(classes) + (i < n % len(classes))
        if take > len(pool):
            raise SystemExit(f"class {c} has {len(pool)} rows after the training subset, "
                             f"fewer than the {take} validation rows asked for")
        rows.append(rng.choice(pool, size=take, replace=False))
    return np.sort(np.concatenate(rows))


def subset(data: str, train_images: int, val_images: int, test_images: int, split_seed: int,
           label_column: str, out: Path) -> Path:
    """A Parquet folder of three splits, every encoder trained and scored on exactly these:
    ``train``, the first ``train_images`` rows of ``data``'s train file (its rows are
    shuffled); ``validation``, :func:`validation_rows` of the rest of train; ``test``, the
    first ``test_images`` rows of its test file."""
    folder = out / f"{Path(data).name}-{train_images}-val{val_images}s{split_seed}-{test_images}"
    if (folder / "test.parquet").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    train = pq.read_table(Path(data) / "train.parquet")
    labels = train.column(label_column).to_numpy()
    val = validation_rows(labels, train_images, val_images, split_seed)
    pq.write_table(train.slice(0, train_images), folder / "train.parquet")
    pq.write_table(train.take(val), folder / "validation.parquet")
    test = pq.read_table(Path(data) / "test.parquet")
    pq.write_table(test.slice(0, test_images), folder / "test.parquet")
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
    from simclr_kit.train.loop import pretrain

    base = {"data": dataclasses.asdict(data), "epochs": args.epochs,
            "batch_size": args.batch_size, "seed": args.seed, "out": str(run_dir),
            "progress": False, "checkpoint_every": 0, "device": args.device}
    pretrain(from_dict(PretrainConfig, merge(base, kit_overrides(spec))), report=False)
    return load_encoder(run_dir, args.device)


def earlier_run(spec: str, seed: int) -> tuple[str, Encoder]:
    """``from:RUN_DIR=NAME`` -> (NAME, the run's encoder); the run must have used ``seed``."""
    import yaml

    run_dir, _, name = spec.removeprefix("from:").partition("=")
    recorded = yaml.safe_load((Path(run_dir) / "config.yaml").read_text())["seed"]
    if recorded != seed:
        raise SystemExit(f"{run_dir} was trained with seed {recorded}, not --seed {seed}")
    return name or spec, load_encoder(run_dir, "cpu")


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


def score(encoder: Encoder, train: ImageStore, scored: ImageStore, name: str) -> dict[str, float]:
    """kNN and linear-probe accuracies on ``scored``, the probes fitted on ``train``'s labels."""
    rows, _ = run_protocols(encoder, train, scored, EvalConfig(protocols=("knn", "linear")),
                            torch.device("cpu"), name, progress=False)
    return {f"{r['protocol']}_{r['metric']}": round(r["value"], 2) for r in rows}


def summarize(path: str) -> None:
    """A Markdown table of a results file: per run and split, the mean over seeds and each
    seed's value, of kNN top-1, kNN top-5 and linear top-1."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            groups.setdefault((r.get("split", "test"), r["run"]), []).append(r)
    keys = ("knn_top1", "knn_top5", "linear_top1")
    print("| split | run | seeds | " + " | ".join(f"{k} mean (per seed)" for k in keys) + " |")
    print("| --- | --- | --- |" + " ---: |" * len(keys))
    for (split, run), rows in sorted(groups.items()):
        rows = sorted(rows, key=lambda r: r["seed"])
        cells = [f"{np.mean([r[k] for r in rows]):.2f} ({' / '.join(f'{r[k]:.2f}' for r in rows)})"
                 for k in keys]
        seeds = ",".join(str(r["seed"]) for r in rows)
        print(f"| {split} | {run} | {seeds} | " + " | ".join(cells) + " |")


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/datasets/cifar10")
    parser.add_argument("--train-images", type=int, default=10_000,
                        help="pretraining and probe-fitting rows: the first rows of train")
    parser.add_argument("--val-images", type=int, default=2_000,
                        help="validation rows, stratified, from the rest of train")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the validation rows")
    parser.add_argument("--test-images", type=int, default=2_000,
                        help="test rows scored with --report-test: the first rows of test")
    parser.add_argument("--label-column", default="label")
    parser.add_argument("--report-test", action="store_true",
                        help="also score the test split (for the settings already chosen)")
    parser.add_argument("--summarize", metavar="JSONL",
                        help="print the mean over seeds of a results file as a table, and exit")
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
    if args.summarize:
        return summarize(args.summarize)

    work = Path(args.work)
    folder = subset(args.data, args.train_images, args.val_images, args.test_images,
                    args.split_seed, args.label_column, work)
    data = DataConfig(data=str(folder), image_size=args.image_size)
    scored = {"validation": None, **({"test": None} if args.report_test else {})}
    for name in scored:
        train_split, split = open_splits(dataclasses.replace(data, eval_split=name), True)
        scored[name] = decode_split(split, args.image_size, progress=False)
    train = decode_split(train_split, args.image_size, progress=False)
    sizes = " / ".join(f"{len(store)} {name}" for name, store in scored.items())
    print(f"{len(train)} train / {sizes} images at {args.image_size} px; "
          f"{args.epochs} epochs, batch {args.batch_size}, seed {args.seed}; "
          f"torch threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.1f}", flush=True)
    for spec in args.runs:
        started, reused = time.perf_counter(), spec.startswith("from:")
        if spec.startswith("kit"):
            run_dir = work / "runs" / f"{time.strftime('%Y%m%d-%H%M%S')}-{len(os.listdir(work))}"
            encoder = train_kit(spec, args, data, run_dir)
        elif spec == "lightly":
            encoder = train_lightly(args, train)
        elif spec == "random":
            encoder = random_encoder(args, train)
        elif spec.startswith("from:"):
            spec, encoder = earlier_run(spec, args.seed)
        else:
            raise SystemExit(f"unknown run {spec!r}: kit[:FIELD=VALUE,...], lightly, random or "
                             "from:RUN_DIR=NAME")
        seconds = None if reused else round(time.perf_counter() - started, 1)
        for name, store in scored.items():
            result = {"run": spec, "split": name, "train_s": seconds,
                      **score(encoder, train, store, spec), "images": len(train),
                      "scored_images": len(store), "image_size": args.image_size,
                      "epochs": args.epochs, "batch_size": args.batch_size, "seed": args.seed,
                      "commit": commit(), "load": round(os.getloadavg()[0], 1),
                      "date": time.strftime("%Y-%m-%d %H:%M")}
            print(json.dumps(result), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
