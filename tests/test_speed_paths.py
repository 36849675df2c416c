"""The speed paths: multi-tensor LARS, fused/foreach optimizers, --time-budget, compiled-model
checkpoints and the throughput benchmark. CUDA-only checks skip on machines without a GPU."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from conftest import write_parquet_dataset
from simclr_kit.train.budget import TimeBudget
from simclr_kit.cli import main
from simclr_kit.config import DataConfig, PretrainConfig
from simclr_kit.devices import compile_by_default
from simclr_kit.train.optim import LARS, build_optimizer, parameter_groups, warmup_epochs_within
from simclr_kit.report.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def reference_lars_step(params: list[dict], state: dict, lr: float, momentum: float,
                        eta: float, clip: bool = False) -> None:
    """LARS (You et al. 2017) one parameter at a time, as SimCLR applies it: decay and the trust
    ratio only for the groups marked ``lars``; the first momentum buffer is the step itself.
    ``clip``: the ratio is capped as solo-learn's ``clip_lr`` does, ``min(ratio / lr, 1)``."""
    with torch.no_grad():
        for group in params:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad + group["weight_decay"] * p
                if group["lars"]:
                    w, g = p.norm().item(), d.norm().item()
                    ratio = eta * w / g if w > 0 and g > 0 else 1.0
                    if clip and w > 0 and g > 0:
                        ratio = min(ratio / lr, 1.0)
                    d = d * ratio
                buf = state.get(p)
                state[p] = d.clone() if buf is None else momentum * buf + d
                p -= lr * state[p]


class _Net(nn.Module):
    """Conv + BatchNorm + two heads; ``extra`` starts at zero (||w|| = 0: the trust ratio must
    fall back to 1) and sits beside ``fc``, so gradients still reach every other parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten())
        self.fc = nn.Linear(4 * 4 * 4, 3)
        self.extra = nn.Linear(4 * 4 * 4, 3, bias=False)
        nn.init.zeros_(self.extra.weight)

    def forward(self, x):
        h = self.body(x)
        return self.fc(h) + self.extra(h)


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return _Net()


# Clipped at eta 0.05 and lr 0.05: the conv's ratio / lr is about 2 (capped at 1), fc's about
# 0.6 (kept), so both branches of the cap are compared.
@pytest.mark.parametrize("clip,eta", [(False, 2e-3), (True, 5e-2)])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_foreach_lars_equals_per_parameter_reference_over_steps(device, clip, eta):
    fast, ref = _net().to(device), _net().to(device)
    opt = LARS(parameter_groups(fast, 1e-2), lr=0.05, momentum=0.9, weight_decay=1e-2, eta=eta,
               clip=clip)
    ref_groups, ref_state = parameter_groups(ref, 1e-2), {}
    g = torch.Generator().manual_seed(1)
    for step in range(4):
        x = torch.randn(8, 3, 6, 6, generator=g).to(device)
        for net in (fast, ref):
            net.zero_grad(set_to_none=False)  # zeroed in place: a buffer aliasing .grad would break
            out = net(x)
            loss = out.pow(2).mean() if step != 2 else out[:, :1].sum() * 0  # step 2: zero grads
            loss.backward()
        opt.step()
        reference_lars_step(ref_groups, ref_state, lr=0.05, momentum=0.9, eta=eta, clip=clip)
        for (name, a), b in zip(fast.named_parameters(), ref.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=f"step {step}: {name}")


def test_lars_skips_parameters_without_gradients_and_never_reads_device_values(monkeypatch):
    net = _net()
    conv = net.body[0]
    frozen = conv.weight.detach().clone()
    net(torch.randn(4, 3, 6, 6)).sum().backward()
    conv.weight.grad = None  # e.g. a frozen layer
    opt = LARS(parameter_groups(net, 1e-4), lr=0.1, weight_decay=1e-4)

    def refuse(*_args, **_kwargs):
        raise AssertionError("the optimizer step read a tensor value on the host")

    for method in ("item", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, method, refuse)
    opt.step()
    monkeypatch.undo()
    assert torch.equal(conv.weight.detach(), frozen)
    assert "momentum_buffer" not in opt.state[conv.weight]
    assert all("momentum_buffer" in opt.state[p] for p in net.parameters() if p is not conv.weight)


def test_sgd_and_adamw_take_the_multi_tensor_path_on_cpu():
    net = _net()
    for name in ("sgd", "adam"):
        opt = build_optimizer(net, name, 0.1, 0.9, 1e-4)
        assert opt.defaults["foreach"] is True and not opt.defaults.get("fused")
        assert [g["weight_decay"] for g in opt.param_groups] == [1e-4, 0.0]


@CUDA
def test_sgd_and_adamw_are_fused_on_cuda():
    net = _net().cuda()
    for name in ("sgd", "adam"):
        opt = build_optimizer(net, name, 0.1, 0.9, 1e-4)
        assert opt.defaults.get("fused") or opt.defaults.get("foreach")
        net(torch.randn(4, 3, 6, 6, device="cuda")).sum().backward()
        opt.step()


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_time_budget_chooses_epochs_from_timed_steps_and_excludes_pauses():
    clock, syncs = FakeClock(), []
    budget = TimeBudget(1.0, steps_per_epoch=10, sync=lambda: syncs.append(clock.now),
                        clock=clock, margin=0.05, warmup_steps=3)
    budget.start()
    clock.now += 20.0  # compilation inside the first step
    assert not budget.step_done()
    with budget.paused():
        clock.now += 500.0  # evaluation: not training time
    ready, steps = False, 1
    while not ready:
        clock.now += 0.5
        ready = budget.step_done()
        steps += 1
    # 3 warm-up steps (the 1st one 20 s), then 0.5 s steps until >= 5 timed and >= 1.2 s.
    assert steps == 8 and len(syncs) == 2
    fit = budget.choose(global_step=steps)
    spent = 20.0 + 7 * 0.5
    assert fit.seconds_per_step == pytest.approx(0.5) and fit.spent_seconds == pytest.approx(spent)
    assert fit.epochs == (steps + math.floor((57.0 - spent) / 0.5)) // 10  # 57 = 60 s x 0.95
    assert fit.expected_seconds <= 57.0
    assert budget.fits_another(60.0 - spent) and not budget.fits_another(60.0 - spent + 1)
    assert not budget.step_done()  # chosen once


def test_time_budget_too_small_still_finishes_the_epoch_in_progress():
    clock = FakeClock()
    budget = TimeBudget(0.01, steps_per_epoch=4, clock=clock, warmup_steps=1)
    budget.start()
    while True:
        clock.now += 1.0  # each step is longer than the whole budget
        if budget.step_done():
            break
    assert budget.choose(global_step=6).epochs == 2
    assert warmup_epochs_within(10.0, 20, 0.2) == 4.0 and warmup_epochs_within(1.0, 20, 0.2) == 1.0


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_parquet_dataset(tmp_path_factory.mktemp("data") / "pq", n_per_class=8, size=8)


TINY = ["--batch-size", "8", "--device", "cpu", "--log-every", "1", "--projection-dim", "16",
        "--image-size", "8"]


def test_time_budget_sets_the_epochs_logs_them_and_ends_with_a_checkpoint(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["pretrain", "--data", str(data), "--out", str(out), "--epochs", "1000",
                 "--time-budget", "0.1", *TINY]) == 0
    records = read_metrics(out / "metrics.jsonl")
    (fit,) = [r for r in records if r["kind"] == "budget"]
    assert fit["replaced_epochs"] == 1000 and 1 <= fit["epochs"] < 1000
    assert fit["timed_steps"] >= 5 and fit["seconds_per_step"] > 0
    assert capsys.readouterr().out.count("time budget 0.1 min:") == 1
    done = [r for r in records if r["kind"] == "done"][-1]
    stopped = [r for r in records if r["kind"] == "budget_stop"]
    assert done["epoch"] == (stopped[0]["epoch"] if stopped else fit["epochs"])
    latest = (out / "checkpoints" / "latest").read_text().strip()
    assert latest == f"epoch-{done['epoch']:04d}"
    state = torch.load(out / "checkpoints" / latest / "state.pt", weights_only=True)
    assert state["budget_fitted"] is True and state["total_epochs"] == done["epoch"]
    # The train records follow the chosen schedule: warm-up then cosine down to ~0 at the end.
    train = [r for r in records if r["kind"] == "train"]
    assert train[-1]["step"] == done["step"] and train[-1]["lr"] < max(r["lr"] for r in train)

    # The budget chose the run's length, whatever --epochs says now: resuming it is refused
    # as for any finished run, and nothing is written.
    capsys.readouterr()
    assert main(["pretrain", "--resume", str(out), "--epochs", "50"]) == 2
    assert "the length its --time-budget chose" in capsys.readouterr().err
    assert read_metrics(out / "metrics.jsonl") == records


def test_compiled_model_checkpoints_keep_plain_keys(data, tmp_path, monkeypatch):
    from simclr_kit.train import loop as training
    from simclr_kit.models.heads import build_simclr

    real_compile = torch.compile
    # The eager backend keeps dynamo's wrapper (and its ``_orig_mod.`` keys) without codegen.
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real_compile(model, backend="eager"))
    cfg = PretrainConfig(data=DataConfig(data=str(data), image_size=8), out=str(tmp_path / "r"),
                         batch_size=8, device="cpu", projection_dim=16, compile=True,
                         progress=False)
    t = training.prepare(cfg)
    assert any(k.startswith("_orig_mod.") for k in t.ddp_model.state_dict())
    t.ddp_model.train()
    loss = training.train_step(t, torch.arange(8))  # one step through the compiled wrapper
    assert torch.isfinite(loss)
    saved = load_file(str(training.save(t) / "model.safetensors"))
    assert set(saved) == set(t.model.state_dict())
    fresh = build_simclr("resnet18", "cifar", 8, 16)
    fresh.load_state_dict(saved, strict=True)


def test_compile_is_off_by_default_on_cpu(data, tmp_path):
    from simclr_kit.train import loop as training

    assert not compile_by_default(torch.device("cpu"))
    cfg = PretrainConfig(data=DataConfig(data=str(data), image_size=8), out=str(tmp_path / "r"),
                         batch_size=8, device="cpu", projection_dim=16, progress=False)
    assert cfg.compile is None
    t = training.prepare(cfg)
    assert t.ddp_model is t.model


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_throughput", ROOT / "bench" / "throughput.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_throughput_bench_runs_on_cpu_with_tiny_sizes(capsys):
    bench = _load_bench()
    argv = ["--image-size", "8", "--batch-size", "8", "--steps", "1", "--warmup", "1",
            "--workers", "1", "--baseline-warmup", "1", "--images", "16", "--device", "cpu",
            "--compile", "false", "--channels-last", "true,false"]
    assert bench.main(argv) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| ")]
    assert lines[0].startswith("| pipeline |") and len(lines) == 5  # header, rule, 3 rows
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:]]
    assert [c[0] for c in cells] == ["batched", "batched", "per-image"]
    assert [c[7] for c in cells] == ["on", "off", "on"]  # channels_last
    assert all(c[1:6] == ["resnet18", "8", "8", "cpu (%d cores)" % os.cpu_count(), "fp32"]
               for c in cells)
    speeds = [float(c[8].replace(",", "")) for c in cells]
    ratios = [float(c[12].rstrip("x")) for c in cells]
    assert all(v > 0 for v in speeds) and ratios[2] == 1.0
    assert ratios[0] == pytest.approx(speeds[0] / speeds[2], rel=0.05)  # cells are rounded


def test_throughput_bench_needs_only_torch_torchvision_numpy_pillow():
    blocked = ["datasets", "yaml", "tqdm", "safetensors", "pyarrow", "sklearn", "matplotlib"]
    # A blocked package looks absent to probes (no origin) and fails when really imported.
    code = (
        "import importlib.abc, importlib.machinery, runpy, sys\n"
        f"BLOCKED = {blocked!r}\n"
        "class Refuse(importlib.abc.Loader):\n"
        "    def create_module(self, spec):\n"
        "        raise ImportError('blocked: ' + spec.name)\n"
        "    def exec_module(self, module):\n"
        "        raise ImportError('blocked')\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in BLOCKED:\n"
        "            return importlib.machinery.ModuleSpec(name, Refuse(), origin=None)\n"
        "sys.meta_path.insert(0, Block())\n"
        "sys.argv = ['throughput.py', '--help']\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT / "bench", capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--baseline-warmup" in proc.stdout


@CUDA
def test_throughput_bench_on_cuda_makes_no_host_sync_per_step():
    bench = _load_bench()
    rows = bench.run(bench.parse_args(["--image-size", "16", "--batch-size", "32", "--steps", "2",
                                       "--warmup", "2", "--workers", "2", "--device", "cuda",
                                       "--compile", "false", "--images", "128"]))
    batched, per_image = rows
    assert batched.precision == "bf16" and batched.syncs_per_step == 0
    assert batched.images_per_s > 0 and per_image.images_per_s > 0
