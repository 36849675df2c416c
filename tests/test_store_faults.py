"""The decoded store under faults: decoders that share a host name and a PID, a full disk, an
edited or damaged cache, a split where nothing decodes, an image too large to decode, and the
progress of a continued decode."""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import datasets
import numpy as np
import pytest

from conftest import TINY
from simclr_kit.cli import main
from simclr_kit.data import chunk_digests, mapped, store
from simclr_kit.data.chunk_decoder import ChunkDecoder
from simclr_kit.data.pixels import Layout
from simclr_kit.data.store import decode_split
from simclr_kit.errors import UserError
from test_store import (SIZE, _cache_dir, _in_memory, _split, assert_same_store,  # noqa: F401
                        on_disk, small_chunks)

SRC = str(Path(mapped.__file__).resolve().parents[2])


def _temporaries(final: Path) -> list[Path]:
    return sorted(final.parent.glob(f".{final.name}.tmp-*"))


# A process that takes the temporary of a decode as host "box", PID 1 (two containers on one
# host: the same hostname, both PID 1), says where, and holds it until its stdin closes.
HOLDER = """
import os, socket, sys
sys.path.insert(0, {src!r})
socket.gethostname = lambda: "box"
os.getpid = lambda: 1
from pathlib import Path
from simclr_kit.data import mapped
tmp = mapped.begin(Path({final!r}), 23, 16)
(tmp / "chunks" / "0.json").write_text("{{}}")
print(tmp, flush=True)
sys.stdin.read()
"""


def _hold(final: Path) -> tuple[subprocess.Popen, Path]:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER.format(src=SRC, final=str(final))],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline().strip()
    assert line, proc.communicate()
    return proc, Path(line)


def test_a_live_decode_with_the_same_host_and_pid_is_never_adopted(tmp_path, monkeypatch):
    final = tmp_path / "decoded" / "KEY"
    holder, theirs = _hold(final)
    try:
        with monkeypatch.context() as m:  # this process is "box", PID 1 too
            m.setattr(mapped.socket, "gethostname", lambda: "box")
            m.setattr(mapped.os, "getpid", lambda: 1)
            mine = mapped.begin(final, 23, SIZE)
        assert mine != theirs  # its own directory: the live one is not adopted ...
        assert (theirs / "chunks" / "0.json").is_file()  # ... nor deleted
        assert (mine / "images.npy").is_file() and not list((mine / "chunks").iterdir())
        mapped.release(mine)
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    # The holder is gone, its lock with it: the next decode adopts its directory.
    with monkeypatch.context() as m:
        m.setattr(mapped.socket, "gethostname", lambda: "box")
        again = mapped.begin(final, 23, SIZE)
    assert again in (theirs, mine) and len(_temporaries(final)) == 1
    mapped.discard(again)
    assert _temporaries(final) == []


def test_a_killed_decoders_temporary_is_adopted(tmp_path, monkeypatch):
    final = tmp_path / "decoded" / "KEY"
    holder, theirs = _hold(final)
    holder.kill()
    holder.wait(timeout=30)
    monkeypatch.setattr(mapped.socket, "gethostname", lambda: "box")
    adopted = mapped.begin(final, 23, SIZE)
    assert adopted == theirs and (adopted / "chunks" / "0.json").is_file()
    mapped.release(adopted)


def test_a_full_disk_is_one_line_naming_the_size_and_the_folder(on_disk, monkeypatch):
    def full(fd, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(mapped, "_fallocate", full)
    final = _cache_dir(on_disk)
    with pytest.raises(UserError, match=rf"not enough disk space for the decoded images: "
                                        rf"\d.* needed in {final.parent}"):
        decode_split(on_disk, SIZE, progress=False, labels=False, workers=1)
    assert _temporaries(final) == [] and not final.exists()


def test_without_fallocate_the_free_space_is_checked(on_disk, monkeypatch):
    def unsupported(fd, length):
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

    class Usage:
        free = 1000

    monkeypatch.setattr(mapped, "_fallocate", unsupported)
    monkeypatch.setattr(mapped.shutil, "disk_usage", lambda path: Usage())
    with pytest.raises(UserError, match=r"not enough disk space .* \(0.00 MB free\)"):
        decode_split(on_disk, SIZE, progress=False, labels=False, workers=1)


def test_the_images_file_is_allocated_when_the_decode_starts(tmp_path):
    tmp = mapped.begin(tmp_path / "decoded" / "KEY", 50, 64)
    try:
        size = (tmp / "images.npy").stat()
        assert size.st_blocks * 512 >= 50 * 3 * 64 * 64  # not sparse: the blocks are there
    finally:
        mapped.discard(tmp)


def test_a_full_disk_through_the_command_line_is_one_line(tmp_path, monkeypatch, capsys):
    from conftest import write_unlabeled_parquet

    def full(fd, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(mapped, "_fallocate", full)
    data = write_unlabeled_parquet(tmp_path / "data")
    code = main(["pretrain", "--data", str(data), "--out", str(tmp_path / "run"), "--epochs",
                 "1", "--image-size", "8", *TINY])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "not enough disk space" in err[0], err


# The command line with chunks of 16 rows, so that two workers share the decode.
SMALL_CHUNKS = ("import sys\nfrom simclr_kit.data import mapped\nmapped.CHUNK_ROWS = 16\n"
                "from simclr_kit.cli import main\nsys.exit(main(sys.argv[1:]))\n")


def _can_mount_tmpfs(where: Path) -> bool:
    """Whether this machine lets a user namespace mount a tmpfs (Linux with unshare)."""
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--mount", "--map-root-user", "mount", "-t", "tmpfs",
                            "-o", "size=64k", "tmpfs", str(where)], capture_output=True)
    return probe.returncode == 0


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_real_small_file_system_is_one_line(tmp_path, workers):
    """The cache on a 512 kB tmpfs, ~1.2 MB to decode in 6 chunks: one line naming the size and
    the folder, with one decoding process (writing through the map would be a SIGBUS) or two
    (not a decoding process that died)."""
    cache = tmp_path / "cache"
    cache.mkdir()
    if not _can_mount_tmpfs(cache):
        pytest.skip("cannot mount a tmpfs here (needs unshare and user namespaces)")
    from conftest import write_unlabeled_parquet

    data = write_unlabeled_parquet(tmp_path / "data", count=96, size=64)  # 12 kB a row
    env = dict(os.environ, PYTHONPATH=SRC, SIMCLR_KIT_CACHE=str(cache), TQDM_DISABLE="1",
               HF_DATASETS_CACHE=str(tmp_path / "hf"), HF_DATASETS_OFFLINE="1",
               HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        ["unshare", "--mount", "--map-root-user", "sh", "-c",
         'mount -t tmpfs -o size=512k tmpfs "$0" && exec "$@"', str(cache),
         sys.executable, "-c", SMALL_CHUNKS, "pretrain", "--data", str(data), "--out",
         str(tmp_path / "run"), "--epochs", "1", "--image-size", "64", "--decode-workers",
         workers, *TINY], env=env, capture_output=True, text=True, timeout=300)
    err = [line for line in proc.stderr.strip().splitlines()  # apart from the progress bar
           if not line.startswith("decoding train:")]
    assert proc.returncode == 2 and len(err) == 1, (proc.returncode, proc.stderr[-2000:])
    assert err[0].startswith("simclr pretrain: error: not enough disk space for the decoded "
                             f"images: 1.18 MB needed in {cache / 'decoded'} ("), err[0]


def test_a_same_size_edit_of_the_images_is_caught_and_decoded_again(on_disk, small_chunks,
                                                                    capsys):
    first = decode_split(on_disk, SIZE, progress=False, labels=False, workers=1)
    del first
    path = _cache_dir(on_disk) / "images.npy"
    images = np.load(path, mmap_mode="r+")
    images[17, 1, 5, 5] ^= 0xFF  # one byte of one image, the file's size unchanged
    images.flush()
    del images
    again = decode_split(on_disk, SIZE, progress=False, labels=False, workers=1)
    assert_same_store(again, _in_memory())
    assert "fails its SHA-256 check" in capsys.readouterr().err


def test_the_chunks_checked_at_an_opening_fit_the_budget(monkeypatch):
    chunks = [[1024, "x"]] * 100  # 100 chunks of 1024 rows of 1 kB: 100 MiB
    monkeypatch.delenv(chunk_digests.VERIFY_ENV, raising=False)
    assert chunk_digests.chunks_to_verify(chunks, 1024) == list(range(100))  # under the budget: all
    monkeypatch.setattr(chunk_digests, "VERIFY_BYTES", 10 << 20)
    picked = chunk_digests.chunks_to_verify(chunks, 1024)
    assert len(picked) == 10 and picked == chunk_digests.chunks_to_verify(chunks, 1024)  # agreed
    monkeypatch.setenv(chunk_digests.VERIFY_ENV, "all")
    assert chunk_digests.chunks_to_verify(chunks, 1024) == list(range(100))


@pytest.mark.parametrize("edit", [
    lambda meta: [],
    lambda meta: None,
    lambda meta: dict(meta, counts=meta["counts"][:2]),
    lambda meta: dict(meta, counts=[[1, 2], [3]]),
    lambda meta: dict(meta, rows=1e12),
    lambda meta: dict(meta, rows=10 ** 12),
    lambda meta: dict(meta, shape="big"),
    lambda meta: dict(meta, skipped=[["x", "y", "z"]]),
    lambda meta: {k: v for k, v in meta.items() if k != "chunks"},
], ids=["list", "null", "counts-rows", "counts-ragged", "rows-float", "rows-huge", "shape",
        "skipped", "no-checksums"])
def test_a_damaged_meta_json_is_decoded_again(on_disk, small_chunks, edit):
    decode_split(on_disk, SIZE, progress=False, labels=False, workers=1)
    meta_file = _cache_dir(on_disk) / "meta.json"
    meta_file.write_text(json.dumps(edit(json.loads(meta_file.read_text()))))
    assert_same_store(decode_split(on_disk, SIZE, progress=False, labels=False, workers=1),
                      _in_memory())
    assert json.loads(meta_file.read_text())["rows"] == 23  # the damaged one was replaced


def test_a_split_where_nothing_decodes_leaves_no_temporary(tmp_path):
    features = datasets.Features({"image": datasets.Image()})
    datasets.Dataset.from_dict({"image": [{"bytes": b"junk", "path": "broken.jpg"}]},
                               features=features).to_parquet(str(tmp_path / "one.parquet"))
    split = _split(datasets.Dataset.from_parquet(str(tmp_path / "one.parquet"),
                                                 cache_dir=str(tmp_path / "hf")))
    for _ in range(2):
        with pytest.raises(UserError, match="none of the 1 images"):
            decode_split(split, SIZE, progress=False, labels=False)
        assert _temporaries(store._cache_dir(split, Layout.crop(SIZE))) == []


def test_a_sample_of_a_folder_with_broken_files_leaves_no_temporary(tmp_path, monkeypatch):
    """The report's views decode a few rows at a time: a handful that is all broken files is
    replaced by the next rows, and leaves nothing in the cache."""
    from PIL import Image

    monkeypatch.setenv("SIMCLR_KIT_CACHE", str(tmp_path / "cache"))  # this test's decodes only

    from simclr_kit.config import DataConfig
    from simclr_kit.report.views import sample_store

    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "000_broken.jpg").write_bytes(b"not a jpeg")
    for i in range(1, 6):
        Image.new("RGB", (12, 12), (40 * i, 0, 0)).save(folder / f"{i:03d}.png")
    sample, _ = sample_store(DataConfig(data=str(folder)), count=1, image_size=SIZE)
    assert len(sample) == 1 and sample.row_ids.tolist() != [0]  # the broken row was passed over
    cache = store.cache_root() / "decoded"
    assert [p.name for p in cache.glob(".*.tmp-*")] == []


def test_a_continued_decode_counts_each_row_once(on_disk, small_chunks, monkeypatch):
    real = ChunkDecoder.__call__
    calls: list[int] = []

    def failing(self, start, stop):
        if len(calls) == 3:
            raise KeyboardInterrupt  # three chunks (12 rows) are recorded
        calls.append(start)
        return real(self, start, stop)

    bars: list[dict] = []

    class Bar:
        def __init__(self, total, initial=0, **kwargs):
            self.state = {"total": total, "n": initial}
            bars.append(self.state)

        def update(self, n):
            self.state["n"] += n

        def close(self):
            pass

    monkeypatch.setattr(store, "tqdm", Bar)
    monkeypatch.setattr(ChunkDecoder, "__call__", failing)
    with pytest.raises(KeyboardInterrupt):
        decode_split(on_disk, SIZE, progress=False, labels=False, workers=1)
    monkeypatch.setattr(ChunkDecoder, "__call__", real)
    decode_split(on_disk, SIZE, progress=False, labels=False, workers=1)
    assert bars[0] == {"total": 23, "n": 12}
    assert bars[1] == {"total": 23, "n": 23}  # began at the 12 recorded, added the other 11


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width x height`` RGB pixels and holds a few bytes of them."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2,
                                                              0, 0, 0))
            + chunk(b"IDAT", zlib.compress(bytes(3 * width + 1))) + chunk(b"IEND", b""))


def test_an_image_beyond_the_pixel_limit_is_skipped_before_it_is_decoded(tmp_path):
    """12000 x 12000 pixels would take ~2.4 GB to decode: it is skipped, naming the limit,
    in a process allowed only 300 MB more address space than it has."""
    import resource

    from PIL import Image

    small = tmp_path / "small.png"
    Image.new("RGB", (20, 30), (200, 10, 10)).save(small)
    rows = [{"bytes": _png_header(12000, 12000), "path": "huge.png"},
            {"bytes": small.read_bytes(), "path": "small.png"}]
    raw = datasets.Dataset.from_dict({"image": rows}, features=datasets.Features(
        {"image": datasets.Image(decode=False)}))
    out = np.zeros((2, 3, SIZE, SIZE), np.uint8)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: decode under the memory limit, report the chunk record
        try:
            os.close(read)
            with open("/proc/self/status") as f:
                vm = next(int(line.split()[1]) for line in f if line.startswith("VmSize:"))
            limit = vm * 1024 + (300 << 20)
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
            record = ChunkDecoder(raw, "image", Layout.crop(SIZE), out)(0, 2)
            os.write(write, json.dumps(record).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        text = f.read()
    os.waitpid(pid, 0)
    record = json.loads(text)
    assert record["files"] == ["small.png"]
    [(row, name, reason)] = record["skipped"]
    assert (row, name) == (0, "huge.png")
    assert reason.startswith("ImageTooLarge: 12000x12000 pixels, more than the 64 megapixels")
