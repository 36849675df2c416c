"""Distributed training on CPU with gloo: 2 processes x B/2 must train like 1 process x B.

Real process groups (spawned workers, or ``python -m simclr_kit`` launched the way torchrun
launches it), tiny images (8 px) and tiny batches. The float32 tolerance is the check's own
(``check_distributed.TOLERANCE``: 1e-4 of each tensor's largest reference value); a correct
implementation lands near 1e-6, the gather without gradient near 1.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import distributed_workers as workers
from conftest import write_parquet_dataset
from simclr_kit import distributed
from simclr_kit.augment import SimCLRAugment, channel_stats
from simclr_kit.diagnostics.check_distributed import TOLERANCE, CheckConfig, run_checks
from simclr_kit.cli import main
from simclr_kit.config import AugmentConfig
from simclr_kit.models.heads import build_simclr
from simclr_kit.report.metrics import read_metrics
from simclr_kit.train.loop import batch_indices, epoch_permutation

N_IMAGES, GLOBAL_BATCH, SEED = 24, 8, 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_two_processes_match_one_and_a_gather_without_gradient_fails():
    cfg = CheckConfig(nproc=2, batch_size=8, image_size=8, device="cpu")
    good, bad = run_checks(cfg, ("with-grad", "no-grad"))  # one spawn, two steps from one start
    diffs = {d.what.split(" (")[0]: d for d in good.differences}
    assert good.passed, good.report()
    n_params = len(list(build_simclr("resnet18", "auto", 8).parameters()))
    assert f"gradients ({n_params} x 2 ranks)" in good.report()  # every parameter, every rank
    assert all(d.rel <= TOLERANCE for d in good.differences)
    assert diffs["views"].abs == 0.0  # each sample gets bit-identical views in both runs

    # The known bug: the forward (and so the loss) is the same, the gradients are not.
    assert not bad.passed and bad.report().endswith("FAIL")
    bad_diffs = {d.what.split(" (")[0]: d for d in bad.differences}
    assert bad_diffs["loss"].rel <= TOLERANCE
    assert bad_diffs["gradients"].rel > 100 * TOLERANCE
    assert bad_diffs["updated weights"].rel > 100 * TOLERANCE


def _views_per_step(images: torch.Tensor) -> dict[tuple[int, int], tuple[torch.Tensor, ...]]:
    """(epoch, step) -> this rank's (indices, view 1, view 2), as the training loop makes them."""
    mean, std = channel_stats(images)
    augment = SimCLRAugment(AugmentConfig(), 8, mean, std, seed=SEED)
    out = {}
    for epoch in (0, 1):
        perm = epoch_permutation(N_IMAGES, SEED, epoch)
        for step in range(N_IMAGES // GLOBAL_BATCH):
            idx = batch_indices(perm, step, GLOBAL_BATCH)
            out[(epoch, step)] = (idx, *augment(images[idx], idx, epoch))
    return out


def test_each_sample_gets_the_same_views_with_one_or_two_ranks(monkeypatch):
    """Over two epochs: the ranks' chunks make up the single-process batch, in order, and every
    sample's views are bit-identical (the real two-process step is compared in the check)."""
    g = torch.Generator().manual_seed(SEED)
    images = torch.randint(0, 256, (N_IMAGES, 3, 8, 8), generator=g, dtype=torch.uint8)
    single = _views_per_step(images)
    per_rank = []
    for r in range(2):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        monkeypatch.setattr(distributed, "world_size", lambda: 2)
        per_rank.append(_views_per_step(images))
    for key, (idx, v1, v2) in single.items():
        parts = [views[key] for views in per_rank]
        assert len(parts[0][0]) == GLOBAL_BATCH // 2
        assert torch.equal(torch.cat([p[0] for p in parts]), idx)
        assert torch.equal(torch.cat([p[1] for p in parts]), v1), key
        assert torch.equal(torch.cat([p[2] for p in parts]), v2), key


@pytest.mark.slow
def test_features_gathered_from_two_ranks_match_one_process(tmp_path):
    n = 7  # 2 ranks x 4 rows: one padding row that must not appear in the result
    mp.start_processes(workers.features_worker, args=(2, _free_port(), n, str(tmp_path)),
                       nprocs=2, start_method="spawn")
    reference = workers.features(n)  # this process: one rank, no padding
    for r in range(2):  # every rank gets all n rows, each once, in order
        gathered = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        assert gathered.shape == reference.shape == (n, 512)
        torch.testing.assert_close(gathered, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", [0, 1, 5, 7, 8, 13])
@pytest.mark.parametrize("world", [2, 3, 4])
def test_shards_cover_every_row_once(n, world, monkeypatch):
    blocks = []
    for r in range(world):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        monkeypatch.setattr(distributed, "world_size", lambda: world)
        rows = distributed.shard_rows(n)
        assert len(rows) == -(-n // world)  # equal sizes: all-gather needs them
        blocks.append(rows)
    # gather_rows keeps the first n of the concatenated blocks
    assert torch.equal(torch.cat(blocks)[:n], torch.arange(n))


def test_global_batch_not_divisible_by_world_is_exit_2_before_data(tmp_path, monkeypatch,
                                                                    capsys):
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    out = tmp_path / "run"
    (tmp_path / "empty").mkdir()  # no images: reading it would be an error of its own
    assert main(["pretrain", "--data", str(tmp_path / "empty"), "--out", str(out),
                 "--batch-size", "9", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "divisible by the number of processes (2)" in err and "empty" not in err
    assert not out.exists()


@pytest.mark.parametrize("argv,message", [
    (["--nproc", "1"], "at least 2 processes"),
    (["--nproc", "2", "--batch-size", "9"], "multiple of --nproc"),
    (["--nproc", "2", "--device", "tpu"], "--device"),
])
def test_check_distributed_bad_input_is_exit_2(argv, message, capsys):
    assert main(["check-distributed", *argv]) == 2
    assert message in capsys.readouterr().err


def _launch(args: list[str], cwd: Path, world: int = 2, timeout: float = 300) -> list[str]:
    """Start ``python -m simclr_kit ARGS`` in ``world`` processes with the environment torchrun
    gives its workers; returns their stderr. Every process must exit 0."""
    port = _free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                   LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, "-m", "simclr_kit", *args], cwd=cwd,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    try:
        outputs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for rank, (p, (_, err)) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"rank {rank} exited {p.returncode}:\n{err[-3000:]}"
    return [err for _, err in outputs]


@pytest.mark.slow
def test_two_process_pretraining_writes_one_checkpoint_set_and_resumes(tmp_path):
    data = write_parquet_dataset(tmp_path / "data", n_per_class=8, size=8)  # 24 train images
    run = tmp_path / "run"
    _launch(["pretrain", "--data", str(data), "--out", str(run), "--epochs", "2",
             "--batch-size", "8", "--device", "cpu", "--log-every", "1",
             "--projection-dim", "16", "--checkpoint-every", "1"], tmp_path)
    checkpoints = run / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["epoch-0001", "epoch-0002", "latest"]
    files = [sorted(p.name for p in (checkpoints / c).iterdir()) for c in ("epoch-0001", "epoch-0002")]
    assert files[0] == files[1] and {"model.safetensors", "model.json", "KEEP"} <= set(files[0])
    assert not [p for p in run.rglob("*") if "tmp" in p.name]  # no second writer's leftovers
    records = read_metrics(run / "metrics.jsonl")
    runs = [r for r in records if r["kind"] == "run"]
    assert len(runs) == 1 and runs[0]["world_size"] == 2
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]  # 24 / 8 steps per epoch, written once
    meta = json.loads((checkpoints / "epoch-0002" / "model.json").read_text())
    assert meta["global_step"] == 6

    _launch(["pretrain", "--resume", str(run), "--epochs", "3"], tmp_path)
    records = read_metrics(run / "metrics.jsonl")
    assert [r["kind"] for r in records].count("resume") == 1
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, 10))
    assert (checkpoints / "latest").read_text().strip() == "epoch-0003"


@pytest.mark.slow
def test_a_process_gone_from_the_job_is_one_line_in_the_others(tmp_path):
    """One node failed (here: left) during the decode; the other meets it in wrap_model."""
    mp.start_processes(workers.peer_gone_worker, args=(2, _free_port(), str(tmp_path)),
                       nprocs=2, start_method="spawn")
    message = (tmp_path / "rank0.txt").read_text()
    # The transport's words depend on the moment the peer left: closed, or reset.
    assert re.match(r"UserError: another process of this torchrun job stopped while this one "
                    r"was building the model \(DistributedDataParallel\) \(Connection "
                    r"(closed|reset) by peer\)", message), message
    assert "its own error, the cause, is in its output" in message and "\n" not in message


def test_a_collective_that_fails_for_another_reason_is_raised_as_it_is():
    with pytest.raises(RuntimeError, match="shapes do not match"):
        with distributed.collective("gathering"):
            raise RuntimeError("shapes do not match")
