"""The decoded store as a memory-mapped file: same pixels as in memory, parallel decoding,
atomic publication, a killed decode never read as complete and resumed; the stored size;
training frames in padded slots, compacted and resumed like crops."""

from __future__ import annotations

import io
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

import crash
from simclr_kit.augment import channel_stats
from simclr_kit.data import mapped, store
from simclr_kit.data.chunk_decoder import ChunkDecoder
from simclr_kit.data.pixels import Layout, decode_image, frame_size
from simclr_kit.data.size_policy import training_sizes
from simclr_kit.data.splits import Split
from simclr_kit.data.store import decode_split
from simclr_kit.errors import UserError

SIZE = 16
BAD = {5, 14}  # rows whose bytes are not an image


def _rows(n: int = 23) -> list[dict]:
    """JPEGs and PNGs of several sizes and modes, two rows of junk bytes."""
    rng = np.random.default_rng(0)
    shapes = [(20, 30), (40, 40), (16, 50), (SIZE, SIZE), (33, 21)]
    rows = []
    for i in range(n):
        h, w = shapes[i % len(shapes)]
        img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        img = img.convert("L") if i % 7 == 3 else img
        buf = io.BytesIO()
        img.save(buf, "JPEG" if i % 2 else "PNG")
        data = b"not an image at all" if i in BAD else buf.getvalue()
        rows.append({"bytes": data, "path": f"img{i}.{'jpg' if i % 2 else 'png'}"})
    return rows


def _split(dataset: datasets.Dataset) -> Split:
    return Split(dataset, "image", None, None, "test", "train")


@pytest.fixture
def on_disk(tmp_path: Path) -> Split:
    """A split read from Parquet: it has a fingerprint, so it is decoded to a mapped file."""
    features = datasets.Features({"image": datasets.Image()})
    datasets.Dataset.from_dict({"image": _rows()}, features=features).to_parquet(
        str(tmp_path / "train.parquet"))
    ds = datasets.Dataset.from_parquet(str(tmp_path / "train.parquet"),
                                       cache_dir=str(tmp_path / "hf"))
    assert ds.cache_files
    return _split(ds)


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mapped, "CHUNK_ROWS", 4)  # 23 rows: 6 chunks


def _in_memory(layout: Layout | None = None) -> store.ImageStore:
    features = datasets.Features({"image": datasets.Image()})
    ds = datasets.Dataset.from_dict({"image": _rows()}, features=features)
    assert not ds.cache_files
    return decode_split(_split(ds), SIZE, progress=False, labels=False, layout=layout)


def _cache_dir(split: Split, layout: Layout = Layout.crop(SIZE)) -> Path:
    final = store._cache_dir(split, layout)
    assert final is not None
    return final


def assert_same_store(a: store.ImageStore, b: store.ImageStore) -> None:
    assert torch.equal(a.images, b.images)
    assert torch.equal(a.row_ids, b.row_ids)
    assert a.files == b.files and a.skipped == b.skipped
    assert torch.equal(a.channel_counts, b.channel_counts)
    assert torch.equal(a.sizes, b.sizes)
    if bool((a.sizes == a.images.shape[-1]).all()):  # no padding: every pixel is the image's
        # The histograms counted while decoding are those of the kept images: the same statistics.
        assert store.store_channel_stats(a) == channel_stats(a.images)


@pytest.mark.parametrize("workers", [1, 2])
def test_mapped_store_has_the_in_memory_pixels(on_disk, small_chunks, workers):
    memory = _in_memory()
    assert memory.row_ids.tolist() == [r for r in range(23) if r not in BAD]
    raw = on_disk.dataset.cast_column("image", datasets.Image(decode=False))
    for k, row in enumerate(memory.row_ids.tolist()):  # the pixels themselves, independently
        with Image.open(io.BytesIO(raw[row]["image"]["bytes"])) as img:
            expected = decode_image(img, Layout.crop(SIZE)).transpose(2, 0, 1)
        assert np.array_equal(memory.images[k].numpy(), expected)

    decoded = decode_split(on_disk, SIZE, progress=False, labels=False, workers=workers)
    assert_same_store(decoded, memory)
    final = _cache_dir(on_disk)
    assert sorted(p.name for p in final.iterdir()) == ["images.npy", "meta.json", "sizes.npy"]
    assert np.load(final / "images.npy", mmap_mode="r").shape == (21, 3, SIZE, SIZE)
    assert not list(final.parent.glob(f".{final.name}.tmp*")), "the temporary was renamed"


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/self/maps")
def test_the_store_tensor_is_a_map_of_the_file(on_disk, small_chunks):
    decoded = decode_split(on_disk, SIZE, progress=False, labels=False, workers=1)
    path = str(_cache_dir(on_disk) / "images.npy")
    ptr = decoded.images.data_ptr()
    spans = [line.split()[0].split("-") for line in Path("/proc/self/maps").read_text().splitlines()
             if line.endswith(path)]
    assert any(int(a, 16) <= ptr < int(b, 16) for a, b in spans), "the tensor lies in the map"
    decoded.images[0, 0, 0, 0] += 1  # copy-on-write: the file keeps its pixels
    again = decode_split(on_disk, SIZE, progress=False, labels=False)
    assert torch.equal(again.images[1:], decoded.images[1:])
    assert again.images[0, 0, 0, 0] != decoded.images[0, 0, 0, 0]


def test_a_published_decode_is_read_back_without_decoding(on_disk, small_chunks, monkeypatch):
    first = decode_split(on_disk, SIZE, progress=False, labels=False, workers=2)

    def refuse(self, start, stop):
        raise AssertionError("decoded again")

    monkeypatch.setattr(ChunkDecoder, "__call__", refuse)
    assert_same_store(decode_split(on_disk, SIZE, progress=False, labels=False), first)
    with pytest.raises(UserError, match="row 5 of 'train' .*img5.jpg.* is not a readable image"):
        decode_split(on_disk, SIZE, bad_images="error", progress=False, labels=False)


def test_a_killed_worker_leaves_no_complete_cache_and_the_next_decode_finishes_it(
        on_disk, small_chunks):
    with pytest.MonkeyPatch.context() as armed:
        crash.arm("decode-chunk@2", armed.setattr)  # each worker dies in its 2nd chunk
        with pytest.raises(UserError, match="a decoding process died"):
            decode_split(on_disk, SIZE, progress=False, labels=False, workers=2)
    final = _cache_dir(on_disk)
    assert not final.exists() and mapped.open_complete(final, SIZE) is None
    temps = list(final.parent.glob(f".{final.name}.tmp-*"))
    assert len(temps) == 1 and not (temps[0] / "meta.json").exists()
    assert_same_store(decode_split(on_disk, SIZE, progress=False, labels=False, workers=2),
                      _in_memory())
    assert not list(final.parent.glob(f".{final.name}.tmp-*"))


def test_an_interrupted_decode_resumes_from_its_recorded_chunks(on_disk, small_chunks,
                                                                monkeypatch):
    reference = _in_memory()
    calls: list[int] = []
    real = ChunkDecoder.__call__

    def failing(self, start, stop):
        calls.append(start)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the third chunk: two are recorded
        return real(self, start, stop)

    monkeypatch.setattr(ChunkDecoder, "__call__", failing)
    with pytest.raises(KeyboardInterrupt):
        decode_split(on_disk, SIZE, progress=False, labels=False, workers=1)
    assert not _cache_dir(on_disk).exists()
    calls.clear()
    monkeypatch.setattr(ChunkDecoder, "__call__",
                        lambda self, a, b: calls.append(a) or real(self, a, b))
    assert_same_store(decode_split(on_disk, SIZE, progress=False, labels=False, workers=1),
                      reference)
    assert calls == [8, 12, 16, 20], "only the chunks without a record are decoded again"


def test_a_decode_killed_while_compacting_starts_over(on_disk, small_chunks, monkeypatch):
    real = mapped.compact_rows

    def half(images, keep):
        images[: len(keep) // 2] = images[-(len(keep) // 2):]  # half the rows moved wrongly
        raise KeyboardInterrupt

    monkeypatch.setattr(mapped, "compact_rows", half)
    with pytest.raises(KeyboardInterrupt):
        decode_split(on_disk, SIZE, progress=False, labels=False, workers=1)
    monkeypatch.setattr(mapped, "compact_rows", real)
    assert_same_store(decode_split(on_disk, SIZE, progress=False, labels=False, workers=1),
                      _in_memory())


def test_a_damaged_cache_is_decoded_again(on_disk, small_chunks):
    first = decode_split(on_disk, SIZE, progress=False, labels=False, workers=1)
    images_file = _cache_dir(on_disk) / "images.npy"
    del first
    with open(images_file, "r+b") as f:  # cut short, as a full disk would leave it
        f.truncate(images_file.stat().st_size - 100)
    assert_same_store(decode_split(on_disk, SIZE, progress=False, labels=False), _in_memory())


def test_bad_images_error_stops_at_the_first_bad_row_in_row_order(on_disk, small_chunks):
    with pytest.raises(UserError, match="row 5 of 'train'"):
        decode_split(on_disk, SIZE, bad_images="error", progress=False, labels=False, workers=2)
    assert not _cache_dir(on_disk).exists()


def test_stored_size_rule(on_disk):
    # Twice the training size (a multiple of 8), but never above the largest image (50 px).
    assert training_sizes(on_disk, 16, None) == (16, 32)
    assert training_sizes(on_disk, 32, None) == (32, 50)
    assert training_sizes(on_disk, 224, None) == (224, 50)
    assert training_sizes(on_disk, 96, 96) == (96, 96)
    assert training_sizes(on_disk, None, None) == (224, 50)  # mixed sizes: 224 px
    with pytest.raises(UserError, match="--store-size 30 is below the training size 32"):
        training_sizes(on_disk, 32, 30)


def test_a_decode_killed_with_its_process_is_continued_by_the_next_process(
        on_disk, small_chunks, tmp_path, monkeypatch):
    """SIGKILL of the decoding process itself (here in its 3rd chunk): another process later
    adopts the dead process's temporary directory and decodes only what is missing."""
    import subprocess
    import sys

    script = (
        "import datasets, sys\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "import crash\n"
        "crash.arm('decode-chunk@3')\n"
        "from simclr_kit.data import mapped\n"
        "from simclr_kit.data.splits import Split\n"
        "from simclr_kit.data.store import decode_split\n"
        "mapped.CHUNK_ROWS = 4\n"
        f"ds = datasets.Dataset.from_parquet({str(tmp_path / 'train.parquet')!r}, "
        f"cache_dir={str(tmp_path / 'hf')!r})\n"
        f"decode_split(Split(ds, 'image', None, None, 'test', 'train'), {SIZE}, "
        "progress=False, labels=False, workers=1)\n")
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    final = _cache_dir(on_disk)
    temps = list(final.parent.glob(f".{final.name}.tmp-*"))
    assert not final.exists() and len(temps) == 1
    assert sorted(p.name for p in (temps[0] / "chunks").iterdir()) == ["0.json", "4.json"]
    reference = _in_memory()
    calls: list[int] = []
    real = ChunkDecoder.__call__
    monkeypatch.setattr(ChunkDecoder, "__call__",
                        lambda self, a, b: calls.append(a) or real(self, a, b))
    assert_same_store(decode_split(on_disk, SIZE, progress=False, labels=False, workers=1),
                      reference)
    assert calls == [8, 12, 16, 20]
    assert not list(final.parent.glob(f".{final.name}.tmp-*"))


def test_records_of_other_chunk_bounds_are_decoded_again(on_disk, small_chunks, monkeypatch):
    reference = _in_memory()
    real = ChunkDecoder.__call__
    calls: list[int] = []

    def failing(self, start, stop):
        if len(calls) == 2:
            raise KeyboardInterrupt  # chunks [0, 4) and [4, 8) are recorded
        calls.append(start)
        return real(self, start, stop)

    monkeypatch.setattr(ChunkDecoder, "__call__", failing)
    with pytest.raises(KeyboardInterrupt):
        decode_split(on_disk, SIZE, progress=False, labels=False, workers=1)
    monkeypatch.setattr(mapped, "CHUNK_ROWS", 8)  # a version with other chunks adopts them
    monkeypatch.setattr(ChunkDecoder, "__call__", real)
    assert_same_store(decode_split(on_disk, SIZE, progress=False, labels=False, workers=1),
                      reference)


@pytest.mark.parametrize("workers", [1, 2])
def test_training_frames_are_whole_images_in_padded_slots(on_disk, small_chunks, workers):
    """Each kept image whole, aspect ratio kept, longer side at most the slot's (never
    enlarged), at the top-left of a zero slot; its size recorded; bad rows compacted away."""
    side = 32
    layout = Layout.frame(side)
    memory = _in_memory(layout)
    raw = on_disk.dataset.cast_column("image", datasets.Image(decode=False))
    for k, row in enumerate(memory.row_ids.tolist()):
        with Image.open(io.BytesIO(raw[row]["image"]["bytes"])) as img:
            h, w = frame_size(img.height, img.width, side)
            expected = decode_image(img, layout).transpose(2, 0, 1)
        assert memory.sizes[k].tolist() == [h, w] and max(h, w) == min(side, max(img.size))
        assert np.array_equal(memory.images[k, :, :h, :w].numpy(), expected)
        assert int(memory.images[k].sum()) == int(memory.images[k, :, :h, :w].sum()), "zeros"
    decoded = decode_split(on_disk, progress=False, labels=False, workers=workers, layout=layout)
    assert_same_store(decoded, memory)
    assert decoded.image_size == side and decoded.images.shape[1:] == (3, side, side)
    final = _cache_dir(on_disk, layout)
    assert np.load(final / "sizes.npy").tolist() == memory.sizes.tolist()
    assert final != _cache_dir(on_disk, Layout.crop(side)), "the key names the form"
