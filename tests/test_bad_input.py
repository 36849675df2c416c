"""Bad input answers with one line and exit 2, or is skipped, counted and listed; never a traceback.

Everything runs the command line in-process on a few 8 px images.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import datasets
import numpy as np
import pytest
import yaml
from PIL import Image

from simclr_kit.cli import main
from simclr_kit.config import DataConfig, PretrainConfig, from_dict
from simclr_kit.data.splits import open_splits
from simclr_kit.data.store import decode_split

TINY = ["--device", "cpu", "--batch-size", "4", "--image-size", "8", "--epochs", "1",
        "--projection-dim", "8", "--log-every", "1", "--checkpoint-every", "0"]
RED, GREEN, BLUE = (220, 20, 20), (10, 200, 30), (20, 20, 220)


def _one_error_line(capsys: pytest.CaptureFixture) -> str:
    err = [line for line in capsys.readouterr().err.splitlines()
           if line.strip() and "%|" not in line]  # progress bars are not error lines
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    return err[0]


def _exif_rotated_jpeg(path: Path) -> None:
    """Stored 8 wide x 16 tall, top red and bottom blue, with EXIF orientation 6 ("rotate 90
    degrees clockwise to display"): shown upright it is 16 x 8 with blue left, red right."""
    raw = np.zeros((16, 8, 3), np.uint8)
    raw[:8], raw[8:] = RED, BLUE
    img = Image.fromarray(raw)
    exif = img.getexif()
    exif[0x0112] = 6
    img.save(path, "JPEG", quality=95, exif=exif.tobytes())


def _write_mixed_folder(root: Path) -> dict[str, object]:
    """A flat folder of every kind of image, three broken files and two that are not images.

    Returns the expected 8 px decoding of each special image (a colour, or a check function).
    """
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    (root / "a_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + rng.bytes(200))
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / f"b_good{i}.png")
    Image.new("L", (8, 8), 77).save(root / "c_gray.png")
    Image.new("RGBA", (8, 8), GREEN + (128,)).save(root / "d_rgba.png")
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, *BLUE] + [0] * 762)
    pal.save(root / "e_palette.png", transparency=0)
    Image.new("RGB", (8, 8), RED).convert("CMYK").save(root / "f_cmyk.jpg", quality=95)
    Image.fromarray(np.full((8, 8), 32768, np.uint16)).save(root / "g_16bit.png")
    wide = np.zeros((12, 20, 3), np.uint8)  # 20 wide: the centre 12 columns survive the crop
    wide[:, :10], wide[:, 10:] = RED, BLUE
    Image.fromarray(wide).save(root / "h_wide.png")
    Image.new("RGB", (1, 1), GREEN).save(root / "i_1x1.png")
    huge = Image.new("P", (8000, 8000), 0)  # one byte a pixel: cheap to write, 64 Mpx to read
    huge.putpalette([*GREEN] + [0] * 765)
    huge.save(root / "j_huge.png", compress_level=1)
    _exif_rotated_jpeg(root / "k_exif.jpg")
    good = (root / "b_good0.png").read_bytes()
    (root / "l_trunc.png").write_bytes(good[: len(good) // 2])
    (root / "m_empty.jpg").write_bytes(b"")
    (root / "notes.txt").write_text("not an image\n")
    (root / "README.md").write_text("# photos\n")
    return {"c_gray.png": (77, 77, 77), "d_rgba.png": GREEN, "e_palette.png": BLUE,
            "f_cmyk.jpg": RED, "g_16bit.png": (128, 128, 128), "i_1x1.png": GREEN,
            "j_huge.png": GREEN}


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, object]]:
    root = tmp_path_factory.mktemp("mixed") / "photos"
    return root, _write_mixed_folder(root)


@pytest.fixture(scope="module")
def skip_run(mixed, tmp_path_factory) -> tuple[Path, str]:
    """One pretraining run over the mixed folder with the default policy (skip)."""
    out = tmp_path_factory.mktemp("runs") / "run"
    capture = io.StringIO()
    from contextlib import redirect_stdout

    with redirect_stdout(capture):
        rc = main(["pretrain", "--data", str(mixed[0]), "--out", str(out), *TINY])
    assert rc == 0
    return out, capture.getvalue()


def test_skip_policy_counts_names_and_summarises(skip_run):
    out, stdout = skip_run
    rows = [line.split("\t") for line in (out / "skipped.txt").read_text().splitlines()]
    assert rows[0] == ["row", "file", "reason"]
    bad = {Path(f).name for r, f, _ in rows[1:] if int(r) >= 0}
    ignored = {Path(f).name for r, f, _ in rows[1:] if int(r) < 0}
    assert bad == {"a_corrupt.png", "l_trunc.png", "m_empty.jpg"}
    assert ignored == {"notes.txt", "README.md"}
    summary = [line for line in stdout.splitlines() if "unreadable" in line]
    assert len(summary) == 1
    assert "skipped 3 unreadable image(s)" in summary[0] and "kept 15" in summary[0]
    assert "ignored 2 file(s)" in summary[0] and "skipped.txt" in summary[0]
    run = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert run["images"] == 15 and run["dataset"]["skipped"] == 3


def test_every_mode_size_and_orientation_decodes_right(mixed, skip_run):
    root, expected = mixed
    train, _ = open_splits(DataConfig(data=str(root)), need_eval=False)
    store = decode_split(train, 8, progress=False)
    raw = train.dataset.cast_column(train.image_column, datasets.Image(decode=False))
    names = [Path(raw[int(r)][train.image_column]["path"]).name for r in store.row_ids]
    images = {n: store.images[i].permute(1, 2, 0).numpy().astype(int) for i, n in enumerate(names)}
    assert len(images) == 15
    for name, colour in expected.items():
        # JPEG and CMYK round trips move colours a little; the rest is exact up to rounding.
        tol = 12 if name.endswith(".jpg") else 1
        assert np.abs(images[name] - np.array(colour)).max() <= tol, name
    wide = images["h_wide.png"]  # shorter side kept, the centre square cut: red | blue
    assert np.abs(wide[:, :3] - RED).max() <= 1 and np.abs(wide[:, -3:] - BLUE).max() <= 1
    exif = images["k_exif.jpg"]  # orientation applied: blue left, red right (raw: red on top)
    assert exif[:, :3, 2].mean() > 150 and exif[:, :3, 0].mean() < 60
    assert exif[:, -3:, 0].mean() > 150 and exif[:, -3:, 2].mean() < 60


def test_error_policy_stops_at_the_first_and_names_it(mixed, skip_run, tmp_path, capsys):
    rc = main(["pretrain", "--data", str(mixed[0]), "--out", str(tmp_path / "r"),
               "--bad-images", "error", *TINY])
    assert rc == 2
    line = _one_error_line(capsys)
    assert "a_corrupt.png" in line and "--bad-images skip" in line
    assert not (tmp_path / "r").exists()


def test_error_policy_on_embedded_bytes_names_the_row(tmp_path, capsys):
    good = io.BytesIO()
    Image.new("RGB", (8, 8), RED).save(good, "PNG")
    rows = [{"bytes": good.getvalue(), "path": None}] * 5
    rows[3] = {"bytes": good.getvalue()[:30], "path": "x3.png"}
    ds = datasets.Dataset.from_dict({"image": rows}, features=datasets.Features(
        {"image": datasets.Image()}))
    ds.to_parquet(str(tmp_path / "train.parquet"))
    assert main(["pretrain", "--data", str(tmp_path / "train.parquet"), "--out",
                 str(tmp_path / "r"), "--bad-images", "error", *TINY]) == 2
    line = _one_error_line(capsys)
    assert "row 3 of 'train' (x3.png)" in line


def test_all_bad_is_an_error_not_an_empty_run(tmp_path, capsys):
    folder = tmp_path / "bad"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.jpg").write_bytes(os.urandom(64))
    (folder / "notes.txt").write_text("x")
    assert main(["pretrain", "--data", str(folder), "--out", str(tmp_path / "r"), *TINY]) == 2
    line = _one_error_line(capsys)
    assert "none of the 3 images" in line and "nothing to train on" in line
    assert not (tmp_path / "r").exists()


def test_truncated_parquet_file_is_one_line(tmp_path, capsys):
    ds = datasets.Dataset.from_dict({"image": [Image.new("RGB", (8, 8))] * 4},
                                    features=datasets.Features({"image": datasets.Image()}))
    ds.to_parquet(str(tmp_path / "train.parquet"))
    data = (tmp_path / "train.parquet").read_bytes()
    (tmp_path / "train.parquet").write_bytes(data[: len(data) // 2])
    assert main(["pretrain", "--data", str(tmp_path), "--out", str(tmp_path / "r"), *TINY]) == 2
    line = _one_error_line(capsys)
    assert f"cannot read {tmp_path}" in line and "Parquet" in line


# ---- dataset shape -------------------------------------------------------------------------

def _parquet(root: Path, splits: dict[str, list[int | None]], labels: str = "classlabel") -> Path:
    """One Parquet file per split of 8 px images; ``labels`` per row (None/-1: missing)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for split, ys in splits.items():
        feats = {"image": datasets.Image()}
        if labels == "classlabel":
            feats["label"] = datasets.ClassLabel(names=["a", "b", "c"])
        elif labels == "string":
            feats["label"] = datasets.Value("string")
        data = {"image": [Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8))
                          for _ in ys]}
        if labels != "none":
            data["label"] = [str(y) for y in ys] if labels == "string" else ys
        datasets.Dataset.from_dict(data, features=datasets.Features(feats)).to_parquet(
            str(root / f"{split}.parquet"))
    return root


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A run pretrained on a train split where some rows have no label (pretraining needs none)."""
    data = _parquet(tmp_path_factory.mktemp("d") / "pq",
                    {"train": [0, 1, -1, 2, 0, -1, 1, 2], "test": [0, 1, 2, 0, 1, 2]})
    out = tmp_path_factory.mktemp("runs") / "tiny"
    assert main(["pretrain", "--data", str(data), "--out", str(out), *TINY]) == 0
    return out


def test_fewer_images_than_a_batch(tmp_path, capsys):
    data = _parquet(tmp_path / "few", {"train": [None] * 6}, labels="none")
    args = ["pretrain", "--data", str(data), *TINY, "--batch-size", "8"]
    assert main([*args, "--out", str(tmp_path / "r1")]) == 2
    line = _one_error_line(capsys)
    assert "only 6 images, fewer than one batch of 8" in line and "--allow-smaller-batch" in line
    run = tmp_path / "r2"
    assert main([*args, "--out", str(run), "--allow-smaller-batch", "true"]) == 0
    assert "a batch of 6 instead of 8" in capsys.readouterr().out
    # config.yaml keeps the batch the user gave; the run record says the one it trained with
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert (saved["batch_size"], saved["allow_smaller_batch"]) == (8, True)
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert (record["kind"], record["batch_size"], record["steps_per_epoch"]) == ("run", 6, 1)
    # so a resume, from the command line or with the config the run started from, takes the
    # same batch again and needs no rule of its own
    from simclr_kit.train.loop import pretrain

    given = from_dict(PretrainConfig, dict(saved, epochs=2, progress=False))
    assert pretrain(given, resume=run, report=False) == run
    assert main(["pretrain", "--resume", str(run), "--epochs", "3"]) == 0
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["steps_per_epoch"] for r in steps if r["kind"] == "run"] == [1]
    assert max(r.get("step", 0) for r in steps) == 3  # one step of 6 images per epoch


@pytest.mark.parametrize("case,message", [
    ("single class", "single class"),
    ("labels missing", "2 of 6 rows without a label"),
    ("no label column", "6 of 6 rows without a label"),
    ("string labels", "must be a ClassLabel or an integer column"),
    ("missing image column", "image column 'photo' not found"),
    ("image column of numbers", "must hold images"),
])
def test_evaluation_data_shape_errors(tiny_run, tmp_path, capsys, case, message):
    train = [0, 1, 2, 0, 1, 2]
    flags: list[str] = []
    if case == "single class":
        data = _parquet(tmp_path / "d", {"train": train, "test": [1] * 6})
    elif case == "labels missing":
        data = _parquet(tmp_path / "d", {"train": train, "test": [0, -1, 2, 0, -1, 2]})
    elif case == "no label column":
        data = _parquet(tmp_path / "d", {"train": train})
        _parquet(tmp_path / "d", {"test": train}, labels="none")
    elif case == "string labels":
        data = _parquet(tmp_path / "d", {"train": train, "test": train}, labels="string")
        flags = ["--label-column", "label"]
    else:
        data = _parquet(tmp_path / "d", {"train": train, "test": train})
        flags = ["--image-column", "photo" if case == "missing image column" else "label"]
    rc = main(["evaluate", str(tiny_run), "--data", str(data), "--device", "cpu",
               "--protocols", "knn", "--knn-k", "3", *flags])
    assert rc == 2
    assert message in _one_error_line(capsys)


# ---- configuration -------------------------------------------------------------------------

@pytest.mark.parametrize("argv,says,not_said", [
    (["pretrain", "--optimizer", "adamx"],
     ["unknown optimizer 'adamx' (--optimizer): choose from 'lars', 'sgd', 'adam'"],
     "out of range"),
    (["evaluate", "RUN", "--protocols", "knn,lnear"],
     ["unknown protocol 'lnear' (--protocols): choose from 'knn', 'linear', 'finetune', "
      "'fractions'; did you mean 'linear'?"], "subset of"),
    (["pretrain", "--stream", "of"], ["(--stream): choose from 'auto', 'on', 'off'; did you mean "
                                     "'off'?"], "out of range"),
    (["train-classifier", "RUN", "--out", "x", "--head", "mpl"],
     ["unknown head 'mpl' (--head)", "did you mean 'mlp'?"], "out of range"),
    (["pretrain", "--config", "cifar100"],
     ["--config cifar100: no such file, and not a built-in recipe (built-in: cifar10, digits)",
      "did you mean cifar10?"], "does not exist"),
    (["pretrain", "--deterministic", "maybe"],
     ["--deterministic takes true or false", "not 'maybe'"], "unrecognized arguments"),
    (["pretrain", "--resume", "NOSUCH"], ["--resume NOSUCH: no such run directory"],
     "config.yaml"),
])
def test_choice_errors_name_the_flag_and_the_choices(argv, says, not_said, tmp_path, capsys):
    argv = [str(tmp_path / "nosuch") if a == "NOSUCH" else
            str(tmp_path / "run") if a == "RUN" else a for a in argv]
    says = [s.replace("NOSUCH", str(tmp_path / "nosuch")) for s in says]
    assert main(argv) == 2
    line = _one_error_line(capsys)
    assert all(s in line for s in says) and not_said not in line, line


def test_a_misspelled_yaml_key_gets_the_suggestion_not_every_key(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("tempreature: 0.2\n")
    assert main(["pretrain", "--config", str(tmp_path / "c.yaml")]) == 2
    line = _one_error_line(capsys)
    assert "unknown key(s) ['tempreature'] (did you mean 'tempreature' -> 'temperature'?)" in line
    assert "batch_size" not in line and "known keys" not in line


@pytest.mark.parametrize("flags,yaml_text,message", [
    (["--temperature", "0"], None, "temperature = 0.0 is out of range: must be a finite number > 0"),
    (["--temperature", "-0.5"], None, "temperature"),
    (["--batch-size", "1"], None, "batch_size = 1 is out of range: must be an integer >= 2"),
    (["--lr", "0"], None, "lr = 0.0 is out of range: must be a finite number > 0"),
    (["--lr", "-0.001"], None, "lr = -0.001"),
    (["--epochs", "0"], None, "epochs = 0 is out of range: must be an integer >= 1"),
    (["--backbone", "resnet1000"], None, "unknown backbone 'resnet1000'"),
    (["--image-size", "4"], None, "image_size = 4 is out of range: must be an integer in [8, 1024]"),
    ([], "epochs: 1\nlearning_rate: 0.1\n", "unknown key(s) ['learning_rate']"),
    ([], "data:\n  imagesize: 8\n", "config.data: unknown key(s) ['imagesize']"),
    ([], "epochs: ten\n", "epochs = 'ten' has the wrong type: expected int"),
])
def test_config_errors_win_before_any_data_is_read(flags, yaml_text, message, tmp_path, capsys):
    # A folder that exists (a missing path is refused at once, as a config error is) and holds
    # no images: reading it would be an error of its own.
    (tmp_path / "empty").mkdir()
    args = ["pretrain", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "r")]
    if yaml_text is not None:
        (tmp_path / "c.yaml").write_text(yaml_text)
        args += ["--config", str(tmp_path / "c.yaml")]
    assert main(args + flags) == 2
    line = _one_error_line(capsys)
    assert message in line and "empty" not in line  # the data was never looked at
    assert not (tmp_path / "r").exists()


def test_yaml_float_without_a_dot_is_a_number(tmp_path):
    from simclr_kit.config import PretrainConfig, from_dict, load_yaml

    (tmp_path / "c.yaml").write_text("lr: 3e-4\n")  # PyYAML reads this as the string '3e-4'
    assert from_dict(PretrainConfig, load_yaml(tmp_path / "c.yaml")).lr == pytest.approx(3e-4)


def test_debug_shows_the_traceback_otherwise_one_line(capsys):
    for argv in (["--debug", "pretrain", "--temperature", "0"],
                 ["pretrain", "--debug", "--temperature", "0"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "Traceback" in err and err.strip().splitlines()[-1].startswith("simclr pretrain: error")
    assert main(["pretrain", "--epochs", "ten"]) == 2  # a usage error: one line too
    line = _one_error_line(capsys)
    assert "invalid int value: 'ten'" in line and "--help" in line


def test_resume_refuses_flags_it_would_ignore(tiny_run, capsys):
    assert main(["pretrain", "--resume", str(tiny_run), "--lr", "0.01"]) == 2
    line = _one_error_line(capsys)
    saved = PretrainConfig().resolved().lr  # the run was made with the default rate
    assert f"lr ({saved} in its config.yaml, 0.01 now): cannot change when resuming" in line


def test_predict_on_image_files_follows_the_bad_image_policy(tiny_run, tmp_path, capsys):
    data = _parquet(tmp_path / "d", {"train": [0, 1, 2, 0, 1, 2], "test": [0, 1, 2, 0, 1, 2]})
    cls = tmp_path / "cls"
    assert main(["train-classifier", str(tiny_run), "--data", str(data), "--out", str(cls),
                 "--epochs", "1", "--device", "cpu"]) == 0
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (12, 9), RED).save(photos / "a.png")
    (photos / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(40))
    capsys.readouterr()
    assert main(["predict", str(cls), "--data", str(photos), "--out", str(tmp_path / "p.csv")]) == 0
    out = capsys.readouterr().out  # the line pretraining prints for the same folder
    # A folder of new images is named as given, not as the 'train' split the loader made of it.
    assert f"skipped 1 unreadable image(s) in '{photos}/'" in out and "no prediction" in out
    assert "'train'" not in out
    assert (tmp_path / "p.csv").read_text().count("a.png") == 1
    assert "b.png" not in (tmp_path / "p.csv").read_text()
    listed = (tmp_path / "p.skipped.txt").read_text().splitlines()
    assert f"listed in {tmp_path / 'p.skipped.txt'}" in out
    assert listed[0] == "row\tfile\treason" and len(listed) == 2
    assert listed[1].split("\t")[1].endswith("b.png")
    assert main(["predict", str(cls), "--data", str(photos), "--out", str(tmp_path / "q.csv"),
                 "--bad-images", "error"]) == 2
    assert "b.png) is not a readable image" in _one_error_line(capsys)


def test_evaluate_says_what_it_skipped_and_counts_images_not_rows(tiny_run, tmp_path, capsys):
    """A truncated JPEG in each split of an image folder: the skipped line, as pretraining
    prints it, and the counts of the images actually scored (also when decoded from the cache)."""
    rng = np.random.default_rng(3)
    for split in ("train", "test"):
        for label in "abc":
            folder = tmp_path / "photos" / split / label
            folder.mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(
                    folder / f"{i}.png")
        good = io.BytesIO()
        Image.new("RGB", (8, 8), RED).save(good, "JPEG")
        (tmp_path / "photos" / split / "a" / "torn.jpg").write_bytes(good.getvalue()[:60])
    for attempt in ("decoded", "from the cache"):
        capsys.readouterr()
        assert main(["evaluate", str(tiny_run), "--data", str(tmp_path / "photos"), "--out",
                     str(tmp_path / "eval"), "--protocols", "knn", "--knn-k", "3",
                     "--device", "cpu"]) == 0, attempt
        out = capsys.readouterr().out
        listed = tmp_path / "eval" / "eval-skipped.txt"
        for split in ("train", "test"):
            assert f"skipped 1 unreadable image(s) in '{split}' (OSError x1), kept 6; listed " \
                f"in {listed}" in out, (attempt, out)
        assert "evaluation on test (6 images)" in out
        # Each skipped image by split, row, file and reason, as pretraining's skipped.txt.
        lines = [line.split("\t") for line in listed.read_text().splitlines()]
        assert lines[0] == ["split", "row", "file", "reason"]
        assert [(s, Path(f).name) for s, _, f, _ in lines[1:]] == [("train", "torn.jpg"),
                                                                   ("test", "torn.jpg")]
        assert all(f"{s}/a/torn.jpg" in f and why.startswith("OSError")
                   for s, _, f, why in lines[1:])
    report = (tmp_path / "eval" / "eval.md").read_text()
    assert "Train split: `train` (6 images); evaluated split: `test` (6 images)." in report
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    counts = result["eval"]
    assert (counts["rows"], counts["images"], counts["skipped"]) == (7, 6, 1)


def test_a_batch_too_large_for_the_memory_says_what_to_lower(tiny_run, tmp_path, monkeypatch,
                                                             capsys):
    from simclr_kit.train import loop as training

    def no_memory(*args, **kwargs):  # what torch's CPU allocator raises
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: "
                           "can't allocate memory: you tried to allocate 824633720832 bytes. "
                           "Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(training, "simclr_step", no_memory)
    data = _parquet(tmp_path / "d", {"train": [None] * 8}, labels="none")
    assert main(["pretrain", "--data", str(data), "--out", str(tmp_path / "r"), *TINY]) == 2
    line = _one_error_line(capsys)
    assert "out of memory on cpu in a training step of 4 images of 8 px" in line
    assert "lower --batch-size (now 4) or --image-size (now 8)" in line
    assert "--precision" not in line  # no such advice on the CPU


@pytest.mark.parametrize("precision, channels_last, advice", [
    ("fp32", False, ["--precision bf16", "--channels-last true"]),
    ("auto", True, []),  # already bf16 and channels_last on CUDA
])
def test_out_of_memory_on_cuda_also_names_precision_and_layout(precision, channels_last,
                                                               advice):
    import torch

    from simclr_kit.devices import out_of_memory_error

    err = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    # The device as the training loop passes it: resolve_device's, with the rank's index.
    error = out_of_memory_error(err, torch.device("cuda", 0), 4096, 8, 224, precision,
                                channels_last)
    assert error is not None
    text = str(error)
    assert "out of memory on cuda:0 in a training step of 512 images of 224 px" in text
    assert "lower --batch-size (now 4096, 512 per process) or --image-size (now 224)" in text
    assert all(a in text for a in advice) and ("--precision" in text) == bool(advice)
    assert out_of_memory_error(RuntimeError("shape mismatch"), torch.device("cuda", 0), 8, 1,
                               32, "auto", True) is None


@pytest.fixture(scope="module")
def classifier(tiny_run, tmp_path_factory) -> Path:
    data = _parquet(tmp_path_factory.mktemp("cd") / "pq",
                    {"train": [0, 1, 2, 0, 1, 2], "test": [0, 1, 2, 0, 1, 2]})
    out = tmp_path_factory.mktemp("cls") / "cls"
    assert main(["train-classifier", str(tiny_run), "--data", str(data), "--out", str(out),
                 "--epochs", "1", "--device", "cpu"]) == 0
    return out


@pytest.mark.parametrize("edit, message", [
    (lambda m: dict(m, class_names=m["class_names"] + ["d", "e"]),
     "does not fit the classifier its metadata describes"),
    (lambda m: dict(m, feature_dim=64), "does not fit the classifier its metadata describes"),
    (lambda m: {k: v for k, v in m.items() if k != "feature_dim"},
     "its metadata lacks feature_dim"),
    (lambda m: dict(m, head="deep"), "head = 'deep', not 'linear' or 'mlp'"),
], ids=["classes", "feature-dim", "no-feature-dim", "head"])
def test_predict_with_a_classifier_its_metadata_does_not_describe(classifier, tmp_path, capsys,
                                                                  edit, message):
    from simclr_kit.checkpoint_files import load_weights, read_metadata, save_weights

    file = tmp_path / "cls" / "classifier.safetensors"
    file.parent.mkdir()
    source = classifier / "classifier.safetensors"
    meta = {k: v for k, v in read_metadata(source).items() if k != "format"}
    save_weights(file, load_weights(source), edit(meta))
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (8, 8), RED).save(photos / "a.png")
    capsys.readouterr()
    assert main(["predict", str(file.parent), "--data", str(photos), "--out",
                 str(tmp_path / "p.csv")]) == 2
    assert message in _one_error_line(capsys)


def test_imagenet_init_without_its_weights_fails_before_any_data_is_read(tmp_path, monkeypatch,
                                                                         capsys):
    from simclr_kit.train import prepare as trainer

    def read(*args, **kwargs):
        raise AssertionError("the data was read before the weights were checked")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty hub cache; offline
    monkeypatch.setattr(trainer, "_load_data", read)
    data = _parquet(tmp_path / "d", {"train": [None] * 8}, labels="none")
    assert main(["pretrain", "--data", str(data), "--out", str(tmp_path / "r"), *TINY,
                 "--init", "imagenet"]) == 2
    line = _one_error_line(capsys)
    assert "ImageNet weights for resnet18 are not in the local cache" in line
    assert "resnet18-" in line and str(tmp_path / "torch") in line
