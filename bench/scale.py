"""Start-up costs at ImageNet scale, the former way and the current way in one run; prints one
JSON line per result.

    python bench/scale.py --root /tmp/scale-bench        # then: rm -rf /tmp/scale-bench

- **Labels.** A generated Parquet split of 1,281,167 rows (ImageNet-1k's train split): a
  ClassLabel column of 1,000 classes and the same 4 x 4 PNG in every row. Opened with
  ``datasets`` as simclr-kit opens it, its table has the record batches of an image set
  (100 rows each), and a per-row read costs in proportion to their number: the former way is
  timed on ``--sample`` rows at this full size and extrapolated linearly to every row.
  Former: ``ds.select_columns([col])[col]`` read row by row (``store._labels`` before it read
  columns), and ``ds.train_test_split(..., stratify_by_column=col)`` to carve the validation
  part. Current: ``store._labels`` (one Arrow column) and ``splits._carve_validation``; the
  labels and the carved rows are checked equal to the former ones.
- **The feature cache's data key.** Former: SHA-256 over every decoded uint8 pixel (what
  ``cache.data_hash`` still does for a set held in memory, which has no store key), timed on
  ``--hash-images`` random 224 x 224 images and extrapolated to 1,281,167 of them. Current:
  ``cache.data_hash`` of a store with a decoded cache's key, at the full ImageNet shape (its
  pixels are a broadcast view: the key reads none of them) and 1,281,167 row ids.

- **A cached store.** A train split of ``--store-images`` (300,000) 32 x 32 JPEGs with
  ImageNet's 1,000 classes once the default 20% validation part is carved off (375,000 rows
  generated), decoded once with their labels into the decoded cache (timed: the first run's
  decoding). Then, in a new process, as a second ``simclr pretrain --monitor-knn`` or
  ``simclr evaluate`` on the same data starts: opening the splits, reopening the decoded store
  with its labels (a cache hit), and the feature cache's data key of that store, the part of
  ``evaluate``'s start-up that grows with the set.

Times are ``wall / CPU`` seconds of this process (CPU time is the steadier of the two on a
shared machine). Everything lives under ``--root``, which may be kept between runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import time
from pathlib import Path

import numpy as np

IMAGENET_TRAIN_ROWS = 1_281_167
IMAGENET_CLASSES = 1_000


def make_labels_set(folder: Path, rows: int, classes: int) -> None:
    """``folder/train.parquet``: ``rows`` rows of one 4 x 4 PNG and a random ClassLabel."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.fromarray(np.full((4, 4, 3), 128, np.uint8)).save(buf, "PNG")
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(
        names=[f"n{c:08d}" for c in range(classes)])})
    labels = np.random.default_rng(0).integers(0, classes, rows)
    with pq.ParquetWriter(folder / "train.parquet.partial", features.arrow_schema) as writer:
        for start in range(0, rows, 100_000):
            stop = min(start + 100_000, rows)
            image = [{"bytes": buf.getvalue(), "path": None}] * (stop - start)
            writer.write_table(pa.table({"image": image, "label": labels[start:stop]},
                                        schema=features.arrow_schema))
    (folder / "train.parquet.partial").rename(folder / "train.parquet")


class Clock:
    """Wall and CPU seconds of one block: ``with Clock() as c: ...``, then ``c.wall``,
    ``c.cpu`` and ``str(c)`` (``"wall / CPU"``)."""

    def __enter__(self) -> Clock:
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self._wall
        self.cpu = time.process_time() - self._cpu

    def __str__(self) -> str:
        return f"{self.wall:.3f} / {self.cpu:.3f}"


def _print(result: dict) -> None:
    print(json.dumps(result), flush=True)


def _scaled(clock: Clock, factor: float) -> str:
    return f"{clock.wall * factor:.1f} / {clock.cpu * factor:.1f}"


def labels(root: Path, rows: int, sample: int) -> None:
    """Carving the validation part and reading the labels, former and current ways."""
    from simclr_kit.config import DataConfig
    from simclr_kit.data import store as store_module
    from simclr_kit.data.splits import TRAIN_SPLITS, _carve_validation, whole_split

    folder = root / f"labels{rows}"
    if not (folder / "train.parquet").is_file():
        with Clock() as made:
            make_labels_set(folder, rows, IMAGENET_CLASSES)
        _print({"bench": "generate", "rows": rows, "seconds": str(made)})
    cfg = DataConfig(data=str(folder))
    with Clock() as opened:  # the first open of a run builds the datasets cache
        whole = whole_split(cfg, TRAIN_SPLITS)
    ds, column = whole.dataset, whole.label_column
    assert column is not None
    _print({"bench": "open", "rows": len(ds), "seconds": str(opened),
            "record_batches": ds.data.column(column).num_chunks})

    with Clock() as former_carve:
        parts = ds.train_test_split(test_size=cfg.val_fraction, seed=cfg.split_seed,
                                    stratify_by_column=column)
    with Clock() as current_carve:
        train, val = _carve_validation(ds, cfg)
    for old, new in ((parts["train"], train), (parts["test"], val)):
        assert np.array_equal(old._indices.column(0).to_numpy(),
                              new._indices.column(0).to_numpy()), "the carved rows differ"
    _print({"bench": "carve the validation part", "rows": len(ds), "train": len(train),
            "validation": len(val), "former_train_test_split_s": str(former_carve),
            "current_s": str(current_carve)})

    # The labels of the carved train part, as decode_split reads them (no row broken here).
    split = dataclasses.replace(whole, dataset=train)
    keep = np.arange(len(train))
    with Clock() as former_rows:
        values = split.dataset.select_columns([column])[column]  # the former _labels
        former = [values[int(i)] for i in keep[:sample]]
    with Clock() as current_sample:
        current = store_module._labels(split, keep[:sample], "error")
    with Clock() as current_all:
        every = store_module._labels(split, keep, "error")
    assert current is not None and every is not None
    assert current.tolist() == former and every[:sample].tolist() == former
    factor = IMAGENET_TRAIN_ROWS / sample
    _print({"bench": "labels", "split": "carved train part", "rows": len(train),
            "sample_rows": sample, "former_per_row_sample_s": str(former_rows),
            "former_ms_per_row_cpu": round(1000 * former_rows.cpu / sample, 3),
            "former_extrapolated_to_1281167_s": _scaled(former_rows, factor),
            "current_sample_s": str(current_sample),
            "current_all_rows_s": str(current_all)})


def feature_key(hash_images: int, size: int = 224) -> None:
    """The feature cache's data key of ImageNet at ``size`` px, former and current ways."""
    import torch

    from simclr_kit.data.store import ImageStore
    from simclr_kit.evaluation.cache import data_hash

    def store(images: torch.Tensor, key: str | None) -> ImageStore:
        return ImageStore(images=images, labels=None, class_names=None, image_size=size,
                          row_ids=torch.arange(len(images)), key=key)

    pixels = torch.randint(0, 256, (hash_images, 3, size, size), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    with Clock() as former:
        data_hash(store(pixels, None))
    gigabytes = pixels.numel() / 1e9
    whole = torch.zeros((1, 3, size, size), dtype=torch.uint8).expand(IMAGENET_TRAIN_ROWS, -1,
                                                                      -1, -1)
    with Clock() as current:
        keyed = data_hash(store(whole, "0" * 64))
    assert keyed != data_hash(store(whole, "1" * 64))  # the key is what it depends on
    factor = IMAGENET_TRAIN_ROWS / hash_images
    _print({"bench": "feature-cache data key", "size": size, "sample_images": hash_images,
            "former_pixel_sha256_sample_s": str(former),
            "former_gb_per_s_cpu": round(gigabytes / former.cpu, 3),
            "former_extrapolated_to_1281167_s": _scaled(former, factor),
            "imagenet_pixel_gb": round(IMAGENET_TRAIN_ROWS * 3 * size * size / 1e9, 1),
            "current_store_key_1281167_s": str(current)})


def make_store_set(folder: Path, rows: int, size: int = 32) -> None:
    """``folder/train.parquet``: ``rows`` JPEGs of ``size`` px (64 distinct smooth images in
    turn) and a random ClassLabel of 1,000 classes."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 1, size)[None, :, None]
    jpegs = []
    for colour in rng.integers(0, 256, (64, 3)):
        buf = io.BytesIO()
        Image.fromarray((ramp * colour + (1 - ramp) * colour[::-1]).astype(np.uint8).repeat(
            size, axis=0)).save(buf, "JPEG", quality=90)
        jpegs.append({"bytes": buf.getvalue(), "path": None})
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(
        names=[f"n{c:08d}" for c in range(IMAGENET_CLASSES)])})
    labels = rng.integers(0, IMAGENET_CLASSES, rows)
    folder.mkdir(parents=True, exist_ok=True)
    with pq.ParquetWriter(folder / "train.parquet.partial", features.arrow_schema) as writer:
        for start in range(0, rows, 50_000):
            stop = min(start + 50_000, rows)
            image = [jpegs[i % len(jpegs)] for i in range(start, stop)]
            writer.write_table(pa.table({"image": image, "label": labels[start:stop]},
                                        schema=features.arrow_schema))
    (folder / "train.parquet.partial").rename(folder / "train.parquet")


def _open_store(folder: Path) -> tuple[Clock, Clock, object]:
    """Open the splits and decode (or reopen) the train split with its labels, as pretraining
    with ``--monitor-knn`` and ``evaluate`` do; returns the two clocks and the store."""
    from simclr_kit.config import DataConfig
    from simclr_kit.data.splits import open_splits
    from simclr_kit.data.store import decode_split

    with Clock() as opened:
        train, _ = open_splits(DataConfig(data=str(folder)), need_eval=False)
    with Clock() as decoded:
        store = decode_split(train, 32, progress=False, labels=True)
    assert store.labels is not None and len(store.labels) == len(store)
    return opened, decoded, store


def cached_store(root: Path, images: int) -> None:
    """The first decoding of an ``images``-row set, then a new process's cache-hit start."""
    import subprocess
    import sys

    from simclr_kit.config import DataConfig

    folder = root / f"store{images}"
    if not (folder / "train.parquet").is_file():
        rows = round(images / (1 - DataConfig().val_fraction))  # the carved train part: images
        with Clock() as made:
            make_store_set(folder, rows)
        _print({"bench": "generate", "rows": rows, "seconds": str(made)})
    opened, decoded, store = _open_store(folder)
    _print({"bench": "cached store: first run", "images": len(store),
            "open_splits_s": str(opened), "decode_with_labels_s": str(decoded)})
    subprocess.run([sys.executable, __file__, "--root", str(root), "--store-hit", str(images)],
                   check=True)


def cached_store_hit(root: Path, images: int) -> None:
    from simclr_kit.evaluation.cache import data_hash

    opened, reopened, store = _open_store(root / f"store{images}")
    with Clock() as keyed:
        data_hash(store)
    _print({"bench": "cached store: a new process starts", "images": len(store),
            "open_splits_s": str(opened), "reopen_decoded_with_labels_s": str(reopened),
            "feature_cache_data_key_s": str(keyed)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("/tmp/scale-bench"))
    parser.add_argument("--rows", type=int, default=IMAGENET_TRAIN_ROWS,
                        help="rows of the generated label set (ImageNet-1k's train split)")
    parser.add_argument("--sample", type=int, default=1000,
                        help="rows read the former, per-row way")
    parser.add_argument("--hash-images", type=int, default=2000,
                        help="224-px images hashed the former, per-pixel way")
    parser.add_argument("--store-images", type=int, default=300_000,
                        help="images of the cached store's train part")
    parser.add_argument("--parts", nargs="+", default=["labels", "key", "store"],
                        choices=["labels", "key", "store"], help="which measurements to run")
    parser.add_argument("--store-hit", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.update(SIMCLR_KIT_CACHE=str(args.root / "cache"), HF_HOME=str(args.root / "hf"),
                      HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    if args.store_hit is not None:  # the new process of cached_store
        return cached_store_hit(args.root, args.store_hit)
    if "labels" in args.parts:
        labels(args.root, args.rows, args.sample)
    if "key" in args.parts:
        feature_key(args.hash_images)
    if "store" in args.parts and args.store_images:
        cached_store(args.root, args.store_images)


if __name__ == "__main__":
    main()
