"""Signals to a real ``simclr pretrain`` while its decoding workers run.

SIGKILL of the main process: its workers die with it (they would otherwise wait on a pipe
forever, holding their memory). SIGTERM: one line, exit 143, and the chunks decoded so far are
kept, so the next run decodes only the others.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import wait_for
from simclr_kit.config import DataConfig
from simclr_kit.data import decode_pool, mapped
from simclr_kit.data.pixels import Layout, decode_image
from simclr_kit.data.size_policy import training_sizes
from simclr_kit.data.splits import open_splits
from simclr_kit.data.store import cache_root, decode_split

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")]

ROWS, CHUNK = 64, 4  # 16 chunks of 4 photos of 2000 x 1500 px: seconds of decoding
# The command line with small chunks, so that the decode has many.
SCRIPT = (f"import sys\nfrom simclr_kit.data import mapped\nmapped.CHUNK_ROWS = {CHUNK}\n"
          "from simclr_kit.cli import main\nsys.exit(main(sys.argv[1:]))\n")


def _photo() -> bytes:
    """One 2000 x 1500 PNG (a gradient: small on disk, ~0.1 s to decode)."""
    y, x = np.linspace(0, 255, 1500), np.linspace(0, 255, 2000)
    arr = np.stack(np.broadcast_arrays(y[:, None], x[None, :], (y[:, None] + x) / 2), axis=2)
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    data = _photo()
    for i in range(ROWS):
        (folder / f"{i:03d}.png").write_bytes(data)
    return folder


def _start(folder: Path, out: Path) -> subprocess.Popen:
    env = dict(os.environ, TQDM_DISABLE="1", HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    return subprocess.Popen(
        [sys.executable, "-c", SCRIPT, "pretrain", "--data", str(folder), "--out", str(out),
         "--image-size", "8", "--decode-workers", "2", "--batch-size", "8", "--device", "cpu",
         "--epochs", "1"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _recorded() -> list[Path]:
    return list((cache_root() / "decoded").glob(".*.tmp-*/chunks/*.json"))


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state, ppid, ...), None if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _children(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        fields = _stat(int(entry.name)) if entry.name.isdigit() else None
        if fields and int(fields[1]) == pid:
            kids.append(int(entry.name))
    return kids


def _running(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] not in ("Z", "X")  # a zombie has exited


def test_the_workers_die_with_a_killed_main_process(photos, tmp_path, monkeypatch):
    monkeypatch.setenv("SIMCLR_KIT_CACHE", str(tmp_path / "cache"))  # this test's decode only
    proc = _start(photos, tmp_path / "run")
    wait_for(proc, _recorded, "a decoded chunk", timeout=240)
    workers = _children(proc.pid)
    assert len(workers) >= 2
    proc.kill()
    proc.wait(timeout=30)
    deadline = time.monotonic() + 10
    try:
        while any(_running(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [w for w in workers if _running(w)], "decoding workers outlived their parent"
    finally:
        _kill_left(workers)


def _kill_left(pids: list[int]) -> None:
    """Whatever a failing check leaves running is not left to run forever."""
    for pid in pids:
        if _running(pid):
            os.kill(pid, signal.SIGKILL)


def test_sigterm_stops_the_decode_with_one_line_and_the_next_run_continues(photos, tmp_path,
                                                                           monkeypatch):
    monkeypatch.setenv("SIMCLR_KIT_CACHE", str(tmp_path / "cache"))
    proc = _start(photos, tmp_path / "run")
    wait_for(proc, _recorded, "a decoded chunk", timeout=240)
    workers = _children(proc.pid)
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        _kill_left(workers)
    assert proc.returncode == 143, err[-2000:]
    lines = [line for line in err.strip().splitlines()  # apart from the progress bar
             if not line.startswith("decoding train:")]
    assert lines == ["simclr pretrain: stopped by signal SIGTERM while decoding; the decoded "
                     "chunks are kept: run the same command again to continue"], err[-2000:]
    assert not [w for w in workers if _running(w)]
    kept = {int(p.stem) for p in _recorded()}
    assert kept and len(kept) < ROWS // CHUNK

    # The next decode of the same data decodes only the chunks without a record.
    monkeypatch.setattr(mapped, "CHUNK_ROWS", CHUNK)
    decoded: list[tuple[int, int]] = []
    real = decode_pool.run_in_order

    def spy(job, chunks, workers):
        decoded.extend(chunks)
        return real(job, chunks, workers)

    monkeypatch.setattr(decode_pool, "run_in_order", spy)
    train, _ = open_splits(DataConfig(data=str(photos)), need_eval=False)
    layout = Layout.frame(training_sizes(train, 8, None)[1])  # pretraining's stored form
    store = decode_split(train, progress=False, labels=False, workers=2, layout=layout)
    assert sorted(s for s, _ in decoded) == sorted(set(range(0, ROWS, CHUNK)) - kept)
    with Image.open(photos / "000.png") as img:  # every row holds the one photo, decoded
        hwc = decode_image(img, layout)
    expected = np.zeros((3, layout.side, layout.side), np.uint8)  # at the top-left of its slot
    expected[:, :hwc.shape[0], :hwc.shape[1]] = hwc.transpose(2, 0, 1)
    assert len(store) == ROWS and all(np.array_equal(row, expected) for row in
                                      store.images.numpy())
    assert not _recorded()
