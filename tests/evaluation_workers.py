"""Worker functions for the spawned process groups of test_evaluate.py (imports kept small)."""

from __future__ import annotations

from pathlib import Path

import torch

from distributed_workers import join_group
from simclr_kit import distributed
from simclr_kit.data.store import ImageStore
from simclr_kit.models.encoder import Encoder
from simclr_kit.evaluation.cache import cached_features
from simclr_kit.models.backbones import build_backbone


def tiny_encoder_and_store(n: int, seed: int = 0) -> tuple[Encoder, ImageStore]:
    """A seeded CIFAR-stem ResNet-18 encoder and n seeded random 8 px images."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 8, 8), generator=g, dtype=torch.uint8)
    torch.manual_seed(seed)
    encoder = Encoder(build_backbone("resnet18", "cifar"), 8, (0.5,) * 3, (0.25,) * 3)
    return encoder, ImageStore(images, torch.arange(n) % 2, None, torch.arange(n), 8)


def cache_worker(rank: int, world: int, port: int, n: int, folder: str) -> None:
    """Two cached_features calls on every rank: a miss (sharded extraction, rank 0 writes) and
    a hit; saves both results and the hit flags for the test to compare."""
    join_group(rank, world, port)
    try:
        encoder, store = tiny_encoder_and_store(n)
        cache_dir = Path(folder) / "features"
        first = cached_features(encoder, store, "train", cache_dir, torch.device("cpu"), 2)
        distributed.barrier()  # rank 0's file is complete before anyone looks for it
        second = cached_features(encoder, store, "train", cache_dir, torch.device("cpu"), 2)
        torch.save({"first": first.features, "second": second.features,
                    "hits": torch.tensor([first.hit, second.hit])},
                   Path(folder) / f"rank{rank}.pt")
    finally:
        distributed.shutdown()
