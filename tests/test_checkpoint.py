"""Checkpoints round-trip; exports strict-load into torchvision; foreign files load or are refused."""

from __future__ import annotations

import json
import os
import pickle
from collections import OrderedDict

import pytest
import torch
import torchvision
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from simclr_kit.augment import normalize
from simclr_kit.checkpoint_files import latest_checkpoint, load_train_state, save_checkpoint
from simclr_kit.models.encoder import export_backbone, load_encoder, read_weights
from simclr_kit.errors import UserError
from simclr_kit.models.heads import SimCLR, build_simclr

META = {"backbone": "resnet18", "stem": "cifar", "image_size": 8, "mean": [0.5] * 3,
        "std": [0.25] * 3, "feature_dim": 512}


@pytest.fixture
def run_dir(tmp_path):
    torch.manual_seed(0)
    model = build_simclr("resnet18", "cifar", 8, projection_dim=16)
    model.train()(torch.randn(4, 3, 8, 8))  # move BN running stats away from their init
    state = {"epoch": 1, "step": torch.tensor(3), "rng_cpu": torch.get_rng_state().clone()}
    save_checkpoint(tmp_path / "run", "epoch-0001", model, META, state, keep=True)
    return tmp_path / "run", model


def test_round_trip_weights_metadata_and_state(run_dir):
    path, model = run_dir
    ckpt = latest_checkpoint(path)
    weights = load_file(str(ckpt / "model.safetensors"))
    for key, value in model.state_dict().items():
        assert torch.equal(weights[key], value), key
    state = load_train_state(ckpt)  # weights_only=True load
    assert state["epoch"] == 1 and torch.equal(state["step"], torch.tensor(3))
    assert state["rng_cpu"].dtype == torch.uint8 and state["rng_cpu"].numel() > 100
    meta = read_weights(path).meta
    assert meta["stem"] == "cifar" and meta["image_size"] == 8 and meta["format"] == "simclr-kit/1"


def test_load_encoder_matches_backbone_and_transform(run_dir):
    path, model = run_dir
    encoder = load_encoder(path)
    assert not encoder.training and encoder.feature_dim == 512
    x = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8)
    expected = model.backbone.eval()(normalize(x, META["mean"], META["std"]))
    torch.testing.assert_close(encoder(encoder.transform(x)), expected)
    pil = [Image.fromarray(img.permute(1, 2, 0).numpy()) for img in x]
    torch.testing.assert_close(encoder.transform(pil), encoder.transform(x))


def test_export_strict_loads_into_plain_torchvision(run_dir, tmp_path):
    path, model = run_dir
    out = export_backbone(path, tmp_path / "bb.safetensors")
    plain = torchvision.models.resnet18()
    plain.fc = nn.Identity()
    plain.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    plain.maxpool = nn.Identity()
    plain.load_state_dict(load_file(str(out)), strict=True)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(plain.eval()(x), model.backbone.eval()(x))
    assert json.loads((tmp_path / "bb.json").read_text())["final_layer"] == "fc"


def _saved_run(tmp_path, model, name: str):
    """A run directory holding ``model`` (a SimCLR of torchvision ``name``, ImageNet stem)."""
    meta = dict(META, backbone=name, stem="imagenet", image_size=32,
                feature_dim=model.feature_dim)
    save_checkpoint(tmp_path / "run", "epoch-0001", model, meta, None, keep=True)
    return tmp_path / "run"


@pytest.mark.parametrize("name,final,dim", [("mobilenet_v3_small", "classifier.3", 1024),
                                            ("mnasnet0_5", "classifier.1", 1280)])
def test_a_sequential_classifier_keeps_all_but_its_final_layer_through_export(
        tmp_path, name, final, dim):
    """Trained, loaded and exported, the backbone keeps every layer of torchvision's classifier
    but the last (MobileNetV3: its 1024-wide hidden layer), and the export loads strictly into
    plain torchvision once that layer (named in the sidecar) is an Identity."""
    torch.manual_seed(0)
    model = build_simclr(name, "imagenet", 32, projection_dim=16)
    model.train()(torch.randn(4, 3, 32, 32))  # move BN running stats away from their init
    run = _saved_run(tmp_path, model, name)
    x = torch.randn(2, 3, 32, 32)
    expected = model.backbone.eval()(x)
    encoder = load_encoder(run)
    assert encoder.feature_dim == model.feature_dim == dim
    torch.testing.assert_close(encoder(x), expected)
    out = export_backbone(run, tmp_path / "bb.safetensors")
    assert json.loads((tmp_path / "bb.json").read_text())["final_layer"] == final
    plain = torchvision.models.get_model(name)
    parent, _, child = final.rpartition(".")
    setattr(plain.get_submodule(parent), child, nn.Identity())
    state = OrderedDict(load_file(str(out)))
    state._metadata = plain.state_dict()._metadata  # MNASNet's loader reads it (README)
    plain.load_state_dict(state, strict=True)
    torch.testing.assert_close(plain.eval()(x), expected)


def test_a_checkpoint_of_the_former_headless_form_still_loads(tmp_path):
    """Before, the whole classifier attribute became an Identity: such a checkpoint loads in
    that form, features and export included."""
    torch.manual_seed(0)
    backbone = torchvision.models.mobilenet_v3_small()
    backbone.classifier = nn.Identity()
    model = SimCLR(backbone, 576, 16)
    run = _saved_run(tmp_path, model, "mobilenet_v3_small")
    x = torch.randn(2, 3, 32, 32)
    encoder = load_encoder(run)
    assert encoder.feature_dim == 576
    torch.testing.assert_close(encoder(x), backbone.eval()(x))
    out = export_backbone(run, tmp_path / "bb.safetensors")
    assert json.loads((tmp_path / "bb.json").read_text())["final_layer"] == "classifier"
    plain = torchvision.models.mobilenet_v3_small()
    plain.classifier = nn.Identity()
    plain.load_state_dict(load_file(str(out)), strict=True)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_exported_weights_follow_the_umask_like_their_json(run_dir, tmp_path, umask):
    previous = os.umask(umask)
    try:
        out = export_backbone(run_dir[0], tmp_path / "bb.safetensors")
    finally:
        os.umask(previous)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (out, tmp_path / "bb.json")}
    assert modes == {"bb.safetensors": 0o666 & ~umask, "bb.json": 0o666 & ~umask}
    # The feature cache an evaluation leaves in the run directory too.
    from simclr_kit.evaluation import cache

    previous = os.umask(umask)
    try:
        assert cache._write(tmp_path / "f.safetensors", torch.zeros(2, 3), "key", "test")
    finally:
        os.umask(previous)
    assert (tmp_path / "f.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask


def test_newest_checkpoint_by_position_when_the_pointer_is_lost(tmp_path):
    """Names count epochs from 1 (step 3 of the second epoch is epoch-0002-step-000003), so text
    order is not position order: without ``latest`` the recorded step decides."""
    from simclr_kit.train.loop import checkpoint_name

    run = tmp_path / "run"
    positions = [(0, 3, 3), (1, 0, 4), (1, 3, 7)]  # (0-based epoch, step in epoch, global step)
    names = [checkpoint_name(e, s) for e, s, _ in positions]
    assert names == ["epoch-0001-step-000003", "epoch-0001", "epoch-0002-step-000003"]
    for (_, _, step), name in zip(positions, names):
        save_checkpoint(run, name, nn.Linear(2, 2), {"global_step": step}, None, keep=True)
    (run / "checkpoints" / "latest").unlink()
    assert latest_checkpoint(run).name == "epoch-0002-step-000003"
    (run / "checkpoints" / "epoch-0002-step-000003" / "model.safetensors").unlink()
    assert latest_checkpoint(run).name == "epoch-0001"


@pytest.mark.parametrize("prefix", ["", "module."])
def test_seed_layout_state_dict_loads_and_head_is_not_backbone(tmp_path, prefix):
    torch.manual_seed(1)
    model = build_simclr("resnet18", "imagenet", 64, projection_dim=32)
    state = {prefix + k: v for k, v in model.state_dict().items()}
    torch.save(state, tmp_path / "seed.pt")
    encoder = load_encoder(tmp_path / "seed.pt")
    assert encoder.meta["stem"] == "imagenet"  # inferred from the 7x7 conv1
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(encoder(x), model.backbone.eval()(x))


def test_bare_torchvision_state_dict_with_fc_loads(tmp_path):
    plain = torchvision.models.resnet18()
    torch.save(plain.state_dict(), tmp_path / "tv.pth")
    encoder = load_encoder(tmp_path / "tv.pth")
    x = torch.randn(1, 3, 64, 64)
    plain.fc = nn.Identity()
    torch.testing.assert_close(encoder(x), plain.eval()(x))


def test_wrong_architecture_is_refused(run_dir, tmp_path):
    path, model = run_dir
    with pytest.raises(UserError, match="holds a resnet18 backbone, not a resnet34"):
        load_encoder(path, backbone="resnet34")
    # Without metadata the keys are compared, and the difference is listed.
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    with pytest.raises(UserError, match="missing keys.*layer1.2"):
        load_encoder(tmp_path / "plain.pt", backbone="resnet34")


def test_whole_pickled_model_is_refused(tmp_path):
    torch.save(torchvision.models.resnet18(), tmp_path / "whole.pt")
    with pytest.raises(UserError, match="state_dict"):
        load_encoder(tmp_path / "whole.pt")


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['EXPLOIT_MARKER']}",))


def test_crafted_pickle_never_runs(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("EXPLOIT_MARKER", str(marker))
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"conv1.weight": _Exploit()}, f)
    with pytest.raises(UserError):
        load_encoder(tmp_path / "evil.pt")
    assert not marker.exists()


def test_truncated_checkpoint_is_a_clear_error(run_dir, tmp_path):
    path, _ = run_dir
    data = (latest_checkpoint(path) / "model.safetensors").read_bytes()
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated or corrupt"):
        load_encoder(bad)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_encoder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no complete checkpoint"):
        load_encoder(tmp_path / "empty")


