"""Deploying and sharing: ONNX graphs against torch, ``predict --onnx`` against ``predict``, hub
folders loaded by simclr-kit, by timm's ``local-dir:`` and by the model card's own lines."""

from __future__ import annotations

import csv
import io
import json
import re
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY
from simclr_kit.checkpoint_files import save_weights
from simclr_kit.classifier import load_classifier
from simclr_kit.cli import main
from simclr_kit.models.encoder import load_encoder
from simclr_kit.models.backbones import build_backbone

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

MEAN, STD = [0.45, 0.42, 0.40], [0.27, 0.25, 0.26]
# Three backbones, each at a size it is used at: the run's own 8 px CIFAR-stem ResNet-18 (fast),
# then torchvision's ResNet-18 and timm's ViT-Tiny at 224 px, random weights.
BIG = {"resnet18-224": ("resnet18", "imagenet", None),
       "vit_tiny-224": ("timm/vit_tiny_patch16_224", "imagenet", {"img_size": 224})}


def _one_error_line(capsys: pytest.CaptureFixture) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def _weights_file(folder: Path, name: str, stem: str, size: int, kwargs: dict | None) -> Path:
    """A random-init backbone saved as simclr-kit saves one, BatchNorm statistics made non-trivial
    (a graph that dropped or mis-folded them would show)."""
    torch.manual_seed(0)
    backbone = build_backbone(name, stem, kwargs=kwargs)
    for module in backbone.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
    meta = {"backbone": name, "stem": stem, "image_size": size, "mean": MEAN, "std": STD}
    if kwargs is not None:
        meta["create_model_kwargs"] = kwargs
    folder.mkdir(parents=True, exist_ok=True)
    file = folder / "backbone.safetensors"
    save_weights(file, backbone.state_dict(), meta)
    return file


def _photos(size: int) -> list[Image.Image]:
    """Mixed aspect ratios and modes around ``size``: what users bring."""
    rng = np.random.default_rng(1)
    shapes = [(size * 3 // 2, size), (size, size * 4 // 3), (size, size), (size * 2, size // 2 + 3)]
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in shapes]
    return images + [images[0].convert("L")]


def _write_folder(root: Path, size: int, splits: tuple[str, ...] = ("",), per_class: int = 3,
                  torn: bool = False) -> Path:
    """Two classes of photos (mixed shapes) per split; ``torn``: a truncated JPEG in class a."""
    rng = np.random.default_rng(2)
    for split in splits:
        for label, colour in (("a", (200, 30, 30)), ("b", (30, 30, 200))):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(per_class):
                w, h = (size + 5 * i, size * 3 // 4 + 2) if i % 2 else (size * 3 // 4 + 1, size)
                img = rng.integers(0, 80, (h, w, 3), dtype=np.uint8)
                img[:, : w // 2] = colour
                Image.fromarray(img).save(folder / f"{i}.png")
            if torn and label == "a":
                good = io.BytesIO()
                Image.new("RGB", (size, size), colour).save(good, "JPEG")
                (folder / "torn.jpg").write_bytes(good.getvalue()[:80])
    return root


@torch.no_grad()
def _features(encoder: torch.nn.Module, images) -> torch.Tensor:
    """What ``load_encoder`` users compute: ``encoder(encoder.transform(images))``."""
    return encoder(encoder.transform(images))


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _check_graph(path: Path, size: int, output: str) -> dict[str, str]:
    """The graph passes onnx.checker, takes (batch, 3, S, S) uint8 and gives ``output``; returns
    its metadata_props."""
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    (pixels,) = proto.graph.input
    assert pixels.name == "pixels"
    assert pixels.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = [d.dim_param or d.dim_value for d in pixels.type.tensor_type.shape.dim]
    assert dims == ["batch", 3, size, size]
    assert [o.name for o in proto.graph.output] == [output]
    assert "uint8" in proto.doc_string
    return {p.key: p.value for p in proto.metadata_props}


def _rows(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(open(path)))


def _same_predictions(torch_csv: Path, onnx_csv: Path) -> None:
    """Same ids, labels and predicted classes in the same order; the 6-decimal probabilities
    agree to the float32 rounding of two runtimes (logits within 1e-4 move a softmax
    probability by less than 5e-5; measured: a few 1e-6)."""
    a, b = _rows(torch_csv), _rows(onnx_csv)
    assert list(a[0]) == list(b[0])
    strip = [{k: v for k, v in r.items() if k != "probability"} for r in a]
    assert strip == [{k: v for k, v in r.items() if k != "probability"} for r in b]
    diff = max(abs(float(x["probability"]) - float(y["probability"])) for x, y in zip(a, b))
    assert diff <= 2e-5


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    """One epoch on 8 px images, CIFAR stem, and a kNN evaluation (the model card's table)."""
    out = tmp_path_factory.mktemp("deploy") / "run"
    assert main(["pretrain", "--data", str(data), "--out", str(out), "--epochs", "1", *TINY]) == 0
    assert main(["evaluate", str(out), "--data", str(data), "--protocols", "knn", "--knn-k", "3",
                 "--device", "cpu"]) == 0
    return out


@pytest.fixture(scope="module")
def cls(run, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("deploy") / "cls"
    assert main(["train-classifier", str(run), "--data", str(data), "--out", str(out),
                 "--epochs", "1", "--min-steps", "20", "--device", "cpu"]) == 0
    return out


def test_onnx_encoder_gives_load_encoders_features(run, tmp_path):
    graph = tmp_path / "model.onnx"
    assert main(["export", str(run), str(graph)]) == 0
    props = _check_graph(graph, 8, "features")
    encoder = load_encoder(run)
    assert props["image_size"] == "8" and json.loads(props["mean"]) == list(encoder.mean)
    photos = _photos(8) * 3  # 15 images: another batch size than the exporter traced
    want = _features(encoder, photos)
    (got,) = _session(graph).run(None, {"pixels": encoder.to_uint8(photos).numpy()})
    assert got.shape == (15, 512)
    assert np.abs(got - want.numpy()).max() < 1e-4


def _readme_onnx_runtime_lines(model: Path, photo: Image.Image, folder: Path,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    """README, "Deploying and sharing": the lines without torch, run as written on ``photo``
    with the encoder ``model`` exported; their features are load_encoder's."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    (code,) = [b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S)
               if "import onnxruntime as ort" in b]
    assert main(["export", str(model), str(folder / "model.onnx")]) == 0
    photo.save(folder / "photo.jpg")
    features = _run_block(code, folder, monkeypatch)["features"]
    encoder = load_encoder(model)
    want = _features(encoder, [Image.open(folder / "photo.jpg")]).numpy()
    assert features.shape == (1, encoder.feature_dim) and np.abs(features - want).max() < 1e-4


def test_the_readmes_onnx_runtime_lines_give_load_encoders_features(run, tmp_path, monkeypatch):
    _readme_onnx_runtime_lines(run, _photos(30)[0], tmp_path, monkeypatch)  # 45 x 30


def test_predict_onnx_writes_predicts_csv_broken_images_included(run, cls, tmp_path, capsys):
    graph = tmp_path / "classifier.onnx"
    assert main(["export", str(cls), str(graph)]) == 0
    props = _check_graph(graph, 8, "logits")
    assert json.loads(props["class_names"]) == ["c0", "c1", "c2"]
    photos = _write_folder(tmp_path / "photos", 12, torn=True)
    capsys.readouterr()
    assert main(["predict", str(cls), "--data", str(photos), "--out", str(tmp_path / "t.csv")]) == 0
    said_torch = capsys.readouterr().out.splitlines()[:-1]  # the last line names the CSV
    assert main(["predict", "--onnx", str(graph), "--data", str(photos),
                 "--out", str(tmp_path / "o.csv")]) == 0
    said_onnx = capsys.readouterr().out.splitlines()[:-1]
    assert said_onnx == [line.replace("t.skipped.txt", "o.skipped.txt") for line in said_torch]
    assert "skipped 1 unreadable image(s)" in " ".join(said_onnx)
    assert (tmp_path / "o.skipped.txt").read_text() == (tmp_path / "t.skipped.txt").read_text()
    _same_predictions(tmp_path / "t.csv", tmp_path / "o.csv")
    assert len(_rows(tmp_path / "o.csv")) == 6 and "torn.jpg" not in (tmp_path / "o.csv").read_text()
    # The logits themselves, on the 8 px pixels predict feeds.
    model, meta = load_classifier(cls, torch.device("cpu"))
    encoder = load_encoder(run)
    pixels = encoder.to_uint8(_photos(8) * 3)
    with torch.no_grad():
        want = model(encoder.transform(pixels)).numpy()
    (got,) = _session(graph).run(None, {"pixels": pixels.numpy()})
    assert np.abs(got - want).max() < 1e-4 and (got.argmax(1) == want.argmax(1)).all()


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(BIG))
def test_onnx_at_224_px_matches_load_encoder_and_predict(case, tmp_path, capsys, monkeypatch):
    """Features of mixed-shape photos as load_encoder gives them, then a classifier trained on
    them predicts the same CSV with ONNX Runtime, a truncated JPEG skipped alike."""
    name, stem, kwargs = BIG[case]
    if name.startswith("timm/"):
        pytest.importorskip("timm")
    weights = _weights_file(tmp_path / "w", name, stem, 224, kwargs)
    graph = tmp_path / "model.onnx"
    assert main(["export", str(weights), str(graph)]) == 0
    _check_graph(graph, 224, "features")
    encoder = load_encoder(weights)
    photos = _photos(224)
    want = _features(encoder, photos).numpy()
    (got,) = _session(graph).run(None, {"pixels": encoder.to_uint8(photos).numpy()})
    assert np.abs(got - want).max() < 1e-4
    # the standard crop (shorter side to 256, centre 224) as the README's lines do it
    assert _check_graph(graph, 224, "features")["crop_fraction"] == "0.875"
    _readme_onnx_runtime_lines(weights, _photos(300)[1], tmp_path, monkeypatch)  # 300 x 400

    data = _write_folder(tmp_path / "data", 96, splits=("train", "test"), per_class=2)
    cls = tmp_path / "cls"
    assert main(["train-classifier", str(weights), "--data", str(data), "--out", str(cls),
                 "--epochs", "1", "--min-steps", "5", "--device", "cpu"]) == 0
    assert main(["export", str(cls), str(tmp_path / "cls.onnx")]) == 0
    photos_dir = _write_folder(tmp_path / "photos", 150, per_class=2, torn=True)
    capsys.readouterr()
    for args, out in (([str(cls)], "t.csv"), (["--onnx", str(tmp_path / "cls.onnx")], "o.csv")):
        assert main(["predict", *args, "--data", str(photos_dir), "--out", str(tmp_path / out),
                     "--device", "cpu"]) == 0
        assert "skipped 1 unreadable image(s)" in capsys.readouterr().out
    _same_predictions(tmp_path / "t.csv", tmp_path / "o.csv")


def _card_blocks(card: str) -> dict[str, str]:
    """The Python block under each ``### library`` heading of a model card."""
    return dict(re.findall(r"### (\S+)\n\n(?:[^\n]*\n\n)?```python\n(.*?)```", card, flags=re.S))


def _run_block(code: str, folder: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    monkeypatch.chdir(folder)  # the card's lines run as written, from inside the folder
    scope: dict = {}
    exec(compile(code, "model card", "exec"), scope)
    return scope


def test_hub_folder_loads_with_load_encoder_hf_hub_and_the_cards_lines(run, tmp_path, capsys,
                                                                       monkeypatch):
    folder = tmp_path / "hub"
    assert main(["export", str(run), str(folder), "--format", "hub"]) == 0
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.json",
                                                        "model.safetensors"]
    ref = load_encoder(run)
    x = ref.transform(torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8))
    assert torch.equal(load_encoder(folder)(x), ref(x))

    config = json.loads((folder / "config.json").read_text())
    assert config["num_features"] == 512 and config["pretrained_cfg"]["input_size"] == [3, 8, 8]
    assert config["pretrained_cfg"]["crop_pct"] == 1.0  # at 64 px and below no border is cut
    from simclr_kit.deploy.hub import crop_fraction  # above: the recorded fraction, as eval
    assert [crop_fraction(m) for m in ({"image_size": 224}, {"image_size": 224, "crop_fraction": 1},
                                       {"image_size": 160, "crop_fraction": 0.8})] == [0.875, 1, 0.8]
    assert config["pretrained_cfg"]["mean"] == list(ref.mean)
    assert config["simclr_kit"]["pretraining_config"]["epochs"] == 1
    card = (folder / "README.md").read_text()
    assert re.search(r"^license: +# FILL IN", card, flags=re.M)  # the licence is the user's
    assert "| knn | top1 | test | - | k=3, T=0.1 | 100.00% |" in card
    assert "- knn: cosine similarity" in card and "| temperature | 0.1 |" in card
    assert "split `train` (24 images)" in card
    blocks = _card_blocks(card)
    assert sorted(blocks) == ["simclr-kit", "torchvision"]
    model = _run_block(blocks["torchvision"], folder, monkeypatch)["model"]
    assert torch.equal(model(x), ref(x))
    Image.new("RGB", (20, 12), (200, 40, 40)).save(folder / "photo.jpg")
    features = _run_block(blocks["simclr-kit"], folder, monkeypatch)["features"]
    assert torch.equal(features, ref(ref.transform([Image.open(folder / "photo.jpg")])))

    import huggingface_hub

    from simclr_kit.models.encoder import HUB_FILES

    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda **kw: calls.append(kw) or str(folder))
    assert torch.equal(load_encoder("hf-hub:someone/simclr-r18@v1")(x), ref(x))
    assert calls == [{"repo_id": "someone/simclr-r18", "revision": "v1",
                      "allow_patterns": HUB_FILES}]


@pytest.mark.parametrize("name,kwargs,local_dir", [
    ("timm/test_vit", {"img_size": 16, "patch_size": 4}, True),
    ("timm/resnet18", {}, False)])  # the CIFAR stem: no timm argument makes it
def test_timm_hub_folder_loads_with_local_dir_or_the_cards_lines(name, kwargs, local_dir,
                                                                 tmp_path, monkeypatch):
    timm = pytest.importorskip("timm")
    weights = _weights_file(tmp_path / "w", name, "cifar", 16, kwargs)
    folder = tmp_path / "hub"
    assert main(["export", str(weights), str(folder), "--format", "hub"]) == 0
    ref = load_encoder(weights)
    x = ref.transform(torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8))
    assert torch.equal(load_encoder(folder)(x), ref(x))
    card = (folder / "README.md").read_text()
    assert "library_name: timm" in card
    code = _card_blocks(card)["timm"]
    assert ("local-dir:" in code) == local_dir
    model = _run_block(code, folder, monkeypatch)["model"]
    torch.testing.assert_close(model(x), ref(x), rtol=0, atol=1e-6)
    if local_dir:  # exactly what a timm user types, no other code
        model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
        torch.testing.assert_close(model(x), ref(x), rtol=0, atol=1e-6)


def test_without_onnx_packages_the_commands_say_how_to_install_them(run, cls, tmp_path,
                                                                    monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnx", None)  # `import onnx` now raises ImportError
    assert main(["export", str(run), str(tmp_path / "m.onnx")]) == 2
    assert "pip install 'simclr-kit[onnx]'" in _one_error_line(capsys)
    assert not (tmp_path / "m.onnx").exists()
    monkeypatch.setitem(sys.modules, "onnx", onnx)
    assert main(["export", str(cls), str(tmp_path / "c.onnx")]) == 0
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    image = tmp_path / "x.png"
    Image.new("RGB", (9, 9)).save(image)
    assert main(["predict", "--onnx", str(tmp_path / "c.onnx"), "--data", str(image),
                 "--out", str(tmp_path / "p.csv")]) == 2
    assert "onnxruntime is missing): pip install 'simclr-kit[onnx]'" in _one_error_line(capsys)


def test_wrong_uses_are_one_line_and_nothing_is_overwritten(run, cls, tmp_path, capsys,
                                                            monkeypatch):
    folder = tmp_path / "hub"
    folder.mkdir()
    (folder / "README.md").write_text("my edited card\n")
    assert main(["export", str(run), str(folder), "--format", "hub"]) == 2
    assert "is not an empty folder" in _one_error_line(capsys)
    assert (folder / "README.md").read_text() == "my edited card\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hub"]  # no temporary left behind

    assert main(["export", str(run), str(tmp_path / "m.onnx")]) == 0
    image = tmp_path / "x.png"
    Image.new("RGB", (9, 9)).save(image)
    for argv, message in (
            (["predict", "--onnx", str(tmp_path / "m.onnx")], "an encoder's graph (features)"),
            (["predict", str(cls), "--onnx", str(tmp_path / "m.onnx")], "one of the two"),
            (["predict"], "one of the two"),
            (["predict", "--onnx", str(tmp_path / "nothing.onnx")], "does not exist")):
        assert main([*argv, "--data", str(image), "--out", str(tmp_path / "p.csv")]) == 2, argv
        assert message in _one_error_line(capsys), argv
    assert not (tmp_path / "p.csv").exists()

    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(**kw):
        raise LocalEntryNotFoundError("Cannot find the requested files in the local cache")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    assert main(["export", "hf-hub:someone/missing", str(tmp_path / "x.onnx")]) == 2
    line = _one_error_line(capsys)
    assert "cannot fetch hf-hub:someone/missing" in line and "local cache" in line
    assert main(["export", "hf-hub:no-owner", str(tmp_path / "x.onnx")]) == 2
    assert "expected hf-hub:OWNER/NAME" in _one_error_line(capsys)


def test_onnx_extra_is_declared_and_ci_installs_it():
    """CI installs `.[dev]` on a fresh machine: without onnx there, every test above would skip."""
    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml")
                            .read_text())["project"]
    extras = project["optional-dependencies"]
    for extra in ("onnx", "dev"):
        names = {re.split(r"[<>=\[ ]", req)[0] for req in extras[extra]}
        assert {"onnx", "onnxruntime"} <= names, extra
