"""Streaming batches from the mapped store: the same (indices, images) as the resident path,
each rank its own disjoint share of every batch, the automatic choice, errors surfacing."""

from __future__ import annotations

import threading

import pytest
import torch

from simclr_kit import distributed
from simclr_kit.data import stream
from simclr_kit.data.loader import ResidentBatches, epoch_permutation
from simclr_kit.data.stream import StreamedBatches, batch_source, choose

N, BATCH, SEED = 37, 6, 3  # 6 steps, one partial batch dropped


def _images(n: int = N) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, 5, 5), generator=g, dtype=torch.uint8)


def _batches(source, epoch: int, start: int = 0, steps: int = N // BATCH) -> list:
    # Copies: a streamed CPU batch lives in a buffer reused once the next batch is asked for.
    return [(idx.clone(), source.gather(idx).clone()) for idx in source.epoch(epoch, start, steps)]


@pytest.mark.parametrize("start", [0, 2])
def test_streamed_batches_are_the_resident_batches(start):
    images = _images()
    resident = _batches(ResidentBatches(images, torch.device("cpu"), BATCH, SEED), 1, start)
    streamed = _batches(StreamedBatches(images, torch.device("cpu"), BATCH, SEED, depth=2), 1,
                        start)
    assert len(streamed) == len(resident) == N // BATCH - start
    for (i, x), (j, y) in zip(streamed, resident):
        assert torch.equal(i, j) and torch.equal(x, y) and torch.equal(x, images[i])


def test_two_ranks_read_disjoint_batches_that_cover_the_epoch(monkeypatch):
    images = _images()
    seen = {}
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    for rank in (0, 1):
        monkeypatch.setattr(distributed, "rank", lambda rank=rank: rank)
        seen[rank] = _batches(StreamedBatches(images, torch.device("cpu"), BATCH, SEED), 0)
    perm = epoch_permutation(N, SEED, 0)
    for step, ((a, xa), (b, xb)) in enumerate(zip(seen[0], seen[1])):
        assert len(a) == len(b) == BATCH // 2
        assert torch.equal(torch.cat([a, b]), perm[step * BATCH:(step + 1) * BATCH])
        assert torch.equal(xa, images[a]) and torch.equal(xb, images[b])
    rows = torch.cat([i for part in seen.values() for i, _ in part])
    assert len(set(rows.tolist())) == len(rows) == (N // BATCH) * BATCH, "disjoint, whole batches"


def test_leaving_an_epoch_early_stops_the_gathering_thread():
    source = StreamedBatches(_images(), torch.device("cpu"), BATCH, SEED)
    for k, idx in enumerate(source.epoch(0, 0, N // BATCH)):
        assert source.gather(idx).shape == (BATCH, 3, 5, 5)
        if k == 1:
            break
    assert not [t for t in threading.enumerate() if t.name == "simclr-stream"]


def test_an_error_in_the_gathering_thread_reaches_the_loop(monkeypatch):
    source = StreamedBatches(_images(), torch.device("cpu"), BATCH, SEED)
    monkeypatch.setattr(stream, "batch_indices", lambda perm, step, b: torch.tensor([N + 5]))
    with pytest.raises(IndexError):
        list(source.epoch(0, 0, 2))


def test_gather_of_other_indices_reads_them_now():
    images = _images()
    source = StreamedBatches(images, torch.device("cpu"), BATCH, SEED)
    assert torch.equal(source.gather(torch.tensor([4, 1])), images[[4, 1]])


def test_automatic_choice_and_the_forcing_flag(monkeypatch, capsys):
    images, cpu = _images(), torch.device("cpu")
    assert choose("auto", images, cpu)[0] is False
    assert choose("on", images, cpu) == (True, "--stream on")
    assert choose("off", images, cpu) == (False, "--stream off")
    monkeypatch.setattr(stream.os, "sysconf", lambda name: 64 if name == "SC_PHYS_PAGES" else 4)
    streamed, why = choose("auto", images, cpu)  # 256 bytes of RAM: a quarter holds no set
    assert streamed and "exceed a quarter of the RAM" in why
    assert isinstance(batch_source(images, cpu, BATCH, SEED, "auto"), StreamedBatches)
    assert "streamed from the decoded file (--stream auto" in capsys.readouterr().out
    assert isinstance(batch_source(images, cpu, BATCH, SEED, "off"), ResidentBatches)


class _Stopped(Exception):
    pass


@pytest.mark.parametrize("name, current, index", [
    ("auto", 0, 0), ("cuda", 1, 1), ("cuda:1", 0, 1), (torch.device("cuda"), 2, 2),
    (torch.device("cuda", 1), 0, 1)])
def test_the_gathering_thread_sets_the_device_with_its_index(monkeypatch, name, current, index):
    """The device comes as a run outside torchrun has it (``process_device``, "cuda" without an
    index); the thread's ``set_device`` gets it through torch's own index check."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: None)  # no CUDA here
    set_to = []

    def set_device(device) -> None:
        set_to.append(torch.cuda._utils._get_device_index(device))  # what set_device checks
        raise _Stopped  # the rest of the thread's work needs a GPU

    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    device = distributed.process_device(name) if isinstance(name, str) else name
    source = StreamedBatches(_images(), device, BATCH, SEED)
    with pytest.raises(_Stopped):
        next(source.epoch(0, 0, N // BATCH))
    assert set_to == [index]
    assert stream.indexed_device(device) == torch.device("cuda", index)


def test_an_indexed_device_leaves_other_devices_alone():
    assert stream.indexed_device("cpu") == torch.device("cpu")
    assert stream.indexed_device(torch.device("meta")) == torch.device("meta")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_streamed_batches_on_cuda_are_the_resident_batches():
    images, cuda = _images(), distributed.process_device("cuda")  # as the trainer has it
    assert cuda.index is None, "outside torchrun the trainer's device has no index"
    resident_source = batch_source(images, cuda, BATCH, SEED, "off")
    streamed_source = batch_source(images, cuda, BATCH, SEED, "on")
    assert isinstance(streamed_source, StreamedBatches)
    resident, streamed = _batches(resident_source, 1), _batches(streamed_source, 1)
    assert len(streamed) == len(resident) == N // BATCH
    for (i, x), (j, y) in zip(streamed, resident):
        assert i.device.type == x.device.type == "cuda"
        assert torch.equal(i, j) and torch.equal(x, y)
