"""The SimCLR training loop: one path for CPU, one GPU and torchrun.

Set-up (data, model, optimizer, run directory) lives in :func:`prepare`; :func:`train_epoch`
is the hot loop; :func:`pretrain` ties them together with checkpoints, resume and logging.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from simclr_kit import __version__, distributed, faults
from simclr_kit.augment import SimCLRAugment, channel_stats
from simclr_kit.budget import TimeBudget, describe
from simclr_kit.atomic import atomic_write_text
from simclr_kit.checkpoint import latest_checkpoint, load_train_state, load_weights, save_checkpoint
from simclr_kit.config import PretrainConfig, to_dict, to_yaml, with_data_recipe
from simclr_kit.data.sources import open_splits
from simclr_kit.data.store import ImageStore, announce_skipped, decode_split, skipped_report
from simclr_kit.devices import (autocast_dtype, compile_by_default, grad_scaler, resolve_device,
                                tune_backends)
from simclr_kit.encoder import IMAGENET_MEAN, IMAGENET_STD, build_loaded_backbone, read_weights
from simclr_kit.errors import UserError
from simclr_kit.models import (SimCLR, backbone_feature_dim, backbone_kwargs, build_simclr,
                               is_timm_name, resolve_stem)
from simclr_kit.optim import (build_optimizer, effective_lr, set_lr, warmup_cosine,
                              warmup_epochs_within)
from simclr_kit.report.loggers import open_loggers
from simclr_kit.report.metrics import MetricsLog
from simclr_kit.report.system import hardware_info, peak_memory_mb
from simclr_kit.resume import check_resume
from simclr_kit.step import simclr_step


ROLLING_CHECKPOINT_SECONDS = 300.0


@dataclass
class Trainer:
    """Everything one training run holds; built by :func:`prepare`."""

    config: PretrainConfig
    run_dir: Path
    device: torch.device
    store: ImageStore
    eval_store: ImageStore | None
    images: Tensor  # the store's uint8 images, on the training device when they fit
    model: SimCLR
    ddp_model: nn.Module
    augment: SimCLRAugment
    optimizer: torch.optim.Optimizer
    meta: dict[str, Any]
    log: MetricsLog
    base_lr: float
    steps_per_epoch: int
    total_epochs: int
    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    stop_signal: int | None = None  # a signal this process received
    stopping: bool = False  # the ranks agreed to stop after the current step
    unchecked_loss: Tensor | None = None  # sum of the losses not yet tested for NaN/inf
    last_save: float = field(default_factory=time.monotonic)
    hooks: list[Callable[[Trainer], None]] = field(default_factory=list)
    # With --time-budget: times the first steps, chooses the length, then guards the end.
    # None on a resumed run whose length the budget already chose.
    budget: TimeBudget | None = None
    scaler: torch.amp.GradScaler | None = None  # fp16 loss scaling (devices.grad_scaler)

    @property
    def batch_per_rank(self) -> int:
        return self.config.batch_size // distributed.world_size()


def epoch_permutation(n: int, seed: int, epoch: int) -> Tensor:
    """One global order per epoch, the same on every rank: ``(n,)`` int64 on the CPU."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def batch_indices(perm: Tensor, step: int, global_batch: int) -> Tensor:
    """This rank's share of global batch ``step``: rank r takes the r-th contiguous chunk, so the
    union over ranks is exactly the single-process batch."""
    b = global_batch // distributed.world_size()
    start = step * global_batch + distributed.rank() * b
    return perm[start:start + b]


def _place_images(store: ImageStore, device: torch.device) -> Tensor:
    """Keep the uint8 set on the device when it takes under a quarter of free memory."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if store.images.numel() < free // 4:
            return store.images.to(device)
        return store.images.pin_memory()
    return store.images


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


def _check_batch(cfg: PretrainConfig, n_images: int) -> PretrainConfig:
    """The config to train with: a set smaller than one batch is an error, unless the user
    allowed a smaller batch (then the whole set, rounded down to split over the processes)."""
    if n_images >= cfg.batch_size:
        return cfg
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
    return dataclasses.replace(cfg, batch_size=smaller)


def _load_data(cfg: PretrainConfig) -> tuple[ImageStore, ImageStore | None]:
    """Every rank holds the whole decoded set; each node's first rank downloads and decodes it
    (into the disk cache), the node's other ranks then read that cache."""
    with distributed.local_main_first():
        train, evaluation = open_splits(cfg.data, need_eval=cfg.monitor_knn > 0)
        # Labels only for --monitor-knn (the kNN keys): pretraining itself needs none.
        store = decode_split(train, cfg.data.image_size, cfg.data.bad_images,
                             progress=cfg.progress and distributed.is_main(),
                             labels=cfg.monitor_knn > 0)
        eval_store = None
        if evaluation is not None:
            eval_store = decode_split(evaluation, store.image_size, cfg.data.bad_images,
                                      progress=cfg.progress and distributed.is_main())
    return store, eval_store


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


def prepare(cfg: PretrainConfig, resume: Path | None = None) -> Trainer:
    """Build data, model, optimizer and run directory (or reopen ``resume``)."""
    if resume is not None:
        check_resume(resume, cfg)  # a changed config or a finished run: refused, nothing touched
    device = distributed.init(resolve_device(cfg.device))
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    tune_backends(device, cfg.deterministic)
    _check_world(cfg)
    run_dir = resume if resume is not None else _new_run_dir(cfg)
    store, eval_store = _load_data(cfg)
    cfg = _check_batch(cfg, len(store))
    announce_skipped(store, f"; listed in {run_dir / 'skipped.txt'}")

    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if cfg.init == "imagenet" else channel_stats(store.images)
    model, init_meta = _build_model(cfg, store.image_size)
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    ddp_model = distributed.wrap_model(model, device, cfg.sync_bn)
    if cfg.compile if cfg.compile is not None else compile_by_default(device):
        # The wrapper's state_dict keys gain an ``_orig_mod.`` prefix: checkpoints save
        # ``Trainer.model``, the plain module, so their keys stay clean.
        ddp_model = torch.compile(ddp_model)  # type: ignore[assignment]

    base_lr = effective_lr(cfg.lr, cfg.batch_size, cfg.lr_scaling)
    optimizer = build_optimizer(model, cfg.optimizer, base_lr, cfg.momentum, cfg.weight_decay,
                                cfg.lars_eta, cfg.lars_clip)
    meta = {
        "backbone": cfg.backbone, "stem": init_meta["stem"], "feature_dim": model.feature_dim,
        "projection_dim": cfg.projection_dim,
        "projection_hidden_dim": cfg.projection_hidden_dim or model.feature_dim,
        "image_size": store.image_size, "mean": list(mean), "std": list(std),
        "dataset": store.provenance, "config": to_dict(cfg), "package_version": __version__,
        **{k: v for k, v in init_meta.items() if k != "stem"},
    }
    is_main = distributed.is_main()
    log = MetricsLog(run_dir / "metrics.jsonl" if is_main else None,
                     open_loggers(cfg.loggers, run_dir, to_dict(cfg)) if is_main else None)
    trainer = Trainer(cfg, run_dir, device, store, eval_store, _place_images(store, device),
                      model, ddp_model, SimCLRAugment(cfg.augment, store.image_size, mean, std,
                                                      cfg.seed),
                      optimizer, meta, log, base_lr, len(store) // cfg.batch_size, cfg.epochs)
    trainer.scaler = grad_scaler(cfg.precision, device)
    if cfg.time_budget is not None:
        sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
        trainer.budget = TimeBudget(cfg.time_budget, trainer.steps_per_epoch, sync)
    if cfg.monitor_knn:
        from simclr_kit.evaluation.monitor import knn_monitor

        trainer.hooks.append(knn_monitor(trainer, cfg.monitor_knn))
    if resume is not None:
        _restore(trainer)
    elif distributed.is_main():
        _write_run_files(trainer)
    return trainer


def _write_run_files(t: Trainer) -> None:
    t.run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(t.run_dir / "config.yaml", to_yaml(t.config))
    if t.store.skipped:
        atomic_write_text(t.run_dir / "skipped.txt", skipped_report(t.store))
    t.log.write("run", device=str(t.device), world_size=distributed.world_size(),
                images=len(t.store), image_size=t.store.image_size, effective_lr=t.base_lr,
                steps_per_epoch=t.steps_per_epoch, dataset=t.store.provenance,
                version=__version__, hardware=hardware_info(t.device))


_STATE_KEYS = ("optimizer", "epoch", "step_in_epoch", "global_step", "rng_cpu")


def _restore(t: Trainer) -> None:
    ckpt = latest_checkpoint(t.run_dir, required=False)
    if ckpt is None:
        # Killed before its first checkpoint: the model was just built from the run's seed, so
        # starting again from step 0 is exactly the run it would have been.
        if distributed.is_main():
            tqdm.write(f"{t.run_dir} has no checkpoint yet: starting it from the beginning")
        t.log.write("resume", epoch=0, step_in_epoch=0, checkpoint=None,
                    hardware=hardware_info(t.device))
        return
    state = load_train_state(ckpt)
    missing = [k for k in _STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise UserError(f"{ckpt / 'state.pt'} is not a simclr-kit training state (missing "
                        f"{missing}); it cannot be resumed")
    try:
        t.model.load_state_dict(load_weights(ckpt / "model.safetensors"))
        t.optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as err:
        raise UserError(f"checkpoint {ckpt} does not fit this run's model or optimizer "
                        f"({str(err).strip().splitlines()[0][:200]})") from None
    t.epoch, t.step_in_epoch = int(state["epoch"]), int(state["step_in_epoch"])
    t.global_step = int(state["global_step"])
    if t.config.time_budget is not None and state.get("budget_fitted"):
        t.total_epochs = int(state["total_epochs"])  # the budget fixed the length: keep it
        t.budget = None
    torch.set_rng_state(state["rng_cpu"])
    if t.scaler is not None and "grad_scaler" in state:
        t.scaler.load_state_dict(state["grad_scaler"])
    if t.device.type == "cuda" and "rng_cuda" in state:
        torch.cuda.set_rng_state(state["rng_cuda"], t.device)
    t.log.write("resume", epoch=t.epoch, step_in_epoch=t.step_in_epoch, checkpoint=ckpt.name,
                hardware=hardware_info(t.device))


class NonFiniteLoss(UserError):
    """The loss or the weights became NaN or infinite; nothing after the last good checkpoint
    was saved."""

    def __init__(self, t: Trainer, what: str) -> None:
        last = latest_checkpoint(t.run_dir, required=False)
        kept = f"the last good checkpoint, {last}, is kept" if last else "no checkpoint was saved"
        super().__init__(f"training stopped at epoch {t.epoch + 1} step {t.step_in_epoch}: "
                         f"{what}; {kept}. Start again with a lower --lr, a higher --temperature "
                         "or --precision fp32")


def check_finite(t: Trainer) -> None:
    """Raise :class:`NonFiniteLoss` unless the losses since the last check and every weight and
    buffer are finite: one device sync, run before anything is saved."""
    tensors = [v for v in t.model.state_dict().values() if v.is_floating_point()]
    flags = [~torch.isfinite(v).all() for v in tensors]
    if t.unchecked_loss is not None:
        flags.append(~torch.isfinite(t.unchecked_loss))
    if float(distributed.all_reduce_sum(torch.stack(flags).any().float())) > 0:
        raise NonFiniteLoss(t, "the loss or the weights became NaN or infinite")


def checkpoint_name(epoch: int, step_in_epoch: int) -> str:
    """Epochs count from 1 in every name, as in the progress bar: ``epoch-0002`` ends the second
    epoch, ``epoch-0002-step-000008`` is step 8 of it (``epoch`` is the 0-based epoch index)."""
    if step_in_epoch:
        return f"epoch-{epoch + 1:04d}-step-{step_in_epoch:06d}"
    return f"epoch-{epoch:04d}"


def save(t: Trainer, keep: bool = False) -> Path | None:
    """Checkpoint the current position (rank 0 writes; every rank waits for it).

    Refused (:class:`NonFiniteLoss`) when anything is NaN or infinite, so the last checkpoint
    is always a good one. A failed write on rank 0 is raised on every rank.
    """
    check_finite(t)
    path, error = None, None
    if distributed.is_main():
        name = checkpoint_name(t.epoch, t.step_in_epoch)
        state = {"optimizer": t.optimizer.state_dict(), "epoch": t.epoch,
                 "step_in_epoch": t.step_in_epoch, "global_step": t.global_step,
                 "total_epochs": t.total_epochs, "rng_cpu": torch.get_rng_state(),
                 "budget_fitted": t.config.time_budget is not None
                 and (t.budget is None or t.budget.fit is not None)}
        if t.device.type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state(t.device)
        if t.scaler is not None:
            state["grad_scaler"] = t.scaler.state_dict()
        meta = dict(t.meta, epoch=t.epoch, step_in_epoch=t.step_in_epoch,
                    global_step=t.global_step)
        try:
            path = save_checkpoint(t.run_dir, name, t.model, meta, state, keep)
        except UserError as err:  # a full disk: the other ranks must not wait for rank 0
            error = str(err)
    if distributed.world_size() > 1:
        error = distributed.broadcast_object(error)
    if error is not None:
        raise UserError(error)
    t.last_save = time.monotonic()
    return path


def train_step(t: Trainer, idx: Tensor) -> Tensor:
    """One optimisation step on this rank's images ``idx: (b,)``; returns the loss (device)."""
    total_steps = t.total_epochs * t.steps_per_epoch
    warmup = round(warmup_epochs_within(t.config.warmup_epochs, t.total_epochs,
                                        t.config.warmup_fraction) * t.steps_per_epoch)
    set_lr(t.optimizer, warmup_cosine(t.global_step, total_steps, min(warmup, total_steps),
                                      t.base_lr))
    images = t.images[idx.to(t.images.device)].to(t.device, non_blocking=True)
    v1, v2 = t.augment(images, idx.to(t.device), t.epoch)  # each (b, 3, S, S)
    return simclr_step(t.ddp_model, t.optimizer, v1, v2, t.config.temperature,
                       autocast_dtype(t.config.precision, t.device), t.config.channels_last,
                       t.scaler)


def train_epoch(t: Trainer, bar: tqdm | None) -> None:
    """Run the rest of epoch ``t.epoch`` from ``t.step_in_epoch``; stops early on a signal.

    Rolling checkpoints are written mid-epoch too (:func:`_rolling_due`): an epoch of a large
    set can take hours, and a resumed run continues the same permutation from the saved step.
    """
    # Indices live where the images do: a blocking host-to-GPU copy of them each step would
    # make the host wait for the GPU to drain its queue.
    perm = epoch_permutation(len(t.store), t.config.seed, t.epoch).to(t.images.device)
    t.ddp_model.train()
    t.unchecked_loss = torch.zeros((), device=t.device)
    seen, started = 0, time.perf_counter()
    while t.step_in_epoch < t.steps_per_epoch and not t.stopping:
        loss = train_step(t, batch_indices(perm, t.step_in_epoch, t.config.batch_size))
        t.unchecked_loss += loss  # a NaN stays NaN in the sum: tested at the next log or save
        seen += 1
        t.step_in_epoch += 1
        t.global_step += 1
        faults.point("step")
        if bar is not None:
            bar.update(1)
        logged = seen == t.config.log_every or t.step_in_epoch == t.steps_per_epoch
        if logged:
            _log_interval(t, seen, time.perf_counter() - started, bar)
            seen, started = 0, time.perf_counter()
        _agree_stop(t, logged)
        if t.budget is not None and t.budget.fit is None:
            _observe_budget(t, bar)
        if t.step_in_epoch < t.steps_per_epoch and not t.stopping and _rolling_due(t, logged):
            save(t)


def _observe_budget(t: Trainer, bar: tqdm | None) -> None:
    """Once the first steps are timed, set the run's length to fit ``--time-budget``.

    Rank 0's measurement decides, so every rank takes the same length at the same step.
    """
    assert t.budget is not None
    ready = t.budget.step_done()
    if distributed.world_size() > 1:
        ready = distributed.broadcast_object(ready)
    if not ready:
        return
    fit = distributed.broadcast_object(t.budget.choose(t.global_step))
    t.budget.fit, replaced, t.total_epochs = fit, t.total_epochs, fit.epochs
    warmup = warmup_epochs_within(t.config.warmup_epochs, fit.epochs, t.config.warmup_fraction)
    t.log.write("budget", minutes=t.config.time_budget, replaced_epochs=replaced,
                warmup_epochs=round(warmup, 4), step=t.global_step, **fit.as_record())
    if distributed.is_main():
        tqdm.write(describe(fit, t.config.time_budget or 0.0, replaced, warmup))
    if bar is not None:
        bar.total = t.total_epochs * t.steps_per_epoch
        bar.set_description(f"epoch {t.epoch + 1}/{t.total_epochs}")


def _budget_allows_next_epoch(t: Trainer, epoch_seconds: float) -> bool:
    """False when another epoch as long as the last would overrun the budget (a safety net:
    the chosen length already ends inside it, unless the steps became slower). Every rank must
    agree: they all join the final save."""
    budget = t.budget
    if budget is None or budget.fit is None:
        return True
    over = not budget.fits_another(epoch_seconds)
    return distributed.max_over_ranks(int(over)) == 0


def _rolling_due(t: Trainer, sync_point: bool) -> bool:
    """Whether a rolling checkpoint is due: every ``checkpoint_every_steps`` steps, and once
    ROLLING_CHECKPOINT_SECONDS have passed since the last save. Every rank must give the same
    answer (each joins :func:`save`): the step count is shared; under torchrun the clocks are
    compared at the logging points."""
    every = t.config.checkpoint_every_steps
    if every and t.global_step % every == 0:
        return True
    late = time.monotonic() - t.last_save > ROLLING_CHECKPOINT_SECONDS
    if distributed.world_size() == 1:
        return late
    return sync_point and distributed.max_over_ranks(int(late)) > 0


def _agree_stop(t: Trainer, sync_point: bool) -> None:
    """Set ``t.stopping`` when a signal arrived. A signal may reach the ranks of a torchrun job
    at different steps, and a rank that stopped alone would leave the others waiting in a
    collective: under torchrun the ranks agree at the logging points, where they sync anyway."""
    if distributed.world_size() == 1:
        t.stopping = t.stop_signal is not None
    elif sync_point:
        signum = distributed.max_over_ranks(t.stop_signal or 0)
        if signum:
            t.stop_signal, t.stopping = t.stop_signal or signum, True


def _log_interval(t: Trainer, steps: int, seconds: float, bar: tqdm | None) -> None:
    """Log the mean loss of the last ``steps`` steps (and stop if it is NaN or infinite)."""
    assert t.unchecked_loss is not None
    loss = t.unchecked_loss / steps
    value = float(distributed.all_reduce_sum(loss.detach()) / distributed.world_size())
    if not math.isfinite(value):
        raise NonFiniteLoss(t, f"the loss became {value}")
    t.unchecked_loss.zero_()
    ips = steps * t.config.batch_size / max(seconds, 1e-9)
    lr = t.optimizer.param_groups[0]["lr"]
    t.log.write("train", epoch=t.epoch, step=t.global_step, loss=value, lr=lr,
                images_per_s=round(ips, 1))
    if bar is not None:
        bar.set_postfix(loss=f"{value:.4f}", img_s=f"{ips:.0f}", lr=f"{lr:.3g}")


def _install_signal_handlers(t: Trainer) -> Callable[[], None]:
    """SIGINT/SIGTERM finish the current step, then the loop saves and stops."""
    def handler(signum: int, _frame: Any) -> None:
        if t.stop_signal is not None:  # a second signal: stop now, the last checkpoint stays
            raise KeyboardInterrupt
        t.stop_signal = signum

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    return lambda: [signal.signal(s, h) for s, h in previous.items()]  # type: ignore[func-returns-value]


class Interrupted(Exception):
    """Training stopped by a signal after saving; ``code`` is 128 + the signal number."""

    def __init__(self, signum: int, run_dir: Path) -> None:
        super().__init__(f"stopped by signal {signal.Signals(signum).name}; checkpoint saved: "
                         f"resume with: simclr pretrain --resume {run_dir}")
        self.exit_code = 128 + signum


def fit(t: Trainer) -> Path:
    """Train to ``t.total_epochs``, checkpointing every ``checkpoint_every`` epochs and at the end."""
    restore = _install_signal_handlers(t)
    t.last_save = started = time.monotonic()
    first_step = t.global_step
    bar = None
    if t.config.progress and distributed.is_main():
        bar = tqdm(total=t.total_epochs * t.steps_per_epoch, initial=t.global_step, unit="step",
                   desc="pretraining", dynamic_ncols=True)
    if t.budget is not None:
        t.budget.start()
    try:
        while t.epoch < t.total_epochs:
            if bar is not None:
                bar.set_description(f"epoch {t.epoch + 1}/{t.total_epochs}")
            epoch_started = t.budget.elapsed() if t.budget is not None else 0.0
            train_epoch(t, bar)
            if t.stopping:
                save(t)
                raise Interrupted(t.stop_signal or signal.SIGTERM, t.run_dir)
            t.epoch += 1
            t.step_in_epoch = 0
            epoch_seconds = t.budget.elapsed() - epoch_started if t.budget is not None else 0.0
            # Evaluation hooks do not count against a time budget.
            with t.budget.paused() if t.budget is not None else nullcontext():
                for hook in t.hooks:
                    hook(t)
            if t.epoch < t.total_epochs and not _budget_allows_next_epoch(t, epoch_seconds):
                t.log.write("budget_stop", epoch=t.epoch, planned_epochs=t.total_epochs,
                            training_s=round(t.budget.elapsed(), 2) if t.budget else None)
                t.total_epochs = t.epoch
            every = t.config.checkpoint_every
            kept = bool(every) and t.epoch % every == 0
            # Between kept checkpoints, rolling ones bound the work a crash can lose without
            # writing a checkpoint per (possibly 2-second) epoch.
            if t.epoch < t.total_epochs and (kept or _rolling_due(t, sync_point=True)):
                save(t, keep=kept)
        final = save(t, keep=True)
        seconds = time.monotonic() - started  # this session: a resumed run logs one per session
        t.log.write("done", epoch=t.epoch, step=t.global_step, wall_s=round(seconds, 2),
                    images_per_s=round((t.global_step - first_step) * t.config.batch_size
                                       / max(seconds, 1e-9), 1),
                    peak_memory_mb=peak_memory_mb(t.device))
        return final or t.run_dir
    finally:
        if bar is not None:
            bar.close()
        restore()


def pretrain(config: PretrainConfig, resume: str | Path | None = None,
             report: bool = True) -> Path:
    """Pretrain (or resume) a SimCLR encoder; returns the run directory.

    ``resume``: a run directory to continue. ``config`` must equal its ``config.yaml`` except
    for the fields in :data:`simclr_kit.resume.RESUMABLE_FIELDS` (``epochs`` among them), and a
    run that has trained all its epochs is refused, unchanged (:func:`resume.check_resume`).

    ``report``: write ``RUN/report.html`` at the end with the sections that need no forward
    passes over the data (``simclr report RUN`` adds the embedding sections).
    """
    config, taken = with_data_recipe(config)
    if taken and distributed.is_main():
        tqdm.write(f"digits: the demo recipe's {', '.join(taken)} (recipes/digits.yaml, "
                   "as `simclr run` uses it; PretrainConfig.from_recipe('digits') asks for it)")
    trainer = prepare(config, Path(resume) if resume is not None else None)
    try:
        fit(trainer)
    finally:
        trainer.log.close()
    if report and distributed.is_main():
        from simclr_kit.report.html import write_report_safely

        write_report_safely(trainer.run_dir, embeddings=False)
    return trainer.run_dir
