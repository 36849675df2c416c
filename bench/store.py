"""Benchmarks of the memory-mapped decoded store (issue 13); prints one JSON line per result.

    python bench/store.py data    --root /tmp/store-bench            # generated Parquet sets
    python bench/store.py decode  --root /tmp/store-bench            # images/s, 1 and 2 workers
    python bench/store.py memory  --root /tmp/store-bench            # peak RssAnon of pretrain
    python bench/store.py loader  --root /tmp/store-bench            # loader images/s, step time
    python bench/store.py hash                                       # checksum MB/s, one core
    python bench/store.py bigimage --root /tmp/store-bench           # peak memory of one image

Everything (the Parquet files, the Hugging Face cache, the decoded cache, the runs) lives under
``--root``: delete it afterwards. Peak anonymous memory is sampled from ``/proc/PID/status``
(``RssAnon``, every 20 ms) over the whole process tree, since the kernel keeps no peak of it.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

SETS = {"s10k": (10_000, 64, 64), "s300k": (300_000, 64, 64), "big2k": (2_000, 320, 240),
        "photo2k": (2_000, 500, 375)}  # photo2k: fine detail, ~80 kB, like an ImageNet JPEG


# Runs the simclr CLI with SIGKILL at a named point: `python CRASH step@N ARGS` stops after N steps.
CRASH = Path(__file__).resolve().parents[1] / "tests" / "crash.py"


def _env(root: Path) -> dict[str, str]:
    return dict(os.environ, SIMCLR_KIT_CACHE=str(root / "cache"), HF_HOME=str(root / "hf"),
                HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TQDM_DISABLE="1")


def write_jpegs(folder: Path, count: int,
                image: Callable[[int, np.random.Generator], np.ndarray],
                rows_per_write: int = 10_000) -> None:
    """``count`` JPEGs (quality 90) of ``image(k, rng) -> (h, w, 3) uint8`` for k = 0..count-1,
    in ``folder/train.parquet`` (one ``image`` column); ``rng`` is seeded with ``count``."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    schema = datasets.Features({"image": datasets.Image()}).arrow_schema
    rng = np.random.default_rng(count)
    with pq.ParquetWriter(folder / "train.parquet", schema) as writer:
        for start in range(0, count, rows_per_write):
            rows = []
            for k in range(start, min(start + rows_per_write, count)):
                buf = io.BytesIO()
                Image.fromarray(image(k, rng)).save(buf, "JPEG", quality=90)
                rows.append({"bytes": buf.getvalue(), "path": None})
            writer.write_table(pa.table({"image": rows}, schema=schema))


def make_set(folder: Path, count: int, width: int, height: int) -> None:
    """``count`` JPEGs (smooth random colour fields, ~1.7 kB at 64 px) in ``folder/train.parquet``."""
    from PIL import Image

    def image(k: int, rng: np.random.Generator) -> np.ndarray:
        small = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
        img = np.asarray(Image.fromarray(small).resize((width, height), Image.BILINEAR))
        if width >= 500:  # grain, so that the JPEG is as large as a photo's
            img = (img + rng.integers(-12, 12, (height, width, 3))).clip(0, 255).astype(np.uint8)
        return img

    write_jpegs(folder, count, image)


def _split(folder: Path):
    from simclr_kit.config import DataConfig
    from simclr_kit.data.splits import open_splits

    train, _ = open_splits(DataConfig(data=str(folder)), need_eval=False)
    return train


def decode(root: Path, name: str, size: int, workers: int) -> dict:
    """Decode a set into training frames of side ``size`` in a fresh cache; images per second
    (the Parquet already opened)."""
    from simclr_kit.data.pixels import Layout
    from simclr_kit.data.store import decode_split

    cache = root / f"cache-decode-{name}-{workers}"
    shutil.rmtree(cache, ignore_errors=True)  # a fresh decode every time
    os.environ["SIMCLR_KIT_CACHE"] = str(cache)
    split = _split(root / name)
    cpu = _cpu_seconds()
    started = time.perf_counter()
    store = decode_split(split, progress=False, labels=False, workers=workers,
                         layout=Layout.frame(size))
    seconds = time.perf_counter() - started
    cpu = _cpu_seconds() - cpu  # this process and its (joined) decoding workers
    return {"bench": "decode", "set": name, "images": len(store), "size": size,
            "workers": workers, "seconds": round(seconds, 2),
            "images_per_s": round(len(store) / seconds, 1), "cpu_s": round(cpu, 2),
            "images_per_cpu_s": round(len(store) / cpu, 1),
            "load_avg_1min": round(os.getloadavg()[0], 2)}


def _cpu_seconds() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def _status_kb(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _name(pid: int) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        return " ".join(Path(a.decode()).name for a in argv[:3])
    except OSError:
        return "?"


def watch(cmd: list[str], env: dict[str, str]) -> dict:
    """Run ``cmd``; the peak over time of the summed RssAnon (and RssFile) of its process tree."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    peak_anon = peak_file = 0
    per_process: dict[int, int] = {}
    names: dict[int, str] = {}
    started = time.perf_counter()
    while proc.poll() is None:
        pids = _tree(proc.pid)
        anon = {p: _status_kb(p, "RssAnon") for p in pids}
        peak_anon = max(peak_anon, sum(anon.values()))
        peak_file = max(peak_file, sum(_status_kb(p, "RssFile") for p in pids))
        for p, kb in anon.items():
            per_process[p] = max(per_process.get(p, 0), kb)
            names[p] = _name(p) or names.get(p, "?")  # the last: a forked child execs later
        time.sleep(0.02)
    err = proc.stderr.read() if proc.stderr else ""
    return {"rc": proc.returncode, "seconds": round(time.perf_counter() - started, 1),
            "peak_rss_anon_mb": round(peak_anon / 1024, 1),
            "peak_rss_file_mb": round(peak_file / 1024, 1),
            "per_process_peak_anon_mb": {f"{names[p]} {p}": round(v / 1024, 1)
                                         for p, v in per_process.items()},
            "stderr_tail": err.strip().splitlines()[-1:] if proc.returncode not in (0, -9) else []}


def memory(root: Path, name: str, nproc: int, steps: int, extra: list[str]) -> dict:
    """Peak anonymous memory of ``simclr pretrain`` on a decoded set, killed after ``steps``."""
    from simclr_kit.data.pixels import Layout
    from simclr_kit.data.store import decode_split

    os.environ["SIMCLR_KIT_CACHE"] = str(root / "cache")
    decode_split(_split(root / name), progress=False, labels=False,  # decoded beforehand
                 layout=Layout.frame(64))
    env = dict(_env(root), OMP_NUM_THREADS="1")
    out = root / f"run-{name}-{nproc}-{time.time_ns()}"
    killed = [str(CRASH), f"step@{steps}"]  # the CLI, killed after its steps-th step
    args = ["pretrain", "--data", str(root / name), "--image-size", "64", "--batch-size", "32",
            "--epochs", "1", "--device", "cpu", "--out", str(out), "--log-every", "1",
            "--projection-dim", "32", *extra]
    if nproc == 1:
        cmd = [sys.executable, *killed, *args]
    else:
        torchrun = str(Path(sys.executable).with_name("torchrun"))
        cmd = [torchrun, "--nproc_per_node", str(nproc), *killed, *args]
    result = watch(cmd, env)
    return {"bench": "memory", "set": name, "nproc": nproc, "steps": steps,
            "extra": " ".join(extra), **result}


def loader(root: Path, name: str, rows: int, batch: int, epochs: int) -> list[dict]:
    """Images/s of the batch sources alone: streamed from the map vs held in RAM."""
    import torch

    from simclr_kit.data.loader import ResidentBatches
    from simclr_kit.data.pixels import Layout
    from simclr_kit.data.store import decode_split
    from simclr_kit.data.stream import StreamedBatches

    os.environ["SIMCLR_KIT_CACHE"] = str(root / "cache")
    mapped = decode_split(_split(root / name), progress=False, labels=False,
                          layout=Layout.frame(64)).images[:rows]
    in_ram = mapped.clone()
    cpu = torch.device("cpu")
    sources = {"resident, in RAM": ResidentBatches(in_ram, cpu, batch, 0),
               "resident, indexing the map": ResidentBatches(mapped, cpu, batch, 0),
               "streamed from the map": StreamedBatches(mapped, cpu, batch, 0)}
    rates: dict[str, list[float]] = {k: [] for k in sources}
    steps = rows // batch
    for epoch in range(epochs):  # interleaved, so that a busy neighbour hurts each alike
        for label, source in sources.items():
            started = time.perf_counter()
            total = 0
            for idx in source.epoch(epoch, 0, steps):
                total += int(source.gather(idx)[:, 0, 0, 0].sum())  # touch the batch
            rates[label].append(steps * batch / (time.perf_counter() - started))
    return [{"bench": "loader", "set": name, "rows": rows, "batch": batch, "source": label,
             "images_per_s_median": round(statistics.median(r), 1),
             "images_per_s_all": [round(x) for x in r]} for label, r in rates.items()]


def time_steps(t, sources: dict, steps: int,
               warmup: int) -> dict[str, tuple[list[float], list[float]]]:
    """Per batch source (a label and a batch source of the trainer ``t``), the seconds of each
    of ``steps`` training steps after ``warmup`` more, and the seconds each waited for its
    batch; the sources take turns step by step, so that a busy neighbour slows each alike."""
    from simclr_kit.train.loop import train_step

    times: dict[str, tuple[list[float], list[float]]] = {k: ([], []) for k in sources}
    iterators = {k: source.epoch(0, 0, steps + warmup) for k, source in sources.items()}
    for k in range(steps + warmup):
        for label, source in sources.items():
            t.batches = source
            started = time.perf_counter()
            idx = next(iterators[label])
            waited = time.perf_counter() - started
            train_step(t, idx)
            if k >= warmup:
                times[label][0].append(time.perf_counter() - started)
                times[label][1].append(waited)
    return times


def step_time(root: Path, name: str, steps: int, batch: int) -> list[dict]:
    """Training step time with the set in RAM vs streamed from the map, and the time the loop
    waits for each next batch (0 when the gathering keeps ahead of the steps)."""
    import torch

    from simclr_kit.config import DataConfig, PretrainConfig
    from simclr_kit.data.loader import ResidentBatches
    from simclr_kit.data.stream import StreamedBatches
    from simclr_kit.train.loop import prepare

    os.environ["SIMCLR_KIT_CACHE"] = str(root / "cache")
    cfg = PretrainConfig(data=DataConfig(data=str(root / name), image_size=64), batch_size=batch,
                         device="cpu", epochs=1, progress=False, projection_dim=32,
                         out=str(root / f"run-step-{time.time_ns()}"))
    t = prepare(cfg)
    cpu = torch.device("cpu")
    sources = {"resident, in RAM": ResidentBatches(t.store.images.clone(), cpu, batch, 0),
               "streamed from the map": StreamedBatches(t.store.images, cpu, batch, 0)}
    times = time_steps(t, sources, steps, warmup=2)
    out = [{"bench": "step", "set": name, "batch": batch, "source": label,
            "step_s_median": round(statistics.median(step_s), 4),
            "step_s_all": [round(x, 2) for x in step_s],
            "wait_ms_median": round(1000 * statistics.median(wait_s), 3),
            "wait_ms_max": round(1000 * max(wait_s), 3)}
           for label, (step_s, wait_s) in times.items()]
    return out


def hash_speed(mib: int = 256, repeats: int = 3) -> list[dict]:
    """MB/s of the checksums a cache could keep, over ``mib`` MiB of random bytes in memory
    (the best of ``repeats``: the least disturbed by other jobs)."""
    import hashlib
    import zlib

    data = memoryview(np.random.default_rng(0).integers(0, 256, mib << 20, np.uint8))
    kinds = {"sha256": lambda: hashlib.sha256(data).digest(),
             "blake2b": lambda: hashlib.blake2b(data).digest(),
             "crc32": lambda: zlib.crc32(data)}
    results = []
    for name, run in kinds.items():
        best = min(_timed(run) for _ in range(repeats))
        results.append({"bench": "hash", "kind": name, "mb_per_s": round(len(data) / best / 1e6),
                        "load_avg_1min": round(os.getloadavg()[0], 2)})
    return results


def _timed(run) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


_PEAK = """
import resource, sys
from PIL import Image
from simclr_kit.data.pixels import resize_center_crop, to_rgb_array
Image.MAX_IMAGE_PIXELS = None
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with Image.open(sys.argv[1]) as img:
    resize_center_crop(to_rgb_array(img), 256)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)
"""


def big_image_peak(root: Path) -> list[dict]:
    """The peak resident memory (MB above the process's own) of decoding one large image as a
    decoding worker does (to 256 px), in a fresh process per image: PNG and JPEG, a gradient."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    results = []
    for side in (4000, 8000, 10000):
        ramp = np.linspace(0, 255, side, dtype=np.float32)
        arr = np.empty((side, side, 3), np.uint8)
        arr[..., 0], arr[..., 1], arr[..., 2] = ramp[:, None], ramp[None, :], 128
        for fmt in ("PNG", "JPEG"):
            path = root / f"big{side}.{fmt.lower()}"
            Image.fromarray(arr).save(path, fmt, **({"compress_level": 1} if fmt == "PNG" else
                                                    {"quality": 90}))
            out = subprocess.run([sys.executable, "-c", _PEAK, str(path)], capture_output=True,
                                 text=True, check=True).stdout
            results.append({"bench": "bigimage", "side": side, "format": fmt,
                            "megapixels": side * side / 1e6, "peak_mb": int(out),
                            "bytes_per_pixel": round(int(out) * 2**20 / side**2, 1)})
            path.unlink()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["data", "decode", "memory", "loader", "step", "hash",
                                         "bigimage"])
    parser.add_argument("--root", type=Path, default=Path("/tmp/store-bench"))
    parser.add_argument("--sets", nargs="*", default=None)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--nproc", type=int, default=1)
    parser.add_argument("--extra", default="", help="more pretrain flags, one string "
                        "(memory): --extra='--stream on'")
    args = parser.parse_args()
    root = args.root
    os.environ.update(_env(root))  # before datasets is imported
    results: list[dict] = []
    if args.what == "data":
        for name in args.sets or list(SETS):
            started = time.perf_counter()
            make_set(root / name, *SETS[name])
            results.append({"bench": "data", "set": name, "seconds":
                            round(time.perf_counter() - started, 1)})
    elif args.what == "decode":
        for name in args.sets or ["s300k", "big2k", "photo2k"]:
            size = 64 if SETS[name][1] == 64 else 256
            for workers in (1, 2):
                results.append(decode(root, name, size, workers))
    elif args.what == "memory":
        for name in args.sets or ["s10k", "s300k"]:
            results.append(memory(root, name, args.nproc, args.steps, args.extra.split()))
    elif args.what == "hash":
        results += hash_speed()
    elif args.what == "bigimage":
        results += big_image_peak(root / "bigimage")
    elif args.what == "loader":
        results += loader(root, (args.sets or ["s300k"])[0], 50_000, 256, 3)
    else:
        results += step_time(root, (args.sets or ["s10k"])[0], args.steps, 32)
    for r in results:
        print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
