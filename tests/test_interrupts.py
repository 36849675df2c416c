"""Real signals to real ``python -m simclr_kit pretrain`` processes on 8 px images.

SIGINT/SIGTERM: the step finishes, a checkpoint is saved, the exit code is 130/143 and the last
line says how to resume. SIGKILL, from outside at an arbitrary moment and from inside at exact
points of a checkpoint write (tests/crash.py): every resume continues from a complete
checkpoint, and the run ends with the very weights of an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import wait_for, write_unlabeled_parquet
from simclr_kit.report.metrics import read_metrics
from simclr_kit.checkpoint_files import latest_checkpoint, load_train_state, load_weights

ARGS = ["--batch-size", "4", "--image-size", "8", "--device", "cpu", "--projection-dim", "8",
        "--log-every", "1", "--seed", "7"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 unlabeled 8 px images: 4 steps an epoch at batch 4."""
    return write_unlabeled_parquet(tmp_path_factory.mktemp("data"))


def _start(argv: list[str], fault: str | None = None) -> subprocess.Popen:
    """``python -m simclr_kit pretrain ARGV``, or with ``fault`` (``POINT@N``) armed, the same
    CLI through tests/crash.py."""
    # One thread: the same float reductions in every process, so runs can be compared bit for bit.
    env = dict(os.environ, TQDM_DISABLE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    entry = [str(Path(__file__).with_name("crash.py")), fault] if fault else ["-m", "simclr_kit"]
    return subprocess.Popen([sys.executable, *entry, "pretrain", *argv], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _train_records(run: Path) -> list[dict]:
    # read_metrics skips a line still being written by the child process.
    return [r for r in read_metrics(run / "metrics.jsonl") if r.get("kind") == "train"]


def _finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def _assert_loadable(run: Path) -> None:
    """Whatever a kill left, the checkpoint ``latest`` resolves to is complete and verified."""
    ckpt = latest_checkpoint(run, required=False)
    if ckpt is not None:
        load_weights(ckpt / "model.safetensors")  # size and SHA-256 against the sidecar
        load_train_state(ckpt)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_finishes_the_step_saves_and_says_how_to_resume(data, tmp_path, signum):
    run = tmp_path / "run"
    proc = _start(["--data", str(data), "--out", str(run), "--epochs", "500", *ARGS])
    wait_for(proc, lambda: _train_records(run), "a metrics line")
    proc.send_signal(signum)
    rc, err = _finish(proc)
    assert rc == 128 + signum, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last == (f"simclr pretrain: stopped by signal {signal.Signals(signum).name}; checkpoint "
                    f"saved: resume with: simclr pretrain --resume {run}")
    state = load_train_state(latest_checkpoint(run))
    logged = _train_records(run)[-1]["step"]  # steps logged before the signal arrived
    assert state["global_step"] >= logged  # the step in progress was finished, then saved
    assert not [r for r in json.loads("[" + ",".join(
        (run / "metrics.jsonl").read_text().splitlines()) + "]") if r["kind"] == "done"]


@pytest.mark.slow
def test_kill_9_anywhere_then_resume_gives_the_uninterrupted_weights(data, tmp_path):
    common = [*ARGS, "--data", str(data), "--epochs", "4", "--checkpoint-every", "1",
              "--checkpoint-every-steps", "2", "--deterministic", "true"]
    reference = tmp_path / "reference"
    rc, err = _finish(_start([*common, "--out", str(reference)]))
    assert rc == 0, err[-2000:]

    run = tmp_path / "killed"
    # 1. SIGKILL from outside, at whatever moment the first metrics line happens to appear.
    proc = _start([*common, "--out", str(run)])
    wait_for(proc, lambda: _train_records(run), "a metrics line")
    proc.kill()
    assert _finish(proc)[0] == -signal.SIGKILL
    _assert_loadable(run)
    # 2-3. SIGKILL inside a save (weights written, nothing else), then after the new checkpoint
    # is renamed into place but before `latest` names it.
    for fault in ("save-weights@2", "save-renamed@1"):
        rc, err = _finish(_start(["--resume", str(run)], fault))
        assert rc == -signal.SIGKILL, (fault, rc, err[-2000:])
        _assert_loadable(run)
    rc, err = _finish(_start(["--resume", str(run)]))
    assert rc == 0, err[-2000:]

    got = load_weights(latest_checkpoint(run) / "model.safetensors")
    want = load_weights(latest_checkpoint(reference) / "model.safetensors")
    assert latest_checkpoint(run).name == latest_checkpoint(reference).name == "epoch-0004"
    assert got.keys() == want.keys()
    for key in want:  # bit for bit, BatchNorm statistics included
        assert torch.equal(got[key], want[key]), key
    resumes = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
               if '"resume"' in line]
    assert len(resumes) == 3


def test_a_second_signal_stops_at_once():
    from types import SimpleNamespace

    from simclr_kit.train.events import install_signal_handlers

    events = SimpleNamespace(stop_signal=None)
    before = signal.getsignal(signal.SIGTERM)
    restore = install_signal_handlers(events)  # type: ignore[arg-type]
    try:
        os.kill(os.getpid(), signal.SIGTERM)  # the first asks the loop to save and stop
        assert events.stop_signal == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):  # the second does not wait for it
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        restore()
    assert signal.getsignal(signal.SIGTERM) == before  # the handlers are put back
