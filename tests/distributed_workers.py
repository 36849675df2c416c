"""Worker functions for the spawned process groups of test_distributed.py.

Kept apart from the test module so that each spawned process imports only torch and the modules
under test (not datasets, pyarrow, the CLI): on a 2-core machine imports dominate a spawn.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from simclr_kit import distributed
from simclr_kit.augment import channel_stats
from simclr_kit.evaluation.features import extract_features
from simclr_kit.models.backbones import build_backbone


def join_group(rank: int, world: int, port: int) -> None:
    """What torchrun sets up for a worker, then the package's own initialisation."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    distributed.init(torch.device("cpu"))


def features(n: int, seed: int = 0) -> torch.Tensor:
    """Features ``(n, 512)`` of n seeded random 8 px images from a seeded ResNet-18, batch 2."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 8, 8), generator=g, dtype=torch.uint8)
    torch.manual_seed(seed)
    encoder = build_backbone("resnet18", "cifar")
    mean, std = channel_stats(images)
    return extract_features(encoder, images, mean, std, batch_size=2)


def features_worker(rank: int, world: int, port: int, n: int, folder: str) -> None:
    join_group(rank, world, port)
    try:
        torch.save(features(n), Path(folder) / f"rank{rank}.pt")
    finally:
        distributed.shutdown()


def peer_gone_worker(rank: int, world: int, port: int, folder: str) -> None:
    """Rank 1 leaves the job right after joining it (as a process that fails does); rank 0
    then builds its DDP model, and writes the error it gets."""
    from torch import nn

    from simclr_kit.errors import UserError

    join_group(rank, world, port)
    if rank == 1:
        os._exit(0)
    try:
        distributed.wrap_model(nn.Linear(3, 3), torch.device("cpu"))
        message = "no error"
    except UserError as err:
        message = f"UserError: {err}"
    except Exception as err:
        message = f"{type(err).__name__}: {err}"
    Path(folder, "rank0.txt").write_text(message)
    os._exit(0)  # the group cannot be shut down cleanly with its peer gone
