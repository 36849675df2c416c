"""Config validation and YAML handling; LARS and the per-step warm-up + cosine schedule."""

from __future__ import annotations

import math

import pytest
import torch

from simclr_kit.config import (AugmentConfig, ConfigError, PretrainConfig, from_dict, load_yaml,
                               merge)
from simclr_kit.errors import UserError
from simclr_kit.optim import (LARS, build_optimizer, effective_lr, parameter_groups, set_lr,
                             warmup_cosine, warmup_epochs_within)


@pytest.mark.parametrize("field,value", [("temperature", 0.0), ("batch_size", 1), ("lr", -1.0),
                                         ("epochs", 0), ("backbone", "nope")])
def test_bad_values_name_the_field(field, value, tmp_path):
    if field != "backbone":
        with pytest.raises(UserError, match=field):
            PretrainConfig(**{field: value})
        return
    # Whether this machine can build a backbone is asked where the run is set up, before any
    # data is read (the data here does not exist), not by the config itself.
    from simclr_kit.config import DataConfig
    from simclr_kit.training import prepare

    cfg = PretrainConfig(backbone=value, data=DataConfig(data=str(tmp_path / "absent")))
    with pytest.raises(UserError, match="unknown backbone"):
        prepare(cfg)


def test_yaml_unknown_key_and_nested_sections(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 3\naugment:\n  flip_p: 0.0\ndata:\n  image_size: 16\n")
    cfg = from_dict(PretrainConfig, load_yaml(path))
    assert cfg.epochs == 3 and cfg.augment.flip_p == 0.0 and cfg.data.image_size == 16
    path.write_text("epochs: 3\nlearning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="learning_rate"):
        from_dict(PretrainConfig, load_yaml(path))
    with pytest.raises(ConfigError, match="image_size"):
        from_dict(PretrainConfig, {"data": {"image_size": 4}})


def test_merge_flags_over_file():
    merged = merge({"epochs": 3, "augment": {"flip_p": 0.0, "jitter_p": 0.5}},
                   {"augment": {"flip_p": 0.5}, "epochs": None})
    assert merged == {"epochs": 3, "augment": {"flip_p": 0.5, "jitter_p": 0.5}}


def test_augment_defaults_depend_on_size():
    small, large = AugmentConfig().resolved(32), AugmentConfig().resolved(224)
    assert small.jitter == pytest.approx((0.4, 0.4, 0.4, 0.1)) and small.blur_p == 0.0
    assert large.jitter == pytest.approx((0.8, 0.8, 0.8, 0.2)) and large.blur_p == 0.5


def test_schedule_is_per_step_warmup_then_cosine():
    lrs = [warmup_cosine(s, 100, 10, 1.0) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[55] == pytest.approx(0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] < 0.01
    assert effective_lr(0.3, 512) == pytest.approx(0.6)


def test_lars_matches_hand_computed_step_and_skips_bias_and_norm():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    groups = parameter_groups(model, 1e-2)
    assert [len(g["params"]) for g in groups] == [1, 3]  # weight; bias, BN weight, BN bias
    w0 = model[0].weight.detach().clone()
    b0 = model[0].bias.detach().clone()
    model(torch.randn(8, 4)).pow(2).sum().backward()
    gw, gb = model[0].weight.grad.clone(), model[0].bias.grad.clone()
    LARS(groups, lr=0.5, momentum=0.9, weight_decay=1e-2, eta=1e-3).step()
    g = gw + 1e-2 * w0
    trust = 1e-3 * w0.norm() / g.norm()
    torch.testing.assert_close(model[0].weight.detach(), w0 - 0.5 * trust * g)
    torch.testing.assert_close(model[0].bias.detach(), b0 - 0.5 * gb)  # plain SGD, no decay


def test_learning_rate_scaling_rules_and_capped_warmup():
    # the paper's square-root rule, 0.075 x sqrt(B), is 1.2 per 256 images
    assert effective_lr(1.2, 4096, "sqrt") == pytest.approx(0.075 * math.sqrt(4096))
    assert effective_lr(2.83, 128, "sqrt") == pytest.approx(2.0, abs=2e-3)
    assert effective_lr(1.0, 512, "linear") == pytest.approx(2.0)
    with pytest.raises(ConfigError, match="scaling 'cubic' \\(--lr-scaling\\)"):  # the flag
        PretrainConfig(lr_scaling="cubic")
    assert warmup_epochs_within(10.0, 5, 0.1) == 0.5  # a 5-epoch run warms up for half an epoch
    assert warmup_epochs_within(10.0, 500, 0.1) == 10.0


def test_set_lr_keeps_each_groups_multiple():
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    opt = torch.optim.SGD([{"params": net[0].parameters()},
                           {"params": net[1].parameters(), "lr_mult": 0.1}], lr=1.0)
    set_lr(opt, 0.5)
    assert [g["lr"] for g in opt.param_groups] == [0.5, pytest.approx(0.05)]


def test_config_and_report_modules_import_only_downward():
    """config knows nothing of models or the report (their checks run where a run is set up),
    and the report's sections build on page.py without importing html.py, which imports them."""
    import subprocess
    import sys

    def loaded(code):
        code += "\nimport sys; print(sorted(m for m in sys.modules if m.startswith('simclr_kit')))"
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              check=True).stdout

    config = loaded("from simclr_kit.config import PretrainConfig\n"
                    "PretrainConfig(backbone='no-such-model', loggers=('no-such-logger',))")
    assert "simclr_kit.models" not in config and "simclr_kit.report" not in config
    report = loaded("import simclr_kit.report.sections, simclr_kit.report.embedding_sections")
    assert "simclr_kit.report.page" in report and "simclr_kit.report.html" not in report


def test_every_optimizer_the_config_accepts_is_built_and_steps():
    """config.OPTIMIZERS and optim.BUILDERS name the same optimizers (adding one is both places,
    and a name in one but not the other fails here); each keeps biases and norms undecayed."""
    from simclr_kit.config import OPTIMIZERS
    from simclr_kit.optim import BUILDERS

    assert set(OPTIMIZERS) == set(BUILDERS)
    with pytest.raises(ConfigError, match="optimizer"):
        PretrainConfig(optimizer="rmsprop")
    for name in OPTIMIZERS:
        net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
        opt = build_optimizer(net, name, lr=0.1, momentum=0.9, weight_decay=0.5)
        assert [g["weight_decay"] for g in opt.param_groups] == [0.5, 0.0]
        before = net[0].weight.detach().clone()
        net(torch.randn(8, 3)).square().mean().backward()
        opt.step()
        assert not torch.equal(before, net[0].weight), name
