"""``simclr check-distributed``: N processes x B/N must train like 1 process x B, on this machine.

Distributed contrastive losses fail silently (a gather whose backward does not sum the ranks'
gradients, negatives left local, labels not offset by rank): the loss still falls, only more
slowly. This check runs one real training step (:func:`simclr_kit.train.loop.train_step`: the
augmentation, DDP model, NT-Xent with gathered negatives and LARS) in N processes with batch
B/N each, and a single-process reference step with batch B from the same weights and images,
then compares the loss, every parameter's gradient, the updated weights and the views.

The reference reproduces the distributed BatchNorm semantics, so that only the gather, the label
offsets and the gradient reduction are under test: with SyncBatchNorm (CUDA) statistics over the
global batch, i.e. one forward of all 2B views; without it (always on CPU, where SyncBatchNorm has
no kernels) statistics per rank, i.e. one forward per B/N chunk ``[v1_r; v2_r]``, as each rank
computes them.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor

from simclr_kit import distributed
from simclr_kit.augment import SimCLRAugment, channel_stats
from simclr_kit.config import CheckConfig, PretrainConfig
from simclr_kit.data.loader import ResidentBatches, batch_indices, epoch_permutation
from simclr_kit.data.store import ImageStore
from simclr_kit.errors import UserError
from simclr_kit.models.backbones import check_backbone_name
from simclr_kit.models.heads import SimCLR, build_simclr
from simclr_kit.models.loss import no_gather, nt_xent
from simclr_kit.report.metrics import MetricsLog
from simclr_kit.train.loop import train_step
from simclr_kit.train.optim import build_optimizer, effective_lr, set_lr
from simclr_kit.train.state import Trainer

# float32 carries ~7 digits; the two runs sum the same terms in different orders (per-rank
# partial sums, then the all-reduce), which moves gradients by ~1e-6 of their size. A missing
# gradient path moves them by tens of percent. 1e-4 of each tensor's largest value separates both.
TOLERANCE = 1e-4
# A tensor whose reference gradient (or step) stays below this fraction of the model's largest is
# judged against that fraction instead of its own scale: its values are rounding noise, zero in
# exact arithmetic. A ViT's final LayerNorm bias is one: it shifts every feature vector alike, and
# the projection head's BatchNorm removes any such shift, so its gradient is ~1e-8 of the
# largest, and the two runs' noise differs by 100% of itself.
NOISE_FLOOR = 1e-3


def _all_gather_no_grad(x: Tensor) -> Tensor:
    """The known bug (lightly #1528): :func:`distributed.all_gather_with_grad` whose backward
    keeps only the local slice's gradient. ``x: (n, ...)`` -> ``(world * n, ...)``."""
    parts = [torch.empty_like(x) for _ in range(distributed.world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    parts[distributed.rank()] = x
    return torch.cat(parts)


# The distributed step's all-gather; "no-grad" is the known bug, to show that the check can fail.
GATHERS: dict[str, Callable[[Tensor], Tensor]] = {
    "with-grad": distributed.all_gather_with_grad, "no-grad": _all_gather_no_grad}


@dataclass(frozen=True)
class Difference:
    """Largest difference over a group of tensors; ``rel`` is relative to each tensor's largest
    reference magnitude (so a tiny tensor cannot hide behind a big one)."""

    what: str
    abs: float
    rel: float
    worst: str = ""


@dataclass
class CheckResult:
    config: CheckConfig
    differences: list[Difference] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.differences) and all(d.rel <= TOLERANCE for d in self.differences)

    def report(self) -> str:
        """The lines ``simclr check-distributed`` prints."""
        c = self.config
        b = c.global_batch // c.nproc
        backend = "nccl" if c.device == "cuda" else "gloo"
        bn = ("SyncBatchNorm: statistics over the global batch of "
              f"{2 * c.global_batch} views" if c.global_bn else
              f"BatchNorm per rank; the reference normalises each chunk of {b} images "
              f"({2 * b} views) separately")
        lines = [f"check-distributed: {c.nproc} processes ({backend}, {c.device}) x batch {b} "
                 f"vs 1 process x batch {c.global_batch}; {c.backbone} at {c.image_size} px, "
                 f"seed {c.seed}, one LARS step, gather {c.gather}",
                 bn, f"{'':28}{'max abs diff':>14}{'max rel diff':>14}  worst tensor"]
        for d in self.differences:
            lines.append(f"{d.what:28}{d.abs:14.3e}{d.rel:14.3e}  {d.worst}")
        lines.append(f"tolerance: max rel diff <= {TOLERANCE:g} (float32), relative to each "
                     f"tensor's largest reference value (at least {NOISE_FLOOR:g} of the model's "
                     "largest); for the updated weights, the part above one float32 ulp of the "
                     "weight, relative to the reference step w1 - w0")
        lines.append("PASS" if self.passed else "FAIL")
        return "\n".join(lines)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _validate(cfg: CheckConfig) -> None:
    if cfg.nproc < 2:
        raise UserError(f"--nproc {cfg.nproc}: the check needs at least 2 processes")
    if cfg.gather not in GATHERS:
        raise UserError(f"--gather {cfg.gather!r}: use one of {', '.join(GATHERS)}")
    if cfg.device not in ("cpu", "cuda"):
        raise UserError(f"--device {cfg.device!r}: use auto, cpu (gloo) or cuda (NCCL)")
    if cfg.global_batch % cfg.nproc or cfg.global_batch // cfg.nproc < 2:
        raise UserError(f"--batch-size {cfg.global_batch} must be a multiple of --nproc "
                        f"{cfg.nproc} with at least 2 images per process")
    if cfg.device == "cuda" and torch.cuda.device_count() < cfg.nproc:
        raise UserError(f"--nproc {cfg.nproc} needs {cfg.nproc} GPUs, this machine has "
                        f"{torch.cuda.device_count()}: lower --nproc or use --device cpu")
    if not 8 <= cfg.image_size <= 1024:
        raise UserError(f"--image-size {cfg.image_size}: use 8 to 1024 pixels")
    check_backbone_name(cfg.backbone)


def _pretrain_config(cfg: CheckConfig) -> PretrainConfig:
    """The pretraining settings of the step: ``cfg`` with LARS at its rate scaled linearly,
    float32, no warm-up (step 0 takes the full rate) and the batch that None stands for."""
    return dataclasses.replace(cfg, batch_size=cfg.global_batch, optimizer="lars",
                               lr_scaling="linear", precision="fp32", channels_last=False,
                               warmup_epochs=0.0, epochs=1, progress=False).resolved()


def _make_inputs(cfg: CheckConfig) -> dict[str, Any]:
    """Seeded random images ``(B, 3, S, S) uint8``, their statistics and the initial weights."""
    g = torch.Generator().manual_seed(cfg.seed)
    images = torch.randint(0, 256, (cfg.global_batch, 3, cfg.image_size, cfg.image_size),
                           generator=g, dtype=torch.uint8)
    torch.manual_seed(cfg.seed)
    model = build_simclr(cfg.backbone, "auto", cfg.image_size)
    mean, std = channel_stats(images)
    return {"images": images, "mean": list(mean), "std": list(std),
            "state": model.state_dict(), "feature_dim": model.feature_dim}


def _model(cfg: CheckConfig, inputs: dict[str, Any], device: torch.device) -> SimCLR:
    model = build_simclr(cfg.backbone, "auto", cfg.image_size)
    model.load_state_dict(inputs["state"])
    return model.to(device)


def _no_tf32() -> None:
    # TF32 matmuls and convolutions carry 10-bit mantissas: differences of ~1e-3 that would
    # drown the float32 comparison.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def _snapshot(model: SimCLR) -> dict[str, dict[str, Tensor]]:
    return {"grad": {k: p.grad.detach().cpu().clone() for k, p in model.named_parameters()
                     if p.grad is not None},
            "weight": {k: p.detach().cpu().clone() for k, p in model.named_parameters()}}


class _ViewRecorder:
    """Wraps the augmentation of a Trainer to keep the views of the last batch."""

    def __init__(self, augment: SimCLRAugment) -> None:
        self.augment = augment
        self.views: tuple[Tensor, Tensor] | None = None

    def __call__(self, images: Tensor, indices: Tensor, epoch: int,
                 sizes: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self.views = self.augment(images, indices, epoch, sizes)
        return self.views


def _trainer(cfg: CheckConfig, inputs: dict[str, Any], device: torch.device,
             folder: Path) -> Trainer:
    """A Trainer as :func:`~simclr_kit.train.prepare.prepare` builds it, over the check's images
    and weights."""
    pcfg = _pretrain_config(cfg)
    images = inputs["images"]
    model = _model(cfg, inputs, device)
    ddp_model = distributed.wrap_model(model, device, cfg.sync_bn)
    base_lr = effective_lr(pcfg.lr, cfg.global_batch)
    optimizer = build_optimizer(model, "lars", base_lr, pcfg.momentum, pcfg.weight_decay)
    store = ImageStore(images, None, None, torch.arange(len(images)), cfg.image_size)
    augment = SimCLRAugment(pcfg.augment, cfg.image_size, inputs["mean"], inputs["std"], cfg.seed)
    return Trainer(
        config=pcfg, run_dir=folder, device=device, store=store, eval_store=None,
        batches=ResidentBatches(images, device, cfg.global_batch, cfg.seed), model=model,
        ddp_model=ddp_model, augment=augment, optimizer=optimizer, meta={},
        log=MetricsLog(None), base_lr=base_lr, steps_per_epoch=1, total_epochs=1)


def _worker(rank: int, cfg: CheckConfig, gathers: tuple[str, ...], folder: str) -> None:
    """One rank, set up as torchrun would: one training step per gather from the same start;
    writes ``rank{r}-{gather}.pt``."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(cfg.nproc),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(cfg.port))
    if cfg.device == "cpu":  # N processes share the cores instead of each taking them all
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // cfg.nproc))
    _no_tf32()
    device = distributed.init(torch.device(cfg.device))
    try:
        inputs = torch.load(Path(folder) / "inputs.pt", weights_only=True)
        for gather in gathers:
            out = _distributed_step(cfg, inputs, device, Path(folder), GATHERS[gather])
            torch.save(out, Path(folder) / f"rank{rank}-{gather}.pt")
    finally:
        distributed.shutdown()


def _distributed_step(cfg: CheckConfig, inputs: dict[str, Any], device: torch.device,
                      folder: Path, gather: Callable[[Tensor], Tensor]) -> dict[str, Any]:
    trainer = _trainer(cfg, inputs, device, folder)
    recorder = _ViewRecorder(trainer.augment)
    trainer.augment = recorder  # type: ignore[assignment]
    trainer.ddp_model.train()
    perm = epoch_permutation(cfg.global_batch, cfg.seed, 0)
    indices = batch_indices(perm, 0, cfg.global_batch)
    loss = train_step(trainer, indices, gather)
    loss = distributed.all_reduce_sum(loss) / cfg.nproc  # the mean over ranks: the global loss
    assert recorder.views is not None
    return dict(_snapshot(trainer.model), loss=loss.cpu(), indices=indices,
                views=torch.cat(recorder.views, 1).cpu())


def _reference(cfg: CheckConfig, inputs: dict[str, Any]) -> dict[str, Any]:
    """The one-process step with batch B, BatchNorm statistics as the distributed run has them."""
    _no_tf32()
    device = torch.device("cuda", 0) if cfg.device == "cuda" else torch.device("cpu")
    pcfg = _pretrain_config(cfg)
    model = _model(cfg, inputs, device).train()
    augment = SimCLRAugment(pcfg.augment, cfg.image_size, inputs["mean"], inputs["std"], cfg.seed)
    indices = epoch_permutation(cfg.global_batch, cfg.seed, 0)[:cfg.global_batch]
    v1, v2 = augment(inputs["images"][indices].to(device), indices.to(device), 0)  # (B, 3, S, S)
    b = cfg.global_batch // cfg.nproc
    if cfg.global_bn:
        z1, z2 = model(torch.cat([v1, v2])).chunk(2)
    else:  # one forward per rank's chunk: BatchNorm sees the 2b views that rank r sees
        parts = [model(torch.cat([a, c])) for a, c in zip(v1.split(b), v2.split(b))]
        z1, z2 = torch.cat([p[:b] for p in parts]), torch.cat([p[b:] for p in parts])
    loss = nt_xent(z1, z2, cfg.temperature, no_gather)  # one process: no gather, no offsets
    base_lr = effective_lr(pcfg.lr, cfg.global_batch)
    optimizer = build_optimizer(model, "lars", base_lr, pcfg.momentum, pcfg.weight_decay)
    set_lr(optimizer, base_lr)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return dict(_snapshot(model), loss=loss.detach().cpu(), indices=indices,
                views=torch.cat([v1, v2], 1).cpu())


def _largest(what: str, pairs: list[tuple[str, Tensor, Tensor]]) -> Difference:
    """Largest ``|a - b|`` over named ``(name, a, b)`` pairs, and the largest relative difference
    ``max|a - b| / max(max|b|, NOISE_FLOOR x the largest |b| of all pairs)`` of one tensor, with
    that tensor's name."""
    floor = NOISE_FLOOR * max((float(b.double().abs().max()) for _, _, b in pairs if b.numel()),
                              default=0.0)
    worst_abs, worst_rel, worst = 0.0, 0.0, ""
    for name, a, b in pairs:
        diff = float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
        rel = diff / max(float(b.double().abs().max()), floor, 1e-30) if diff else 0.0
        worst_abs = max(worst_abs, diff)
        if rel > worst_rel or not worst:
            worst_rel, worst = rel, name
    return Difference(what, worst_abs, worst_rel, worst)


def _weights_difference(reference: dict[str, Any], ranks: list[dict[str, Any]],
                        initial: dict[str, Tensor]) -> Difference:
    """Updated weights, judged against the size of the reference step ``w1 - w0``.

    A LARS step moves a weight by ~1e-5 of its size, a few dozen float32 units in the last place
    (ulp): rounding ``w0 - step`` alone may move ``w1`` by one ulp in either run. So the relative
    difference counts what exceeds one ulp of the tensor's largest weight (2^-23 x max|w1|), and
    a step below ``NOISE_FLOOR`` of the largest step is judged against that floor.
    """
    steps = {k: float((w.double() - initial[k].double()).abs().max())
             for k, w in reference["weight"].items()}
    floor = NOISE_FLOOR * max(steps.values(), default=0.0)
    worst_abs, worst_rel, worst = 0.0, 0.0, ""
    for k, w_ref in reference["weight"].items():
        w_ref = w_ref.double()
        step = max(steps[k], floor)
        ulp = 2.0 ** -23 * float(w_ref.abs().max())
        for r, d in enumerate(ranks):
            diff = float((d["weight"][k].double() - w_ref).abs().max())
            rel = max(0.0, diff - ulp) / max(step, 1e-30)
            worst_abs = max(worst_abs, diff)
            if rel > worst_rel or not worst:
                worst_rel, worst = rel, f"{k}@rank{r}"
    return Difference("updated weights", worst_abs, worst_rel, worst)


def _compare(reference: dict[str, Any], ranks: list[dict[str, Any]],
             initial: dict[str, Tensor]) -> list[Difference]:
    loss_diff = abs(float(ranks[0]["loss"]) - float(reference["loss"]))
    out = [Difference("loss", loss_diff, loss_diff / abs(float(reference["loss"])),
                      f"reference loss {float(reference['loss']):.6f}")]
    grads = [(f"{k}@rank{r}", d["grad"].get(k, torch.zeros_like(g)), g)
             for r, d in enumerate(ranks) for k, g in reference["grad"].items()]
    out.append(_largest(f"gradients ({len(reference['grad'])} x {len(ranks)} ranks)", grads))
    out.append(_weights_difference(reference, ranks, initial))
    # Views by sample index: the ranks must hold disjoint chunks that make up the global batch.
    indices = torch.cat([d["indices"] for d in ranks])
    if not torch.equal(indices.sort().values, reference["indices"].sort().values):
        out.append(Difference("views", float("inf"), float("inf"),
                              "the ranks' samples are not the reference batch"))
    else:
        views = torch.cat([d["views"] for d in ranks])[indices.argsort()]
        ref_views = reference["views"][reference["indices"].argsort()]
        out.append(_largest("views (per sample)", [("both views", views, ref_views)]))
    return out


def run_checks(cfg: CheckConfig, gathers: tuple[str, ...] | None = None) -> list[CheckResult]:
    """Run the distributed step (once per gather, in the same processes) and the reference step;
    compare them (see the module docstring). ``gathers`` defaults to ``(cfg.gather,)``."""
    gathers = gathers or (cfg.gather,)
    if cfg.device == "auto":
        cfg = dataclasses.replace(cfg, device="cuda" if torch.cuda.is_available() else "cpu")
    for gather in gathers:
        _validate(dataclasses.replace(cfg, gather=gather))
    if cfg.port is None:
        cfg = dataclasses.replace(cfg, port=_free_port())
    inputs = _make_inputs(cfg)
    with tempfile.TemporaryDirectory(prefix="simclr-check-") as folder:
        torch.save(inputs, Path(folder) / "inputs.pt")
        mp.start_processes(_worker, args=(cfg, gathers, folder), nprocs=cfg.nproc,
                           start_method="spawn")
        runs = {g: [torch.load(Path(folder) / f"rank{r}-{g}.pt", weights_only=True)
                    for r in range(cfg.nproc)] for g in gathers}
    reference = _reference(cfg, inputs)
    return [CheckResult(dataclasses.replace(cfg, gather=g),
                        _compare(reference, runs[g], inputs["state"])) for g in gathers]


def run_check(cfg: CheckConfig) -> CheckResult:
    """:func:`run_checks` for ``cfg.gather`` alone."""
    return run_checks(cfg)[0]
