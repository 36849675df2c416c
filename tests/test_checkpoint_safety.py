"""Checkpoints survive what really happens: torn or altered files, kills mid-save, a full disk, a
NaN, and files crafted to run code. Training runs are in-process, a few steps on 8 px images."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path

import datasets
import pytest
import torch

from simclr_kit import checkpoint_files as checkpoint
from simclr_kit.train import loop as training
from conftest import write_unlabeled_parquet
from simclr_kit.checkpoint_files import latest_checkpoint, load_train_state, load_weights
from simclr_kit.cli import main
from simclr_kit.models.encoder import load_encoder
from simclr_kit.errors import UserError

TINY = ["--device", "cpu", "--batch-size", "4", "--image-size", "8", "--projection-dim", "8",
        "--log-every", "100", "--checkpoint-every", "0"]


def _one_error_line(capsys: pytest.CaptureFixture) -> str:
    err = [line for line in capsys.readouterr().err.splitlines()
           if line.strip() and "%|" not in line]  # progress bars are not error lines
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 unlabeled 8 px images: 4 steps an epoch at batch 4."""
    return write_unlabeled_parquet(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def base_run(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "base"
    assert main(["pretrain", "--data", str(data), "--out", str(out), "--epochs", "1", *TINY]) == 0
    return out


@pytest.fixture
def run(base_run: Path, tmp_path: Path) -> Path:
    """A private copy of the finished run, to damage."""
    return Path(shutil.copytree(base_run, tmp_path / "run"))


def _all_finite(path: Path) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in load_weights(path).values()
               if v.is_floating_point())


# ---- torn, altered and left-over files -----------------------------------------------------

def test_truncated_weights_are_detected_by_their_recorded_size(run, tmp_path, capsys):
    weights = latest_checkpoint(run) / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 1000])  # a torn tail: the header still parses
    with pytest.raises(UserError, match="bytes but model.json records .* truncated"):
        load_encoder(run)
    assert main(["export", str(run), str(tmp_path / "bb.safetensors")]) == 2
    assert "truncated or was replaced" in _one_error_line(capsys)


def test_altered_weights_are_detected_by_their_hash(run):
    weights = latest_checkpoint(run) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF  # same size, one tensor value changed
    weights.write_bytes(bytes(data))
    with pytest.raises(UserError, match="does not match the SHA-256"):
        load_encoder(run)


def test_truncated_training_state_stops_resume_with_one_line(run, capsys):
    state = latest_checkpoint(run) / "state.pt"
    state.write_bytes(state.read_bytes()[:100])
    assert main(["pretrain", "--resume", str(run), "--epochs", "2"]) == 2
    line = _one_error_line(capsys)
    assert "state.pt is 100 bytes but state.json records" in line


def test_what_a_kill_leaves_behind_is_ignored_then_cleaned(run):
    """The states a SIGKILL can leave at each point of a save, each still resumable."""
    root = run / "checkpoints"
    good = latest_checkpoint(run)
    assert good.name == "epoch-0001" and (good / "KEEP").exists()
    # Killed while writing: a half-filled temporary directory and a temporary pointer file.
    torn = root / ".epoch-0001-step-000002.tmp4242"
    torn.mkdir()
    (torn / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes()[:500])
    (root / ".latest.tmp4242").write_text("epoch-0001-step-000002")
    assert latest_checkpoint(run) == good
    # Killed between renaming the same position aside and renaming the new one in.
    aside = root / ".replaced-epoch-0001.tmp4242"
    good.rename(aside)
    assert latest_checkpoint(run) == aside
    assert load_train_state(aside)["global_step"] == 4 and _all_finite(aside / "model.safetensors")
    aside.rename(good)
    # Killed before the first pointer was written: the newest complete directory.
    (root / "latest").unlink()
    assert latest_checkpoint(run) == good
    # The next save sweeps the leftovers away (the kill test resumes real runs).
    checkpoint.save_checkpoint(run, "epoch-0002", torch.nn.Linear(2, 2), {}, {"step": 8}, False)
    assert latest_checkpoint(run).name == "epoch-0002"
    assert sorted(p.name for p in root.iterdir()) == ["epoch-0001", "epoch-0002", "latest"]


# ---- non-finite loss, full disk ------------------------------------------------------------

def test_nan_is_never_saved_and_the_last_good_checkpoint_stays(data, tmp_path, monkeypatch,
                                                               capsys):
    original = training.train_step

    def poisoned(t, idx):
        loss = original(t, idx)
        if t.global_step == 2:  # the third step
            with torch.no_grad():  # a weight blows up while the loss still looks fine
                weight = next(t.model.parameters())
                weight[(0,) * weight.ndim] = float("inf")
        return loss

    monkeypatch.setattr(training, "train_step", poisoned)
    out = tmp_path / "r"
    assert main(["pretrain", "--data", str(data), "--out", str(out), "--epochs", "1", *TINY,
                 "--checkpoint-every-steps", "1"]) == 2
    line = _one_error_line(capsys)
    assert "stopped at epoch 1 step 3" in line and "NaN or infinite" in line
    assert "last good checkpoint" in line and "epoch-0001-step-000002" in line
    last = latest_checkpoint(out)
    assert last.name == "epoch-0001-step-000002" and _all_finite(last / "model.safetensors")


@pytest.mark.parametrize("bad", ["loss", "weight", "buffer", "none"])
def test_finiteness_check_before_every_save(base_run, bad):
    from types import SimpleNamespace

    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    loss = torch.tensor(float("nan") if bad == "loss" else 1.5)
    with torch.no_grad():
        if bad == "weight":
            model[0].weight[1, 2] = float("inf")
        elif bad == "buffer":
            model[1].running_var[0] = float("nan")
    t = SimpleNamespace(model=model, run_dir=base_run, epoch=3, step_in_epoch=7)
    if bad == "none":
        training.check_finite(t, loss)  # type: ignore[arg-type]
        return
    with pytest.raises(training.NonFiniteLoss, match="epoch 4 step 7.*epoch-0001, is kept"):
        training.check_finite(t, loss)  # type: ignore[arg-type]


def _enospc(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_while_saving_stops_the_run_and_keeps_the_previous_checkpoint(
        data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "r"
    real = checkpoint.save_file
    monkeypatch.setattr(checkpoint, "save_file", lambda *a, **k: _enospc()
                        if (out / "checkpoints" / "latest").exists() else real(*a, **k))
    assert main(["pretrain", "--data", str(data), "--out", str(out), "--epochs", "1", *TINY,
                 "--checkpoint-every-steps", "2"]) == 2
    line = _one_error_line(capsys)
    assert "cannot save checkpoint epoch-0001" in line and "No space left on device" in line
    assert "the previous checkpoint epoch-0001-step-000002 is intact" in line
    assert f"--resume {out}" in line
    last = latest_checkpoint(out)
    assert last.name == "epoch-0001-step-000002" and load_train_state(last)["global_step"] == 2
    load_encoder(out)  # loads, sidecars verified
    assert not [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("where", ["weights", "state", "rename", "pointer", "same name"])
def test_every_failing_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch, where):
    run = tmp_path / "run"
    old, new = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    first = "epoch-0001" if where == "same name" else "epoch-0001-step-000002"
    checkpoint.save_checkpoint(run, first, old, {"epoch": 0}, {"step": torch.tensor(2)}, False)
    if where == "weights":
        monkeypatch.setattr(checkpoint, "save_file", _enospc)
    elif where == "state":
        def torn(*_a, **_k):  # torch wraps the OSError of a full disk in a RuntimeError
            raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 "
                               "vs 0\nPytorchStreamWriter failed writing file data/0")
        monkeypatch.setattr(torch, "save", torn)
    else:
        real, failed = os.replace, []
        target = "latest" if where == "pointer" else "epoch-0001"

        def replace(src, dst):  # the first rename onto the target fails, later ones work
            if Path(dst).name == target and not failed:
                failed.append(dst)
                _enospc()
            return real(src, dst)
        monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(UserError, match=f"previous checkpoint {first} is intact"):
        checkpoint.save_checkpoint(run, "epoch-0001", new, {"epoch": 1}, {"step": torch.tensor(4)},
                                   True)
    last = latest_checkpoint(run)
    assert last.name == first and load_train_state(last)["step"] == 2
    assert torch.equal(load_weights(last / "model.safetensors")["weight"], old.weight)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [first, "latest"]


def test_a_full_disk_elsewhere_is_one_line_too(data, base_run, tmp_path, monkeypatch,
                                               capsys):
    """The metrics log (an OSError without a file name), Parquet embeddings (pyarrow's error
    carries no errno), the run's own files (atomic writes), and the feature cache (skipped:
    the evaluation goes on without it)."""
    from simclr_kit.atomic import atomic_write_text
    from simclr_kit.evaluation import cache
    from simclr_kit.report.metrics import MetricsLog

    monkeypatch.setattr(MetricsLog, "write", _enospc)
    assert main(["pretrain", "--data", str(data), "--out", str(tmp_path / "r"), "--epochs", "1",
                 *TINY]) == 2
    line = _one_error_line(capsys)
    assert line == ("simclr pretrain: error: No space left on device (free some space, then "
                    "run again)")
    monkeypatch.undo()

    def arrow_full(*_args, **_kwargs):
        raise OSError("[Errno 28] Error writing bytes to file. Detail: [errno 28] No space "
                      "left on device")

    monkeypatch.setattr("pyarrow.parquet.write_table", arrow_full)
    assert main(["embed", str(base_run), "--data", str(data), "--out",
                 str(tmp_path / "e.parquet"), "--device", "cpu"]) == 2
    assert "No space left on device" in _one_error_line(capsys)
    assert not list(tmp_path.glob("*.parquet")) and not list(tmp_path.glob(".*tmp*"))

    monkeypatch.setattr("pathlib.Path.write_bytes", _enospc)
    with pytest.raises(UserError, match="cannot write .*meta.json: No space left on device"):
        atomic_write_text(tmp_path / "meta.json", "{}")
    monkeypatch.undo()

    monkeypatch.setattr(cache, "save_file", _enospc)
    assert cache._write(tmp_path / "features" / "f.safetensors", torch.zeros(2, 3), "k",
                        "train") is False
    assert not list((tmp_path / "features").iterdir())


def test_saving_the_same_position_again_replaces_it(tmp_path):
    run = tmp_path / "run"
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = torch.nn.Linear(3, 2)
        checkpoint.save_checkpoint(run, "epoch-0001", model, {}, {"seed": seed}, True)
    last = latest_checkpoint(run)
    assert load_train_state(last)["seed"] == 1
    assert torch.equal(load_weights(last / "model.safetensors")["weight"], model.weight)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch-0001", "latest"]


# ---- files that would run code -------------------------------------------------------------

class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['EXPLOIT_MARKER']}",))


@pytest.fixture
def marker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "pwned"
    monkeypatch.setenv("EXPLOIT_MARKER", str(path))
    return path


def test_crafted_init_weights_never_run(data, tmp_path, marker, capsys):
    evil = tmp_path / "weights.pt"
    evil.write_bytes(pickle.dumps({"conv1.weight": _Exploit()}))
    assert main(["pretrain", "--data", str(data), "--out", str(tmp_path / "r"), "--epochs", "1",
                 *TINY, "--init", str(evil)]) == 2
    assert "never unpickled" in _one_error_line(capsys)
    assert not marker.exists()


def test_crafted_training_state_never_runs_even_with_a_matching_sidecar(run, marker, capsys):
    ckpt = latest_checkpoint(run)
    state = ckpt / "state.pt"
    state.write_bytes(pickle.dumps({"optimizer": _Exploit(), "epoch": 1}))
    # The attacker controls the whole directory, so the sidecar matches: weights_only still refuses.
    record = {"file": "state.pt", "bytes": state.stat().st_size,
              "sha256": hashlib.sha256(state.read_bytes()).hexdigest()}
    (ckpt / "state.json").write_text(json.dumps(record))
    assert main(["pretrain", "--resume", str(run), "--epochs", "2"]) == 2
    assert "never unpickled" in _one_error_line(capsys)
    assert not marker.exists()


def test_dataset_loading_scripts_are_refused_with_a_way_out(tmp_path, monkeypatch, capsys):
    def scripted(path, *args, **kwargs):  # what datasets >= 4 raises for a script dataset
        raise RuntimeError(f"Dataset scripts are no longer supported, but found {path.split('/')[-1]}.py")

    monkeypatch.setattr(datasets, "load_dataset", scripted)
    assert main(["pretrain", "--data", "someone/scripted", "--out", str(tmp_path / "r")]) == 2
    announced, line = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert announced.startswith("'someone/scripted' is not a file or folder here: looking it up")
    assert "needs a loading script (scripted.py)" in line and "never run" in line
    assert "to_parquet" in line and "refs/convert/parquet" in line
    local = tmp_path / "local"
    local.mkdir()
    (local / "local.py").write_text("raise SystemExit('ran')\n")
    assert main(["pretrain", "--data", str(local), "--out", str(tmp_path / "r")]) == 2
    assert "needs a loading script (local.py)" in _one_error_line(capsys)


# ---- resuming on other data, damaged training state and metadata -------------------------

def test_resume_on_regenerated_data_is_refused_unless_allowed(tmp_path, capsys):
    """The Parquet file is regenerated at the same path with more rows between two sessions."""
    from simclr_kit.cli.parser import build_parser
    from simclr_kit.cli.commands import pretrain_config
    from simclr_kit.train.resume import resume_config

    data = write_unlabeled_parquet(tmp_path / "data", count=16)
    run = tmp_path / "run"
    config = pretrain_config(build_parser().parse_args(
        ["pretrain", "--data", str(data), "--out", str(run), "--epochs", "1", *TINY]))
    training.pretrain(config, report=False)  # the command line's run, without its report
    before = json.loads((latest_checkpoint(run) / "model.json").read_text())["dataset"]
    write_unlabeled_parquet(tmp_path / "data", count=24)
    capsys.readouterr()
    assert main(["pretrain", "--resume", str(run), "--epochs", "2"]) == 2
    line = _one_error_line(capsys)
    assert f"dataset fingerprint {before['fingerprint']} then, " in line
    assert "16 rows then, 24 now" in line and "--allow-changed-data" in line
    assert latest_checkpoint(run).name == "epoch-0001"  # nothing was trained or written
    with pytest.raises(UserError, match="--allow-changed-data"):  # the API refuses it too
        training.pretrain(resume_config(run, {"epochs": 2}), resume=run, report=False)
    training.pretrain(resume_config(run, {"epochs": 2}), resume=run, report=False,
                      allow_changed_data=True)
    after = json.loads((latest_checkpoint(run) / "model.json").read_text())["dataset"]
    assert after["rows"] == 24 and after["fingerprint"] != before["fingerprint"]
    changed = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
               if '"data_changed"' in line]
    assert [(c["fingerprint_before"], c["fingerprint_now"]) for c in changed] == \
        [(before["fingerprint"], after["fingerprint"])]


def _replace_state(ckpt: Path, state: object) -> None:
    """A new state.pt with a sidecar that matches it (whoever edits the file can edit both)."""
    path = ckpt / "state.pt"
    torch.save(state, str(path))
    record = {"file": "state.pt", "bytes": path.stat().st_size,
              "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    (ckpt / "state.json").write_text(json.dumps(record))


@pytest.mark.parametrize("edit, message", [
    (lambda state: [1, 2], "holds a list, not a simclr-kit training state"),
    (lambda state: dict(state, epoch="two"), "epoch is 'two', not a count"),
    (lambda state: dict(state, step_in_epoch=-3), "step_in_epoch is '-3', not a count"),
], ids=["list", "string-epoch", "negative-step"])
def test_a_training_state_that_loads_but_is_not_one_is_one_line(run, capsys, edit, message):
    ckpt = latest_checkpoint(run)
    _replace_state(ckpt, edit(load_train_state(ckpt)))
    assert main(["pretrain", "--resume", str(run), "--epochs", "2"]) == 2
    assert message in _one_error_line(capsys)


@pytest.mark.parametrize("field, value, message", [
    ("image_size", "big", "image_size = 'big', not a size in pixels"),
    ("mean", [0.5, 0.5], "mean = '[0.5, 0.5]', not three numbers"),
    ("stem", "tall", "stem = 'tall', not 'cifar' or 'imagenet'"),
    ("config", "yes", "config = 'yes', not a mapping"),
])
@pytest.mark.parametrize("command", ["export", "evaluate"])
def test_garbage_weights_metadata_is_one_line(run, tmp_path, capsys, field, value, message,
                                              command):
    ckpt = latest_checkpoint(run)
    meta = json.loads((ckpt / "model.json").read_text())
    meta = {k: v for k, v in meta.items() if k not in ("file", "bytes", "sha256", "format")}
    checkpoint.save_weights(ckpt / "model.safetensors",
                            load_weights(ckpt / "model.safetensors"), dict(meta, **{field: value}))
    args = {"export": ["export", str(run), str(tmp_path / "out.safetensors")],
            "evaluate": ["evaluate", str(run), "--device", "cpu", "--out", str(tmp_path / "e")]}
    assert main(args[command]) == 2
    assert message in _one_error_line(capsys)
    assert not (tmp_path / "out.safetensors").exists()


def test_a_model_json_that_is_not_a_mapping_is_one_line(run, tmp_path, capsys):
    """Weights without metadata in their header fall back to model.json: here ``[1, 2]``."""
    ckpt = latest_checkpoint(run)
    bare = tmp_path / "bare" / "model.safetensors"
    bare.parent.mkdir()
    from safetensors.torch import save_file

    save_file(load_weights(ckpt / "model.safetensors"), str(bare))
    (bare.parent / "model.json").write_text("[1, 2]")
    assert main(["export", str(bare), str(tmp_path / "out.safetensors")]) == 2
    assert "its metadata is a list, not a mapping" in _one_error_line(capsys)
