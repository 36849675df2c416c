"""Shared fixtures: small generated datasets, a private cache folder, quiet progress bars."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

SHARED_DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"

# The caches of the whole session (decoded images, the `datasets` library's Arrow files,
# matplotlib's fonts, torch's compiled kernels), set
# here, before any test module is imported: fixtures of every scope run after this point, and
# `datasets` and `huggingface_hub` read their cache folders and offline switches when imported.
# Removed at the session's end, passed or failed: nothing in it is worth keeping.
SESSION_CACHE = Path(tempfile.mkdtemp(prefix="simclr-kit-tests-"))
os.environ.update({
    "SIMCLR_KIT_CACHE": str(SESSION_CACHE / "simclr-kit"),
    "HF_HOME": str(SESSION_CACHE / "huggingface"),
    "HF_DATASETS_CACHE": str(SESSION_CACHE / "huggingface" / "datasets"),
    "MPLCONFIGDIR": str(SESSION_CACHE / "matplotlib"),  # its font cache, else ~/.cache
    "TORCHINDUCTOR_CACHE_DIR": str(SESSION_CACHE / "torchinductor"),
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_OFFLINE": "1",
    "TQDM_DISABLE": "1",
})


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    shutil.rmtree(SESSION_CACHE, ignore_errors=True)


def make_class_images(n_per_class: int = 12, classes: int = 3, size: int = 12,
                      seed: int = 0) -> tuple[list[np.ndarray], list[int]]:
    """Generated RGB images whose class is a colour and a bar position: learnable, tiny."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    palette = np.array([[220, 40, 40], [40, 200, 60], [50, 70, 230], [200, 200, 40]])
    for c in range(classes):
        for _ in range(n_per_class):
            img = rng.integers(0, 60, size=(size, size, 3)).astype(np.uint8)
            col = (c * size) // classes
            img[:, col:col + max(1, size // classes)] = palette[c % len(palette)]
            images.append(img)
            labels.append(c)
    return images, labels


def wait_for(proc: subprocess.Popen, ready: Callable[[], object], what: str,
             timeout: float = 300) -> None:
    """Poll ``ready()`` until it is true; fail when ``proc`` exits first or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"exited early ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"{what} not in time")
        time.sleep(0.05)


def write_image_folder(root: Path, n_per_class: int = 12, classes: int = 3, size: int = 12,
                       fmt: str = "png") -> Path:
    from PIL import Image

    images, labels = make_class_images(n_per_class, classes, size)
    for i, (img, label) in enumerate(zip(images, labels)):
        folder = root / f"class_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"img_{i:04d}.{fmt}")
    return root


def write_parquet_dataset(root: Path, n_per_class: int = 12, classes: int = 3,
                          size: int = 12) -> Path:
    """A Parquet folder with train/test splits and columns named like the hub's cifar10."""
    import datasets
    from PIL import Image

    features = datasets.Features({"img": datasets.Image(),
                                  "label": datasets.ClassLabel(names=[f"c{i}" for i in range(classes)])})
    for split, seed in (("train", 0), ("test", 1)):
        images, labels = make_class_images(n_per_class, classes, size, seed)
        ds = datasets.Dataset.from_dict({"img": [Image.fromarray(i) for i in images],
                                         "label": labels}, features=features)
        root.mkdir(parents=True, exist_ok=True)
        ds.to_parquet(str(root / f"{split}.parquet"))
    return root


# Flags for a pretraining run that takes seconds: 8 px images in batches of 8, a small head.
TINY = ["--batch-size", "8", "--device", "cpu", "--log-every", "1", "--projection-dim", "16"]


def write_unlabeled_parquet(root: Path, count: int = 16, size: int = 8) -> Path:
    """``count`` random RGB images in one Parquet file with a single ``image`` column."""
    import datasets
    from PIL import Image

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
              for _ in range(count)]
    root.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict({"image": images}, features=datasets.Features(
        {"image": datasets.Image()})).to_parquet(str(root / "train.parquet"))
    return root / "train.parquet"


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three classes of 8 px images, 8 per class in each of train and test (a module may
    define its own ``data`` instead)."""
    return write_parquet_dataset(tmp_path_factory.mktemp("data") / "pq", n_per_class=8, size=8)


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return write_image_folder(tmp_path / "folder")


@pytest.fixture
def parquet_dir(tmp_path: Path) -> Path:
    return write_parquet_dataset(tmp_path / "parquet")


def needs_shared(name: str) -> Path:
    path = SHARED_DATASETS / name
    if not path.exists():
        pytest.skip(f"{path} not present (only beside the development checkout)")
    return path

