"""The ``simclr`` command: sub-commands parse flags into configs and call the API. No logic here.

Every user error (UserError) becomes one line on stderr and exit code 2; ``--debug`` shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

from simclr_kit import __version__
from simclr_kit.config import (AugmentConfig, CheckConfig, ClassifierConfig, DataConfig,
                               EvalConfig, PretrainConfig, config_source, data_recipe, from_dict, merge,
                               merge_pretrain)
from simclr_kit.data.names import check_data_name
from simclr_kit.errors import UserError
from simclr_kit.flags import Parser, add_bool, add_flags, config_flags, overrides
from simclr_kit.resume import resumable_text

# Every command imports what it runs (torch, datasets, matplotlib) inside its function, after
# its flags are checked: --help and a mistyped value answer without loading them.

DATA_FLAGS = config_flags(DataConfig, "data.")
# The data flags of the commands that work on a run's dataset: the stored size of the
# training images concerns pretraining alone.
RUN_DATA_FLAGS = [f for f in DATA_FLAGS if f.flag != "--store-size"]
PRETRAIN_FLAGS = config_flags(PretrainConfig) + config_flags(AugmentConfig, "augment.")
# "eval.": in `run`, --eval-seed and --eval-batch-size must not land on the pretraining seed
# and batch.
EVAL_FLAGS = config_flags(EvalConfig, "eval.")
CLASSIFIER_FLAGS = config_flags(ClassifierConfig)
CHECK_FLAGS = sorted((f for f in config_flags(CheckConfig) if f.dest in CheckConfig.FLAGS),
                     key=lambda f: CheckConfig.FLAGS.index(f.dest))
# The data flags of predict and embed, which read one whole split: of the run's own dataset,
# or of the files --data names.
FILE_DATA_FLAGS = [f for f in DATA_FLAGS if f.flag in ("--data", "--data-config", "--revision",
                                                        "--image-column", "--label-column",
                                                        "--bad-images", "--crop-fraction")]

RUN_DATA = ("data (default: the run's own dataset: the one its last evaluation used, else the one "
            "it was pretrained on)")
CLASSIFIER_DATA = ("data (default: the dataset the classifier was trained on; an image file, "
                   "folder or glob is also accepted)")


def pretrain_config(args: argparse.Namespace) -> PretrainConfig:
    """YAML file (or the digits recipe when no data is named), then the flags on top."""
    given = overrides(args, DATA_FLAGS + PRETRAIN_FLAGS)
    # --config: a file, or a built-in recipe by name (--config cifar10)
    base = (config_source(args.config, PretrainConfig) if args.config else
            data_recipe(given.get("data", {}).get("data")))
    return from_dict(PretrainConfig, merge_pretrain(base, given))


def data_flags(args: argparse.Namespace) -> dict[str, Any] | None:
    """The data flags the user gave, for a command that otherwise takes the run's dataset; a
    mistyped ``--data`` path is refused here, before the command loads torch and datasets."""
    given = overrides(args, DATA_FLAGS).get("data")
    check_data_name((given or {}).get("data"))
    return given


def eval_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The evaluation flags the user gave, as EvalConfig fields."""
    return overrides(args, EVAL_FLAGS).get("eval", {})


def _print_config(cfg: PretrainConfig) -> int:
    from simclr_kit.config import to_yaml

    print(to_yaml(cfg), end="")
    return 0


def _print_result_table(result: dict[str, Any]) -> None:
    from simclr_kit.evaluation.tables import result_verdict

    print(f"\nevaluation on {result['eval']['split']} ({result['eval']['images']} images); "
          f"written to {result['out']}/eval.json\n")
    print(result["table"])
    sentence = result_verdict(result)
    if sentence is not None:
        print(sentence)


def cmd_pretrain(args: argparse.Namespace) -> int:
    if args.resume and args.config:
        raise UserError("--config cannot be combined with --resume: a run continues with the "
                        f"config it started with ({Path(args.resume) / 'config.yaml'})")
    if args.resume:  # the flags go on top of the run's config; pretrain refuses what may not
        from simclr_kit.resume import resume_config

        cfg = resume_config(Path(args.resume), overrides(args, DATA_FLAGS + PRETRAIN_FLAGS))
    else:
        cfg = pretrain_config(args)
    if args.print_config:  # before the data check: a config may name a path of elsewhere
        return _print_config(cfg)
    if args.allow_changed_data and not args.resume:
        raise UserError("--allow-changed-data applies to --resume RUN only")
    check_data_name(cfg.data.data)  # a mistyped path: one line, before torch loads
    from simclr_kit.training import pretrain, summary

    text = summary(pretrain(cfg, resume=args.resume,  # empty on ranks other than 0
                            allow_changed_data=args.allow_changed_data))
    if text:
        print(text)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    cfg = pretrain_config(args)
    eval_cfg = from_dict(EvalConfig, merge({"baselines": ("random",)}, eval_flags(args)), "eval")
    if args.print_config:
        return _print_config(cfg)
    check_data_name(cfg.data.data)
    from simclr_kit.evaluation.protocols import evaluate
    from simclr_kit.training import pretrain

    run_dir = pretrain(cfg, report=False)
    result = evaluate(run_dir, cfg.data, eval_cfg, device=cfg.device, progress=cfg.progress)
    _print_result_table(result)
    from simclr_kit import distributed
    from simclr_kit.report.html import write_report_safely

    if distributed.is_main():  # evaluate has printed the skipped-images lines: quiet here
        report = write_report_safely(run_dir, data=cfg.data, device=cfg.device, progress=False)
        if report is not None:
            print(f"report written to {report}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    eval_cfg = from_dict(EvalConfig, eval_flags(args), "eval")
    data = data_flags(args)
    from simclr_kit.evaluation.protocols import evaluate

    result = evaluate(args.checkpoint, data, eval_cfg, out=args.out, device=args.device)
    _print_result_table(result)
    return 0


def cmd_train_classifier(args: argparse.Namespace) -> int:
    cfg = from_dict(ClassifierConfig, overrides(args, CLASSIFIER_FLAGS), "classifier")
    data = data_flags(args)
    from simclr_kit.classifier import train_classifier

    result = train_classifier(args.checkpoint, data, args.out, cfg, args.device)
    print(f"validation accuracy {result['val_accuracy']:.2f}% ({result['classes']} classes); "
          f"classifier saved in {result['out']}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    data = data_flags(args)
    from simclr_kit.classifier import predict

    if (args.classifier is None) == (args.onnx is None):
        raise UserError("give the classifier folder or --onnx FILE.onnx, one of the two")
    if args.onnx is not None:
        from simclr_kit.deploy.onnx_predict import predict_onnx

        if args.device not in ("auto", "cpu"):
            raise UserError("--onnx runs on ONNX Runtime's CPU provider: drop --device")
        n = predict_onnx(args.onnx, data, args.out, split=args.split)
    else:
        n = predict(args.classifier, data, args.out, args.device, split=args.split)
    print(f"{n} predictions written to {args.out}")
    return 0


def cmd_show_augment(args: argparse.Namespace) -> int:
    cfg = pretrain_config(args)
    if args.print_config:
        return _print_config(cfg)
    check_data_name(cfg.data.data)
    from simclr_kit.report.views import show_augment

    out, drawn = show_augment(cfg, args.out, args.count, args.epoch)
    print(f"{drawn} images and their two views saved to {out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    fmt = args.format or ("onnx" if Path(args.output).suffix == ".onnx" else "safetensors")
    if fmt == "hub":
        from simclr_kit.deploy.hub import export_hub

        out = export_hub(args.checkpoint, args.output, args.backbone)
        print(f"hub folder written to {out}: model.safetensors, config.json and README.md (the "
              "model card; fill in its licence before sharing)")
    elif fmt == "onnx":
        from simclr_kit.deploy.onnx_export import export_onnx

        done = export_onnx(args.checkpoint, args.output, args.backbone)
        print(f"{done.kind} exported to {done.path}: input pixels (N, 3, S, S) uint8, output "
              f"{done.output} (N, {done.width}) float32; ONNX Runtime gives torch's output to "
              f"{done.max_difference:.1g}")
    else:
        from simclr_kit.encoder import export_backbone

        out = export_backbone(args.checkpoint, args.output, args.backbone)
        print(f"backbone exported to {out} (metadata in {out.with_suffix('.json')})")
    return 0


def cmd_check_distributed(args: argparse.Namespace) -> int:
    cfg = from_dict(CheckConfig, dict(overrides(args, CHECK_FLAGS), gather=args.gather), "check")
    from simclr_kit.check_distributed import run_check

    result = run_check(cfg)
    print(result.report())
    return 0 if result.passed else 1


def cmd_report(args: argparse.Namespace) -> int:
    data = data_flags(args)  # on top of the run's recorded data
    from simclr_kit.report.html import write_report

    path = write_report(args.run_dir, data,
                        embeddings=args.embeddings, device=args.device,
                        max_points=args.max_points, progress=True)
    print(f"report written to {path}")
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    given = dict(data_flags(args) or {}, **({"train_split": args.split} if args.split else {}))
    from simclr_kit.embed import embed

    emb = embed(args.checkpoint, given or None, args.out, args.format, args.projections, args.device,
                args.batch_size)
    shapes = f"features {tuple(emb.features.shape)}" + (
        f", projections {tuple(emb.projections.shape)}" if emb.projections is not None else "")
    print(f"{len(emb.ids)} embeddings of split {emb.meta['split']!r} ({shapes}) written to "
          f"{args.out}")
    return 0


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


# Errors of the machine rather than of the code: a full disk, a read-only or forbidden folder.
_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}
_FULL_DISK = os.strerror(errno.ENOSPC)  # "No space left on device"


def _environment_error(err: BaseException) -> str | None:
    """One line for an error of the machine (a full disk, a read-only or forbidden folder),
    also when a library wrapped it without its errno (torch.save, pyarrow); else None."""
    if isinstance(err, OSError) and err.errno in _ENVIRONMENT_ERRNOS:
        where = f"{err.filename}: " if err.filename else ""
        full = " (free some space, then run again)" if err.errno in (errno.ENOSPC,
                                                                      errno.EDQUOT) else ""
        return f"{where}{err.strerror}{full}"
    if isinstance(err, (OSError, RuntimeError)) and _FULL_DISK in str(err):
        return f"{_FULL_DISK} ({str(err).splitlines()[0][:160]}): free some space, then run again"
    return None


def _command_parser(parser: argparse.ArgumentParser, name: str) -> Parser:
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return commands.choices[name]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:  # said by the sub-command's parser, which knows the flags to suggest
            _command_parser(parser, args.command).unrecognized(extra)
    except SystemExit as done:  # --help, --version, or a usage error already printed
        return done.code if isinstance(done.code, int) else 2
    try:
        return int(args.func(args) or 0)
    except UserError as err:
        if args.debug:
            traceback.print_exc()
        print(f"simclr {args.command}: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        code = getattr(err, "exit_code", None)  # a run or a decode stopped by a signal
        machine = _environment_error(err) if code is None else None
        if machine is not None:
            if args.debug:
                traceback.print_exc()
            print(f"simclr {args.command}: error: {machine}", file=sys.stderr)
            return 2
        if code is None:
            raise
        print(f"simclr {args.command}: {err}", file=sys.stderr)
        return int(code)
    except KeyboardInterrupt:
        print(f"simclr {args.command}: interrupted", file=sys.stderr)
        return 130
