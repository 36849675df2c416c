"""Metric sinks: MetricsLog forwards every record; a missing library is a one-line error."""

from __future__ import annotations

from importlib.util import find_spec

import pytest

from simclr_kit.cli import main
from simclr_kit.errors import UserError
from simclr_kit.report import loggers
from simclr_kit.report.metrics import MetricsLog, read_metrics


class RecordingSink:
    def __init__(self) -> None:
        self.records: list[tuple[str, dict]] = []
        self.closed = False

    def write(self, kind: str, values: dict) -> None:
        self.records.append((kind, values))

    def close(self) -> None:
        self.closed = True


def test_metrics_log_forwards_every_record_and_closes(tmp_path):
    sink = RecordingSink()
    log = MetricsLog(tmp_path / "metrics.jsonl", [sink])
    log.write("train", epoch=0, step=3, loss=4.5, lr=0.1)
    log.write("knn", epoch=1, top1=55.0)
    log.close()
    assert [r for r in read_metrics(tmp_path / "metrics.jsonl")] == [v for _, v in sink.records]
    assert sink.closed and [k for k, _ in sink.records] == ["train", "knn"]
    assert loggers.scalars(sink.records[0][1]) == {"loss": 4.5, "lr": 0.1}


def test_a_torn_last_line_does_not_swallow_the_next_record(tmp_path):
    """A kill mid-write leaves half a line; the record written after a resume stays readable."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"kind": "train", "step": 1}\n{"kind": "train", "st')
    log = MetricsLog(path)
    log.write("resume", epoch=0)
    log.write("train", step=2)
    assert [(r["kind"], r.get("step")) for r in read_metrics(path)] == [
        ("train", 1), ("resume", None), ("train", 2)]


def test_missing_library_is_a_one_line_error_before_any_data(tmp_path, monkeypatch, capsys):
    # Whatever is installed here: tensorboard present, wandb missing.
    real = find_spec
    present = real("json")
    monkeypatch.setattr(loggers.importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else
                        present if name == "tensorboard" else real(name, *a))
    with pytest.raises(UserError, match=r"pip install 'simclr-kit\[wandb\]'"):
        loggers.check_loggers(["wandb"])
    # A folder without images (reading it would be an error of its own): the logger error
    # comes first, before any data is read.
    (tmp_path / "empty").mkdir()
    code = main(["pretrain", "--data", str(tmp_path / "empty"), "--logger", "tensorboard,wandb",
                 "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "empty" not in err
    assert "--logger wandb needs the wandb package" in err and not (tmp_path / "run").exists()
    assert main(["pretrain", "--logger", "neptune", "--out", str(tmp_path / "r")]) == 2
    assert "unknown logger 'neptune'" in capsys.readouterr().err


@pytest.mark.skipif(find_spec("tensorboard") is None, reason="tensorboard is not installed")
def test_tensorboard_sink_writes_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = MetricsLog(tmp_path / "metrics.jsonl",
                     loggers.open_loggers(["tensorboard"], tmp_path, {"epochs": 1}))
    for step in (1, 2, 3):
        log.write("train", epoch=0, step=step, loss=5.0 - step, lr=0.01 * step)
    log.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 4.0), (2, 3.0),
                                                                         (3, 2.0)]


def fake_module(monkeypatch, name: str, **attrs):
    """A stand-in library in sys.modules, found by find_spec like an installed one."""
    import importlib.machinery
    import sys
    import types

    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    for key, value in attrs.items():
        setattr(module, key, value)
    monkeypatch.setitem(sys.modules, name, module)
    return module


def test_wandb_and_mlflow_sinks_call_their_libraries(tmp_path, monkeypatch):
    calls: list[tuple] = []

    class Run:
        def log(self, data, step=None):
            calls.append(("wandb.log", data, step))

        def finish(self):
            calls.append(("wandb.finish",))

    fake_module(monkeypatch, "wandb", init=lambda **kw: calls.append(("wandb.init", kw)) or Run())
    fake_module(monkeypatch, "mlflow",
                set_tracking_uri=lambda uri: calls.append(("mlflow.uri", uri)),
                start_run=lambda run_name: calls.append(("mlflow.start", run_name)),
                log_params=lambda params: calls.append(("mlflow.params", params)),
                log_metrics=lambda data, step: calls.append(("mlflow.metrics", data, step)),
                end_run=lambda: calls.append(("mlflow.end",)))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = tmp_path / "run"
    log = MetricsLog(run_dir / "metrics.jsonl", loggers.open_loggers(
        ["wandb", "mlflow"], run_dir, {"epochs": 2, "data": {"data": "digits"}}))
    log.write("train", epoch=0, step=7, loss=3.5, lr=0.2)
    log.close()
    assert calls[0][0] == "wandb.init" and calls[0][1]["config"]["epochs"] == 2
    assert ("mlflow.params", {"epochs": 2, "data.data": "digits"}) in calls
    assert ("wandb.log", {"train/loss": 3.5, "train/lr": 0.2}, 7) in calls
    assert ("mlflow.metrics", {"train/loss": 3.5, "train/lr": 0.2}, 7) in calls
    assert calls[-2:] == [("wandb.finish",), ("mlflow.end",)]
