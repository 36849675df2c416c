"""Training batches streamed from the mapped store, gathered ahead by a background thread.

For sets that do not fit on the device: while the step runs, a thread gathers the rows of the
next batches from the memory-mapped ``(N, 3, S, S)`` uint8 store into pinned host buffers
(a CPU device uses them as they are) and, on CUDA, copies them to the device with
``non_blocking`` on a copy stream of its own, so the step finds its batch ready. Each rank
gathers only the rows of its own share of each global batch. Memory: ``depth + 1`` batches of
host buffers, whatever the size of the set; the pixels stay in the page cache, once per machine.

:func:`choose` decides between this and the device-resident set (``--stream auto``).
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterator

import torch
from torch import Tensor
from tqdm.auto import tqdm

from simclr_kit import distributed
from simclr_kit.data.loader import ResidentBatches, batch_indices, epoch_permutation

_END = object()


def choose(mode: str, images: Tensor, device: torch.device) -> tuple[bool, str]:
    """Whether to stream (``mode`` "on", "off" or "auto") and a phrase saying why.

    Auto streams when the uint8 set takes over a quarter of the device's free memory (CUDA),
    or over a quarter of the machine's RAM on a CPU device, where the page cache must keep the
    map for a gather not to wait on the disk (then the overlap pays).
    """
    size = images.numel()
    if mode in ("on", "off"):
        return mode == "on", f"--stream {mode}"
    if device.type == "cuda":
        room, where = torch.cuda.mem_get_info(device)[0], "free device memory"
    else:
        room, where = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "RAM"
    fits = size < room // 4
    return not fits, (f"--stream auto: {size / 2**30:.2f} GiB of uint8 images "
                      f"{'fit in' if fits else 'exceed'} a quarter of the {where} "
                      f"({room / 2**30:.1f} GiB)")


def indexed_device(device: torch.device | str) -> torch.device:
    """``device`` with an index where it is CUDA: the device the gathering thread sets.

    The current CUDA device is per thread, so the thread must set it, and
    ``torch.cuda.set_device`` refuses a device without an index, which is what a run outside
    torchrun has ("cuda"): that one becomes the caller's current device, once, when the batch
    source is built. Other devices come back as they are."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


class StreamedBatches:
    """This rank's batches from ``images (N, 3, S, S) uint8`` on the CPU (a map), gathered
    ahead: the interface of :class:`~simclr_kit.data.loader.ResidentBatches`.

    ``global_batch``: images per step over all ranks; ``depth``: batches gathered ahead;
    ``device`` as :func:`~simclr_kit.distributed.process_device` gives it ("cuda" included).
    """

    def __init__(self, images: Tensor, device: torch.device | str, global_batch: int, seed: int,
                 depth: int = 2) -> None:
        self.images, self.device = images, indexed_device(device)
        self.global_batch, self.seed, self.depth = global_batch, seed, max(1, depth)
        self.cuda = self.device.type == "cuda"
        self._copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._buffers: list[Tensor] = []
        self._ready: tuple[Tensor, Tensor] | None = None  # the batch epoch() just yielded

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def epoch(self, epoch: int, start_step: int, steps: int) -> Iterator[Tensor]:
        """This rank's indices ``(b,)`` (on the device) for steps ``start_step .. steps - 1`` of
        ``epoch``; their images, gathered meanwhile, come from :meth:`gather`."""
        perm = epoch_permutation(len(self), self.seed, epoch)
        try:
            for idx, images in self.stream(perm, start_step, steps):
                self._ready = (idx, images)
                yield idx
        finally:
            self._ready = None

    def gather(self, idx: Tensor) -> Tensor:
        """The uint8 images ``(b, 3, S, S)`` of ``idx`` on the device: the prefetched batch when
        ``idx`` is the one :meth:`epoch` yielded last, else gathered now."""
        if self._ready is not None and idx is self._ready[0]:
            return self._ready[1]
        return self.images[idx.cpu()].to(self.device, non_blocking=True)

    def _buffer(self, slot: int, rows: int) -> Tensor:
        while len(self._buffers) <= slot:
            shape = (rows, *self.images.shape[1:])
            self._buffers.append(torch.empty(shape, dtype=torch.uint8, pin_memory=self.cuda))
        return self._buffers[slot][:rows]

    def stream(self, perm: Tensor, start_step: int, steps: int
               ) -> Iterator[tuple[Tensor, Tensor]]:
        """``(idx (b,) int64, images (b, 3, S, S) uint8)`` on the device for steps
        ``start_step .. steps - 1`` of the epoch whose global order is ``perm``.

        On a CPU device a batch's images live in a reused buffer: they are valid until the next
        batch is asked for (as a training step uses them).
        """
        ready: queue.Queue = queue.Queue()
        free: queue.Queue = queue.Queue()
        for slot in range(self.depth + 1):
            free.put(slot)
        stop = threading.Event()
        worker = threading.Thread(target=self._produce, daemon=True, name="simclr-stream",
                                  args=(perm.cpu(), start_step, steps, ready, free, stop))
        worker.start()
        held = None
        try:
            while True:
                item = ready.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                if held is not None:
                    free.put(held)  # the step that used the previous batch is over
                idx, images, event, held = item
                if event is not None:
                    current = torch.cuda.current_stream(self.device)
                    current.wait_event(event)
                    # Made on the copy stream: the allocator must not reuse them before the
                    # step's kernels on the current stream are done with them.
                    images.record_stream(current)
                    idx.record_stream(current)
                yield idx, images
        finally:
            stop.set()
            worker.join()

    def _produce(self, perm: Tensor, start_step: int, steps: int, ready: queue.Queue,
                 free: queue.Queue, stop: threading.Event) -> None:
        torch.set_num_threads(1)  # this thread only: the step keeps the cores
        try:
            if self.cuda:
                torch.cuda.set_device(self.device)  # the current device is per thread
            for step in range(start_step, steps):
                slot = None
                while slot is None:
                    if stop.is_set():
                        return
                    try:
                        slot = free.get(timeout=0.05)
                    except queue.Empty:
                        continue
                idx = batch_indices(perm, step, self.global_batch)
                buffer = self._buffer(slot, len(idx))
                torch.index_select(self.images, 0, idx, out=buffer)
                if not self.cuda:
                    ready.put((idx, buffer, None, slot))
                    continue
                with torch.cuda.stream(self._copy_stream):
                    images = buffer.to(self.device, non_blocking=True)
                    idx_device = idx.to(self.device, non_blocking=True)
                    event = torch.cuda.Event()
                    event.record()
                event.synchronize()  # this thread waits, not the step: the buffer is free again
                free.put(slot)
                ready.put((idx_device, images, event, None))
            ready.put(_END)
        except BaseException as err:  # raised in the training loop, where it can be handled
            ready.put(err)


def batch_source(images: Tensor, device: torch.device, global_batch: int, seed: int,
                 mode: str = "auto") -> ResidentBatches | StreamedBatches:
    """The training batches of ``images (N, 3, S, S) uint8``: held whole (on the device when it
    fits) or streamed from the map, as ``mode`` ("auto", "on", "off") and :func:`choose` decide.
    The choice is printed, on a CPU device only when it streams (held whole, the set is still
    the shared map, indexed by each step)."""
    streamed, why = choose(mode, images, torch.device(device))
    if distributed.is_main() and (streamed or torch.device(device).type != "cpu"):
        where = "streamed from the decoded file" if streamed else "held whole"
        if not streamed and torch.device(device).type == "cuda":
            where += " on the device"
        tqdm.write(f"training images: {where} ({why})")
    if streamed:
        return StreamedBatches(images, device, global_batch, seed)
    return ResidentBatches(images, device, global_batch, seed)
