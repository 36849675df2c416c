"""timm backbones (``--backbone timm/NAME``): a ResNet-18 and a tiny ViT at 16 px, end to end."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from conftest import TINY, write_parquet_dataset
from simclr_kit.checkpoint_files import latest_checkpoint
from simclr_kit.cli import main
from simclr_kit.models.encoder import load_encoder
from simclr_kit.errors import UserError
from simclr_kit.models.backbones import backbone_kwargs, build_backbone, resolve_stem
from simclr_kit.models.heads import build_simclr
from simclr_kit.train.optim import build_optimizer, parameter_groups

timm = pytest.importorskip("timm")

# timm's own test ViT (6 blocks of width 64, 0.3 M parameters): the ViT code path of
# vit_tiny_patch16_224 at a tenth of the cost.
VIT = "timm/test_vit"
SIZE = 16
# What each model is built with at 16 px: the ViT's small-image form is 4 px patches.
KWARGS = {"timm/resnet18": {}, VIT: {"img_size": SIZE, "patch_size": 4}}


@pytest.fixture(scope="module")
def data16(tmp_path_factory):
    return write_parquet_dataset(tmp_path_factory.mktemp("data16") / "pq", n_per_class=8,
                                 size=SIZE)


@pytest.fixture(scope="module", params=sorted(KWARGS))
def run(request, data16, tmp_path_factory):
    """One epoch of 3 steps (24 images, batch 8) on the named timm backbone."""
    out = tmp_path_factory.mktemp("timm") / "run"
    assert main(["pretrain", "--data", str(data16), "--out", str(out), "--epochs", "1",
                 "--backbone", request.param, *TINY]) == 0
    return request.param, out


def _meta(run_dir):
    return json.loads((latest_checkpoint(run_dir) / "model.json").read_text())


def _plain_timm(name: str, meta: dict) -> nn.Module:
    """What a user of the export writes: create_model with the sidecar's kwargs, and for a
    CIFAR-stem ResNet the two replacements the README shows."""
    model = timm.create_model(name.removeprefix("timm/"), pretrained=False, num_classes=0,
                              **meta["create_model_kwargs"])
    if meta["stem"] == "cifar" and "patch_size" not in meta["create_model_kwargs"]:
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    return model


def test_pretrain_records_how_to_rebuild_the_backbone(run):
    name, out = run
    meta = _meta(out)
    assert meta["backbone"] == name and meta["stem"] == "cifar"
    assert meta["create_model_kwargs"] == KWARGS[name]
    assert meta["feature_dim"] == timm.create_model(name[5:], num_classes=0).num_features


def test_resume_evaluate_and_export_strict_into_timm(run, data16, tmp_path):
    name, out = run
    assert main(["pretrain", "--resume", str(out), "--epochs", "2"]) == 0
    assert latest_checkpoint(out).name == "epoch-0002"
    assert main(["evaluate", str(out), "--data", str(data16), "--linear-epochs", "2",
                 "--knn-k", "3", "--device", "cpu"]) == 0
    result = json.loads((out / "eval.json").read_text())
    assert {r["protocol"] for r in result["results"]} == {"knn", "linear"}

    file = tmp_path / "bb.safetensors"
    assert main(["export", str(out), str(file)]) == 0
    sidecar = json.loads(file.with_suffix(".json").read_text())
    assert sidecar["create_model_kwargs"] == KWARGS[name]
    plain = _plain_timm(name, sidecar)
    plain.load_state_dict(load_file(str(file)), strict=True)
    encoder = load_encoder(out)
    x = torch.randn(3, 3, SIZE, SIZE)
    torch.testing.assert_close(plain.eval()(x), encoder(x), rtol=0, atol=0)
    # The export reloads as an encoder too, with the same features.
    torch.testing.assert_close(load_encoder(file)(x), encoder(x), rtol=0, atol=0)


@pytest.mark.slow
def test_classifier_predict_embed_and_report(run, data16, tmp_path):
    name, out = run
    cls = tmp_path / "cls"
    assert main(["train-classifier", str(out), "--data", str(data16), "--out", str(cls),
                 "--epochs", "1", "--device", "cpu"]) == 0
    assert json.loads((cls / "classifier.json").read_text())["create_model_kwargs"] == KWARGS[name]
    assert main(["predict", str(cls), "--data", str(data16), "--out", str(tmp_path / "p.csv")]) == 0
    assert len((tmp_path / "p.csv").read_text().splitlines()) == 25  # header + 24 test images
    assert main(["embed", str(out), "--data", str(data16), "--out", str(tmp_path / "e.parquet"),
                 "--split", "test"]) == 0
    assert (tmp_path / "e.parquet").is_file()
    assert main(["report", str(out), "--data", str(data16), "--device", "cpu"]) == 0


def test_vit_embeddings_are_adapted_but_not_decayed():
    model = build_simclr(VIT, "auto", SIZE, projection_dim=16)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed, embeddings, rest = parameter_groups(model, 1e-4)
    assert (decayed["weight_decay"], decayed["lars"]) == (1e-4, True)
    assert (embeddings["weight_decay"], embeddings["lars"]) == (0.0, True)
    assert (rest["weight_decay"], rest["lars"]) == (0.0, False)
    assert {names[id(p)] for p in embeddings["params"]} == {"backbone.pos_embed",
                                                           "backbone.cls_token"}
    rest_names = {names[id(p)] for p in rest["params"]}
    assert {"backbone.blocks.0.norm1.weight", "backbone.blocks.0.attn.qkv.bias"} <= rest_names
    decayed_names = {names[id(p)] for p in decayed["params"]}
    assert {"backbone.patch_embed.proj.weight", "backbone.blocks.0.attn.qkv.weight",
            "projection_head.layers.0.weight"} <= decayed_names
    assert len(decayed_names) + len(embeddings["params"]) + len(rest_names) == len(names)
    # AdamW takes the same groups: the embeddings are not decayed.
    adamw = build_optimizer(model, "adamw", 1e-3, 0.9, 0.05)
    assert isinstance(adamw, torch.optim.AdamW)
    assert [g["weight_decay"] for g in adamw.param_groups] == [0.05, 0.0, 0.0]
    assert any(p is model.backbone.pos_embed for p in adamw.param_groups[1]["params"])


def test_a_vit_run_takes_moco_v3s_recipe_for_what_is_not_given_and_says_so(data16, tmp_path,
                                                                           capsys):
    import yaml

    out = tmp_path / "vit"
    assert main(["pretrain", "--data", str(data16), "--out", str(out), "--epochs", "1",
                 "--backbone", VIT, "--lr", "1e-3", *TINY]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "MoCo v3" in line]
    assert len(lines) == 1
    assert "adamw" in lines[0] and "weight decay 0.1" in lines[0] and "warm-up 40" in lines[0]
    assert "lr " not in lines[0]  # the rate was given: not the recipe's
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert (config["optimizer"], config["lr"], config["lr_scaling"], config["weight_decay"],
            config["warmup_epochs"]) == ("adamw", 1e-3, "linear", 0.1, 40.0)


def test_one_lars_step_at_the_default_rate_moves_the_position_embedding_by_lr_times_eta():
    """With the trust ratio, a step moves a tensor by lr x eta of its norm (the first step of
    momentum SGD is the gradient itself, and these tensors are not decayed); a raw SGD step at
    the LARS rate moved timm's pos_embed by several times its norm."""
    from simclr_kit.config import PretrainConfig
    from simclr_kit.models.loss import nt_xent
    from simclr_kit.train.optim import effective_lr

    cfg = PretrainConfig(backbone=VIT, optimizer="lars", batch_size=256).resolved()
    lr = effective_lr(cfg.lr, cfg.batch_size, cfg.lr_scaling)
    torch.manual_seed(0)
    model = build_simclr(VIT, "auto", SIZE, projection_dim=16)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = build_optimizer(model, "lars", lr, cfg.momentum, cfg.weight_decay, cfg.lars_eta)
    x = torch.randn(16, 3, SIZE, SIZE)
    z1, z2 = model(x).chunk(2)
    nt_xent(z1, z2, 0.1).backward()
    optimizer.step()
    for name in ("backbone.pos_embed", "backbone.cls_token"):
        p = dict(model.named_parameters())[name]
        relative = ((p.detach() - before[name]).norm() / before[name].norm()).item()
        assert relative == pytest.approx(lr * cfg.lars_eta, rel=1e-3), (name, relative)
        assert relative < 0.01


@pytest.mark.parametrize("size, stem, kwargs", [
    (32, "cifar", {"img_size": 32, "patch_size": 4}),
    (64, "cifar", {"img_size": 64, "patch_size": 8}),
    (96, "imagenet", {"img_size": 96}),
])
def test_vit_small_image_rule(size, stem, kwargs):
    vit = "timm/vit_tiny_patch16_224"
    assert resolve_stem("auto", size, vit) == stem
    assert backbone_kwargs(vit, stem, size) == kwargs
    # --init imagenet keeps the model's own 16 px patches at any size.
    assert backbone_kwargs(vit, "imagenet", size) == {"img_size": size}


def test_stem_rule_for_other_timm_models():
    assert resolve_stem("auto", 32, "timm/resnet18") == "cifar"
    assert resolve_stem("auto", 96, "timm/resnet18") == "imagenet"
    cifar = build_backbone("timm/resnet18", "cifar")
    assert cifar.conv1.stride == (1, 1) and isinstance(cifar.maxpool, nn.Identity)
    # ConvNeXt (a patchify stem) and ResNet-D (a deep stem) keep their own stems.
    assert resolve_stem("auto", 32, "timm/convnext_atto") == "imagenet"
    assert resolve_stem("auto", 32, "timm/resnet18d") == "imagenet"
    with pytest.raises(UserError, match="has no CIFAR stem"):
        build_backbone("timm/convnext_atto", "cifar")


def test_imagenet_init_reads_the_local_cache_only(tmp_path, monkeypatch):
    from simclr_kit.models import timm_backbones

    monkeypatch.setattr(timm_backbones, "cached_weights_file", lambda name: None)
    with pytest.raises(UserError, match="not in the local cache"):
        build_backbone("timm/resnet18", "imagenet", weights="imagenet")
    # With a weights file in the cache (here a stand-in), those weights are the backbone's.
    torch.manual_seed(1)
    full = timm.create_model("resnet18", num_classes=1000)
    file = tmp_path / "model.safetensors"
    save_file(full.state_dict(), str(file))
    monkeypatch.setattr(timm_backbones, "cached_weights_file", lambda name: str(file))
    model = build_backbone("timm/resnet18", "imagenet", weights="imagenet")
    assert torch.equal(model.conv1.weight, full.conv1.weight)


def test_missing_timm_is_one_line_and_exit_2(data, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` now raises ImportError
    assert main(["pretrain", "--data", str(data), "--out", str(tmp_path / "r"),
                 "--backbone", "timm/resnet18", *TINY]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'simclr-kit[timm]'" in err
    assert not (tmp_path / "r").exists()


def test_unknown_timm_name_is_one_line_and_exit_2(data, tmp_path, capsys):
    assert main(["pretrain", "--data", str(data), "--out", str(tmp_path / "r"),
                 "--backbone", "timm/resnet_nineteen", *TINY]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown timm model 'resnet_nineteen'" in err


def test_exported_convnext_keeps_its_head_norm(tmp_path):
    """A timm model's own ``head.*`` (ConvNeXt's final norm) is backbone, not a classifier."""
    from simclr_kit.checkpoint_files import save_weights

    backbone = build_backbone("timm/convnext_atto", "imagenet")
    assert any(k.startswith("head.norm.") for k in backbone.state_dict())
    file = tmp_path / "convnext.safetensors"
    save_weights(file, backbone.state_dict(), {"backbone": "timm/convnext_atto",
                                               "stem": "imagenet", "image_size": 32,
                                               "create_model_kwargs": {}})
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(load_encoder(file)(x), backbone.eval()(x), rtol=0, atol=0)


@pytest.mark.slow
def test_check_distributed_passes_for_a_vit():
    from simclr_kit.diagnostics.check_distributed import CheckConfig, run_check

    result = run_check(CheckConfig(device="cpu", backbone=VIT, image_size=SIZE))
    assert result.passed, result.report()


def test_feature_size_is_probed_and_checked_against_what_timm_declares():
    # MobileNetV3 pools 576 channels through a head convolution: 1024 features (head_hidden_size).
    assert build_simclr("timm/mobilenetv3_small_100", "auto", 32, 16).feature_dim == 1024
    from simclr_kit.models.timm_backbones import check_num_features

    model = nn.Linear(2, 3)
    model.num_features = 5
    with pytest.raises(UserError, match="declares 5 features but its forward gives 3"):
        check_num_features("timm/x", model, 3)


def test_the_readme_example_of_a_backbone_of_ones_own_trains(tmp_path, monkeypatch):
    """README, "Extending": the network registered with timm, as the README writes it,
    pretrains as ``timm/tiny_net`` on the embedded digits and is saved with its feature size."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("**A backbone**"):readme.index("**An augmentation**")]
    code = section.split("```python\n")[1].split("```")[0]
    monkeypatch.chdir(tmp_path)
    module = types.ModuleType("readme_example")  # timm's registry looks the module up
    monkeypatch.setitem(sys.modules, module.__name__, module)
    exec(compile(code, "README.md", "exec"), module.__dict__)
    meta = _meta(tmp_path / module.run_dir)
    assert meta["backbone"] == "timm/tiny_net" and meta["feature_dim"] == 32
    encoder = load_encoder(tmp_path / module.run_dir)
    assert encoder(torch.rand(2, 3, 8, 8)).shape == (2, 32)


def _vit_weights(tmp_path: Path, kwargs: dict) -> Path:
    """A timm/test_vit backbone saved as simclr-kit saves one, with ``kwargs`` recorded."""
    from simclr_kit.checkpoint_files import save_weights

    model = build_backbone(VIT, "cifar", kwargs={"img_size": SIZE, "patch_size": 4})
    file = tmp_path / "vit.safetensors"
    save_weights(file, model.state_dict(), {
        "backbone": VIT, "stem": "cifar", "image_size": SIZE, "feature_dim": 64,
        "mean": [0.5] * 3, "std": [0.25] * 3, "kind": "backbone",
        "create_model_kwargs": kwargs})
    return file


@pytest.mark.parametrize("kwargs, message", [
    ({"img_size": SIZE, "patch_size": 4, "checkpoint_path": "/nowhere/evil.pth"},
     "asks timm.create_model for 'checkpoint_path'"),
    ({"img_size": SIZE, "pretrained_cfg_overlay": {"file": "/nowhere/evil.pth"}},
     "asks timm.create_model for 'pretrained_cfg_overlay'"),
    ({"img_size": "16", "patch_size": 4}, "create_model_kwargs img_size = '16' is not an integer"),
    (["img_size"], "create_model_kwargs is a list, not a mapping"),
], ids=["checkpoint_path", "overlay", "string", "list"])
def test_checkpoint_metadata_cannot_choose_what_timm_loads(tmp_path, monkeypatch, capsys,
                                                           kwargs, message):
    called: list[dict] = []
    real = timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: called.append(k) or real(*a, **k))
    file = _vit_weights(tmp_path, kwargs)
    capsys.readouterr()
    assert main(["export", str(file), str(tmp_path / "out.safetensors")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    with pytest.raises(UserError, match="not loaded"):
        load_encoder(file)
    with pytest.raises(UserError, match="only img_size, patch_size are taken"):
        build_backbone(VIT, "cifar", kwargs={"checkpoint_path": "/nowhere/evil.pth"})
    assert not [k for k in called if set(k) - {"pretrained", "num_classes", "img_size",
                                               "patch_size"}]


def test_the_recorded_kwargs_still_load(tmp_path):
    encoder = load_encoder(_vit_weights(tmp_path, {"img_size": SIZE, "patch_size": 4}))
    assert encoder.feature_dim == 64


def test_a_mistyped_timm_name_suggests_the_names_it_resembles(capsys):
    from simclr_kit.models.timm_backbones import check_timm_name

    with pytest.raises(UserError) as err:
        check_timm_name("timm/vit_tiny_patch16_22")
    suggested = str(err.value).split("such as ", 1)[1].split(", ")
    assert suggested[0] == "timm/vit_tiny_patch16_224"
    assert all(n.startswith("timm/vit_") and "sapiens" not in n for n in suggested)


def test_timm_imagenet_init_without_its_weights_fails_before_any_data_is_read(
        data, tmp_path, monkeypatch, capsys):
    from simclr_kit.models import timm_backbones
    from simclr_kit.train import prepare as trainer

    def read(*args, **kwargs):
        raise AssertionError("the data was read before the weights were checked")

    monkeypatch.setattr(timm_backbones, "cached_weights_file", lambda name: None)
    monkeypatch.setattr(trainer, "_load_data", read)
    assert main(["pretrain", "--data", str(data), "--out", str(tmp_path / "r"),
                 "--backbone", "timm/resnet18", "--init", "imagenet", *TINY]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not in the local cache" in err[0], err
