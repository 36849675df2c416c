"""The test suite keeps to itself: its caches live and die with the session, wherever a fixture
of any scope decodes or loads data, and importing the command line stays light."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src"

PROBE = '''
import pytest

from conftest import write_parquet_dataset
from simclr_kit.config import DataConfig
from simclr_kit.data.splits import open_splits
from simclr_kit.data.store import decode_split


@pytest.fixture(scope="module")
def decoded(tmp_path_factory):
    """Loaded (Arrow caches) and decoded (the decoded-image cache) before any test runs."""
    folder = write_parquet_dataset(tmp_path_factory.mktemp("d") / "pq", n_per_class=2, size=8)
    train, _ = open_splits(DataConfig(data=str(folder)), need_eval=False)
    return decode_split(train, 8, progress=False)


def test_probe(decoded, tmp_path):
    assert len(decoded) == 6
    import matplotlib.pyplot as plt  # the report's plots: matplotlib builds its font cache

    plt.figure().savefig(tmp_path / "plot.png")
'''


def _without_caches(env: dict[str, str]) -> dict[str, str]:
    """The environment minus every variable that moves a cache: the child's conftest alone
    decides where they go."""
    return {k: v for k, v in env.items()
            if not k.startswith(("SIMCLR_KIT_", "HF_", "XDG_CACHE", "MPLCONFIGDIR",
                                 "TORCHINDUCTOR_"))}


def test_module_fixtures_never_touch_the_users_caches(tmp_path):
    """A module-scoped fixture that loads and decodes a dataset, run by a pytest of its own
    under a fresh HOME with this suite's conftest: nothing lands in HOME (caches, config), and the
    session's cache folder is gone when the session ends."""
    home, suite = tmp_path / "home", tmp_path / "suite"
    home.mkdir()
    suite.mkdir()
    shutil.copy(TESTS / "conftest.py", suite / "conftest.py")
    (suite / "test_probe.py").write_text(PROBE)
    env = dict(_without_caches(dict(os.environ)), HOME=str(home), PYTHONPATH=str(SRC),
               TMPDIR=str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "--basetemp", str(tmp_path / "basetemp"), str(suite)],
                          cwd=suite, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert list(home.iterdir()) == [], sorted(str(p) for p in home.rglob("*"))
    assert list((tmp_path / "tmp").iterdir()) == []  # the session's cache folder is removed


HEAVY = ("datasets", "matplotlib", "timm", "sklearn", "pyarrow", "scipy", "torch")


def test_help_and_a_config_error_leave_the_heavy_libraries_out(tmp_path):
    """`simclr --help`, a one-line config error and a mistyped --data path need none of these:
    each command imports them where it uses them, after its flags, config and paths are
    checked."""
    (tmp_path / "data").mkdir()
    code = ("import sys\n"
            "from simclr_kit.cli import main\n"
            "for argv in (['--help'], ['pretrain', '--help'], ['pretrain', '--epochs', '0'],\n"
            "             ['run', '--optimizer', 'adamx'], ['evaluate', 'RUN', '--knn-k', '0'],\n"
            "             ['pretrain', '--data', 'data/unlabelled'],\n"
            "             ['evaluate', 'RUN', '--data', './photos'],\n"
            "             ['predict', 'CLS', '--out', 'p.csv', '--data', 'new/*.jpg']):\n"
            "    print(f'rc={main(argv)}', file=sys.stderr)\n"
            f"print(' '.join(m for m in {HEAVY!r} if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(SRC)),
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    codes = [w for w in done.stderr.split() if w.startswith("rc=")]
    assert codes == ["rc=0", "rc=0", "rc=2", "rc=2", "rc=2", "rc=2", "rc=2", "rc=2"], done.stderr
    said = [line for line in done.stderr.splitlines() if "no such file or folder" in line]
    assert said == ["simclr pretrain: error: no such file or folder: data/unlabelled; data/ is a "
                    "folder here, so this is a path, not the hub id 'data/unlabelled'",
                    "simclr evaluate: error: no such file or folder: ./photos"], done.stderr
    assert "simclr predict: error: no files match 'new/*.jpg'" in done.stderr.splitlines()
    assert done.stdout.splitlines()[-1].split() == [], done.stdout.splitlines()[-1]
