"""Every source kind opens through `datasets`, columns are found by type, images become RGB."""

from __future__ import annotations

import io

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_class_images, needs_shared
from simclr_kit.config import DataConfig
from simclr_kit.data import sources
from simclr_kit.data.pixels import resize_center_crop, to_rgb_array
from simclr_kit.data.splits import open_splits
from simclr_kit.data.store import decode_split
from simclr_kit.errors import UserError


def _decode(cfg: DataConfig, need_eval: bool = True):
    train, evaluation = open_splits(cfg, need_eval)
    return (decode_split(train, cfg.image_size, progress=False),
            decode_split(evaluation, cfg.image_size, progress=False) if evaluation else None)


def test_digits_scaled_to_255_and_stratified_validation():
    from sklearn.datasets import load_digits

    train, val = _decode(DataConfig(data="digits"))
    assert len(train) + len(val) == 1797 and len(val) == 360
    assert train.image_size == 8 and train.images.dtype == torch.uint8
    assert int(train.images.max()) == 255  # 16 -> 255, not left at 0-16
    # Stratified: each class's share of the validation part matches its share overall.
    counts = np.bincount(load_digits().target, minlength=10) / 1797
    np.testing.assert_allclose(np.bincount(val.labels.numpy(), minlength=10) / 360, counts, atol=0.01)
    # Exact pixels: each stored image is a digit scaled by 255/16, in all three channels.
    digits = load_digits().images
    first = train.images[0, 0].numpy().astype(float)
    match = [i for i in range(1797) if np.array_equal(np.round(digits[i] * 255 / 16), first)]
    assert match and torch.equal(train.images[0, 0], train.images[0, 2])


def test_parquet_folder_with_cifar_like_columns(parquet_dir):
    train, test = _decode(DataConfig(data=str(parquet_dir)))
    assert train.provenance["image_column"] == "img" and train.provenance["split"] == "train"
    assert test.provenance["split"] == "test" and train.class_names == ["c0", "c1", "c2"]
    assert train.images.shape == (36, 3, 12, 12) and sorted(set(train.labels.tolist())) == [0, 1, 2]


def test_parquet_glob_and_save_to_disk(parquet_dir, tmp_path):
    # A single labelled split: a stratified validation part is held out, pretraining included.
    train, val = _decode(DataConfig(data=str(parquet_dir / "train*.parquet")))
    assert len(train) + len(val) == 36 and "carved" in val.provenance["split"]
    counts = np.bincount(val.labels.numpy(), minlength=3)
    assert counts.min() >= 2 and counts.max() - counts.min() <= 1
    full_train, _ = _decode(DataConfig(data=str(parquet_dir)))
    ds = datasets.load_dataset("parquet", data_dir=str(parquet_dir))
    ds.save_to_disk(str(tmp_path / "saved"))
    saved_train, saved_test = _decode(DataConfig(data=str(tmp_path / "saved")))
    assert torch.equal(saved_train.images, full_train.images)
    assert len(saved_test) == 36


def test_image_folder_labelled_and_flat(image_folder, tmp_path):
    train, val = _decode(DataConfig(data=str(image_folder), val_fraction=0.25))
    assert len(train) + len(val) == 36 and train.class_names == ["class_0", "class_1", "class_2"]
    flat = tmp_path / "flat"
    flat.mkdir()
    for i, img in enumerate(make_class_images(4, 2)[0]):
        Image.fromarray(img).save(flat / f"{i}.png")
    store, none = _decode(DataConfig(data=str(flat)), need_eval=False)
    assert len(store) == 8 and store.labels is None and none is None
    with pytest.raises(UserError, match="no label"):
        _decode(DataConfig(data=str(flat)), need_eval=True)


def test_column_overrides_and_missing_columns(parquet_dir):
    with pytest.raises(UserError, match="image column 'image' not found"):
        _decode(DataConfig(data=str(parquet_dir), image_column="image"))
    train, _ = _decode(DataConfig(data=str(parquet_dir), image_column="img", label_column="label"))
    assert len(train) == 36


@pytest.mark.parametrize("spelling,hint", [
    ("data/unlabelled", "did you mean data/unlabeled?"),  # data/ exists: a path, not a hub id
    ("./data/unlabelled", "did you mean ./data/unlabeled?"),
    ("data/unlabelled/", "did you mean data/unlabeled?"),
    ("./no/such/folder", ""),
    ("photos.parquet", ""),
])
def test_a_mistyped_path_fails_at_once_without_asking_the_hub(spelling, hint, tmp_path,
                                                              monkeypatch):
    (tmp_path / "data" / "unlabeled").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    asked = []
    monkeypatch.setattr(sources, "_load_hub", lambda cfg, near="": asked.append(cfg.data))
    with pytest.raises(UserError, match="no such file or folder") as err:
        open_splits(DataConfig(data=spelling), need_eval=False)
    assert hint in str(err.value) and asked == []
    assert ("hub id" in str(err.value)) == (spelling == "data/unlabelled")


def test_local_folders_load_without_the_loaders_progress_bars(tmp_path, monkeypatch):
    """Nothing is downloaded from a local folder: the loader's "Downloading data" and
    "Generating train split" bars are off while it reads one, and on again afterwards."""
    from conftest import write_image_folder

    folder = write_image_folder(tmp_path / "photos", n_per_class=5, classes=2, size=8)
    bars_while_loading = []
    real = datasets.load_dataset

    def load(*args, **kwargs):
        bars_while_loading.append(not datasets.are_progress_bars_disabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", load)
    datasets.enable_progress_bars()
    open_splits(DataConfig(data=str(folder)), need_eval=False)
    assert bars_while_loading == [False] and not datasets.are_progress_bars_disabled()


def test_a_name_that_may_be_a_hub_id_goes_to_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    asked = []
    monkeypatch.setattr(sources, "_load_hub", lambda cfg, near="": asked.append(cfg.data) or
                        sources.digits_dataset())
    for name in ("cifar10", "uoft-cs/cifar10"):
        open_splits(DataConfig(data=name), need_eval=False)
    assert asked == ["cifar10", "uoft-cs/cifar10"]


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG" if img.mode != "CMYK" else "JPEG")
    return buf.getvalue()


def test_any_mode_becomes_rgb():
    rgb = np.zeros((6, 6, 3), np.uint8)
    rgb[..., 0] = 200
    for mode in ("L", "RGBA", "P", "CMYK", "1"):
        arr = to_rgb_array(Image.open(io.BytesIO(_png_bytes(Image.fromarray(rgb).convert(mode)))))
        assert arr.shape == (6, 6, 3) and arr.dtype == np.uint8
    wide = Image.fromarray(np.full((4, 4), 65535, np.uint16))  # 16-bit white
    assert to_rgb_array(wide).min() == 255
    half = Image.fromarray(np.full((4, 4), 32768, np.uint16))
    assert abs(int(to_rgb_array(half)[0, 0, 0]) - 128) <= 1  # scaled, not clipped to 255


def test_resize_shorter_side_and_centre_crop():
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, 10:30] = 255  # the centre square of a 20x40 image
    out = resize_center_crop(arr, 10)
    assert out.shape == (10, 10, 3) and out[:, 1:-1].min() == 255 and out.min() > 200
    same = np.random.default_rng(0).integers(0, 255, (10, 10, 3)).astype(np.uint8)
    assert resize_center_crop(same, 10) is same  # already at size: untouched


def test_shared_cifar10_mini_just_works():
    path = needs_shared("cifar10-mini")
    train, test = _decode(DataConfig(data=str(path)))
    assert train.images.shape == (1000, 3, 32, 32) and len(test) == 200
    assert train.num_classes == 10 and train.provenance["image_column"] == "img"


def test_unreachable_hub_id_is_one_clear_error():
    # conftest sets HF_HUB_OFFLINE=1, so nothing is requested.
    with pytest.raises(UserError, match="hub dataset could not be reached"):
        open_splits(DataConfig(data="someone/some-images"), need_eval=False)


@pytest.mark.parametrize("spelling,hint", [
    ("unlabelled", "(did you mean unlabeled?)"),  # next to unlabeled/
    ("data/unlabelled", "(did you mean unlabeled?)"),  # no data/ either: names of this folder
])
def test_a_name_looked_up_on_the_hub_says_so_first_with_near_local_names(
        spelling, hint, tmp_path, monkeypatch, capsys):
    (tmp_path / "unlabeled").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="could not be reached") as err:
        open_splits(DataConfig(data=spelling), need_eval=False)
    assert hint in str(err.value)
    said = capsys.readouterr().err.splitlines()
    assert said == [f"{spelling!r} is not a file or folder here {hint}: looking it up on the "
                    "Hugging Face hub (its local cache only: HF_HUB_OFFLINE)"]


def test_an_unreachable_hub_is_announced_then_refused_in_one_line(tmp_path):
    """With the network allowed but nothing listening at the hub's address, the command says
    first that it looks the name up on the hub, then stops with one error that repeats the
    near local name."""
    import os
    import subprocess
    import sys

    (tmp_path / "unlabeled").mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"  # the discard port: nothing listens
    done = subprocess.run([sys.executable, "-m", "simclr_kit", "pretrain", "--data",
                           "unlabelled", "--device", "cpu"], cwd=tmp_path, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          timeout=300)
    lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 2, lines
    assert lines[0] == ("'unlabelled' is not a file or folder here (did you mean unlabeled?): "
                        "looking it up on the Hugging Face hub (http://127.0.0.1:9)")
    assert lines[1].startswith("simclr pretrain: error: cannot load 'unlabelled': it is not a "
                               "file or folder here (did you mean unlabeled?), and the hub "
                               "(http://127.0.0.1:9) could not be reached"), lines


def test_a_hub_that_never_answers_is_given_up_on_before_the_loader_runs(tmp_path, monkeypatch):
    """A hub address that accepts the connection and then says nothing (a network that drops
    the packets): one request bounded by HUB_CONNECT_SECONDS decides, and datasets.load_dataset,
    whose retries wait for half a minute, is never called."""
    import socket

    import huggingface_hub

    loads: list[tuple] = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: loads.append(a))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(sources, "HUB_CONNECT_SECONDS", 0.5)
    monkeypatch.chdir(tmp_path)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)  # the kernel completes the handshake; nothing ever reads or answers
        endpoint = f"http://127.0.0.1:{server.getsockname()[1]}"
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", endpoint)
        with pytest.raises(UserError, match=rf"the hub \({endpoint}\) could not be reached in "
                                            r"0.5 s \(\w*Timeout\)"):
            open_splits(DataConfig(data="someone/images"), need_eval=False)
    assert loads == []


def test_one_split_rule_with_each_commands_preference():
    from simclr_kit.data.splits import EVAL_SPLITS, PREDICT_SPLITS, TRAIN_SPLITS, pick_split

    names = ["train", "test"]
    assert pick_split(names, None, TRAIN_SPLITS, "--train-split") == "train"
    assert pick_split(names, None, PREDICT_SPLITS, "--split") == "test"
    assert pick_split(names, None, EVAL_SPLITS, "--eval-split", required=False) == "test"
    assert pick_split(names, "train", PREDICT_SPLITS, "--split") == "train"  # named wins
    assert pick_split(["photos"], None, PREDICT_SPLITS, "--split") == "photos"  # the only one
    assert pick_split(["a", "b"], None, EVAL_SPLITS, "--eval-split", required=False) is None
    with pytest.raises(UserError, match="no 'train' split among .* choose one with --train-split"):
        pick_split(["a", "b"], None, TRAIN_SPLITS, "--train-split")
    with pytest.raises(UserError, match=r"split 'x' not found; .* \(choose with --split\)"):
        pick_split(names, "x", PREDICT_SPLITS, "--split")



def _forbid_row_reads(monkeypatch) -> None:
    """Reading a column one Python object per row (slow at 1.28 M rows) becomes an error."""
    def refuse(*args, **kwargs):
        raise AssertionError("a column was read row by row")

    monkeypatch.setattr(datasets.arrow_dataset.Column, "__getitem__", refuse)
    monkeypatch.setattr(datasets.arrow_dataset.Column, "__iter__", refuse)


def _labelled_parquet(folder, labels, label_feature) -> datasets.Dataset:
    """``folder/train.parquet``: 4 px images with ``labels`` and an ``id`` column (the row
    number); row 1's image is broken, so decoding skips it. Returns the split as loaded."""
    rng = np.random.default_rng(0)
    images = [{"bytes": _png_bytes(Image.fromarray(rng.integers(0, 255, (4, 4, 3), np.uint8))),
               "path": None} for _ in labels]
    images[1] = {"bytes": b"not an image", "path": None}
    features = datasets.Features({"image": datasets.Image(), "label": label_feature,
                                  "id": datasets.Value("int64")})
    folder.mkdir(parents=True)
    datasets.Dataset.from_dict({"image": images, "label": labels, "id": list(range(len(labels)))},
                               features=features).to_parquet(str(folder / "train.parquet"))
    return datasets.load_dataset("parquet", data_dir=str(folder))["train"]


@pytest.mark.parametrize("feature", [datasets.ClassLabel(names=list("abcd")),
                                     datasets.Value("int32")])
@pytest.mark.parametrize("val_fraction, seed", [(0.2, 0), (0.35, 7)])
def test_a_carved_split_reads_its_labels_as_one_column(tmp_path, monkeypatch, feature,
                                                       val_fraction, seed):
    """The carved rows are those of datasets' own ``train_test_split`` (stratified by a
    ClassLabel column), and the labels of the kept rows are the column's, at no per-row read."""
    labels = [i % 4 for i in range(40)]
    ds = _labelled_parquet(tmp_path / "pq", labels, feature)
    stratify = "label" if isinstance(feature, datasets.ClassLabel) else None
    want = ds.train_test_split(test_size=val_fraction, seed=seed, stratify_by_column=stratify)
    cfg = DataConfig(data=str(tmp_path / "pq"), label_column="label",
                     val_fraction=val_fraction, split_seed=seed)
    _forbid_row_reads(monkeypatch)
    train, val = open_splits(cfg, need_eval=True)
    stores = [decode_split(part, progress=False) for part in (train, val)]
    monkeypatch.undo()
    for part, store, reference in zip((train, val), stores, (want["train"], want["test"])):
        ids = list(part.dataset["id"])
        assert ids == list(reference["id"])
        assert store.labels.tolist() == [labels[ids[r]] for r in store.row_ids.tolist()]
    assert 1 in list(train.dataset["id"]) + list(val.dataset["id"])  # the broken row: skipped
    assert len(stores[0]) + len(stores[1]) == 39
    assert train.class_names == (list("abcd") if stratify else ["0", "1", "2", "3"])


@pytest.mark.parametrize("feature", [datasets.Value("int64"), datasets.Value("uint8")])
def test_missing_labels_read_as_one_column(tmp_path, monkeypatch, feature):
    from simclr_kit.data.splits import TRAIN_SPLITS, whole_split

    labels = [2, 0, None, 5, 1, None, 3, 7]
    if feature.dtype == "int64":
        labels[3] = -1  # "no label" on the hub
    _labelled_parquet(tmp_path / "pq", labels, feature)
    cfg = DataConfig(data=str(tmp_path / "pq"), label_column="label")
    _forbid_row_reads(monkeypatch)
    split = whole_split(cfg, TRAIN_SPLITS)
    store = decode_split(split, progress=False, missing_labels="keep")
    kept = [0] + list(range(2, 8))  # row 1's image is broken
    assert store.row_ids.tolist() == kept
    assert store.labels.tolist() == [-1 if labels[r] is None or labels[r] < 0 else labels[r]
                                     for r in kept]
    assert split.class_names == [str(i) for i in range(8)]
    missing = sum(labels[r] is None or labels[r] < 0 for r in kept)
    with pytest.raises(UserError, match=f"has {missing} of 7 rows without a label in 'label'"):
        decode_split(split, progress=False)


def test_a_class_too_small_to_stratify_is_one_clear_error(tmp_path):
    _labelled_parquet(tmp_path / "pq", [0, 0, 0, 0, 1, 1, 1, 2],
                      datasets.ClassLabel(names=list("abc")))
    with pytest.raises(UserError, match="cannot split off a validation part"):
        open_splits(DataConfig(data=str(tmp_path / "pq")), need_eval=True)
