"""Config validation and YAML handling; LARS and the per-step warm-up + cosine schedule."""

from __future__ import annotations

import math

import pytest
import torch

from simclr_kit.config import (AugmentConfig, ConfigError, PretrainConfig, from_dict, load_yaml,
                               merge)
from simclr_kit.errors import UserError
from simclr_kit.train.optim import (LARS, build_optimizer, effective_lr, parameter_groups, set_lr,
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
    from simclr_kit.train.loop import prepare

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
    """optim.BUILDERS builds every row of the one optimizer table, config.OPTIMIZER_DEFAULTS,
    with the optimizer of that name; each keeps biases and norms undecayed."""
    from simclr_kit.config import OPTIMIZERS
    from simclr_kit.train.optim import BUILDERS

    assert set(OPTIMIZERS) == set(BUILDERS)
    with pytest.raises(ConfigError, match="optimizer"):
        PretrainConfig(optimizer="rmsprop")
    for name in OPTIMIZERS:
        net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
        opt = build_optimizer(net, name, lr=0.1, momentum=0.9, weight_decay=0.5)
        assert type(opt).__name__.lower() == name
        assert [g["weight_decay"] for g in opt.param_groups] == [0.5, 0.0]
        before = net[0].weight.detach().clone()
        net(torch.randn(8, 3)).square().mean().backward()
        opt.step()
        assert not torch.equal(before, net[0].weight), name


@pytest.mark.parametrize("name, rate_at_512, weight_decay", [
    ("sgd", 0.06 * 512 / 128, 5e-4),  # lightly's CIFAR-10 benchmark: 0.06 x B/128
    ("adam", 1e-3 * 512 / 256, 1e-6),  # Adam's 1e-3 for a batch of 256, scaled linearly
    ("adamw", 1e-3 * 512 / 256, 0.05),
])
def test_each_optimizer_takes_its_own_defaults_and_a_given_value_wins(name, rate_at_512,
                                                                      weight_decay):
    cfg = PretrainConfig(optimizer=name, batch_size=512).resolved()
    assert effective_lr(cfg.lr, 512, cfg.lr_scaling) == pytest.approx(rate_at_512)
    assert (cfg.optimizer, cfg.weight_decay, cfg.warmup_epochs) == (name, weight_decay, 10.0)
    given = PretrainConfig(optimizer=name, lr=0.5, lr_scaling="sqrt", weight_decay=0.0,
                           warmup_epochs=2.0).resolved()
    assert (given.lr, given.lr_scaling, given.weight_decay, given.warmup_epochs) == \
        (0.5, "sqrt", 0.0, 2.0)
    assert given.resolved() == given


@pytest.mark.parametrize("batch", [2, 128, 256, 512, 4096, 8192, 65536])
def test_the_default_lars_rate_follows_simclrs_square_root_rule_at_every_batch(batch):
    """SimCLR (Chen et al. 2020, appendix B.1): LARS at 0.075 x sqrt(batch size), which gives
    4.8 at batch 4096, the rate of its linear rule there (0.3 x 4096 / 256)."""
    cfg = PretrainConfig(batch_size=batch).resolved()
    assert cfg.optimizer == "lars"
    assert effective_lr(cfg.lr, batch, cfg.lr_scaling) == pytest.approx(0.075 * math.sqrt(batch))
    assert effective_lr(cfg.lr, 4096, cfg.lr_scaling) == pytest.approx(0.3 * 4096 / 256)


@pytest.mark.parametrize("backbone", ["timm/vit_tiny_patch16_224", "vit_b_16",
                                      "timm/deit_small_patch16_224"])
def test_a_vit_backbone_takes_moco_v3s_recipe_unless_told_otherwise(backbone):
    """MoCo v3 (Chen, Xie & He 2021) trains ViTs with AdamW, lr 1.5e-4 x B/256, weight decay
    0.1 and 40 warm-up epochs; each field given explicitly wins."""
    cfg = PretrainConfig(backbone=backbone, batch_size=4096).resolved()
    assert cfg.optimizer == "adamw"
    assert effective_lr(cfg.lr, 4096, cfg.lr_scaling) == pytest.approx(1.5e-4 * 4096 / 256)
    assert (cfg.weight_decay, cfg.warmup_epochs) == (0.1, 40.0)
    chosen = PretrainConfig(backbone=backbone, lr=1e-3, weight_decay=0.05).resolved()
    assert (chosen.optimizer, chosen.lr, chosen.weight_decay, chosen.warmup_epochs) == \
        ("adamw", 1e-3, 0.05, 40.0)
    lars = PretrainConfig(backbone=backbone, optimizer="lars").resolved()
    default = PretrainConfig(optimizer="lars").resolved()
    assert (lars.lr, lars.lr_scaling, lars.weight_decay, lars.warmup_epochs) == \
        (default.lr, default.lr_scaling, default.weight_decay, default.warmup_epochs)
    assert PretrainConfig(backbone="resnet50").resolved().optimizer == "lars"


def test_adam_adds_weight_decay_to_the_gradient_and_adamw_decouples_it():
    """The first Adam step is lr x g / (|g| + eps) (bias-corrected moments of one gradient):
    with L2 (``adam``) g includes wd x w; with decoupled decay (``adamw``) the weight shrinks
    by lr x wd first."""
    lr, wd, eps = 0.01, 0.5, 1e-8
    results = {}
    for name in ("adam", "adamw"):
        torch.manual_seed(0)
        net = torch.nn.Linear(3, 4, bias=False)
        w0 = net.weight.detach().clone()
        net(torch.randn(8, 3)).square().mean().backward()
        g = net.weight.grad.clone()
        build_optimizer(net, name, lr=lr, momentum=0.9, weight_decay=wd).step()
        results[name] = (w0, g, net.weight.detach())
    w0, g, w = results["adam"]
    d = g + wd * w0
    torch.testing.assert_close(w, w0 - lr * d / (d.abs() + eps))
    w0, g, w = results["adamw"]
    torch.testing.assert_close(w, w0 * (1 - lr * wd) - lr * g / (g.abs() + eps))


def test_torchvision_vit_position_embedding_and_class_token_are_adapted_not_decayed():
    from torchvision.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(image_size=16, patch_size=8, num_layers=1, num_heads=2,
                            hidden_dim=8, mlp_dim=16)
    names = {id(p): n for n, p in vit.named_parameters()}
    groups = parameter_groups(vit, 1e-4)
    [embeddings] = [g for g in groups if g["lars"] and g["weight_decay"] == 0.0]
    assert {names[id(p)] for p in embeddings["params"]} == {"class_token",
                                                           "encoder.pos_embedding"}
    [decayed] = [g for g in groups if g["weight_decay"] == 1e-4]
    assert "conv_proj.weight" in {names[id(p)] for p in decayed["params"]}


def test_config_facts_are_read_from_the_fields_declarations():
    """Which fields a resume may change and which a recipe does not pin are marked on their
    declarations (setting(resumable=, pinned_by_recipe=)); the lists are derived from them."""
    from dataclasses import fields

    from simclr_kit.config import (DataConfig, data_recipe, flatten, marked, recipe,
                                   with_data_recipe)
    from simclr_kit.train.resume import RESUMABLE_FIELDS

    def declared(fact, value):
        top = {f.name for f in fields(PretrainConfig) if f.metadata.get(fact) is value}
        return top | {f"data.{f.name}" for f in fields(DataConfig) if f.metadata.get(fact) is value}

    assert set(RESUMABLE_FIELDS) == declared("resumable", True) == {
        "epochs", "device", "progress", "log_every", "checkpoint_every",
        "checkpoint_every_steps", "loggers", "stream", "data.decode_workers"}
    unpinned = marked(PretrainConfig, "pinned_by_recipe", False)
    assert set(unpinned) == declared("pinned_by_recipe", False) == {
        "out", "epochs", "batch_size", "data.data"}
    # one rule names the recipe: the command line's base and the API's both take it
    assert data_recipe(None) == data_recipe("digits") == recipe("digits")
    assert data_recipe("some/folder") == {}
    _, taken = with_data_recipe(PretrainConfig(epochs=1))
    assert taken == [k for k in flatten(recipe("digits")) if k not in unpinned]


def test_the_classifier_takes_the_linear_probes_defaults():
    """A frozen classifier trains as evaluate's linear probe: its defaults are the probe's."""
    from simclr_kit.classifier import _recipe
    from simclr_kit.config import ClassifierConfig, EvalConfig

    probe, frozen = EvalConfig(), _recipe(ClassifierConfig())
    assert (frozen.epochs, frozen.batch_size, frozen.lr, frozen.weight_decay, frozen.min_steps,
            frozen.seed, frozen.backbone_lr_mult) == (
        probe.linear_epochs, probe.linear_batch_size, probe.linear_lr, probe.linear_weight_decay,
        probe.linear_min_steps, probe.seed, probe.finetune_backbone_lr_mult)
