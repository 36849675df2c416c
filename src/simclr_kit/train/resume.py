"""Whether a run may be resumed with a given config, decided before anything is read or written.

A resumed run continues the run it was: the config may differ from the saved ``config.yaml``
only in how long it trains, where and how it reports (:data:`RESUMABLE_FIELDS`), and a run that
has already trained its epochs is left exactly as it is. The command line and the Python API
(``pretrain(config, resume=RUN)``) both go through :func:`check_resume`. Once the data is read,
:func:`check_same_data` refuses data that changed under the same name (a regenerated Parquet
file, a folder with files added), unless asked to continue on it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from simclr_kit.config import (DataConfig, PretrainConfig, flag_name, flatten, from_dict, load_yaml,
                               marked, merge, to_dict)
from simclr_kit.errors import UserError

# Fields a resume may change, as their declarations mark them (setting(..., resumable=True));
# every other one is the run's own. --help, the README and the error of a refused resume name
# their flags (resumable_flags).
RESUMABLE_FIELDS = marked(PretrainConfig, "resumable")


def resumable_flags() -> list[str]:
    """The flags of :data:`RESUMABLE_FIELDS` (``progress`` has no flag to name)."""
    flags = []
    for name in RESUMABLE_FIELDS:
        cls, field = (DataConfig, name[5:]) if name.startswith("data.") else (PretrainConfig, name)
        flag = flag_name(cls, field)
        if flag:
            flags.append(flag)
    return flags


def resumable_text() -> str:
    """"--epochs, --device, ... and --decode-workers", as --help and the errors list them."""
    flags = resumable_flags()
    return f"{', '.join(flags[:-1])} and {flags[-1]}"


def saved_config(run_dir: Path) -> dict[str, Any]:
    """The run's ``config.yaml`` as a dict."""
    if not Path(run_dir).exists():
        raise UserError(f"--resume {run_dir}: no such run directory")
    file = Path(run_dir) / "config.yaml"
    if not file.is_file():
        raise UserError(f"--resume {run_dir}: no config.yaml there, so it is not a run directory")
    return load_yaml(file, PretrainConfig)


def resume_config(run_dir: Path, changes: dict[str, Any]) -> PretrainConfig:
    """The saved config with ``changes`` (a nested dict of fields) laid over it; whether those
    changes are allowed is :func:`check_resume`'s to say. Without an ``epochs`` change the run
    goes on to the length it was last given: a run extended with ``--epochs`` and then
    interrupted continues to that length, not to the one in its ``config.yaml``."""
    from simclr_kit.checkpoint_files import latest_checkpoint, load_train_state  # torch: lazily

    saved = saved_config(run_dir)
    ckpt = latest_checkpoint(run_dir, required=False)
    if "epochs" not in changes and ckpt is not None:
        target = load_train_state(ckpt).get("total_epochs")
        if isinstance(target, int) and not saved.get("time_budget"):
            saved["epochs"] = target
    return from_dict(PretrainConfig, merge(saved, changes))


def _changed_fields(run_dir: Path, saved: PretrainConfig, config: PretrainConfig) -> list[str]:
    before, now = flatten(to_dict(saved)), flatten(to_dict(config))
    changed = []
    for name, value in now.items():
        if name in RESUMABLE_FIELDS or before.get(name) == value:
            continue
        if name == "out" and (value is None or Path(value).resolve() == run_dir.resolve()):
            continue  # the run directory is the one being resumed, whatever it was called
        changed.append(f"{name} ({before.get(name)!r} in its config.yaml, {value!r} now)")
    return changed


def _epochs(n: int) -> str:
    return f"{n} epoch" + ("" if n == 1 else "s")


def _check_epochs_left(run_dir: Path, config: PretrainConfig) -> None:
    """Refuse a run that has trained its last epoch: resuming it would only save the same
    weights again and replace its report and metrics with a session that did nothing."""
    from simclr_kit.checkpoint_files import latest_checkpoint, load_train_state  # torch: lazily

    ckpt = latest_checkpoint(run_dir, required=False)
    if ckpt is None:
        return  # killed before its first checkpoint: it starts again from the beginning
    state = load_train_state(ckpt)
    epoch, step = int(state.get("epoch", 0)), int(state.get("step_in_epoch", 0))
    total = config.epochs
    if config.time_budget is not None and state.get("budget_fitted"):
        total = int(state.get("total_epochs", total))
        if epoch >= total:
            raise UserError(f"{run_dir} is complete ({_epochs(epoch)}, the length its "
                            "--time-budget chose); nothing was changed. To train further, start "
                            f"a new run from its weights with --init {run_dir}")
    if epoch < total:
        return
    if epoch == total and step == 0:
        raise UserError(f"{run_dir} is complete ({_epochs(epoch)}); nothing was changed. Use "
                        f"--epochs M with M > {epoch} to extend it")
    done = _epochs(epoch) + (f" and {step} steps" if step else "")
    raise UserError(f"{run_dir} has trained {done}, more than the {total} asked for now; "
                    f"nothing was changed. Use --epochs M with M > {epoch} to extend it")


def check_resume(run_dir: Path, config: PretrainConfig) -> None:
    """Raise a one-line UserError, before any data is read, unless ``run_dir`` can continue
    with ``config``: same fields as its ``config.yaml`` outside :data:`RESUMABLE_FIELDS`, and
    epochs left to train."""
    run_dir = Path(run_dir)
    saved = from_dict(PretrainConfig, saved_config(run_dir), f"{run_dir / 'config.yaml'}")
    changed = _changed_fields(run_dir, saved, config)
    if changed:
        raise UserError(f"{'; '.join(changed)}: cannot change when resuming {run_dir} (only "
                        f"{resumable_text()} can); start a new run for that")
    _check_epochs_left(run_dir, config)


def check_same_data(run_dir: Path, provenance: dict[str, Any],
                    allow_changed: bool = False) -> tuple[str, str] | None:
    """Compare the dataset fingerprint recorded in the latest checkpoint of ``run_dir`` with the
    data read now (``provenance``, the store's). Changed data is a one-line UserError naming
    both, unless ``allow_changed``; then ``(before, now)`` is returned (None when unchanged,
    or when nothing was recorded: a run killed before its first checkpoint starts afresh)."""
    from tqdm.auto import tqdm

    from simclr_kit import distributed
    from simclr_kit.checkpoint_files import latest_checkpoint, read_metadata  # torch: lazily

    ckpt = latest_checkpoint(run_dir, required=False)
    if ckpt is None:
        return None
    recorded = read_metadata(ckpt / "model.safetensors").get("dataset")
    before = recorded.get("fingerprint") if isinstance(recorded, dict) else None
    now = provenance.get("fingerprint")
    if before is None or before == now:
        return None
    what = (f"the training data {provenance.get('source')!r} changed since {ckpt.name} was "
            f"saved (dataset fingerprint {before} then, {now} now; "
            f"{recorded.get('rows')} rows then, {provenance.get('rows')} now)")
    if not allow_changed:
        raise UserError(f"{what}: resuming would continue on other images in another order. "
                        "Put the data back, start a new run, or pass --allow-changed-data to "
                        f"continue {run_dir} on the new data")
    if distributed.is_main():
        tqdm.write(f"{what}: continuing on the new data (--allow-changed-data)")
    return str(before), str(now)
