"""How a training run is built: :func:`prepare` does everything before the first step.

In this order: check a resumed run's config, start the process group, check the batch splits
over the processes, name the run directory, decode the data, build the model (and wrap it for
DDP and ``torch.compile``), the optimizer, the augmentation, the batch source and the logs,
then restore a resumed run's checkpoint or write a new run's ``config.yaml``. The result is a
:class:`~simclr_kit.train.state.Trainer`; the loop is :mod:`simclr_kit.train.loop`.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from simclr_kit import __version__, distributed
from simclr_kit.atomic import atomic_write_text
from simclr_kit.augment import SimCLRAugment
from simclr_kit.config import VIT_DEFAULTS, PretrainConfig, to_dict, to_yaml
from simclr_kit.data.pixels import Layout, chosen_crop_fraction
from simclr_kit.data.size_policy import training_sizes
from simclr_kit.data.skip_reports import announce_skipped, skipped_report
from simclr_kit.data.splits import open_splits
from simclr_kit.data.store import ImageStore, decode_split, store_channel_stats
from simclr_kit.data.stream import batch_source
from simclr_kit.devices import compile_by_default, grad_scaler, tune_backends
from simclr_kit.errors import UserError
from simclr_kit.models.backbones import (backbone_feature_dim, backbone_kwargs, check_backbone_name,
                                         fetch_imagenet_weights, resolve_stem)
from simclr_kit.models.encoder import (IMAGENET_MEAN, IMAGENET_STD, build_loaded_backbone,
                                       read_weights)
from simclr_kit.models.heads import SimCLR, build_simclr
from simclr_kit.models.timm_backbones import is_timm_name
from simclr_kit.report.loggers import check_loggers, open_loggers
from simclr_kit.report.metrics import MetricsLog
from simclr_kit.report.system import hardware_info
from simclr_kit.train.budget import TimeBudget
from simclr_kit.train.checkpoints import restore
from simclr_kit.train.optim import build_optimizer, effective_lr
from simclr_kit.train.resume import check_resume, check_same_data
from simclr_kit.train.state import Trainer


def _new_run_dir(cfg: PretrainConfig) -> Path:
    """Rank 0 names and checks the directory and every rank takes its answer: a clock or a
    check on another rank could differ (a rank that starts late would find rank 0's files)."""
    decision: tuple[str, str | None] = ("", None)
    if distributed.is_main():
        run_dir = Path(cfg.out or f"runs/simclr-{time.strftime('%Y%m%d-%H%M%S')}")
        error = None
        if run_dir.exists() and any(run_dir.iterdir()):
            error = (f"run directory {run_dir} already exists and is not empty: use "
                     f"--resume {run_dir} to continue it, or choose another --out")
        decision = (str(run_dir), error)
    path, error = distributed.broadcast_object(decision)
    if error is not None:
        raise UserError(error)
    return Path(path)


def _check_world(cfg: PretrainConfig) -> None:
    """Before any data is read: the global batch must split evenly over the processes."""
    world = distributed.world_size()
    if cfg.batch_size % world:
        raise UserError(f"--batch-size {cfg.batch_size} is the global batch and must be divisible "
                        f"by the number of processes ({world})")
    if cfg.batch_size // world < 2 and world > 1:
        raise UserError(f"--batch-size {cfg.batch_size} gives fewer than 2 images per process")


def _check_batch(cfg: PretrainConfig, n_images: int) -> int:
    """The global batch to train with, ``cfg.batch_size``: a set smaller than one batch is an
    error, unless the user allowed a smaller batch (then the whole set, rounded down to split
    over the processes). The config keeps the batch it was given, so that a resume finds the
    same batch on the same data without a rule of its own."""
    if n_images >= cfg.batch_size:
        return cfg.batch_size
    world = distributed.world_size()
    smaller = n_images - n_images % world
    if not cfg.allow_smaller_batch or smaller < 2 * world:
        hint = (f"lower --batch-size to at most {n_images}, or pass --allow-smaller-batch true"
                if smaller >= 2 * world else "NT-Xent needs at least 2 images per process")
        raise UserError(f"only {n_images} images, fewer than one batch of {cfg.batch_size}: "
                        f"{hint}")
    if distributed.is_main():
        tqdm.write(f"only {n_images} images: training with a batch of {smaller} instead of "
                   f"{cfg.batch_size} (--allow-smaller-batch); the learning rate scales with it")
    return smaller


def _load_data(cfg: PretrainConfig) -> tuple[ImageStore, ImageStore | None, int]:
    """The training store (whole frames, longer side at most L), the evaluation store and the
    training size. Each node's first rank downloads and decodes the set into the disk cache;
    the node's other ranks then map that same file (data/mapped.py): one copy of the pixels
    per machine."""
    with distributed.local_main_first():
        train, evaluation = open_splits(cfg.data, need_eval=cfg.monitor_knn > 0)
        size, side = training_sizes(train, cfg.data.image_size, cfg.data.store_size)
        # Labels only for --monitor-knn (the kNN keys): pretraining itself needs none.
        store = decode_split(train, bad_images=cfg.data.bad_images,
                             progress=cfg.progress and distributed.is_main(),
                             labels=cfg.monitor_knn > 0, workers=cfg.data.decode_workers,
                             layout=Layout.frame(side))
        eval_store = None
        if evaluation is not None:  # evaluation sees the standard centre crop at the size
            eval_store = decode_split(evaluation, size, cfg.data.bad_images,
                                      progress=cfg.progress and distributed.is_main(),
                                      workers=cfg.data.decode_workers,
                                      crop_fraction=chosen_crop_fraction(cfg.data.crop_fraction))
    return store, eval_store, size


def _build_model(cfg: PretrainConfig, image_size: int) -> tuple[SimCLR, dict[str, Any]]:
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    init_meta: dict[str, Any] = {}
    if cfg.init in ("scratch", "imagenet"):
        weights = "imagenet" if cfg.init == "imagenet" else None
        stem = "imagenet" if weights else resolve_stem(cfg.stem, image_size, cfg.backbone)
        model = build_simclr(cfg.backbone, stem, image_size, cfg.projection_dim,
                             cfg.projection_hidden_dim, weights)
        kwargs = backbone_kwargs(cfg.backbone, stem, image_size)
    else:
        loaded = read_weights(cfg.init, cfg.backbone)
        stem, kwargs = loaded.meta["stem"], loaded.meta.get("create_model_kwargs", {})
        backbone = build_loaded_backbone(loaded)
        model = SimCLR(backbone, backbone_feature_dim(cfg.backbone, backbone, image_size),
                       cfg.projection_dim, cfg.projection_hidden_dim)
        init_meta = {"init_from": str(loaded.path)}
    if is_timm_name(cfg.backbone):  # what timm.create_model needs to rebuild it
        init_meta["create_model_kwargs"] = kwargs
    return model, dict(init_meta, stem=stem)


def _vit_recipe_line(given: PretrainConfig, resolved: PretrainConfig) -> str | None:
    """The line that says a ViT backbone took MoCo v3's recipe for the optimizer fields left
    unset (config.VIT_DEFAULTS); None when it took none of them."""
    fields = ("optimizer", "lr", "lr_scaling", "weight_decay", "warmup_epochs")
    taken = [f for f in fields if getattr(given, f) is None]
    if not taken or given.optimizer_defaults()[1] is not VIT_DEFAULTS:
        return None
    rate = effective_lr(resolved.lr, resolved.batch_size, resolved.lr_scaling)
    values = {"optimizer": resolved.optimizer,
              "lr": f"lr {resolved.lr:g} per 256 images ({rate:.3g} at batch "
                    f"{resolved.batch_size})",
              "lr_scaling": f"{resolved.lr_scaling} scaling",
              "weight_decay": f"weight decay {resolved.weight_decay:g}",
              "warmup_epochs": f"warm-up {resolved.warmup_epochs:g} epochs (at most "
                               f"{resolved.warmup_fraction:g} of the run)"}
    return (f"{resolved.backbone}: MoCo v3's ViT recipe, {', '.join(values[f] for f in taken)}; "
            "--optimizer, --lr, --weight-decay and --warmup-epochs choose otherwise")


def prepare(cfg: PretrainConfig, resume: Path | None = None,
            allow_changed_data: bool = False) -> Trainer:
    """Build data, model, optimizer and run directory (or reopen ``resume``; data that changed
    since its last checkpoint is refused unless ``allow_changed_data``)."""
    check_backbone_name(cfg.backbone)  # what this machine lacks fails before any data is read
    check_loggers(cfg.loggers)
    given, cfg = cfg, cfg.resolved()  # the optimizer's defaults as numbers, as config.yaml holds
    if cfg.init == "imagenet":
        fetch_imagenet_weights(cfg.backbone)
    if resume is not None:
        check_resume(resume, cfg)  # a changed config or a finished run: refused, nothing touched
    device = distributed.process_device(cfg.device)
    if distributed.is_main() and (line := _vit_recipe_line(given, cfg)):
        tqdm.write(line)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    tune_backends(device, cfg.deterministic)
    _check_world(cfg)
    if resume is None:  # config.yaml records the directory the run was given, not None
        run_dir = _new_run_dir(cfg)
        cfg = dataclasses.replace(cfg, out=str(run_dir))
    else:
        run_dir = resume
    store, eval_store, image_size = _load_data(cfg)
    changed = check_same_data(resume, store.provenance, allow_changed_data) \
        if resume is not None else None
    batch_size = _check_batch(cfg, len(store))
    announce_skipped(store, f"; listed in {run_dir / 'skipped.txt'}")

    mean, std = ((IMAGENET_MEAN, IMAGENET_STD) if cfg.init == "imagenet"
                 else store_channel_stats(store))  # counted while decoding: no pass over pixels
    model, init_meta = _build_model(cfg, image_size)
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    ddp_model = distributed.wrap_model(model, device, cfg.sync_bn)
    if cfg.compile if cfg.compile is not None else compile_by_default(device):
        # The wrapper's state_dict keys gain an ``_orig_mod.`` prefix: checkpoints save
        # ``Trainer.model``, the plain module, so their keys stay clean.
        ddp_model = torch.compile(ddp_model)  # type: ignore[assignment]

    base_lr = effective_lr(cfg.lr, batch_size, cfg.lr_scaling)
    optimizer = build_optimizer(model, cfg.optimizer, base_lr, cfg.momentum, cfg.weight_decay,
                                cfg.lars_eta, cfg.lars_clip)
    meta = {
        "backbone": cfg.backbone, "stem": init_meta["stem"], "feature_dim": model.feature_dim,
        "projection_dim": cfg.projection_dim,
        "projection_hidden_dim": cfg.projection_hidden_dim or model.feature_dim,
        "image_size": image_size, "mean": list(mean), "std": list(std),
        "crop_fraction": chosen_crop_fraction(cfg.data.crop_fraction),
        "store_size": store.image_size,
        "dataset": store.provenance, "config": to_dict(cfg), "package_version": __version__,
        **{k: v for k, v in init_meta.items() if k != "stem"},
    }
    is_main = distributed.is_main()
    log = MetricsLog(run_dir / "metrics.jsonl" if is_main else None,
                     open_loggers(cfg.loggers, run_dir, to_dict(cfg)) if is_main else None)
    trainer = Trainer(
        config=cfg, run_dir=run_dir, device=device, store=store, eval_store=eval_store,
        batches=batch_source(store.images, device, batch_size, cfg.seed, cfg.stream),
        model=model, ddp_model=ddp_model,
        augment=SimCLRAugment(cfg.augment, image_size, mean, std, cfg.seed),
        optimizer=optimizer, meta=meta, log=log, base_lr=base_lr,
        steps_per_epoch=len(store) // batch_size, total_epochs=cfg.epochs,
        sizes=None if store.sizes is None else store.sizes.to(device))
    trainer.scaler = grad_scaler(cfg.precision, device)
    if cfg.time_budget is not None:
        sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
        trainer.budget = TimeBudget(cfg.time_budget, trainer.steps_per_epoch, sync)
    if cfg.monitor_knn:
        from simclr_kit.evaluation.monitor import knn_monitor

        trainer.hooks.append(knn_monitor(trainer, cfg.monitor_knn))
    if resume is not None:
        restore(trainer)
        if changed is not None:
            trainer.log.write("data_changed", fingerprint_before=changed[0],
                              fingerprint_now=changed[1], dataset=store.provenance)
    elif distributed.is_main():
        _write_run_files(trainer)
    return trainer


def _write_run_files(t: Trainer) -> None:
    t.run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(t.run_dir / "config.yaml", to_yaml(t.config))
    if t.store.skipped:
        atomic_write_text(t.run_dir / "skipped.txt", skipped_report(t.store))
    t.log.write("run", device=str(t.device), world_size=distributed.world_size(),
                images=len(t.store), image_size=t.meta["image_size"], batch_size=t.batch_size,
                effective_lr=t.base_lr,
                steps_per_epoch=t.steps_per_epoch, dataset=t.store.provenance,
                version=__version__, hardware=hardware_info(t.device))
