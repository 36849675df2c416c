"""The learning rate a pretraining run logs, step by step, against the schedule's formula."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from conftest import write_unlabeled_parquet
from simclr_kit.cli import main
from simclr_kit.report.metrics import read_metrics


def schedule(step: int, total_steps: int, warmup_steps: int, base_lr: float) -> float:
    """The rate of 0-based ``step``: linear warm-up over the first ``warmup_steps`` steps up to
    ``base_lr``, then a half cosine that reaches 0 at ``total_steps``."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    return base_lr / 2 * (1 + math.cos(math.pi * progress))


def test_logged_rates_follow_warmup_in_steps_then_cosine_to_zero(tmp_path: Path) -> None:
    # 16 images at batch 4: 4 steps an epoch, 12 in 3 epochs. A warm-up of 1.5 epochs (allowed
    # by --warmup-fraction 0.5) is 6 steps; counted in epochs it would be 1 or 2 steps, or whole
    # epochs of one rate each.
    data = write_unlabeled_parquet(tmp_path / "data")
    run = tmp_path / "run"
    assert main(["pretrain", "--data", str(data), "--out", str(run), "--epochs", "3",
                 "--batch-size", "4", "--image-size", "8", "--device", "cpu",
                 "--projection-dim", "8", "--log-every", "1", "--lr", "2.56",
                 "--lr-scaling", "linear", "--warmup-epochs", "1.5",
                 "--warmup-fraction", "0.5"]) == 0
    base_lr = 2.56 * 4 / 256
    logged = {r["step"]: r["lr"] for r in read_metrics(run / "metrics.jsonl")
              if r["kind"] == "train"}
    assert sorted(logged) == list(range(1, 13))  # one line after every step
    for step, lr in logged.items():  # the line after step k shows the rate step k ran at
        assert lr == pytest.approx(schedule(step - 1, 12, 6, base_lr), rel=1e-9, abs=1e-15), step
    assert logged[6] == logged[7] == pytest.approx(base_lr)  # the peak ends the warm-up
