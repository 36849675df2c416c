"""`simclr evaluate` end to end: all four protocols, the feature cache, frozen encoders stay
bit-identical, fine-tuning, baselines, and kNN monitoring during pretraining."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import make_class_images
from simclr_kit.cli import main
from simclr_kit.config import EvalConfig
from simclr_kit.data.store import ImageStore
from simclr_kit.models.encoder import Encoder, load_encoder
from simclr_kit.evaluation import cache as cache_module
from simclr_kit.evaluation.cache import cache_key
from simclr_kit.evaluation.features import extract_features
from simclr_kit.evaluation.finetune import finetune, finetune_optimizer
from simclr_kit.evaluation.knn import knn_accuracy
from simclr_kit.evaluation.linear import train_linear_probe
from simclr_kit.evaluation.protocols import run_protocols
from simclr_kit.models.heads import Classifier
from simclr_kit.models.backbones import build_backbone
from simclr_kit.report.metrics import read_metrics

TINY = ["--batch-size", "8", "--device", "cpu", "--log-every", "1", "--projection-dim", "16",
        "--deterministic", "true"]
# Few steps everywhere: the numbers are checked against independent computations, not levels.
QUICK = ["--device", "cpu", "--linear-epochs", "3", "--linear-min-steps", "12", "--seeds", "2",
         "--finetune-epochs", "1", "--finetune-batch-size", "8"]


def _noisy_parquet(root: Path) -> Path:
    """Train/test Parquet splits of 8 px class images with a third of the labels flipped, so
    no protocol sits at exactly 100% and numbers from different code paths can disagree."""
    import datasets

    features = datasets.Features({"img": datasets.Image(),
                                  "label": datasets.ClassLabel(names=["a", "b", "c"])})
    root.mkdir(parents=True)
    for split, seed in (("train", 0), ("test", 1)):
        images, labels = make_class_images(10, 3, 8, seed)
        rng = np.random.default_rng(seed + 10)
        flip = rng.random(len(labels)) < 0.34
        labels = [int(rng.integers(3)) if f else y for y, f in zip(labels, flip)]
        ds = datasets.Dataset.from_dict({"img": [Image.fromarray(i) for i in images],
                                         "label": labels}, features=features)
        ds.to_parquet(str(root / f"{split}.parquet"))
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return _noisy_parquet(tmp_path_factory.mktemp("data") / "pq")


@pytest.fixture(scope="module")
def run(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "run"
    assert main(["pretrain", "--data", str(data), "--out", str(out), "--epochs", "2",
                 *TINY]) == 0
    return out


@pytest.fixture
def count_forwards(monkeypatch) -> list[int]:
    """Counts the feature extractions (backbone passes over a split) that the cache lets through."""
    calls: list[int] = []
    real = cache_module.extract_features

    def counting(encoder, images, *args, **kwargs):
        calls.append(int(images.shape[0]))
        return real(encoder, images, *args, **kwargs)

    monkeypatch.setattr(cache_module, "extract_features", counting)
    return calls


def _rows(out: Path) -> list[dict]:
    return json.loads((out / "eval.json").read_text())["results"]


def test_all_four_protocols_labelled_and_consistent(run, data, tmp_path, capsys):
    out = tmp_path / "ev"
    assert main(["evaluate", str(run), "--data", str(data), "--out", str(out), *QUICK,
                 "--protocols", "knn,linear,fractions,finetune", "--knn-k", "5,200"]) == 0
    rows = _rows(out)
    for r in rows:
        assert set(r) >= {"encoder", "protocol", "metric", "value", "split", "seed",
                          "hyperparameters"}
        assert r["encoder"] == "simclr" and r["split"] == "test" and 0 <= r["value"] <= 100
    # 3 classes: no top-5 (it would be 100% whenever the true class got a vote); k=200 capped
    # at the 30 training images; label subsets of the same labels share one row (below).
    protocols = [r["protocol"] for r in rows]
    assert protocols[:3] == ["knn", "knn", "linear"] and protocols[-1] == "finetune"
    assert set(protocols[3:-1]) == {"fractions"}
    assert all(r["metric"] == "top1" for r in rows)

    # The cached features are the encoder's eval-mode features, and each number is what the
    # protocol functions give on them (independent recomputation).
    encoder = load_encoder(run)
    from simclr_kit.data.splits import open_splits
    from simclr_kit.data.store import decode_split
    from simclr_kit.config import DataConfig

    train_split, val_split = open_splits(DataConfig(data=str(data)), need_eval=True)
    train, val = decode_split(train_split, 8, progress=False), decode_split(val_split, 8, progress=False)
    f_train = extract_features(encoder, train.images, encoder.mean, encoder.std)
    f_val = extract_features(encoder, val.images, encoder.mean, encoder.std)
    files = json.loads((out / "eval.json").read_text())["features"]["simclr"]
    torch.testing.assert_close(load_file(files["train"]["file"])["features"], f_train)
    knn = knn_accuracy(f_train, train.labels, f_val, val.labels, 3, ks=(5, 30))
    assert [r["value"] for r in rows[:2]] == [knn[5]["top1"], knn[30]["top1"]]
    assert [r["hyperparameters"]["k"] for r in rows[:2]] == [5, 30]
    assert "k_asked" not in rows[0]["hyperparameters"]
    assert rows[1]["hyperparameters"]["k_asked"] == 200
    assert 0 < knn[5]["top1"] < 100  # the noisy labels make the comparison meaningful
    probe = train_linear_probe(f_train, train.labels, f_val, val.labels, 3, epochs=3,
                               min_steps=12)
    linear = rows[2]
    assert linear["value"] == pytest.approx(probe.val_accuracy)
    # 30 rows = 1 step per epoch at batch 256: min_steps raises 3 epochs to 12, and says so.
    assert linear["hyperparameters"].items() >= {"epochs": 3, "min_steps": 12, "epochs_run": 12,
                                                 "steps": 12, "lr": 1e-3,
                                                 "batch_size": 256}.items()

    # Each subset takes a prefix of one per-class shuffle, so two subsets hold the same labels
    # exactly when they take as many of every class: grouped by those counts, by hand.
    per_class = torch.bincount(train.labels).tolist()
    groups: dict[tuple[int, ...], list[str]] = {}
    for name in ("1%", "10%", "100%", "1-shot", "5-shot", "10-shot"):
        take = ([min(int(name[:-5]), n) for n in per_class] if name.endswith("-shot") else
                [max(1, math.floor(float(name[:-1]) / 100 * n + 0.5)) for n in per_class])
        groups.setdefault(tuple(take), []).append(name)
    fractions = rows[3:-1]
    assert [(r["subset"], r.get("same_as")) for r in fractions] == \
        [(names[0], names[1:] or None) for names in groups.values()]
    assert [r["labels"] for r in fractions] == [sum(take) for take in groups]
    assert groups[(1, 1, 1)] == ["1%", "10%", "1-shot"]  # 10 images or so per class
    for r in fractions:
        assert r["seed"] == [0, 1] and len(r["runs"]) == 2
        assert r["std"] == pytest.approx(float(np.std(r["runs"], ddof=1)))

    finetune_row = rows[-1]
    hp = finetune_row["hyperparameters"]
    assert hp["backbone_lr"] == pytest.approx(hp["lr"] * hp["backbone_lr_mult"])
    assert hp["epochs"] == 1 and "crop" in hp["augmentation"]

    with Image.open(out / "label_efficiency.png") as png:
        assert png.format == "PNG" and min(png.size) > 100
    table = (out / "eval.md").read_text()
    assert "| fractions | top1 | test | 0,1 | 5-shot (15 labels)" in table
    assert "| fractions | top1 | test | 0,1 | 1% = 10% = 1-shot (3 labels, the same labels)" \
        in table
    assert "| knn | top1 | test | - | k=5, T=0.1 |" in table
    assert "| knn | top1 | test | - | k=30 (200 asked; the train split has 30 images), " \
        "T=0.1 |" in table
    assert "| linear | top1 |" in capsys.readouterr().out


def test_second_evaluate_reads_the_cache_without_a_backbone_pass(run, data, tmp_path,
                                                                 count_forwards, monkeypatch):
    hashed: list[str] = []
    real_hash = cache_module._hash_tensor
    monkeypatch.setattr(cache_module, "_hash_tensor", lambda h, name, tensor: (
        hashed.append(name), real_hash(h, name, tensor)))
    out = tmp_path / "ev"
    argv = ["evaluate", str(run), "--data", str(data), "--out", str(out), *QUICK,
            "--protocols", "knn,linear,fractions"]
    assert main(argv) == 0
    assert count_forwards == [30, 30]  # train and test, once each
    # Decoded from files, each split is keyed by its decoded cache: no pass over the pixels.
    assert hashed.count("rows") == 2 and "images" not in hashed
    first = _rows(out)
    assert main(argv) == 0
    assert count_forwards == [30, 30]  # nothing new: both splits came from features/
    assert _rows(out) == first
    assert all(v["cached"] for v in json.loads((out / "eval.json").read_text())
               ["features"]["simclr"].values())

    # A damaged cache file is recomputed, not trusted.
    train_file = next((out / "features").glob("train-*.safetensors"))
    train_file.write_bytes(b"not a safetensors file")
    assert main(argv) == 0
    assert count_forwards == [30, 30, 30] and _rows(out) == first


def test_cache_key_follows_weights_pixels_and_split() -> None:
    torch.manual_seed(0)
    encoder = Encoder(build_backbone("resnet18", "cifar"), 8, (0.5,) * 3, (0.25,) * 3)
    images = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    store = ImageStore(images, torch.arange(6) % 2, None, torch.arange(6), 8)
    key = cache_key(encoder, store, "train")
    assert cache_key(encoder, store, "train") == key
    assert cache_key(encoder, store, "test") != key
    other_pixels = ImageStore(images.clone(), store.labels, None, store.row_ids, 8)
    other_pixels.images[0, 0, 0, 0] ^= 1
    assert cache_key(encoder, other_pixels, "train") != key
    with torch.no_grad():
        encoder.backbone.bn1.running_var[0] += 1e-3  # a buffer, not a parameter
    assert cache_key(encoder, store, "train") != key
    moved = Encoder(encoder.backbone, 8, (0.4,) * 3, (0.25,) * 3)
    assert cache_key(moved, store, "train") != cache_key(encoder, store, "train")


def test_cache_key_of_a_decoded_store_follows_its_key_and_rows_not_its_pixels() -> None:
    torch.manual_seed(0)
    encoder = Encoder(build_backbone("resnet18", "cifar"), 8, (0.5,) * 3, (0.25,) * 3)
    # Pixels on the meta device cannot be read: the key must come from the store's own key.
    images = torch.empty((6, 3, 8, 8), dtype=torch.uint8, device="meta")
    store = ImageStore(images, None, None, torch.arange(6), 8, key="3f2a")
    key = cache_key(encoder, store, "train")
    assert cache_key(encoder, ImageStore(images, None, None, torch.arange(6), 8, key="3f2a"),
                     "train") == key
    assert cache_key(encoder, ImageStore(images, None, None, torch.arange(6), 8, key="3f2b"),
                     "train") != key
    skipped = ImageStore(images[:5], None, None, torch.tensor([0, 1, 2, 4, 5]), 8, key="3f2a")
    assert cache_key(encoder, skipped, "train") != key
    pixels = torch.zeros((6, 3, 8, 8), dtype=torch.uint8)
    unkeyed = ImageStore(pixels, None, None, torch.arange(6), 8)  # held in memory: pixels hashed
    assert cache_key(encoder, unkeyed, "train") != key


def test_decode_split_keys_a_store_by_its_decoded_cache(data) -> None:
    from simclr_kit.config import DataConfig
    from simclr_kit.data.pixels import Layout
    from simclr_kit.data.splits import open_splits
    from simclr_kit.data.store import _cache_dir, decode_split

    train, _ = open_splits(DataConfig(data=str(data)), need_eval=False)
    store = decode_split(train, progress=False)
    assert store.key == _cache_dir(train, Layout.crop(store.image_size)).name
    assert decode_split(train, progress=False).key == store.key  # a cache hit: the same key
    digits, _ = open_splits(DataConfig(data="digits"), need_eval=False)
    assert decode_split(digits, progress=False).key is None  # in memory, no fingerprint


def _tiny_stores(n: int = 24) -> tuple[ImageStore, ImageStore]:
    g = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=g)
    labels = torch.arange(n) % 3
    return (ImageStore(images[:16], labels[:16], ["a", "b", "c"], torch.arange(16), 8,
                       {"split": "train"}),
            ImageStore(images[16:], labels[16:], ["a", "b", "c"], torch.arange(8), 8,
                       {"split": "test"}))


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_frozen_protocols_leave_the_encoder_bit_identical(mode, tmp_path) -> None:
    torch.manual_seed(1)
    encoder = Encoder(build_backbone("resnet18", "cifar"), 8, (0.5,) * 3, (0.25,) * 3)
    encoder.train(mode == "train")
    train, val = _tiny_stores()
    before = _state(encoder)
    cfg = EvalConfig(protocols=("knn", "linear", "fractions", "finetune"), knn_k=(3,),
                     linear_epochs=2, linear_min_steps=4, probe_augment=True, seeds=2,
                     fractions=(0.5,), shots=(1,), finetune_epochs=1, finetune_batch_size=8)
    rows, _ = run_protocols(encoder, train, val, cfg, torch.device("cpu"), "tiny",
                            progress=False, cache_dir=tmp_path / "features")
    assert {r["protocol"] for r in rows} == {"knn", "linear", "fractions", "finetune"}
    after = encoder.state_dict()
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        assert torch.equal(tensor, after[name]), name  # weights and BatchNorm buffers alike
    assert encoder.training == (mode == "train")  # the mode it came in with
    assert all(p.grad is None for p in encoder.parameters())
    # The check has teeth: one train-mode forward does move the BatchNorm statistics.
    encoder.train()
    with torch.no_grad():
        encoder(torch.randn(4, 3, 8, 8))
    assert not torch.equal(before["backbone.bn1.running_mean"], encoder.backbone.bn1.running_mean)


def test_finetune_trains_the_backbone_at_its_own_rate() -> None:
    torch.manual_seed(2)
    model = Classifier(build_backbone("resnet18", "cifar"), 512, 3, frozen=False)
    optimizer = finetune_optimizer(model, lr=0.01, backbone_lr_mult=0.1, weight_decay=0.0)
    assert [g["lr"] for g in optimizer.param_groups] == [0.01, pytest.approx(0.001)]
    assert sum(p.numel() for p in optimizer.param_groups[1]["params"]) == \
        sum(p.numel() for p in model.backbone.parameters())
    train, _ = _tiny_stores()
    before = _state(model.backbone)
    # 16 images at batch 5: the last batch of 1 is skipped (1x1 BatchNorm maps at 8 px).
    losses = finetune(model, train.images, train.labels, (0.5,) * 3, (0.25,) * 3, epochs=2,
                      lr=0.01, backbone_lr_mult=0.1, batch_size=5, weight_decay=0.0, seed=0,
                      device=torch.device("cpu"), cosine=True)
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    after = model.backbone.state_dict()
    assert not torch.equal(before["conv1.weight"], after["conv1.weight"])
    assert not torch.equal(before["bn1.running_mean"], after["bn1.running_mean"])


@pytest.mark.parametrize("cosine", [True, False])
def test_finetune_rates_per_step_follow_the_schedule_and_the_multiple(cosine, monkeypatch):
    """Each Adam step's two rates against the closed form: head ``lr * (1 + cos(pi s / S)) / 2``
    (or ``lr`` when constant), backbone that times ``backbone_lr_mult``."""
    seen: list[list[float]] = []
    adam_step = torch.optim.Adam.step

    def recording_step(self, *args, **kwargs):
        seen.append([group["lr"] for group in self.param_groups])
        return adam_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", recording_step)
    torch.manual_seed(2)
    model = Classifier(build_backbone("resnet18", "cifar"), 512, 3, frozen=False)
    train, _ = _tiny_stores()
    # 16 images at batch 5: 3 steps per epoch (the last batch of 1 is skipped), 6 in all.
    finetune(model, train.images, train.labels, (0.5,) * 3, (0.25,) * 3, epochs=2, lr=0.01,
             backbone_lr_mult=0.1, batch_size=5, weight_decay=0.0, seed=0,
             device=torch.device("cpu"), cosine=cosine)
    steps = np.arange(6)
    head = 0.01 * (1 + np.cos(np.pi * steps / 6)) / 2 if cosine else np.full(6, 0.01)
    np.testing.assert_allclose(np.array(seen), np.stack([head, head * 0.1], 1), rtol=1e-12)


def test_baselines_under_the_same_protocol(run, data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "ev"
    assert main(["evaluate", str(run), "--data", str(data), "--out", str(out), *QUICK,
                 "--protocols", "knn", "--knn-k", "5", "--baseline", "random"]) == 0
    rows = _rows(out)
    assert {r["encoder"] for r in rows} == {"simclr", "random-init"}
    assert "| simclr | random-init |" in (out / "eval.md").read_text()
    capsys.readouterr()

    import torchvision.models._api as tv_api
    from urllib.error import URLError

    def offline(*args, **kwargs):
        raise URLError("no network")

    monkeypatch.setattr(tv_api, "load_state_dict_from_url", offline)
    assert main(["evaluate", str(run), "--data", str(data), "--out", str(tmp_path / "im"),
                 "--device", "cpu", "--baseline", "imagenet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "resnet18-" in err[0] and "checkpoints" in err[0]
    assert not (tmp_path / "im").exists()


@pytest.mark.parametrize("flag,value,field", [("--fractions", "0", "fractions"),
                                              ("--shots", "0", "shots"),
                                              ("--linear-min-steps", "-1", "linear_min_steps"),
                                              ("--protocols", "knn,probe", "protocols")])
def test_bad_protocol_settings_are_one_line(flag, value, field, run, data, capsys):
    assert main(["evaluate", str(run), "--data", str(data), flag, value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and field in err[0]


def test_monitor_knn_logs_records_without_changing_training(run, data, tmp_path, capsys):
    out = tmp_path / "mon"
    assert main(["pretrain", "--data", str(data), "--out", str(out), "--epochs", "2",
                 "--monitor-knn", "1", *TINY]) == 0
    records = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "knn"]
    assert [r["epoch"] for r in records] == [1, 2]
    # The closing line names the last of them.
    assert f"kNN top-1 {records[-1]['top1']:.2f}% (k=30)" in capsys.readouterr().out
    for r in records:
        # k capped at the 30 keys; no top-5 with 3 classes, as in evaluate
        assert r["k"] == 30 and r["temperature"] == 0.1 and r["split"] == "test"
        assert r["keys"] == 30 and r["queries"] == 30 and 0 <= r["top1"] <= 100
        assert "top5" not in r

    # Monitoring reads the model and draws no random numbers: the weights (BatchNorm buffers
    # included) are bit-identical to the same run without it.
    ours = load_file(str(out / "checkpoints" / "epoch-0002" / "model.safetensors"))
    plain = load_file(str(run / "checkpoints" / "epoch-0002" / "model.safetensors"))
    assert ours.keys() == plain.keys()
    assert all(torch.equal(ours[k], plain[k]) for k in ours)

    # The last record is the kNN protocol of `simclr evaluate` on the final checkpoint.
    assert main(["evaluate", str(out), "--data", str(data), "--protocols", "knn",
                 "--device", "cpu"]) == 0
    top1 = next(r["value"] for r in _rows(out) if r["metric"] == "top1")
    assert records[-1]["top1"] == pytest.approx(top1, abs=100 / 30 + 1e-9)

    from simclr_kit.report.html import write_report

    html = write_report(out, embeddings=False).read_text()
    assert 'id="knn-monitor"' in html and "no monitored kNN records" not in html


def test_monitor_knn_needs_labels(tmp_path, capsys):
    from conftest import write_image_folder

    folder = write_image_folder(tmp_path / "imgs", n_per_class=4, size=8)
    # An image folder's class folders are labels; a single unlabelled split is not.
    for path in folder.rglob("*.png"):
        path.rename(folder / path.name)
    assert main(["pretrain", "--data", str(folder), "--out", str(tmp_path / "r"),
                 "--epochs", "1", "--monitor-knn", "1", *TINY]) == 2
    assert "label" in capsys.readouterr().err


@pytest.mark.slow
def test_feature_cache_under_two_ranks(tmp_path):
    """Both ranks embed their shard on a miss (rank 0 writes one file), both read it on a hit,
    and both hold the same features as one process computes."""
    import socket

    import torch.multiprocessing as mp

    import evaluation_workers as workers

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    n = 7  # an odd count: rank 1's shard carries a padding row that must not leak
    mp.start_processes(workers.cache_worker, args=(2, port, n, str(tmp_path)), nprocs=2,
                       start_method="spawn")
    encoder, store = workers.tiny_encoder_and_store(n)
    reference = extract_features(encoder, store.images, encoder.mean, encoder.std)
    assert len(list((tmp_path / "features").glob("*.safetensors"))) == 1
    for r in range(2):
        saved = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        assert saved["hits"].tolist() == [False, True]
        torch.testing.assert_close(saved["first"], reference, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(saved["second"], reference, rtol=1e-5, atol=1e-5)


def test_train_classifier_linear_head_is_evaluates_linear_probe(run, data, tmp_path, capsys):
    """The downstream classifier's frozen linear head and evaluate's linear probe are one
    thing: with both commands' defaults, the same accuracy printed, and the saved classifier
    predicts (from images, through predict's path) what the probe predicts."""
    from simclr_kit.classifier import load_classifier
    from simclr_kit.config import DataConfig
    from simclr_kit.data.splits import open_splits
    from simclr_kit.data.store import decode_split
    from simclr_kit.evaluation.features import forward_images

    assert main(["evaluate", str(run), "--data", str(data), "--out", str(tmp_path / "ev"),
                 "--protocols", "linear", "--device", "cpu"]) == 0
    probe_row = _rows(tmp_path / "ev")[0]
    assert probe_row["hyperparameters"]["steps"] == 2000  # the default recipe, step floor on
    assert f"{probe_row['value']:.2f}%" in capsys.readouterr().out
    assert main(["train-classifier", str(run), "--data", str(data), "--out", str(tmp_path / "c"),
                 "--head", "linear", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    meta = json.loads((tmp_path / "c" / "classifier.json").read_text())
    assert meta["val_accuracy"] == probe_row["value"]
    assert f"validation accuracy {probe_row['value']:.2f}%" in printed
    assert 0 < probe_row["value"] < 100  # noisy labels: agreement is not by saturation
    assert meta["config"]["epochs"] == 100 and meta["config"]["batch_size"] == 256

    encoder = load_encoder(run)
    train_split, val_split = open_splits(DataConfig(data=str(data)), need_eval=True)
    train, val = (decode_split(s, 8, progress=False) for s in (train_split, val_split))
    f_train, f_val = (extract_features(encoder, s.images, encoder.mean, encoder.std)
                      for s in (train, val))
    probe = train_linear_probe(f_train, train.labels, f_val, val.labels, 3)
    model, _ = load_classifier(tmp_path / "c", torch.device("cpu"))
    predicted = forward_images(model, val.images, encoder.mean, encoder.std).argmax(1)
    assert torch.equal(predicted, probe.val_predictions)


def test_train_classifier_mlp_head_folds_the_standardisation(run, data, tmp_path):
    """An mlp head goes through the same trainer; the saved model, fed raw images, scores
    what the trainer reported."""
    from simclr_kit.classifier import load_classifier, train_classifier
    from simclr_kit.config import ClassifierConfig, DataConfig
    from simclr_kit.data.splits import open_splits
    from simclr_kit.data.store import decode_split
    from simclr_kit.evaluation.finetune import accuracy

    train_classifier(run, DataConfig(data=str(data)), tmp_path / "m",
                     ClassifierConfig(head="mlp", hidden_dim=16, min_steps=50), device="cpu",
                     progress=False)
    meta = json.loads((tmp_path / "m" / "classifier.json").read_text())
    assert meta["config"]["min_steps"] == 50
    model, _ = load_classifier(tmp_path / "m", torch.device("cpu"))
    _, val_split = open_splits(DataConfig(data=str(data)), need_eval=True)
    val = decode_split(val_split, 8, progress=False)
    acc = accuracy(model, val.images, val.labels, meta["mean"], meta["std"], "cpu")
    assert acc == pytest.approx(meta["val_accuracy"], abs=1e-4)  # a count / 30, in float32 there
