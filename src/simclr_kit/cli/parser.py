"""The ``simclr`` command line: one sub-command per job, each with the flags derived from its
config's fields (:mod:`simclr_kit.cli.flags`).
"""

from __future__ import annotations

import argparse
from typing import Callable

from simclr_kit import __version__
from simclr_kit.cli.commands import (CHECK_FLAGS, CLASSIFIER_DATA, CLASSIFIER_FLAGS, DATA_FLAGS,
                                     EVAL_FLAGS, FILE_DATA_FLAGS, PRETRAIN_FLAGS, RUN_DATA,
                                     RUN_DATA_FLAGS, cmd_check_distributed, cmd_embed, cmd_evaluate,
                                     cmd_export, cmd_predict, cmd_pretrain, cmd_report, cmd_run,
                                     cmd_show_augment, cmd_train_classifier)
from simclr_kit.cli.flags import Parser, add_bool, add_flags
from simclr_kit.train.resume import resumable_text


def _config_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file of pretraining fields, as --print-config writes "
                   "them, or a built-in recipe by name (digits, cifar10); flags override it "
                   "(default: the digits recipe when --data is digits or absent)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as "
                   "YAML (what --config reads and the run saves as config.yaml) and exit")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="simclr", description="SimCLR pretraining of image encoders, and evaluation.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--version", action="version", version=f"simclr-kit {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, func: Callable, text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=text, description=text)
        p.set_defaults(func=func)
        # SUPPRESS: without a value of its own, the sub-command keeps a `simclr --debug` given
        # before it (a plain default would reset it to False).
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show tracebacks for errors")
        return p

    p = command("run", cmd_run, "pretrain, then evaluate (linear probe and kNN) next to a "
                "random-init encoder; with no --data, the embedded digits demo")
    _config_options(p)
    add_flags(p, DATA_FLAGS, "data")
    add_flags(p, PRETRAIN_FLAGS, "pretraining")
    add_flags(p, EVAL_FLAGS, "evaluation")

    p = command("pretrain", cmd_pretrain, "SimCLR pretraining; writes a run directory")
    _config_options(p)
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR with its "
                   f"config.yaml; only {resumable_text()} may change; a run that trained all "
                   "its epochs is left as it is")
    p.add_argument("--allow-changed-data", action="store_true", help="with --resume: continue "
                   "although the data changed since the last checkpoint (another dataset "
                   "fingerprint: a file regenerated or images added under the same name); "
                   "refused otherwise (default: off)")
    add_flags(p, DATA_FLAGS, "data")
    add_flags(p, PRETRAIN_FLAGS, "pretraining")

    p = command("evaluate", cmd_evaluate, "evaluate an encoder with standard protocols")
    p.add_argument("checkpoint", help="run directory, checkpoint or weights file")
    p.add_argument("--out", help="results folder (default: the run directory)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default: auto)")
    add_flags(p, RUN_DATA_FLAGS, RUN_DATA)
    add_flags(p, EVAL_FLAGS, "evaluation")

    p = command("train-classifier", cmd_train_classifier,
                "train a classifier head on the extracted backbone (frozen, or --finetune)")
    p.add_argument("checkpoint", help="run directory, checkpoint or weights file")
    p.add_argument("--out", required=True, help="folder for the classifier")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default: auto)")
    add_flags(p, RUN_DATA_FLAGS, RUN_DATA)
    add_flags(p, CLASSIFIER_FLAGS, "classifier")

    p = command("predict", cmd_predict, "predict classes with a saved classifier")
    p.add_argument("classifier", nargs="?", help="folder written by train-classifier (or "
                   "--onnx instead)")
    p.add_argument("--onnx", metavar="FILE", help="run the classifier graph FILE.onnx (simclr "
                   "export CLS_DIR FILE.onnx) with ONNX Runtime on the CPU instead of torch; it "
                   "carries what predict needs (default: none, the classifier folder)")
    p.add_argument("--out", required=True, help="CSV file: id (the file, for images read from "
                   "files; else the row of the split), label (the true class, when the split "
                   "has labels), predicted, probability; unreadable images are listed in "
                   "OUT.skipped.txt")
    p.add_argument("--split", help="dataset split to predict (default: the only split, else "
                   "'test', else 'train')")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default: auto)")
    add_flags(p, FILE_DATA_FLAGS, CLASSIFIER_DATA)

    p = command("show-augment", cmd_show_augment,
                "save a PNG grid of images next to their two augmented views")
    p.add_argument("--out", default="augment.png", help="PNG file (default: augment.png)")
    p.add_argument("--count", type=int, default=8, help="images to show (default: 8)")
    p.add_argument("--epoch", type=int, default=1, help="epoch whose views to draw, counted "
                   "from 1 as in checkpoints and metrics.jsonl (default: 1)")
    _config_options(p)
    add_flags(p, DATA_FLAGS, "data")
    add_flags(p, [f for f in PRETRAIN_FLAGS if f.dest.startswith("augment.") or f.dest == "seed"],
              "augmentation")

    p = command("export", cmd_export, "write the backbone alone as torchvision-loadable "
                "safetensors, an encoder or a classifier as ONNX, or a hub folder with a model card")
    p.add_argument("checkpoint", help="run directory, checkpoint, weights file or "
                   "hf-hub:OWNER/NAME; for ONNX also a train-classifier folder (the graph then "
                   "gives logits)")
    p.add_argument("output", help="OUT.safetensors, OUT.onnx, or a new folder with --format hub")
    p.add_argument("--format", choices=("safetensors", "onnx", "hub"), help="safetensors (the "
                   "backbone's weights), onnx (a graph taking uint8 pixels, needs simclr-kit[onnx])"
                   " or hub (model.safetensors, config.json, README.md) (default: from the "
                   "OUTPUT suffix, .onnx or else safetensors)")
    p.add_argument("--backbone", help="architecture of a foreign weights file (default: resnet18)")

    p = command("embed", cmd_embed, "write backbone features (and optionally projections) of "
                "every image of a split, with row ids, files and labels, to Parquet or .npy")
    p.add_argument("checkpoint", help="run directory, checkpoint or weights file")
    p.add_argument("--out", required=True, help="OUT.parquet, or OUT.npy with --format npy "
                   "(then beside it OUT.ids.npy, OUT.files.npy for images read from files, "
                   "OUT.labels.npy for a labelled split, OUT.projections.npy with "
                   "--projections, and OUT.json); unreadable images are listed in "
                   "OUT.skipped.txt")
    p.add_argument("--format", choices=("parquet", "npy"),
                   help="file format (default: from the --out suffix, else parquet)")
    add_bool(p, "--projections", "projections", "also the projection head's outputs (needs a "
              "pretraining checkpoint, not an exported backbone) (default: off)", default=False)
    p.add_argument("--split", help="split to embed, every row (default: 'train', else the "
                   "only split)")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass "
                   "(default: 256)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default: auto)")
    add_flags(p, FILE_DATA_FLAGS, RUN_DATA)

    p = command("report", cmd_report, "write RUN/report.html: the verdict and headline "
                "numbers, curves, evaluation, confusion matrix, augmented views, embedding map, "
                "retrieval, hardware and time, config; one self-contained file")
    p.add_argument("run_dir", metavar="RUN", help="run directory")
    add_bool(p, "--embeddings", "embeddings", "compute the sections that embed both splits "
              "(confusion matrix, embedding map, retrieval); off is quick (default: on)",
              default=True)
    p.add_argument("--max-points", type=int, default=1000, help="evaluation images on the "
                   "t-SNE map, a stratified sample (default: 1000)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default: auto)")
    add_flags(p, RUN_DATA_FLAGS, RUN_DATA)

    p = command("check-distributed", cmd_check_distributed,
                "check on this machine that N processes x batch B/N train like 1 process x "
                "batch B: one step each way; prints the largest differences in loss, gradients, "
                "updated weights and views, then PASS or FAIL (exit 1)")
    add_flags(p, CHECK_FLAGS, "check")
    p.add_argument("--gather", default="with-grad", choices=("with-grad", "no-grad"),
                   help=argparse.SUPPRESS)  # no-grad: the known bug, shows the check can fail
    return parser


def command_parser(parser: argparse.ArgumentParser, name: str) -> Parser:
    """The parser of sub-command ``name``: it knows that command's flags, to suggest one."""
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return commands.choices[name]
