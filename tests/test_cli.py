"""The command line end to end on a few dozen generated images, in-process."""

from __future__ import annotations

import csv
import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision
from safetensors.torch import load_file
from torch import nn

from conftest import TINY
from simclr_kit.checkpoint import latest_checkpoint
from simclr_kit.cli import main
from simclr_kit.report.metrics import read_metrics



@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "run"
    assert main(["pretrain", "--data", str(data), "--out", str(out), "--epochs", "1", *TINY]) == 0
    return out


def test_pretrain_writes_run_directory(run):
    assert (run / "config.yaml").is_file() and (run / "checkpoints" / "latest").is_file()
    records = read_metrics(run / "metrics.jsonl")
    train = [r for r in records if r["kind"] == "train"]
    assert len(train) == 3 and all(r["loss"] > 0 for r in train)  # 24 images / batch 8
    # the default rate, 2.83 per 256 images, scaled by the square root of 8 / 256
    assert records[0]["effective_lr"] == pytest.approx(2.83 * (8 / 256) ** 0.5)


def test_resume_continues_to_more_epochs(run, tmp_path):
    assert main(["pretrain", "--resume", str(run), "--epochs", "2"]) == 0
    records = read_metrics(run / "metrics.jsonl")
    assert [r["kind"] for r in records].count("resume") == 1
    assert max(r["step"] for r in records if r["kind"] == "train") == 6
    assert (run / "checkpoints" / "latest").read_text().strip() == "epoch-0002"
    # Resumed again without --epochs (after a kill, say), it goes on to the length last given,
    # not to the one in its config.yaml.
    from simclr_kit.resume import resume_config

    assert resume_config(run, {}).epochs == 2
    assert resume_config(run, {"epochs": 5}).epochs == 5


def test_evaluate_writes_json_and_table(run, data, capsys):
    assert main(["evaluate", str(run), "--data", str(data), "--linear-epochs", "3",
                 "--knn-k", "3,10", "--device", "cpu"]) == 0
    result = json.loads((run / "eval.json").read_text())
    protocols = {(r["protocol"], r["hyperparameters"].get("k")) for r in result["results"]}
    assert protocols == {("knn", 3), ("knn", 10), ("linear", None)}
    assert result["eval"]["split"] == "test"
    assert "| linear | top1 |" in capsys.readouterr().out


def test_train_classifier_predict_and_export(run, data, tmp_path):
    cls = tmp_path / "cls"
    assert main(["train-classifier", str(run), "--data", str(data), "--out", str(cls),
                 "--epochs", "2", "--device", "cpu"]) == 0
    meta = json.loads((cls / "classifier.json").read_text())
    assert meta["class_names"] == ["c0", "c1", "c2"] and 0 <= meta["val_accuracy"] <= 100
    preds = tmp_path / "preds.csv"
    assert main(["predict", str(cls), "--data", str(data), "--out", str(preds)]) == 0
    rows = list(csv.DictReader(open(preds)))
    assert len(rows) == 24  # every row of the test split (the default)
    assert {r["predicted"] for r in rows} <= {"c0", "c1", "c2"}
    import pyarrow.parquet as pq

    truth = pq.read_table(data / "test.parquet").column("label").to_pylist()
    assert [r["label"] for r in rows] == [f"c{y}" for y in truth]  # the true class, by name
    assert [r["id"] for r in rows] == [str(i) for i in range(24)]  # rows of the split
    assert all(0 < float(r["probability"]) <= 1 for r in rows)

    out = tmp_path / "bb.safetensors"
    assert main(["export", str(run), str(out)]) == 0
    plain = torchvision.models.resnet18()
    plain.fc = nn.Identity()
    plain.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    plain.maxpool = nn.Identity()
    plain.load_state_dict(load_file(str(out)), strict=True)


def test_predict_on_image_files(run, data, tmp_path):
    from PIL import Image

    cls = tmp_path / "cls"
    assert main(["train-classifier", str(run), "--data", str(data), "--out", str(cls),
                 "--epochs", "1", "--device", "cpu"]) == 0
    for i in range(3):
        Image.new("RGB", (20, 14), (i * 80, 10, 10)).save(tmp_path / f"x{i}.png")
    preds = tmp_path / "p.csv"
    assert main(["predict", str(cls), "--data", str(tmp_path / "x*.png"), "--out", str(preds)]) == 0
    assert [r["id"].endswith(f"x{i}.png") for i, r in enumerate(csv.DictReader(open(preds)))] == [True] * 3


def test_run_prints_simclr_next_to_random_init(data, tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["run", "--data", str(data), "--out", str(out), "--epochs", "1", *TINY,
                 "--linear-epochs", "2", "--knn-k", "5"]) == 0
    text = capsys.readouterr().out
    assert "| simclr | random-init |" in text
    rows = json.loads((out / "eval.json").read_text())["results"]
    assert {r["encoder"] for r in rows} == {"simclr", "random-init"}


@pytest.mark.parametrize("argv,message", [
    (["pretrain", "--data", "./missing/folder"], "no such file or folder"),
    (["pretrain", "--temperature", "0"], "temperature"),
    (["pretrain", "--batch-size", "1"], "batch_size"),
    (["evaluate", "./missing-run", "--data", "digits"], "does not exist"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "runs").exists()  # nothing written


def test_existing_run_dir_is_never_overwritten(run, data, capsys):
    before = (run / "checkpoints" / "latest").read_text()
    assert main(["pretrain", "--data", str(data), "--out", str(run), "--epochs", "1", *TINY]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (run / "checkpoints" / "latest").read_text() == before


def test_too_few_images_for_a_batch(data, tmp_path, capsys):
    assert main(["pretrain", "--data", str(data), "--out", str(tmp_path / "r"),
                 "--batch-size", "64", "--device", "cpu"]) == 2
    assert "fewer than one batch" in capsys.readouterr().err


@pytest.mark.slow
def test_module_entry_point_and_help_show_defaults():
    proc = subprocess.run([sys.executable, "-m", "simclr_kit", "pretrain", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    assert "(default: 0.1)" in proc.stdout and "--temperature" in proc.stdout
    assert torch.__version__  # the same interpreter has torch


def test_pretrain_from_init_weights(run, data, tmp_path):
    out = tmp_path / "from-init"
    assert main(["pretrain", "--data", str(data), "--out", str(out), "--epochs", "1",
                 "--init", str(run), *TINY]) == 0
    meta = json.loads(next((out / "checkpoints").glob("epoch-*/model.json")).read_text())
    assert meta["init_from"].endswith("model.safetensors") and meta["stem"] == "cifar"


def test_show_augment_writes_a_grid(data, tmp_path):
    from PIL import Image

    out = tmp_path / "grid.png"
    assert main(["show-augment", "--data", str(data), "--out", str(out), "--count", "4"]) == 0
    with Image.open(out) as img:
        assert img.height > img.width  # 4 rows of (original, view 1, view 2)


# ---- boolean flags, mistyped flags, config files -------------------------------------------

def _parsed(argv: list[str]):
    from simclr_kit.cli import build_parser

    return build_parser().parse_args(argv)


@pytest.mark.parametrize("argv,value", [
    (["train-classifier", "RUN", "--out", "o", "--finetune"], True),
    (["train-classifier", "--finetune", "RUN", "--out", "o"], True),  # RUN is not its value
    (["train-classifier", "RUN", "--out", "o", "--finetune", "true"], True),
    (["train-classifier", "RUN", "--out", "o", "--finetune", "false"], False),
    (["train-classifier", "RUN", "--out", "o", "--no-finetune"], False),
    (["train-classifier", "RUN", "--out", "o"], None),
])
def test_boolean_flags_are_bare_negated_or_valued(argv, value):
    args = _parsed(argv)
    assert args.finetune is value and args.checkpoint == "RUN"


def test_every_boolean_option_has_a_bare_and_a_no_form():
    """Generic: every true/false row of every flag table, present and future."""
    from simclr_kit.cli import (CLASSIFIER_FLAGS, DATA_FLAGS, EVAL_FLAGS, PRETRAIN_FLAGS,
                                _bool)

    tables = {"pretrain": DATA_FLAGS + PRETRAIN_FLAGS, "evaluate": DATA_FLAGS + EVAL_FLAGS,
              "train-classifier": CLASSIFIER_FLAGS}
    rows = [(command, flag, dest) for command, table in tables.items()
            for flag, dest, kind, _ in table if kind is _bool]
    assert len(rows) >= 6  # compile, channels-last, sync-bn, deterministic, probe-augment, ...
    positional = {"pretrain": [], "evaluate": ["RUN"], "train-classifier": ["RUN", "--out", "o"]}
    for command, flag, dest in rows:
        base = [command, *positional[command]]
        assert getattr(_parsed([*base, flag]), dest) is True, flag
        assert getattr(_parsed([*base, f"--no-{flag[2:]}"]), dest) is False, flag
        assert getattr(_parsed([*base, flag, "no"]), dest) is False, flag
    assert _parsed(["evaluate", "--probe-augment", "RUN"]).checkpoint == "RUN"
    assert _parsed(["embed", "RUN", "--out", "e.parquet", "--projections"]).projections is True
    assert _parsed(["embed", "RUN", "--out", "e.parquet"]).projections is False
    assert _parsed(["report", "RUN", "--no-embeddings"]).embeddings is False
    assert _parsed(["check-distributed", "--no-sync-bn"]).sync_bn is False


@pytest.mark.parametrize("argv,hint", [
    (["pretrain", "--imagesize", "16"], "did you mean --image-size?"),
    (["evaluate", "RUN", "--knnk", "5"], "did you mean --knn-k?"),
    (["train-classifier", "RUN", "--out", "o", "--fine-tune"], "did you mean --finetune?"),
])
def test_a_mistyped_flag_gets_the_closest_one(argv, hint, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unrecognized arguments" in err[0] and hint in err[0]


def test_config_file_in_flag_spellings_and_print_config(tmp_path, capsys):
    import yaml

    given = tmp_path / "flat.yaml"
    given.write_text("data: digits\nimage_size: 16\nbatch-size: 64\nflip-p: 0.0\n"
                     "augment:\n  crop-scale-min: 0.3\nepochs: 2\n")
    out = tmp_path / "never"
    assert main(["pretrain", "--config", str(given), "--batch-size", "32", "--out", str(out),
                 "--print-config"]) == 0
    printed = capsys.readouterr().out
    config = yaml.safe_load(printed)
    assert config["data"] == {**config["data"], "data": "digits", "image_size": 16}
    assert (config["batch_size"], config["epochs"]) == (32, 2)  # the flag wins over the file
    assert config["augment"]["flip_p"] == 0.0 and config["augment"]["crop_scale_min"] == 0.3
    assert not out.exists()  # printing trains nothing
    # What it prints is a config file as it stands.
    (tmp_path / "printed.yaml").write_text(printed)
    assert main(["pretrain", "--config", str(tmp_path / "printed.yaml"), "--print-config"]) == 0
    assert capsys.readouterr().out == printed
    (tmp_path / "twice.yaml").write_text("batch-size: 64\nbatch_size: 32\n")
    assert main(["pretrain", "--config", str(tmp_path / "twice.yaml")]) == 2
    assert "'batch_size' is given twice ('batch-size' and 'batch_size')" in capsys.readouterr().err


# ---- resuming ------------------------------------------------------------------------------

def _files(run):
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(run.rglob("*"))
            if p.is_file()}


def _epochs_done(run) -> int:
    return int(json.loads((latest_checkpoint(run) / "model.json").read_text())["epoch"])


def test_resuming_a_finished_run_changes_nothing(run, capsys):
    """``run`` has trained all its epochs (one, or two once resumed above)."""
    before, done = _files(run), _epochs_done(run)
    capsys.readouterr()
    assert main(["pretrain", "--resume", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert f"{run} is complete ({done} epoch" in err[0] and "nothing was changed" in err[0]
    assert f"--epochs M with M > {done}" in err[0]
    assert _files(run) == before


def test_api_resume_refuses_what_the_command_line_refuses(run):
    from simclr_kit.config import PretrainConfig, from_dict, load_yaml
    from simclr_kit.errors import UserError
    from simclr_kit.training import pretrain

    before = _files(run)
    saved = from_dict(PretrainConfig, load_yaml(run / "config.yaml"))
    with pytest.raises(UserError, match=r"lr \(2\.83 in its config.yaml, 0\.01 now\): cannot "
                                        r"change when resuming"):
        pretrain(dataclasses.replace(saved, lr=0.01, epochs=9), resume=run)
    with pytest.raises(UserError, match="is complete"):
        pretrain(dataclasses.replace(saved, epochs=_epochs_done(run)), resume=run)
    assert _files(run) == before


def test_show_augment_draws_the_count_it_says_despite_a_broken_image(tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    rng = np.random.default_rng(0)
    for i in range(7):
        pixels = rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"b{i}.png")
    out = tmp_path / "grid.png"
    assert main(["show-augment", "--data", str(folder), "--out", str(out), "--count", "6"]) == 0
    text = capsys.readouterr().out
    assert "6 images and their two views" in text and "skipped 1 unreadable image(s)" in text
    with Image.open(out) as img:
        assert round(img.height / 150) == 6  # 1.5 inches at 100 dpi per row
