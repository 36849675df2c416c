"""The sub-commands of ``simclr``: each parses its flags into configs and calls the API. No logic
here.

Every command imports what it runs (torch, datasets, matplotlib) inside its function, after
its flags are checked: --help and a mistyped value answer without loading them.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from simclr_kit.cli.flags import config_flags, overrides
from simclr_kit.config import (AugmentConfig, CheckConfig, ClassifierConfig, DataConfig, EvalConfig,
                               PretrainConfig, config_source, data_recipe, from_dict, merge,
                               merge_pretrain)
from simclr_kit.data.names import check_data_name
from simclr_kit.errors import UserError

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
        from simclr_kit.train.resume import resume_config

        cfg = resume_config(Path(args.resume), overrides(args, DATA_FLAGS + PRETRAIN_FLAGS))
    else:
        cfg = pretrain_config(args)
    if args.print_config:  # before the data check: a config may name a path of elsewhere
        return _print_config(cfg)
    if args.allow_changed_data and not args.resume:
        raise UserError("--allow-changed-data applies to --resume RUN only")
    check_data_name(cfg.data.data)  # a mistyped path: one line, before torch loads
    from simclr_kit.train.loop import pretrain, summary

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
    from simclr_kit.train.loop import pretrain

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
        from simclr_kit.models.encoder import export_backbone

        out = export_backbone(args.checkpoint, args.output, args.backbone)
        print(f"backbone exported to {out} (metadata in {out.with_suffix('.json')})")
    return 0


def cmd_check_distributed(args: argparse.Namespace) -> int:
    cfg = from_dict(CheckConfig, dict(overrides(args, CHECK_FLAGS), gather=args.gather), "check")
    from simclr_kit.diagnostics.check_distributed import run_check

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
