"""One decoding task: rows of a split's image column decoded into their slots, in RAM or in
the shared map, with the record of what it kept and skipped."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from simclr_kit.data import mapped
from simclr_kit.data.chunk_digests import rows_digest
from simclr_kit.data.image_entries import item_name, open_item
from simclr_kit.data.pixels import Layout, decode_image


def _reason(err: Exception) -> str:
    text = str(err).splitlines()[0] if str(err).strip() else ""
    text = re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", "embedded bytes", text)
    return f"{type(err).__name__}: {text}".strip()


class ChunkDecoder:
    """Decode rows ``[start, stop)`` of ``raw`` in ``layout``'s form into the same rows of
    ``out``: an ``(N, 3, L, L)`` uint8 array in RAM, or the path of a ``.npy`` that each process
    maps shared on first use. Each image goes to the top-left of its slot, zeros elsewhere.

    Returns a chunk record ``{start, stop, files, skipped, counts, sizes}`` (``counts``: the kept
    images' per-channel histograms, 3 x 256, of their valid pixels only; ``sizes``: each kept
    image's ``[height, width]``); a skipped row's slot keeps zeros.
    """

    def __init__(self, raw: datasets.Dataset, column: str, layout: Layout,
                 out: np.ndarray | Path) -> None:
        self.raw, self.column, self.layout, self.out = raw, column, layout, out
        self._map: tuple[int, Any] | None = None  # (pid, (mmap, array, offset))

    def _rows(self) -> np.ndarray:
        if isinstance(self.out, np.ndarray):
            return self.out
        if self._map is None or self._map[0] != os.getpid():  # a forked worker maps its own
            self._map = (os.getpid(), mapped.map_rows(self.out))
        return self._map[1][1]

    def _items(self, start: int, stop: int) -> list[Any]:
        try:  # one Arrow read per slice; a row that cannot be read fails alone, below
            return list(self.raw[start:stop][self.column])
        except Exception:
            return [None] * (stop - start)

    def __call__(self, start: int, stop: int) -> dict:
        out, files, skipped, sizes = self._rows(), [], [], []
        counts = np.zeros((3, 256), np.int64)
        for first in range(start, stop, 64):
            items = self._items(first, min(first + 64, stop))
            for row, item in enumerate(items, first):
                try:
                    item = self.raw[row][self.column] if item is None else item
                    with open_item(item) as img:
                        hwc = decode_image(img, self.layout)
                    h, w = hwc.shape[:2]
                    out[row, :, :h, :w] = hwc.transpose(2, 0, 1)  # (3, h, w): see data/mapped.py
                    out[row, :, h:] = 0  # the padding is zero whatever the file held before
                    out[row, :, :h, w:] = 0
                    for c in range(3):
                        counts[c] += np.bincount(hwc[..., c].ravel(), minlength=256)
                    files.append(item_name(item))
                    sizes.append([h, w])
                except Exception as err:  # PIL raises many types for bad bytes; each is one bad row
                    skipped.append((row, item_name(item), _reason(err)))
        record = {"start": start, "stop": stop, "files": files, "skipped": skipped,
                  "counts": counts.tolist(), "sizes": sizes}
        if self._map is not None:
            mm, array, offset = self._map[1]
            mapped.flush_rows(mm, offset, array[0].nbytes, start, stop)
            bad = {r for r, _, _ in skipped}
            record["sha256"] = rows_digest(array, [r for r in range(start, stop)
                                                   if r not in bad])
        return record

    def close(self) -> None:
        if self._map is not None and self._map[0] == os.getpid():
            mm, array, _ = self._map[1]
            del array
            self._map = None
            mm.close()
