"""The ``simclr`` command: sub-commands parse flags into configs and call the API. No logic here.

Every user error (UserError) becomes one line on stderr and exit code 2; ``--debug`` shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import errno
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, NoReturn, Sequence

from simclr_kit import __version__
from simclr_kit.config import (AugmentConfig, ClassifierConfig, DataConfig, EvalConfig,
                               PretrainConfig, from_dict, load_yaml, merge, recipe,
                               recipe_names)
from simclr_kit.errors import UserError

P, D, A, E, K = PretrainConfig, DataConfig(), AugmentConfig(), EvalConfig(), ClassifierConfig()


def _csv(kind: Callable[[str], Any]) -> Callable[[str], tuple]:
    def parse(text: str) -> tuple:
        try:
            return tuple(kind(part) for part in text.split(",") if part.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
    return parse


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _bool(text: str) -> bool:
    if text.lower() in _TRUE:
        return True
    if text.lower() in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _add_bool(group: argparse._ActionsContainer, flag: str, dest: str, text: str,
              default: bool | None = None) -> None:
    """One boolean option, three spellings: ``--flag`` (true), ``--flag true|false`` and
    ``--no-flag`` (false). A bare flag before a positional is kept from taking it as its value
    by :meth:`_Parser.parse_known_args`."""
    off = f"--no-{flag[2:]}"
    group.add_argument(flag, dest=dest, type=_bool, nargs="?", const=True, default=default,
                       metavar="true|false", help=f"{text}; {off} turns it off")
    group.add_argument(off, dest=dest, action="store_const", const=False, help=argparse.SUPPRESS)


# (flag, config path, type, help). The default shown comes from the dataclass.
DATA_FLAGS = [
    ("--data", "data.data", str, "images: 'digits' (embedded), a hub id, a save_to_disk folder, "
     "a Parquet folder or glob, or an image folder"),
    ("--data-config", "data.data_config", str, "hub dataset configuration name (default: none)"),
    ("--revision", "data.revision", str,
     "hub dataset revision: branch, tag or commit (default: the main branch)"),
    ("--train-split", "data.train_split", str, "split to train on (default: 'train' or the only split)"),
    ("--eval-split", "data.eval_split", str,
     "split to evaluate on (default: 'validation', else 'test', else a stratified part of train)"),
    ("--image-column", "data.image_column", str, "image column (default: the Image feature)"),
    ("--label-column", "data.label_column", str, "label column (default: the ClassLabel feature)"),
    ("--image-size", "data.image_size", int,
     "working size in pixels (default: the images' own size when they share one, up to 224)"),
    ("--val-fraction", "data.val_fraction", float,
     f"part split off for validation when there is a single split (default: {D.val_fraction})"),
    ("--split-seed", "data.split_seed", int, f"seed of that split (default: {D.split_seed})"),
    ("--bad-images", "data.bad_images", str,
     f"unreadable images: 'skip' (counted and listed) or 'error' (default: {D.bad_images})"),
]
PRETRAIN_FLAGS = [
    ("--out", "out", str, "run directory (default: runs/simclr-DATE-TIME); must not exist"),
    ("--epochs", "epochs", int, f"passes over the data (default: {P.epochs})"),
    ("--batch-size", "batch_size", int,
     f"global batch in images, divided over processes (default: {P.batch_size})"),
    ("--lr", "lr", float, f"learning rate for a batch of 256, scaled to the global batch by "
     f"--lr-scaling (default: {P.lr})"),
    ("--lr-scaling", "lr_scaling", str, "'linear' (lr x B/256) or 'sqrt' (lr x sqrt(B/256), "
     f"SimCLR's choice for small batches) (default: {P.lr_scaling})"),
    ("--optimizer", "optimizer", str, f"'lars' (SimCLR), 'sgd' or 'adam'; warm-up then cosine, "
     f"stepped per batch (default: {P.optimizer})"),
    ("--weight-decay", "weight_decay", float, f"(default: {P.weight_decay}; 5e-4 suits sgd)"),
    ("--warmup-epochs", "warmup_epochs", float, "linear warm-up length in epochs, at most "
     f"--warmup-fraction of the run (default: {P.warmup_epochs})"),
    ("--warmup-fraction", "warmup_fraction", float, "longest warm-up as a fraction of the run: "
     f"a 5-epoch run warms up for at most 0.5 epochs at 0.1 (default: {P.warmup_fraction})"),
    ("--lars-eta", "lars_eta", float, "LARS trust coefficient: a layer moves by about lr x eta "
     "of its norm per step; larger learns faster, too large diverges "
     f"(default: {P.lars_eta})"),
    ("--lars-clip", "lars_clip", _bool, "cap each layer's LARS rate at the global rate "
     f"(solo-learn's clip_lr) (default: {P.lars_clip})"),
    ("--temperature", "temperature", float, "NT-Xent temperature; SimCLR's 0.1 learned best in "
     "short CPU runs at batch 128, 0.2 was level and 0.5 6-8 points worse "
     f"(default: {P.temperature})"),
    ("--backbone", "backbone", str, "any torchvision classification model, or timm/NAME for a "
     f"timm model (pip install 'simclr-kit[timm]') (default: {P.backbone})"),
    ("--stem", "stem", str, "'auto' (CIFAR stem at <= 64 px), 'cifar' or 'imagenet' "
     f"(default: {P.stem})"),
    ("--init", "init", str, "'scratch', 'imagenet' (torchvision's or timm's weights) or a "
     f"weights path (default: {P.init})"),
    ("--projection-dim", "projection_dim", int, f"output size of the head (default: {P.projection_dim})"),
    ("--projection-hidden-dim", "projection_hidden_dim", int,
     "hidden size of the head (default: the backbone's feature size)"),
    ("--device", "device", str, "'auto' (cuda, then mps, then cpu), 'cpu', 'cuda', 'mps' "
     f"(default: {P.device})"),
    ("--precision", "precision", str, "'auto' (bf16 autocast on CUDA, fp32 elsewhere), 'fp32', "
     "'bf16', 'fp16' (default: auto)"),
    ("--compile", "compile", _bool, "torch.compile the model; the first step then takes up to "
     "a minute longer (default: on with CUDA and Triton, off elsewhere)"),
    ("--channels-last", "channels_last", _bool, f"channels_last memory format (default: {P.channels_last})"),
    ("--sync-bn", "sync_bn", _bool, f"SyncBatchNorm across GPUs under torchrun (default: {P.sync_bn})"),
    ("--seed", "seed", int, f"seed of weights, order and augmentation (default: {P.seed})"),
    ("--checkpoint-every", "checkpoint_every", int,
     f"epochs between kept checkpoints, 0 for only the last (default: {P.checkpoint_every})"),
    ("--checkpoint-every-steps", "checkpoint_every_steps", int,
     "steps between rolling checkpoints, which replace each other; for long epochs on machines "
     "that may be taken away (default: 0, a rolling one every 5 minutes only)"),
    ("--allow-smaller-batch", "allow_smaller_batch", _bool,
     "with fewer images than --batch-size, train on batches of all of them instead of "
     f"stopping (default: {P.allow_smaller_batch})"),
    ("--log-every", "log_every", int, f"steps between metric lines (default: {P.log_every})"),
    ("--monitor-knn", "monitor_knn", int, "run the kNN protocol every N epochs and after the "
     "last (k=200, T=0.1; keys: the labelled pretraining split, clean; queries: the evaluation "
     "split), logged as 'knn' records in metrics.jsonl and drawn in the report; costs about a "
     "sixth of an epoch each time (default: 0, off)"),
    ("--time-budget", "time_budget", float,
     "minutes of training (data decoding and evaluation not counted): the first steps are "
     "timed, then the epochs and the schedule are set to end inside it, replacing --epochs "
     "(default: off)"),
    ("--deterministic", "deterministic", _bool, "deterministic algorithms, slower "
     f"(default: {P.deterministic})"),
    ("--logger", "loggers", _csv(str), "comma list of tensorboard, wandb, mlflow: copies of the "
     "metrics for those tools (metrics.jsonl is always written; each needs its library, e.g. "
     "pip install 'simclr-kit[tensorboard]') (default: none)"),
    ("--crop-scale-min", "augment.crop_scale_min", float,
     f"smallest crop area fraction (default: {A.crop_scale_min})"),
    ("--flip-p", "augment.flip_p", float, f"horizontal flip probability (default: {A.flip_p})"),
    ("--jitter-strength", "augment.jitter_strength", float,
     "colour strength s (default: 0.5 at <= 64 px, 1.0 above)"),
    ("--blur-p", "augment.blur_p", float, "blur probability (default: 0 at <= 32 px, 0.5 above)"),
    ("--solarize-p", "augment.solarize_p", float, f"solarize probability (default: {A.solarize_p})"),
]
EVAL_FLAGS = [
    ("--protocols", "protocols", _csv(str), "comma list of knn, linear, finetune, fractions "
     f"(default: {','.join(E.protocols)})"),
    ("--knn-k", "knn_k", _csv(int), f"neighbours, a comma list to sweep (default: {E.knn_k[0]})"),
    ("--knn-temperature", "knn_temperature", float, f"kNN vote temperature (default: {E.knn_temperature})"),
    ("--linear-epochs", "linear_epochs", int, f"linear probe epochs (default: {E.linear_epochs})"),
    ("--linear-lr", "linear_lr", float, f"linear probe Adam rate (default: {E.linear_lr})"),
    ("--linear-batch-size", "linear_batch_size", int, f"(default: {E.linear_batch_size})"),
    ("--linear-weight-decay", "linear_weight_decay", float, f"(default: {E.linear_weight_decay})"),
    ("--linear-min-steps", "linear_min_steps", int, "train every linear probe (label fractions "
     "too) for at least this many steps, adding epochs: 100 epochs of a 500-image subset are "
     f"only 200 steps, too few to converge; 0 keeps the epochs (default: {E.linear_min_steps})"),
    ("--probe-augment", "probe_augment", _bool, "train the linear probe on augmented views "
     "(crop + flip) through the frozen backbone instead of cached features: a backbone forward "
     f"per batch, much slower (default: {E.probe_augment})"),
    ("--seeds", "seeds", int, f"runs per label-fraction subset, reported as mean and std "
     f"(default: {E.seeds})"),
    ("--fractions", "fractions", _csv(float), "comma list of label fractions for the fractions "
     f"protocol, class-stratified (default: {','.join(f'{f:g}' for f in E.fractions)})"),
    ("--shots", "shots", _csv(int), "comma list of examples per class for the fractions "
     f"protocol's k-shot subsets (default: {','.join(str(k) for k in E.shots)})"),
    ("--finetune-epochs", "finetune_epochs", int,
     f"fine-tune protocol: epochs over the train split (default: {E.finetune_epochs})"),
    ("--finetune-lr", "finetune_lr", float, "fine-tune: Adam rate of the new head, cosine to 0 "
     f"(default: {E.finetune_lr})"),
    ("--finetune-backbone-lr-mult", "finetune_backbone_lr_mult", float, "fine-tune: backbone "
     "rate = head rate x this; lower it if accuracy falls during the first epochs "
     f"(default: {E.finetune_backbone_lr_mult})"),
    ("--finetune-batch-size", "finetune_batch_size", int,
     f"fine-tune: images per step (default: {E.finetune_batch_size})"),
    ("--finetune-weight-decay", "finetune_weight_decay", float,
     f"fine-tune: Adam weight decay (default: {E.finetune_weight_decay})"),
    ("--baseline", "baselines", _csv(str), "also evaluate 'random' and/or 'imagenet' encoders "
     "under the same protocols (default: none for evaluate, random for run)"),
    ("--eval-batch-size", "batch_size", int, f"feature extraction batch (default: {E.batch_size})"),
    ("--eval-seed", "seed", int, f"seed of the probes (default: {E.seed})"),
]
CLASSIFIER_FLAGS = [
    ("--head", "head", str, f"'linear' or 'mlp' (default: {K.head})"),
    ("--finetune", "finetune", _bool, "train the whole network (default: frozen backbone)"),
    ("--epochs", "epochs", int, f"(default: {K.epochs})"),
    ("--lr", "lr", float, f"Adam rate of the head (default: {K.lr})"),
    ("--backbone-lr-mult", "backbone_lr_mult", float,
     f"backbone rate = lr x this, with --finetune (default: {K.backbone_lr_mult})"),
    ("--batch-size", "batch_size", int, f"(default: {K.batch_size})"),
    ("--weight-decay", "weight_decay", float, f"(default: {K.weight_decay})"),
    ("--seed", "seed", int, f"(default: {K.seed})"),
]


RUN_DATA = ("data (default: the run's own dataset: the one its last evaluation used, else the one "
            "it was pretrained on)")


def _add(parser: argparse.ArgumentParser, flags: list, title: str) -> None:
    group = parser.add_argument_group(title)
    for flag, path, kind, text in flags:
        if kind in (_bool, bool):  # bool itself would read "false" as True
            _add_bool(group, flag, path, text)
            continue
        group.add_argument(flag, dest=path, type=kind, default=None, help=text,
                           metavar=flag.lstrip("-").replace("-", "_").upper())


def _overrides(args: argparse.Namespace, flags: list) -> dict[str, Any]:
    """Nested dict of the flags the user gave (``data.image_size`` -> {"data": {...}})."""
    out: dict[str, Any] = {}
    for _, path, _, _ in flags:
        value = getattr(args, path, None)
        if value is None:
            continue
        node = out
        *parents, leaf = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def pretrain_config(args: argparse.Namespace) -> PretrainConfig:
    """YAML file (or the digits recipe when no data is named), then the flags on top."""
    given = _overrides(args, DATA_FLAGS + PRETRAIN_FLAGS)
    if args.config and not Path(args.config).exists() and args.config in recipe_names():
        base = recipe(args.config)  # a built-in recipe by name: --config cifar10
    elif args.config:
        base = load_yaml(args.config, PretrainConfig)
    elif given.get("data", {}).get("data", "digits") == "digits":
        base = recipe("digits")
    else:
        base = {}
    return from_dict(PretrainConfig, merge(base, given))


def data_config(args: argparse.Namespace) -> DataConfig:
    return from_dict(DataConfig, _overrides(args, DATA_FLAGS).get("data", {}), "data")


def data_flags(args: argparse.Namespace) -> dict[str, Any] | None:
    """The data flags the user gave, for a command that otherwise takes the run's dataset."""
    return _overrides(args, DATA_FLAGS).get("data")


def _print_config(cfg: PretrainConfig) -> int:
    from simclr_kit.config import to_yaml

    print(to_yaml(cfg), end="")
    return 0


def _print_result_table(result: dict[str, Any]) -> None:
    from simclr_kit.evaluation.tables import verdict

    print(f"\nevaluation on {result['eval']['split']} ({result['eval']['images']} images); "
          f"written to {result['out']}/eval.json\n")
    print(result["table"])
    sentence = verdict(result["results"], (result.get("encoder") or {}).get("backbone") or "encoder")
    if sentence is not None:
        print(sentence)


def cmd_pretrain(args: argparse.Namespace) -> int:
    from simclr_kit.resume import resume_config
    from simclr_kit.training import pretrain

    if args.resume and args.config:
        raise UserError("--config cannot be combined with --resume: a run continues with the "
                        f"config it started with ({Path(args.resume) / 'config.yaml'})")
    if args.resume:  # the flags go on top of the run's config; pretrain refuses what may not
        cfg = resume_config(Path(args.resume), _overrides(args, DATA_FLAGS + PRETRAIN_FLAGS))
    else:
        cfg = pretrain_config(args)
    if args.print_config:
        return _print_config(cfg)
    run_dir = pretrain(cfg, resume=args.resume)
    print(f"checkpoint saved in {run_dir}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from simclr_kit.evaluation.protocols import evaluate
    from simclr_kit.training import pretrain

    cfg = pretrain_config(args)
    eval_cfg = from_dict(EvalConfig, merge({"baselines": ("random",)}, _overrides(args, EVAL_FLAGS)),
                         "eval")
    if args.print_config:
        return _print_config(cfg)
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
    from simclr_kit.evaluation.protocols import evaluate

    eval_cfg = from_dict(EvalConfig, _overrides(args, EVAL_FLAGS), "eval")
    result = evaluate(args.checkpoint, data_flags(args), eval_cfg, out=args.out,
                      device=args.device)
    _print_result_table(result)
    return 0


def cmd_train_classifier(args: argparse.Namespace) -> int:
    from simclr_kit.classifier import train_classifier

    cfg = from_dict(ClassifierConfig, _overrides(args, CLASSIFIER_FLAGS), "classifier")
    result = train_classifier(args.checkpoint, data_flags(args), args.out, cfg, args.device)
    print(f"validation accuracy {result['val_accuracy']:.2f}% ({result['classes']} classes); "
          f"classifier saved in {result['out']}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from simclr_kit.classifier import predict

    data = getattr(args, "data.data")
    if data is None:
        raise UserError("--data is required: an image file, folder, glob or dataset")
    cfg = dataclasses.replace(data_config(args), train_split=args.split)
    n = predict(args.classifier, data, args.out, args.device, cfg)
    print(f"{n} predictions written to {args.out}")
    return 0


def cmd_show_augment(args: argparse.Namespace) -> int:
    from simclr_kit.report.views import show_augment

    cfg = pretrain_config(args)
    if args.print_config:
        return _print_config(cfg)
    out, drawn = show_augment(cfg, args.out, args.count, args.epoch)
    print(f"{drawn} images and their two views saved to {out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from simclr_kit.encoder import export_backbone

    out = export_backbone(args.checkpoint, args.output, args.backbone)
    print(f"backbone exported to {out} (metadata in {out.with_suffix('.json')})")
    return 0


def cmd_check_distributed(args: argparse.Namespace) -> int:
    from simclr_kit.check_distributed import CheckConfig, run_check

    result = run_check(CheckConfig(nproc=args.nproc, batch_size=args.batch_size,
                                   device=args.device, backbone=args.backbone,
                                   image_size=args.image_size, seed=args.seed,
                                   sync_bn=args.sync_bn, gather=args.gather))
    print(result.report())
    return 0 if result.passed else 1


def cmd_report(args: argparse.Namespace) -> int:
    from simclr_kit.report.html import write_report

    path = write_report(args.run_dir, data_flags(args),  # on top of the run's recorded data
                        embeddings=args.embeddings, device=args.device,
                        max_points=args.max_points, progress=True)
    print(f"report written to {path}")
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    from simclr_kit.embed import embed

    if getattr(args, "data.data") is None:
        raise UserError("--data is required: the dataset whose images to embed")
    cfg = dataclasses.replace(data_config(args), train_split=args.split)
    emb = embed(args.checkpoint, cfg, args.out, args.format, args.projections, args.device,
                args.batch_size)
    shapes = f"features {tuple(emb.features.shape)}" + (
        f", projections {tuple(emb.projections.shape)}" if emb.projections is not None else "")
    print(f"{len(emb.ids)} embeddings of split {emb.meta['split']!r} ({shapes}) written to "
          f"{args.out}")
    return 0


class _Parser(argparse.ArgumentParser):
    """Usage mistakes are user errors too: one line on stderr and exit 2, not a usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_known_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                         namespace: argparse.Namespace | None = None) -> Any:
        """A bare boolean flag becomes ``--flag=true`` unless a true/false word follows it, so
        that ``--probe-augment RUN`` does not read RUN as the flag's value."""
        words = list(sys.argv[1:] if args is None else args)
        flags = {s for a in self._actions if a.type is _bool and a.nargs == "?"
                 for s in a.option_strings}
        for i, word in enumerate(words):
            after = words[i + 1].lower() if i + 1 < len(words) else None
            if word in flags and after not in _TRUE + _FALSE:
                words[i] = f"{word}=true"
        return super().parse_known_args(words, namespace)

    def unrecognized(self, extra: list[str]) -> NoReturn:
        """Unknown arguments, with the closest flag of this command for each unknown one."""
        options = {o.lstrip("-").replace("-", ""): o for a in self._actions
                   for o in a.option_strings if o.startswith("--")}
        hints = []
        for word in (w.split("=")[0] for w in extra if w.startswith("--")):
            close = difflib.get_close_matches(word.lstrip("-").replace("-", ""), list(options),
                                              n=1, cutoff=0.75)
            hints += [(word, options[c]) for c in close]
        hint = ""
        if len(hints) == 1:
            hint = f"; did you mean {hints[0][1]}?"
        elif hints:
            hint = f"; did you mean {', '.join(f'{flag} for {word}' for word, flag in hints)}?"
        self.error(f"unrecognized arguments: {' '.join(extra)}{hint}")


def _config_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file of pretraining fields, as --print-config writes "
                   "them, or a built-in recipe by name (digits, cifar10); flags override it "
                   "(default: the digits recipe when --data is digits or absent)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as "
                   "YAML (what --config reads and the run saves as config.yaml) and exit")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
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
    _add(p, DATA_FLAGS, "data")
    _add(p, PRETRAIN_FLAGS, "pretraining")
    _add(p, EVAL_FLAGS, "evaluation")

    p = command("pretrain", cmd_pretrain, "SimCLR pretraining; writes a run directory")
    _config_options(p)
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR with its "
                   "config.yaml; only --epochs, --device, --log-every, --checkpoint-every[-steps] "
                   "and --logger may change; a run that trained all its epochs is left as it is")
    _add(p, DATA_FLAGS, "data")
    _add(p, PRETRAIN_FLAGS, "pretraining")

    p = command("evaluate", cmd_evaluate, "evaluate an encoder with standard protocols")
    p.add_argument("checkpoint", help="run directory, checkpoint or weights file")
    p.add_argument("--out", help="results folder (default: the run directory)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default: auto)")
    _add(p, DATA_FLAGS, RUN_DATA)
    _add(p, EVAL_FLAGS, "evaluation")

    p = command("train-classifier", cmd_train_classifier,
                "train a classifier head on the extracted backbone (frozen, or --finetune)")
    p.add_argument("checkpoint", help="run directory, checkpoint or weights file")
    p.add_argument("--out", required=True, help="folder for the classifier")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default: auto)")
    _add(p, DATA_FLAGS, RUN_DATA)
    _add(p, CLASSIFIER_FLAGS, "classifier")

    p = command("predict", cmd_predict, "predict classes with a saved classifier")
    p.add_argument("classifier", help="folder written by train-classifier")
    p.add_argument("--out", required=True, help="CSV file: id (the file, for images read from "
                   "files; else the row of the split), label (the true class, when the split "
                   "has labels), predicted, probability")
    p.add_argument("--split", help="dataset split to predict (default: the only split, else "
                   "'test', else 'train')")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default: auto)")
    _add(p, [f for f in DATA_FLAGS if f[0] in ("--data", "--data-config", "--revision",
                                                "--image-column", "--label-column",
                                                "--bad-images")],
         "data (an image file, folder or glob is also accepted)")

    p = command("show-augment", cmd_show_augment,
                "save a PNG grid of images next to their two augmented views")
    p.add_argument("--out", default="augment.png", help="PNG file (default: augment.png)")
    p.add_argument("--count", type=int, default=8, help="images to show (default: 8)")
    p.add_argument("--epoch", type=int, default=0, help="epoch whose views to draw (default: 0)")
    _config_options(p)
    _add(p, DATA_FLAGS, "data")
    _add(p, [f for f in PRETRAIN_FLAGS if f[1].startswith("augment.") or f[1] == "seed"],
         "augmentation")

    p = command("export", cmd_export, "write the backbone alone as torchvision-loadable safetensors")
    p.add_argument("checkpoint", help="run directory, checkpoint or weights file")
    p.add_argument("output", help="OUT.safetensors")
    p.add_argument("--backbone", help="architecture of a foreign weights file (default: resnet18)")

    p = command("embed", cmd_embed, "write backbone features (and optionally projections) of "
                "every image of a split, with row ids, files and labels, to Parquet or .npy")
    p.add_argument("checkpoint", help="run directory, checkpoint or weights file")
    p.add_argument("--out", required=True, help="OUT.parquet, or OUT.npy with --format npy "
                   "(then OUT.ids.npy, OUT.labels.npy and OUT.json are written beside it)")
    p.add_argument("--format", choices=("parquet", "npy"),
                   help="file format (default: from the --out suffix, else parquet)")
    _add_bool(p, "--projections", "projections", "also the projection head's outputs (needs a "
              "pretraining checkpoint, not an exported backbone) (default: off)", default=False)
    p.add_argument("--split", help="split to embed, every row (default: 'train', else the "
                   "only split)")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass "
                   "(default: 256)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default: auto)")
    _add(p, [f for f in DATA_FLAGS if f[0] in ("--data", "--data-config", "--revision",
                                                "--image-column", "--label-column",
                                                "--bad-images")], "data")

    p = command("report", cmd_report, "write RUN/report.html: config, hardware and time, "
                "curves, evaluation, confusion matrix, augmented views, embedding map, "
                "retrieval; one self-contained file")
    p.add_argument("run_dir", metavar="RUN", help="run directory")
    _add_bool(p, "--embeddings", "embeddings", "compute the sections that embed both splits "
              "(confusion matrix, embedding map, retrieval); off is quick (default: on)",
              default=True)
    p.add_argument("--max-points", type=int, default=1000, help="evaluation images on the "
                   "t-SNE map, a stratified sample (default: 1000)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default: auto)")
    _add(p, DATA_FLAGS, RUN_DATA)

    p = command("check-distributed", cmd_check_distributed,
                "check on this machine that N processes x batch B/N train like 1 process x "
                "batch B: one step each way; prints the largest differences in loss, gradients, "
                "updated weights and views, then PASS or FAIL (exit 1)")
    p.add_argument("--nproc", type=int, default=2, help="processes, one GPU each with cuda "
                   "(default: 2)")
    p.add_argument("--batch-size", type=int, help="global batch B (default: 8 per process)")
    p.add_argument("--device", default="auto", help="'auto' (cuda if present), 'cpu' (gloo, "
                   "BatchNorm per process) or 'cuda' (NCCL, SyncBatchNorm) (default: auto)")
    p.add_argument("--backbone", default="resnet18", help="torchvision model or timm/NAME "
                   "(default: resnet18)")
    p.add_argument("--image-size", type=int, default=16, help="pixels of the generated images "
                   "(default: 16)")
    p.add_argument("--seed", type=int, default=0, help="seed of images and weights (default: 0)")
    _add_bool(p, "--sync-bn", "sync_bn", "SyncBatchNorm on cuda, as pretraining uses it "
              "(default: on)", default=True)
    p.add_argument("--gather", default="with-grad", choices=("with-grad", "no-grad"),
                   help=argparse.SUPPRESS)  # no-grad: the known bug, shows the check can fail
    return parser


# Errors of the machine rather than of the code: a full disk, a read-only or forbidden folder.
_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def _command_parser(parser: argparse.ArgumentParser, name: str) -> _Parser:
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
    except OSError as err:
        if err.errno not in _ENVIRONMENT_ERRNOS:
            raise
        if args.debug:
            traceback.print_exc()
        print(f"simclr {args.command}: error: {err.filename or ''}: {err.strerror}",
              file=sys.stderr)
        return 2
    except Exception as err:
        code = getattr(err, "exit_code", None)  # a run stopped by a signal after saving
        if code is None:
            raise
        print(f"simclr {args.command}: {err}", file=sys.stderr)
        return int(code)
    except KeyboardInterrupt:
        print(f"simclr {args.command}: interrupted", file=sys.stderr)
        return 130
