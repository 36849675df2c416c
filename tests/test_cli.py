"""The command line end to end on a few dozen generated images, in-process."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import re
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from safetensors.torch import load_file
from torch import nn

from conftest import TINY
from simclr_kit.checkpoint_files import latest_checkpoint
from simclr_kit.cli import main
from simclr_kit.report.metrics import read_metrics



README = Path(__file__).resolve().parents[1] / "README.md"
PRETRAINED = {}  # what the module's pretraining printed


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "run"
    printed = io.StringIO()
    with redirect_stdout(printed):
        assert main(["pretrain", "--data", str(data), "--out", str(out), "--epochs", "1",
                     *TINY]) == 0
    PRETRAINED["out"] = printed.getvalue()
    return out


def test_pretrain_writes_run_directory(run):
    assert (run / "config.yaml").is_file() and (run / "checkpoints" / "latest").is_file()
    records = read_metrics(run / "metrics.jsonl")
    train = [r for r in records if r["kind"] == "train"]
    assert len(train) == 3 and all(r["loss"] > 0 for r in train)  # 24 images / batch 8
    assert [r["epoch"] for r in train] == [1, 1, 1]  # from 1, as checkpoints and the bar count
    # the default rate, SimCLR's square-root rule 0.075 x sqrt(B), at batch 8
    assert records[0]["effective_lr"] == pytest.approx(0.075 * 8 ** 0.5)


def test_pretrain_ends_with_the_loss_the_files_and_the_next_command(run):
    """The closing lines: the epochs and final loss (the last logged one), the checkpoint, the
    report and the command to run next (on the run's own, labelled, dataset)."""
    loss = [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"][-1]["loss"]
    lines = PRETRAINED["out"].splitlines()[-4:]
    assert lines == [f"pretrained {run}: 1 epoch(s) trained, final loss {loss:.4f}",
                     f"checkpoint: {run / 'checkpoints' / 'epoch-0001'}",
                     f"report: {run / 'report.html'}",
                     f"next: simclr evaluate {run}   (on its own labelled dataset; --data "
                     "chooses another)"]


def test_config_yaml_records_the_run_directory_it_chose(data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["pretrain", "--data", str(data), "--epochs", "1", *TINY]) == 0
    (made,) = (tmp_path / "runs").iterdir()
    import yaml

    out = yaml.safe_load((made / "config.yaml").read_text())["out"]
    assert out is not None and (tmp_path / out).resolve() == made.resolve()


def test_adam_takes_its_own_default_rate_and_the_logged_rates_follow_the_schedule(data,
                                                                                   tmp_path):
    """--optimizer adam without --lr trains at Adam's 1e-3 per 256 images (scaled linearly),
    recorded as numbers; the logged rate of each step is the warm-up (counted in steps) and
    then the cosine to zero."""
    import math

    import yaml

    out = tmp_path / "adam"
    assert main(["pretrain", "--data", str(data), "--out", str(out), "--epochs", "2",
                 "--optimizer", "adam", "--warmup-fraction", "0.5", *TINY]) == 0
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert (config["optimizer"], config["lr"], config["lr_scaling"], config["weight_decay"],
            config["warmup_epochs"]) == ("adam", 1e-3, "linear", 1e-6, 10.0)
    records = read_metrics(out / "metrics.jsonl")
    base = 1e-3 * 8 / 256
    assert records[0]["effective_lr"] == pytest.approx(base)
    # 3 steps an epoch; warm-up min(10, 0.5 x 2) = 1 epoch = 3 steps, then 3 steps of cosine.
    expected = [base * (k + 1) / 3 if k < 3 else base * (1 + math.cos(math.pi * (k - 3) / 3)) / 2
                for k in range(6)]
    logged = {r["step"]: r["lr"] for r in records if r["kind"] == "train"}  # after step s: s-1's
    assert [logged[s] for s in range(1, 7)] == pytest.approx(expected)


@pytest.mark.parametrize("source", ["recipe", "file"])
def test_naming_another_optimizer_than_the_config_drops_its_rate_and_weight_decay(
        source, tmp_path, capsys):
    """The digits recipe (taken when --data is left out) and a config file both name LARS with
    its rate: --optimizer adam takes Adam's own defaults for what is not given on the command
    line, and naming the config's own optimizer keeps its values."""
    import yaml

    from simclr_kit.config import PretrainConfig, from_dict, recipe

    if source == "recipe":
        config, base = [], recipe("digits")
    else:
        base = {"optimizer": "lars", "lr": 0.5, "lr_scaling": "sqrt", "weight_decay": 1e-5,
                "warmup_epochs": 2}
        (tmp_path / "lars.yaml").write_text(yaml.safe_dump(base))
        config = ["--config", str(tmp_path / "lars.yaml")]

    def resolved(*flags: str) -> PretrainConfig:
        assert main(["pretrain", *config, *flags, "--print-config"]) == 0
        return from_dict(PretrainConfig, yaml.safe_load(capsys.readouterr().out)).resolved()

    adam = resolved("--optimizer", "adam")
    assert (adam.optimizer, adam.lr, adam.lr_scaling, adam.weight_decay, adam.warmup_epochs) == \
        ("adam", 1e-3, "linear", 1e-6, 10.0)
    given = resolved("--optimizer", "sgd", "--lr", "0.2", "--warmup-epochs", "1")
    assert (given.lr, given.lr_scaling, given.weight_decay, given.warmup_epochs) == \
        (0.2, "linear", 5e-4, 1.0)
    same = resolved("--optimizer", "lars")
    assert (same.lr, same.lr_scaling, same.weight_decay, same.warmup_epochs) == \
        (base["lr"], base["lr_scaling"], base["weight_decay"], base["warmup_epochs"])
    api = PretrainConfig.from_recipe("digits", optimizer="adamw").resolved()
    assert (api.lr, api.weight_decay) == (1e-3, 0.05)


def test_resume_continues_to_more_epochs(run, tmp_path, capsys):
    assert main(["pretrain", "--resume", str(run), "--epochs", "2"]) == 0
    assert f"resuming from epoch-0001 in {run}" in capsys.readouterr().out
    records = read_metrics(run / "metrics.jsonl")
    assert [r["kind"] for r in records].count("resume") == 1
    assert max(r["step"] for r in records if r["kind"] == "train") == 6
    assert (run / "checkpoints" / "latest").read_text().strip() == "epoch-0002"
    # Resumed again without --epochs (after a kill, say), it goes on to the length last given,
    # not to the one in its config.yaml.
    from simclr_kit.train.resume import resume_config

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
    # Without --data: the dataset the classifier was trained on, the same rows.
    own = tmp_path / "own.csv"
    assert main(["predict", str(cls), "--out", str(own)]) == 0
    assert own.read_text() == preds.read_text()

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


def test_show_augment_counts_epochs_from_1(data, tmp_path, monkeypatch, capsys):
    """--epoch 1 draws the views of the first epoch: the keyed draws' epoch index 0."""
    import simclr_kit.report.views as views

    drawn = []
    monkeypatch.setattr(views, "save_view_grid", lambda *a, epoch, **k: drawn.append(epoch))
    for epoch in ("1", "3"):
        assert main(["show-augment", "--data", str(data), "--out", str(tmp_path / "g.png"),
                     "--count", "2", "--epoch", epoch]) == 0
    assert drawn == [0, 2]
    assert main(["show-augment", "--data", str(data), "--epoch", "0"]) == 2
    assert "epochs count from 1" in capsys.readouterr().err


def test_resumable_fields_are_one_list_in_help_readme_and_error(run, capsys):
    from simclr_kit.train.resume import RESUMABLE_FIELDS, resumable_flags, resumable_text

    flags = resumable_flags()
    assert len(flags) == len(RESUMABLE_FIELDS) - 1  # progress has no flag
    readme = " ".join(README.read_text().split())
    listed = re.search(r"`--resume RUN_DIR` continues it with its `config.yaml`: only (.*?) may "
                       r"change", readme)
    assert listed and re.findall(r"`(--[a-z-]+)`", listed.group(1)) == flags
    assert f"only {resumable_text()} may change" in _help("pretrain", capsys)
    assert main(["pretrain", "--resume", str(run), "--lr", "0.01"]) == 2
    assert f"(only {resumable_text()} can)" in capsys.readouterr().err


def _help(command: str, capsys) -> str:
    assert main([command, "--help"]) == 0
    return " ".join(capsys.readouterr().out.split())


def test_help_says_what_flags_do(capsys):
    """Help texts hold no measurements, and embed's names every file it writes."""
    text = _help("pretrain", capsys)
    temperature = text.split("--temperature TEMPERATURE")[1].split(" --")[0]
    assert not re.search(r"best|level|worse|points|\d%", temperature), temperature
    text = _help("embed", capsys)
    for name in ("OUT.ids.npy", "OUT.files.npy", "OUT.labels.npy", "OUT.projections.npy",
                 "OUT.json", "OUT.skipped.txt"):
        assert name in text, name
    for command in ("evaluate", "train-classifier", "report"):
        assert "--store-size" not in _help(command, capsys), command


def test_show_augment_writes_a_grid(data, tmp_path):
    from PIL import Image

    out = tmp_path / "grid.png"
    assert main(["show-augment", "--data", str(data), "--out", str(out), "--count", "4"]) == 0
    with Image.open(out) as img:
        assert img.height > img.width  # 4 rows of (original, view 1, view 2)


# ---- boolean flags, mistyped flags, config files -------------------------------------------

def _parsed(argv: list[str]):
    from simclr_kit.cli.parser import build_parser

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
    from simclr_kit.cli.commands import CLASSIFIER_FLAGS, DATA_FLAGS, EVAL_FLAGS, PRETRAIN_FLAGS
    from simclr_kit.cli.flags import parse_bool as _bool

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


# ---- flags derived from the config dataclasses ---------------------------------------------

def _sections():
    """(config class, dest prefix, flag table) for every config class the commands expose."""
    from simclr_kit.cli.commands import CLASSIFIER_FLAGS, DATA_FLAGS, EVAL_FLAGS, PRETRAIN_FLAGS
    from simclr_kit.config import (AugmentConfig, ClassifierConfig, DataConfig, EvalConfig,
                                   PretrainConfig)

    return [(DataConfig, "data.", DATA_FLAGS), (PretrainConfig, "", PRETRAIN_FLAGS),
            (AugmentConfig, "augment.", PRETRAIN_FLAGS), (EvalConfig, "eval.", EVAL_FLAGS),
            (ClassifierConfig, "", CLASSIFIER_FLAGS)]


def _options(command):
    """{option string: action} of a sub-command, the hidden --no-x forms left out."""
    from simclr_kit.cli.parser import build_parser, command_parser

    parser = command_parser(build_parser(), command)
    return {o: a for a in parser._actions for o in a.option_strings if a.help != "==SUPPRESS=="}


def test_every_config_field_is_a_flag_or_marked_not_one():
    import typing

    without_flag = set()
    for cls, prefix, table in _sections():
        dests = {f.dest for f in table}
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[field.name]):
                continue  # a section (data, augment): its fields are checked as their class
            unflagged = field.metadata.get("flag") is False
            assert (prefix + field.name in dests) != unflagged, f"{cls.__name__}.{field.name}"
            assert field.metadata.get("help"), f"{cls.__name__}.{field.name} has no help"
            if unflagged:
                without_flag.add(prefix + field.name)
        fields = {prefix + f.name for f in dataclasses.fields(cls)}
        assert {d for d in dests if d.startswith(prefix) and "." not in d[len(prefix):]} <= fields
    assert without_flag == {"data.cache_dir", "progress"}


def test_each_command_has_its_flags_and_no_two_write_the_same_value():
    from simclr_kit.cli.commands import CLASSIFIER_FLAGS, DATA_FLAGS, EVAL_FLAGS, PRETRAIN_FLAGS

    def flags(table):
        return {f.flag for f in table}

    data, pretrain = flags(DATA_FLAGS), flags(PRETRAIN_FLAGS)
    augment = {f.flag for f in PRETRAIN_FLAGS if f.dest.startswith("augment.")}
    assert len(augment) == 13 and {"--flip-p", "--grayscale-p", "--solarize-threshold"} <= augment
    by_name = {"--data", "--data-config", "--revision", "--image-column", "--label-column",
               "--bad-images", "--crop-fraction"}  # what names images and how they are cropped
    run_data = data - {"--store-size"}  # the stored size concerns pretraining alone
    expected = {"run": data | pretrain | flags(EVAL_FLAGS), "pretrain": data | pretrain,
                "evaluate": run_data | flags(EVAL_FLAGS), "report": run_data,
                "train-classifier": run_data | flags(CLASSIFIER_FLAGS), "predict": by_name,
                "embed": by_name, "show-augment": data | augment | {"--seed"}}
    every = data | pretrain | flags(EVAL_FLAGS) | flags(CLASSIFIER_FLAGS)
    table = DATA_FLAGS + PRETRAIN_FLAGS + EVAL_FLAGS + CLASSIFIER_FLAGS
    for command, wanted in expected.items():
        options = _options(command)  # a command's own --out or --device has its own help
        derived = {o for o, a in options.items() for f in table
                   if o == f.flag and a.help.split("; --no-")[0] == f.help}
        assert derived == wanted, command
        dests = [a.dest for a in {id(a): a for a in options.values()}.values()]
        assert len(dests) == len(set(dests)), f"{command}: two options write one value"
    assert {"--eval-seed", "--eval-batch-size", "--baseline", "--logger"} <= every
    args = _parsed(["run", "--eval-seed", "7", "--eval-batch-size", "32", "--batch-size", "64"])
    from simclr_kit.cli.commands import eval_flags, pretrain_config

    assert eval_flags(args) == {"seed": 7, "batch_size": 32}
    assert (pretrain_config(args).seed, pretrain_config(args).batch_size) == (0, 64)


def test_help_states_each_default_as_the_dataclass_has_it():
    """The "(default: X)" of every flag, read back by the flag's own parser, is the field's
    default; a None default is explained in words."""
    for cls, prefix, table in _sections():
        defaults = {prefix + f.name: f.default for f in dataclasses.fields(cls)}
        options = _options("train-classifier" if cls.__name__ == "ClassifierConfig" else "run")
        for flag in (f for f in table if f.dest in defaults):
            text, default = options[flag.flag].help, defaults[flag.dest]
            if flag.flag == "--data":  # the command's group says it: digits, or the run's own
                assert "(default:" not in text
                continue
            start = text.rindex("(default: ") + len("(default: ")
            shown = text[start:text.index(")", start)]
            if default is None:
                assert shown and "None" not in shown, flag.flag
                continue
            first = shown.split(" ")[0].rstrip(",;")
            value = () if first == "none" else options[flag.flag].type(first)
            if any(isinstance(v, float) for v in (default if isinstance(default, tuple)
                                                  else (default,))):
                assert value == pytest.approx(default, rel=1e-5), flag.flag
            else:
                assert value == default, flag.flag


def test_a_new_field_is_one_line():
    """What a field's declaration alone gives its flag: name, type, help and default."""
    from simclr_kit.config import setting, unflagged
    from simclr_kit.cli.flags import config_flags, parse_bool

    @dataclasses.dataclass(frozen=True)
    class Demo:
        rate: float = setting(0.25, "a rate per step")
        sizes: tuple[int, ...] = setting((1, 2), "sizes in pixels")
        names: tuple[str, ...] = setting((), "names", flag="--name")
        on: bool = setting(True, "switch")
        limit: int | None = setting(None, "most items", shown="no limit")
        hidden: str = unflagged("x", "set by the API")

    flags = {f.dest: f for f in config_flags(Demo, "demo.")}
    assert list(flags) == ["demo.rate", "demo.sizes", "demo.names", "demo.on", "demo.limit"]
    assert flags["demo.rate"].flag == "--rate" and flags["demo.rate"].kind("0.5") == 0.5
    assert flags["demo.rate"].help == "a rate per step (default: 0.25)"
    assert flags["demo.sizes"].kind("3,4") == (3, 4) and "(default: 1,2)" in flags["demo.sizes"].help
    assert flags["demo.names"].flag == "--name" and "(default: none)" in flags["demo.names"].help
    assert flags["demo.on"].kind is parse_bool and "(default: True)" in flags["demo.on"].help
    assert flags["demo.limit"].kind("7") == 7 and flags["demo.limit"].help.endswith("(default: no limit)")

    @dataclasses.dataclass(frozen=True)
    class Unexplained:
        limit: int | None = setting(None, "most items")

    @dataclasses.dataclass(frozen=True)
    class Undocumented:
        size: int = 3

    for cls, message in ((Unexplained, "None default needs shown="), (Undocumented, "no help")):
        with pytest.raises(TypeError, match=message):
            config_flags(cls)


def test_new_augment_flags_reach_the_config(capsys):
    import yaml

    assert main(["pretrain", "--grayscale-p", "0", "--blur-sigma-max", "1.5", "--crop-ratio-min",
                 "0.5", "--momentum", "0.8", "--print-config"]) == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert (config["augment"]["grayscale_p"], config["augment"]["blur_sigma_max"]) == (0.0, 1.5)
    assert config["augment"]["crop_ratio_min"] == 0.5 and config["momentum"] == 0.8
    assert main(["pretrain", "--jitter-p", "2", "--print-config"]) == 2
    assert "augment.jitter_p = 2.0 is out of range" in capsys.readouterr().err


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
    from simclr_kit.train.loop import pretrain

    before = _files(run)
    saved = from_dict(PretrainConfig, load_yaml(run / "config.yaml"))
    with pytest.raises(UserError, match=r"lr \(1\.2 in its config.yaml, 0\.01 now\): cannot "
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


def test_check_distributed_takes_a_pretraining_config_from_its_flags(monkeypatch):
    """check-distributed's flags are config_flags(CheckConfig) for CheckConfig.FLAGS; the
    pretraining fields it does not declare again keep pretrain's flag and help, and the flags
    given build a CheckConfig, which is a PretrainConfig."""
    from types import SimpleNamespace

    import simclr_kit.diagnostics.check_distributed as check
    from simclr_kit.cli.commands import CHECK_FLAGS, PRETRAIN_FLAGS
    from simclr_kit.config import CheckConfig, PretrainConfig

    assert [f.dest for f in CHECK_FLAGS] == list(CheckConfig.FLAGS)
    pretraining = {f.dest: f for f in PRETRAIN_FLAGS}
    own = set(CheckConfig.__annotations__)  # declared (again) by CheckConfig itself
    inherited = [f for f in CHECK_FLAGS if f.dest not in own]
    assert {f.dest for f in inherited} == {"backbone", "seed", "sync_bn"}
    assert all(f == pretraining[f.dest] for f in inherited)
    seen: list = []
    monkeypatch.setattr(check, "run_check", lambda cfg: seen.append(cfg) or
                        SimpleNamespace(report=lambda: "", passed=True))
    assert main(["check-distributed", "--batch-size", "6", "--seed", "3", "--no-sync-bn",
                 "--image-size", "8", "--backbone", "resnet34"]) == 0
    assert seen == [CheckConfig(batch_size=6, seed=3, sync_bn=False, image_size=8,
                                backbone="resnet34")]
    assert isinstance(seen[0], PretrainConfig) and (seen[0].lr, seen[0].nproc) == (0.3, 2)
    assert CheckConfig(nproc=3).global_batch == 24  # None: 8 images per process
